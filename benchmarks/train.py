"""The one training loop every method shares: AdamW, linear warmup + decay (transformers' `get_scheduler`),
gradient clipping at 1.0, the same batches in the same order, and — for AdaLoRA — PEFT's `update_and_allocate`
after every optimizer step (before `zero_grad`, as PEFT documents it)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .tasks import Batch


@dataclass
class TrainResult:
    train_s: float
    step_s: float  # median seconds per optimizer step (robust to the shared machine's noise)
    steps: int
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    adalora_calls: int = 0


def make_optimizer(model: torch.nn.Module, lr: float, loraplus_ratio: float | None) -> torch.optim.Optimizer:
    """AdamW (weight decay 0) on the trainable parameters; with LoRA+ PEFT's `create_loraplus_optimizer`."""
    if loraplus_ratio:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(
            model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=loraplus_ratio, weight_decay=0.0
        )
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def train(
    model: torch.nn.Module,
    batches: list[Batch],
    *,
    lr: float,
    warmup_ratio: float = 0.1,
    scheduler: str = "linear",
    loraplus_ratio: float | None = None,
    adalora: bool = False,
    max_grad_norm: float = 1.0,
) -> TrainResult:
    """One pass over `batches` (one optimizer step per batch)."""
    from transformers import get_scheduler

    steps = len(batches)
    optimizer = make_optimizer(model, lr, loraplus_ratio)
    sched = get_scheduler(scheduler, optimizer, num_warmup_steps=round(warmup_ratio * steps), num_training_steps=steps)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    curve: list[tuple[int, float]] = []
    step_times: list[float] = []
    calls = 0
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        sched.step()
        if adalora:
            model.base_model.update_and_allocate(step)
            calls += 1
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)
        value = float(loss.detach())
        if not torch.isfinite(torch.tensor(value)):
            raise FloatingPointError(f"loss is {value} at step {step}")
        curve.append((step + 1, round(value, 5)))
    train_s = time.perf_counter() - start
    timed = step_times[1:] if len(step_times) > 1 else step_times
    return TrainResult(train_s, statistics.median(timed), steps, curve, calls)


def describe(result: TrainResult) -> dict[str, Any]:
    return {"train_s": result.train_s, "step_s": result.step_s, "steps": result.steps}
