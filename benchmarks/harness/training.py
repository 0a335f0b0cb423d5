"""The one training loop every method shares: AdamW (weight decay 0; with LoRA+ `gora.app.train.make_optimizer`,
i.e. PEFT's `create_loraplus_optimizer`), linear warmup + decay (transformers' `get_scheduler`), gradient clipping at
1.0, the same batches in the same order, and — for AdaLoRA — PEFT's `update_and_allocate` after every optimizer
step (before `zero_grad`, as PEFT documents it).

A non-finite loss stops training: the result says `diverged` (a learning rate that diverges is a result of the
tuning, not an error to retry).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gora.app.adapters import make_optimizer

from .tasks import Batch


@dataclass
class TrainResult:
    train_s: float
    step_s: float  # median seconds per optimizer step (robust to the shared machine's noise)
    steps: int
    loss_curve: list[tuple[int, float | None]] = field(default_factory=list)
    adalora_calls: int = 0
    diverged: bool = False
    train_cpu_s: float = 0.0  # CPU time of this process while training (less sensitive to a busy machine)


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
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> TrainResult:
    """One optimizer step per batch of `batches` (every epoch, in order); each forward under `autocast()` when given
    (bf16 on CUDA), the backward and optimizer step outside it."""
    from transformers import get_scheduler

    steps = len(batches)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, learning_rate=lr, loraplus_lr_ratio=loraplus_ratio) or torch.optim.AdamW(
        params, lr=lr, weight_decay=0.0
    )
    sched = get_scheduler(scheduler, optimizer, num_warmup_steps=round(warmup_ratio * steps), num_training_steps=steps)
    model.train()
    curve: list[tuple[int, float | None]] = []
    step_times: list[float] = []
    calls = 0
    diverged = False
    start, cpu_start = time.perf_counter(), time.process_time()
    for step, batch in enumerate(batches):
        t0 = time.perf_counter()
        with autocast() if autocast is not None else contextlib.nullcontext():
            loss = model(**batch).loss
        value = float(loss.detach())
        if not math.isfinite(value):
            curve.append((step + 1, None))  # JSON has no NaN
            diverged = True
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        sched.step()
        if adalora:
            model.base_model.update_and_allocate(step)
            calls += 1
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)
        curve.append((step + 1, round(value, 5)))
    train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    timed = step_times[1:] if len(step_times) > 1 else step_times
    step_s = statistics.median(timed) if timed else math.nan
    return TrainResult(train_s, step_s, len(step_times), curve, calls, diverged, train_cpu_s)
