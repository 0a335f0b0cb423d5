"""Batches and model state, shared by the stages that run the model (estimate.py, gamma.py, quant.py).

- `first_batches` / `take`: the batches a stage uses, taken from any iterable without consuming one more;
- `batch_loss`: the scalar loss of one batch (`forward_fn(model, batch)`, else `model(**batch).loss`);
- `modes_restored` / `eval_mode`: every module's train/eval flag as it was afterwards;
- `seeded`: randomness inside the block drawn from a seed, the caller's RNG state untouched.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

ForwardFn = Callable[[nn.Module, Any], Any]


def first_batches(batches: Iterable[Any], n: int) -> Iterator[Any]:
    """The first `n` batches; a one-shot iterator is advanced by exactly `n` (not one more), so whoever reads it
    next gets batch n+1."""
    return itertools.islice(batches, n)


def take(iterator: Iterator[Any], n: int) -> list[Any]:
    """Up to `n` batches of `iterator` as a list (exactly the ones consumed)."""
    return list(itertools.islice(iterator, max(n, 0)))


def batch_loss(
    model: nn.Module, batch: Any, forward_fn: ForwardFn | None, device: torch.device, what: str
) -> torch.Tensor:
    """The scalar loss of one batch: `forward_fn(model, batch)`, else `model(**batch)`; `what` names the batch in
    errors (e.g. "batch 3", "held-out batch 0")."""
    if forward_fn is not None:
        out = forward_fn(model, batch)
    elif isinstance(batch, Mapping):
        out = model(**to_device(batch, device))
    else:
        raise ValueError(
            f"{what} is a {type(batch).__name__}, not a dict of model keyword arguments: "
            "pass forward_fn=lambda model, batch: <scalar loss> to get_gora_model / estimate_gradients"
        )
    loss = out if isinstance(out, torch.Tensor) else getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(
            f"{what} gave no scalar loss: include labels in the batches so the model returns .loss, "
            "or pass forward_fn=lambda model, batch: <scalar loss>"
        )
    return loss


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def modes_restored(model: nn.Module) -> Iterator[None]:
    """Afterwards every module's train/eval flag is what it was before (not one flag for the whole model)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) inside the block; afterwards every module's flag is as it was.

    bitsandbytes repacks a `Linear4bit` weight in place on its first eval-mode CPU forward (an inference-only layout
    it cannot backpropagate through); that switch is off inside the block, so quantized bases stay as they were.
    """
    repack = [(m, m.support_avx512bf16_for_cpu) for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    with modes_restored(model):
        try:
            model.eval()
            for module, _ in repack:
                module.support_avx512bf16_for_cpu = False
            yield
        finally:
            for module, flag in repack:
                module.support_avx512bf16_for_cpu = flag


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Randomness inside the block (e.g. dropout) is drawn from `seed`; the caller's RNG state is restored after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
