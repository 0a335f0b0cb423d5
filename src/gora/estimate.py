"""Stage 1: gradient estimation.

G = (1/N) Σ_k ∂L_k/∂W over the first N batches, for every target weight W (paper: "gradient pre-computation").
Each layer's gradient is folded into a float32 accumulator by a post-accumulate-grad hook as soon as backward has
produced it, then freed, so at most about one layer's gradient exists at a time beyond the accumulators.
The model comes back exactly as it was: weights, requires_grad flags, train/eval modes and `.grad` fields.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import GoraConfig
from .targets import Target, find_targets

logger = logging.getLogger(__name__)

ForwardFn = Callable[[nn.Module, Any], Any]


@dataclass
class GradientStats:
    """What gradient estimation produced.

    Attributes:
        targets: The adapted modules with their shapes, in model order.
        gradients: Module name -> G, the float32 mean gradient in the [out, in] layout.
        num_batches: N, the number of batches averaged.
        no_grad: Targets whose weight received no gradient at all (unused in the forward); they get no adapter.
    """

    targets: list[Target]
    gradients: dict[str, torch.Tensor]
    num_batches: int
    no_grad: list[str] = field(default_factory=list)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {t.name: (t.m, t.n) for t in self.targets if t.name in self.gradients}


def estimate_gradients(
    model: nn.Module,
    config: GoraConfig,
    dataloader: Iterable[Any],
    *,
    forward_fn: ForwardFn | None = None,
    offload_to_cpu: bool = False,
    show_progress: bool = True,
) -> GradientStats:
    """Average the gradient of every target weight over the first `config.num_batches` batches.

    Args:
        model: The base model (not a PeftModel), in any dtype; it is not modified.
        config: GoRA configuration (targets, N, seed).
        dataloader: Any iterable of batches. Without `forward_fn`, each batch is a dict of keyword arguments that
            makes the model return an output with a `.loss`.
        forward_fn: Optional `forward_fn(model, batch)` returning the scalar loss (or an output with `.loss`), for
            models or batches that do not fit the dict convention.
        offload_to_cpu: Keep the float32 accumulators on the CPU instead of the model's device.
        show_progress: Show a tqdm progress bar.

    Raises:
        ValueError: empty dataloader, a batch without loss, a non-finite loss or gradient, no gradient reaching any
            target, or any target problem that `find_targets` reports. The model is left exactly as it was.
    """
    targets = find_targets(model, config)
    device = _model_device(model)
    acc_device = torch.device("cpu") if offload_to_cpu else device
    sums = {t.name: torch.zeros(t.m, t.n, dtype=torch.float32, device=acc_device) for t in targets}
    counts = dict.fromkeys(sums, 0)
    non_finite: set[str] = set()

    def make_hook(target: Target) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            grad = param.grad.detach()
            grad = grad.T if target.transposed else grad
            if not bool(torch.isfinite(grad).all()):
                non_finite.add(target.name)
            sums[target.name].add_(grad.to(device=acc_device, dtype=torch.float32))
            counts[target.name] += 1
            param.grad = None  # free it now: memory stays bounded by the accumulators plus ~one gradient

        return hook

    num_batches = 0
    with _estimation_state(model, targets) as weights, _seeded(config.seed, device):
        handles = [w.register_post_accumulate_grad_hook(make_hook(t)) for t, w in zip(targets, weights)]
        try:
            batches = _first(dataloader, config.num_batches)
            progress = tqdm(batches, total=config.num_batches, desc="GoRA gradients", disable=not show_progress)
            for index, batch in enumerate(progress):
                loss = _loss(model, batch, forward_fn, device, index)
                loss.backward()
                num_batches += 1
                if non_finite:
                    raise ValueError(
                        f"non-finite gradient in batch {index} for {sorted(non_finite)[:4]}: check the data, lower "
                        "the loss scale, or run estimation in float32"
                    )
        finally:
            for handle in handles:
                handle.remove()
    if num_batches == 0:
        raise ValueError("the dataloader yielded no batch: GoRA needs at least one batch to estimate gradients")
    if num_batches < config.num_batches:
        logger.warning("the dataloader ran out after %d of num_batches=%d batches", num_batches, config.num_batches)
    no_grad = [t.name for t in targets if counts[t.name] == 0]
    if len(no_grad) == len(targets):
        raise ValueError(
            "no target layer received a gradient: the loss does not depend on the targeted modules. "
            "Check target_modules and that the batches run through them"
        )
    if no_grad:
        logger.warning("%d target(s) got no gradient and get no adapter: %s", len(no_grad), ", ".join(no_grad))
    gradients = {name: s.div_(num_batches) for name, s in sums.items() if counts[name] > 0}
    return GradientStats(targets=targets, gradients=gradients, num_batches=num_batches, no_grad=no_grad)


def _first(dataloader: Iterable[Any], n: int) -> Iterator[Any]:
    for index, batch in enumerate(dataloader):
        if index >= n:
            return
        yield batch


def _loss(
    model: nn.Module, batch: Any, forward_fn: ForwardFn | None, device: torch.device, index: int
) -> torch.Tensor:
    if forward_fn is not None:
        out = forward_fn(model, batch)
    elif isinstance(batch, Mapping):
        out = model(**_to_device(batch, device))
    else:
        raise ValueError(
            f"batch {index} is a {type(batch).__name__}, not a dict of model keyword arguments: "
            "pass forward_fn=lambda model, batch: <scalar loss> to get_gora_model / estimate_gradients"
        )
    loss = out if isinstance(out, torch.Tensor) else getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(
            f"batch {index} gave no scalar loss: include labels in the batches so the model returns .loss, "
            "or pass forward_fn=lambda model, batch: <scalar loss>"
        )
    if not loss.requires_grad:
        raise ValueError(f"the loss of batch {index} does not depend on any target weight; check target_modules")
    if not math.isfinite(loss.item()):
        raise ValueError(f"batch {index} gave a non-finite loss ({loss.item()}): check its inputs and labels")
    return loss.reshape(())


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def _estimation_state(model: nn.Module, targets: list[Target]) -> Iterator[list[nn.Parameter]]:
    """Only target weights require grad, train mode; afterwards flags, modes and `.grad` are as they were."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    weights = [model.get_submodule(t.name).weight for t in targets]
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for w in weights:
            w.requires_grad_(True)
        model.train()
        yield weights
    finally:
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad
        for module, mode in modes:
            module.training = mode


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Dropout during estimation is drawn from `seed`; the caller's RNG state is restored afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
