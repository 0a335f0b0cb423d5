"""The one training loop every method shares: AdamW (weight decay 0; with LoRA+ `gora.app.run.train.make_optimizer`,
i.e. PEFT's `create_loraplus_optimizer`), linear warmup + decay (transformers' `get_scheduler`), gradient clipping at
1.0, the same batches in the same order, and — for AdaLoRA — PEFT's `update_and_allocate` after every optimizer
step (before `zero_grad`, as PEFT documents it).

A non-finite loss stops training: the result says `diverged` (a learning rate that diverges is a result of the
tuning, not an error to retry).

With `checkpoint`, the loop saves its state there (the trained parameters, the optimizer's and scheduler's state, the
RNG states, the loss curve and the step times so far) every `checkpoint_every_s` seconds and after the last step,
atomically (`gora.fileio.atomic_write`), and a call that finds the file resumes after the step it holds: the
same numbers as a run never stopped, so a run cut by the end of a session loses at most `checkpoint_every_s` of
training. The caller rebuilds the model as it built it before (same method, seed and init) and deletes the file
once the run's record is written. AdaLoRA is not checkpointed (its rank allocator's moving averages live outside the
parameters and the optimizer): an AdaLoRA run cut short starts over.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gora.app.run.adapters import make_optimizer
from gora.fileio import atomic_write

from .tasks import Batch

logger = logging.getLogger(__name__)

CHECKPOINT_EVERY_S = 300.0  # the harness's default interval between two checkpoints of a run's training


@dataclass
class TrainResult:
    train_s: float
    step_s: float  # median seconds per optimizer step (robust to the shared machine's noise)
    steps: int
    loss_curve: list[tuple[int, float | None]] = field(default_factory=list)
    adalora_calls: int = 0
    diverged: bool = False
    train_cpu_s: float = 0.0  # CPU time of this process while training (less sensitive to a busy machine)
    # steps after which a checkpoint was resumed (train_s, train_cpu_s and the step times add up the segments)
    resumed_at: list[int] = field(default_factory=list)


def _trained(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict[str, Any]:
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


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
    checkpoint: Path | None = None,
    checkpoint_every_s: float = CHECKPOINT_EVERY_S,
    checkpoint_key: str = "",
) -> TrainResult:
    """One optimizer step per batch of `batches` (every epoch, in order); each forward under `autocast()` when given
    (bf16 on CUDA), the backward and optimizer step outside it. `checkpoint`: see the module's docstring;
    `checkpoint_key` names the run (its id), and a checkpoint saved under another key is refused."""
    from transformers import get_scheduler

    steps = len(batches)
    params = list(_trained(model).values())
    optimizer = make_optimizer(model, learning_rate=lr, loraplus_lr_ratio=loraplus_ratio) or torch.optim.AdamW(
        params, lr=lr, weight_decay=0.0
    )
    sched = get_scheduler(scheduler, optimizer, num_warmup_steps=round(warmup_ratio * steps), num_training_steps=steps)
    if checkpoint is not None and adalora:
        logger.warning(
            "AdaLoRA runs are not checkpointed (its rank allocator's state is not saved): %s unused", checkpoint
        )
        checkpoint = None
    model.train()
    curve: list[tuple[int, float | None]] = []
    step_times: list[float] = []
    calls = 0
    diverged = False
    done, prior_s, prior_cpu_s, resumed_at = 0, 0.0, 0.0, []
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if state["key"] != checkpoint_key or state["steps"] != steps:
            raise RuntimeError(
                f"checkpoint {checkpoint} belongs to another run ({state['key'][:200]!r}, {state['steps']} steps), "
                f"not to {checkpoint_key[:200]!r} ({steps} steps): delete it to start this run over"
            )
        trained = _trained(model)
        if set(state["params"]) != set(trained):
            raise RuntimeError(
                f"checkpoint {checkpoint} holds other trained parameters than the rebuilt model "
                f"({len(state['params'])} against {len(trained)}): delete it to start this run over"
            )
        with torch.no_grad():
            for name, param in trained.items():
                param.copy_(state["params"][name])
        optimizer.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        done, curve, step_times = state["done"], state["curve"], state["step_times"]
        prior_s, prior_cpu_s, diverged = state["train_s"], state["train_cpu_s"], state["diverged"]
        resumed_at = [*state["resumed_at"], done]
        logger.info("resumed %s after step %d of %d", checkpoint, done, steps)
    start, cpu_start = time.perf_counter(), time.process_time()
    last_save = start

    def save(step_done: int) -> None:
        state = {
            "key": checkpoint_key,
            "steps": steps,
            "done": step_done,
            "params": {n: p.detach().cpu().clone() for n, p in _trained(model).items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": _rng_state(),
            "curve": curve,
            "step_times": step_times,
            "train_s": prior_s + time.perf_counter() - start,
            "train_cpu_s": prior_cpu_s + time.process_time() - cpu_start,
            "diverged": diverged,
            "resumed_at": resumed_at,
        }
        atomic_write(checkpoint, lambda tmp: torch.save(state, tmp))  # the previous checkpoint or this one, whole

    for step in range(done, steps):  # a diverged run's checkpoint holds done = steps: nothing left to run
        batch = batches[step]
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
        if checkpoint is not None and step + 1 < steps and time.perf_counter() - last_save >= checkpoint_every_s:
            save(step + 1)
            last_save = time.perf_counter()
    if checkpoint is not None and done < steps:
        save(steps)  # the evaluation after training is long too: a run cut there resumes with training done
    train_s = prior_s + time.perf_counter() - start
    train_cpu_s = prior_cpu_s + time.process_time() - cpu_start
    timed = step_times[1:] if len(step_times) > 1 else step_times
    step_s = statistics.median(timed) if timed else math.nan
    return TrainResult(train_s, step_s, len(step_times), curve, calls, diverged, train_cpu_s, resumed_at)
