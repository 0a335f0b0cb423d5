"""Stage 1: gradient estimation.

G = (1/N) Σ_k ∂L_k/∂W over the first N batches, for every target weight W (paper: "gradient pre-computation").
Each layer's gradient is folded into a float32 accumulator by a post-accumulate-grad hook as soon as backward has
produced it, then freed, so at most about one layer's gradient exists at a time beyond the accumulators.
The model comes back exactly as it was: weights, requires_grad flags, train/eval modes and `.grad` fields.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import GoraConfig
from .distributed import (
    all_reduce_sum_,
    all_true,
    check_not_zero3,
    fail_together,
    full_tensor,
    is_distributed,
    is_dtensor,
    ranks_where_false,
    sum_counts,
    unwrap_model,
    world_size,
)
from .distributed import rank as dist_rank
from .sketch import SketchStore
from .targets import Target, find_targets

logger = logging.getLogger(__name__)

ForwardFn = Callable[[nn.Module, Any], Any]
_END = object()  # end of a batch stream (a batch may be anything, even None)


@dataclass
class GradientStats:
    """What gradient estimation produced.

    Attributes:
        targets: The adapted modules with their shapes, in model order.
        gradients: Module name -> G, the float32 mean gradient in the [out, in] layout (every layer with
            `store="full"`; only the small layers stored whole with `store="sketch"`).
        num_batches: N, the number of batches averaged (over all ranks under torch.distributed).
        no_grad: Targets whose weight received no gradient at all (unused in the forward); they get no adapter.
        store: "full" or "sketch" (`GoraConfig.gradient_store`).
        sketches: Module name -> Y = G·A_maxᵀ [m, min(max_rank, m, n)] (sketch mode).
        importances: Module name -> I estimated during estimation (sketched layers), for `importance_metric`.
        importance_metric: The metric of `importances`.
        seed: The seed of A_max (sketch mode: A0 must be drawn with it).
        info: How the statistics were made (world size, batches per rank, adaptive stopping, bytes, ...).
    """

    targets: list[Target]
    gradients: dict[str, torch.Tensor]
    num_batches: int
    no_grad: list[str] = field(default_factory=list)
    store: str = "full"
    sketches: dict[str, torch.Tensor] = field(default_factory=dict)
    importances: dict[str, float] = field(default_factory=dict)
    importance_metric: str | None = None
    seed: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {t.name: (t.m, t.n) for t in self.targets if t.name in self.gradients or t.name in self.sketches}

    def nbytes(self) -> int:
        """Bytes held by the statistics' tensors."""
        return sum(x.numel() * x.element_size() for x in [*self.gradients.values(), *self.sketches.values()])


class _FullStore:
    """`gradient_store="full"`: S = Σ_b g_b in float32 per target."""

    def __init__(self, targets: list[Target], device: torch.device) -> None:
        self.whole = {t.name: torch.zeros(t.m, t.n, dtype=torch.float32, device=device) for t in targets}
        self.sketches: dict[str, torch.Tensor] = {}
        self.device = device

    def fold(self, target: Target, grad: torch.Tensor) -> None:
        self.whole[target.name].add_(grad.to(device=self.device, dtype=torch.float32))

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.whole.values())


Store = _FullStore | SketchStore


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

    Under torch.distributed every rank runs its own batches and the float32 statistics are summed over ranks once
    at the end, so G is the mean over all ranks' batches and identical everywhere. DDP (and DeepSpeed ZeRO-1/2 or
    accelerate) wrappers are unwrapped: target names are those of `model.module`, and the backward runs on the
    inner module without DDP's gradient sync. FSDP2 (`fully_shard`) models are supported: each sharded gradient
    (already averaged over ranks by FSDP) is gathered layer by layer, folded in and freed. ZeRO-3 is refused.
    Ranks may see different numbers of batches (a rank with none adds nothing), except under FSDP2 and
    `adaptive_batches`, where every batch is a collective: there all ranks stop when the first runs out, and a
    rank without any batch is an error raised on every rank.

    Args:
        model: The base model (not a PeftModel), in any dtype, possibly wrapped in DDP or sharded by FSDP2; it is
            not modified.
        config: GoRA configuration (targets, N, seed, gradient_store, adaptive stopping).
        dataloader: Any iterable of batches (this rank's batches under torch.distributed). Without `forward_fn`,
            each batch is a dict of keyword arguments that makes the model return an output with a `.loss`.
        forward_fn: Optional `forward_fn(model, batch)` returning the scalar loss (or an output with `.loss`), for
            models or batches that do not fit the dict convention.
        offload_to_cpu: Keep the float32 statistics on the CPU instead of the model's device (also
            `GoraConfig.offload_to_cpu`).
        show_progress: Show a tqdm progress bar (rank 0 only).

    Raises:
        ValueError: empty dataloader (on every rank; on any rank under FSDP2 or adaptive_batches), a batch
            without loss, a non-finite loss or gradient, no gradient reaching any target, ZeRO-3 parameters, or any
            target problem that `find_targets` reports. The model is left exactly as it was.
    """
    model = unwrap_model(model)
    check_not_zero3(model)
    targets = find_targets(model, config)
    device = model_device(model)
    acc_device = torch.device("cpu") if (offload_to_cpu or config.offload_to_cpu) else device
    store: Store = (
        SketchStore(targets, config, acc_device)
        if config.gradient_store == "sketch"
        else _FullStore(targets, acc_device)
    )
    counts = dict.fromkeys((t.name for t in targets), 0)
    non_finite: set[str] = set()
    sink: list[Callable[[Target, torch.Tensor, torch.Tensor], None]] = []

    def fold(target: Target, grad: torch.Tensor, weight: torch.Tensor) -> None:
        grad = grad.T if target.transposed else grad
        if not bool(torch.isfinite(grad).all()):
            non_finite.add(target.name)
        sink[0](target, grad, weight)  # weight: the parameter as stored (an FSDP2 shard is gathered only if needed)

    def make_hook(target: Target) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            fold(target, param.grad.detach(), param)
            param.grad = None  # free it now: memory stays bounded by the statistics plus ~one gradient

        return hook

    def step(batch: Any, index: int, weights: list[nn.Parameter], sharded: list[bool]) -> None:
        loss = _loss(model, batch, forward_fn, device, index)
        loss.backward()
        for target, weight, is_sharded in zip(targets, weights, sharded):
            if is_sharded and weight.grad is not None:  # FSDP2: a sharded grad, already averaged over ranks
                fold(target, full_tensor(weight.grad.detach()), weight)
                weight.grad = None
        if non_finite:
            raise ValueError(
                f"non-finite gradient in batch {index} for {sorted(non_finite)[:4]}: check the data, lower "
                "the loss scale, or run estimation in float32"
            )

    def count(target: Target, grad: torch.Tensor, weight: torch.Tensor) -> None:
        counts[target.name] += 1
        store.fold(target, grad)

    local_batches = 0
    adaptive = _Adaptive(config) if config.adaptive_batches else None
    with _estimation_state(model, targets) as weights, seeded(config.seed + dist_rank(), device):
        sharded = [is_dtensor(w) for w in weights]
        reduce = {t.name: is_distributed() and not s for t, s in zip(targets, sharded)}
        handles = [
            w.register_post_accumulate_grad_hook(make_hook(t)) for t, w, s in zip(targets, weights, sharded) if not s
        ]
        try:
            batches = iter(_first(dataloader, config.num_batches))
            with fail_together(is_distributed(), "gradient estimation"):
                first = next(batches, _END)
            lockstep = is_distributed() and (any(sharded) or adaptive is not None)
            any_batch = _check_batches_on_ranks(first is not _END, lockstep, config)  # before any other collective
            # without per-batch collectives (lockstep), an error on one rank is raised on every rank after the block
            together = is_distributed() and not lockstep
            if any_batch and isinstance(store, SketchStore):  # every rank joins finish_pilot (no batch: zero sums)
                sink[:] = [lambda t, g, w: store.pilot_fold(t, g, _layout(t, full_tensor(w.detach())))]
                with fail_together(together, "the pilot batch of gradient estimation"):
                    if first is not _END:
                        with seeded(config.seed + dist_rank(), device):  # pilot: forked RNG, the N batches unchanged
                            step(first, 0, weights, sharded)
                by_name = {t.name: (t, w) for t, w in zip(targets, weights)}
                store.finish_pilot(
                    lambda name: _layout(by_name[name][0], full_tensor(by_name[name][1].detach())), reduce
                )
            sink[:] = [count]
            stream = itertools.chain([] if first is _END else [first], batches)
            progress = tqdm(
                _while_every_rank_has_one(stream) if lockstep else stream,
                total=config.num_batches,
                desc="GoRA gradients",
                disable=not show_progress or dist_rank() != 0,
            )
            with fail_together(together, "gradient estimation"):
                for index, batch in enumerate(progress):
                    step(batch, index, weights, sharded)
                    local_batches += 1
                    if adaptive is not None and adaptive.converged(store, targets, weights, reduce, local_batches):
                        break
        finally:
            for handle in handles:
                handle.remove()
        return _finish(store, targets, weights, config, counts, local_batches, reduce, adaptive)


def _finish(
    store: Store,
    targets: list[Target],
    weights: list[nn.Parameter],
    config: GoraConfig,
    counts: dict[str, int],
    local_batches: int,
    reduce: dict[str, bool],
    adaptive: _Adaptive | None,
) -> GradientStats:
    """Sum the statistics over ranks (once), divide by the number of batches, estimate sketched importances."""
    names = [t.name for t in targets]
    global_batches, *reduced_counts = sum_counts([local_batches] + [counts[n] for n in names])
    if global_batches == 0:
        raise ValueError("the dataloader yielded no batch: GoRA needs at least one batch to estimate gradients")
    if local_batches < config.num_batches and (adaptive is None or not adaptive.stopped):
        logger.warning("the dataloader ran out after %d of num_batches=%d batches", local_batches, config.num_batches)
    for name, reduced in zip(names, reduced_counts):
        if reduce[name]:
            counts[name] = reduced
    no_grad = [n for n in names if counts[n] == 0]
    if len(no_grad) == len(targets):
        raise ValueError(
            "no target layer received a gradient: the loss does not depend on the targeted modules. "
            "Check target_modules and that the batches run through them"
        )
    if no_grad:
        logger.warning("%d target(s) got no gradient and get no adapter: %s", len(no_grad), ", ".join(no_grad))
    stats_bytes = store.nbytes()
    gradients: dict[str, torch.Tensor] = {}
    sketches: dict[str, torch.Tensor] = {}
    importances: dict[str, float] = {}
    for name in names:
        total = global_batches if reduce[name] else local_batches  # FSDP2 grads arrive averaged over ranks
        if name in no_grad:
            continue
        if name in store.whole:
            gradients[name] = _reduced(store.whole.pop(name), reduce[name]).div_(total)
        else:
            assert isinstance(store, SketchStore)
            sketches[name] = _reduced(store.sketches.pop(name), reduce[name]).div_(total)
            values = _reduced(store.samplers[name].values, reduce[name]).div_(total)
            importances[name] = store.estimate(name, values)
    info: dict[str, Any] = {
        "store": config.gradient_store,
        "world_size": world_size(),
        "batches_per_rank": local_batches,
        "statistics_bytes": stats_bytes,
    }
    if isinstance(store, SketchStore):
        info["pilot_batches"] = 1
        info["sketch_samples"] = config.sketch_samples
    if adaptive is not None:
        info["adaptive"] = adaptive.report(local_batches, global_batches)
    return GradientStats(
        targets=targets,
        gradients=gradients,
        num_batches=global_batches,
        no_grad=no_grad,
        store=config.gradient_store,
        sketches=sketches,
        importances=importances,
        importance_metric=config.importance if importances else None,
        seed=config.seed,
        info=info,
    )


def _layout(target: Target, weight: torch.Tensor) -> torch.Tensor:
    """W in the [m, n] layout (Conv1D stores [n, m])."""
    return weight.T if target.transposed else weight


def _reduced(tensor: torch.Tensor, reduce: bool) -> torch.Tensor:
    return all_reduce_sum_(tensor) if reduce else tensor


class _Adaptive:
    """Adaptive number of batches: stop once every layer's importance has converged.

    After batch k >= adaptive_min_batches, with I_k the importance of the running mean G_k = S_k / k:
    stop when |I_k − I_{k−1}| / (I_{k−1} + 1e-8) <= τ for every layer (layers without gradient yet excluded).
    Under torch.distributed the running sums are all-reduced first (a per-batch collective, only in this mode),
    so the decision is computed from identical statistics and is the same on every rank.
    """

    def __init__(self, config: GoraConfig) -> None:
        self.config = config
        self.previous: dict[str, float] | None = None
        self.history: list[float] = []  # the largest relative change after each checked batch
        self.stopped = False

    def converged(
        self, store: Store, targets: list[Target], weights: list[nn.Parameter], reduce: dict[str, bool], k: int
    ) -> bool:
        config = self.config
        if k < config.adaptive_min_batches - 1:
            return False
        current = _running_importances(store, targets, weights, reduce, config, k)
        previous, self.previous = self.previous, current
        if previous is None or k < config.adaptive_min_batches:
            return False
        change = max(
            (abs(current[n] - previous[n]) / (previous[n] + 1e-8) for n in current if n in previous), default=0.0
        )
        self.history.append(change)
        self.stopped = all_true(change <= config.adaptive_threshold)
        if self.stopped:
            logger.info("GoRA: importances converged after %d batches (max relative change %.3g)", k, change)
        return self.stopped

    def report(self, local_batches: int, global_batches: int) -> dict[str, Any]:
        return {
            "stopped_early": self.stopped,
            "batches_per_rank": local_batches,
            "batches": global_batches,
            "max_batches": self.config.num_batches,
            "threshold": self.config.adaptive_threshold,
            "min_batches": self.config.adaptive_min_batches,
            "max_relative_change": self.history,
        }


@torch.no_grad()
def _running_importances(
    store: Store,
    targets: list[Target],
    weights: list[nn.Parameter],
    reduce: dict[str, bool],
    config: GoraConfig,
    k: int,
) -> dict[str, float]:
    """I(S/k) = I(S)/k of every layer (every metric is 1-homogeneous), from all-reduced copies of the sums S."""
    from .importance import layer_importance

    out: dict[str, float] = {}
    for target, weight in zip(targets, weights):
        name = target.name
        if name in store.whole:
            S = store.whole[name]
            S = all_reduce_sum_(S.clone()) if reduce[name] else S
            if not bool(S.any()):
                continue
            W = full_tensor(weight.detach())
            total = k * world_size() if reduce[name] else k
            out[name] = layer_importance(W.T if target.transposed else W, S, config.importance) / total
        else:
            assert isinstance(store, SketchStore)
            values = store.samplers[name].values
            values = all_reduce_sum_(values.clone()) if reduce[name] else values
            if bool(values.any()):
                out[name] = store.estimate(name, values) / (k * world_size() if reduce[name] else k)
    return out


def _check_batches_on_ranks(has_batch: bool, lockstep: bool, config: GoraConfig) -> bool:
    """Whether any rank has a batch, the same answer on every rank; a rank without one is an error in lockstep.

    Without per-batch collectives (plain or DDP models, `adaptive_batches=False`) a rank without batches adds zero
    sums and no batches to the totals, so G is still the mean over all the batches seen. Under FSDP2 (every forward
    and backward is a collective) and adaptive stopping (a collective after each batch) the ranks run the same
    number of batches, so a rank without batches would leave the others waiting: every rank raises the same error.
    """
    empty = ranks_where_false(has_batch)
    if not is_distributed() or not empty or len(empty) == world_size():
        return len(empty) < world_size()  # no batch anywhere: _finish reports it on every rank
    problem = f"rank(s) {empty} of {world_size()} got no batch from their dataloader"
    if lockstep:
        mode = "adaptive_batches=True" if config.adaptive_batches else "FSDP2 (fully_shard)"
        raise ValueError(
            f"{problem}; under {mode} all ranks run each batch together, so the others would wait forever. Give "
            "every rank at least one batch: a DistributedSampler with drop_last=False pads every rank to the same "
            "length, an IterableDataset must yield on every rank; or use fewer processes"
        )
    logger.warning("%s: they add nothing, and G is the mean over the other ranks' batches", problem)
    return True


def _while_every_rank_has_one(batches: Iterable[Any]) -> Iterator[Any]:
    """The batches while every rank still has one: ranks that step together stop together (one collective each)."""
    iterator = iter(batches)
    while True:
        batch = next(iterator, _END)
        if not all_true(batch is not _END):
            if batch is not _END:
                logger.warning(
                    "rank %d: another rank's dataloader ran out, so every rank stops here (FSDP2 and adaptive "
                    "stopping run the same number of batches on every rank); this rank's further batches are unused",
                    dist_rank(),
                )
            return
        yield batch


def _first(dataloader: Iterable[Any], n: int) -> Iterator[Any]:
    for index, batch in enumerate(dataloader):
        if index >= n:
            return
        yield batch


def batch_loss(
    model: nn.Module, batch: Any, forward_fn: ForwardFn | None, device: torch.device, what: str
) -> torch.Tensor:
    """The scalar loss of one batch: `forward_fn(model, batch)`, else `model(**batch)`; `what` names the batch in
    errors (e.g. "batch 3", "held-out batch 0")."""
    if forward_fn is not None:
        out = forward_fn(model, batch)
    elif isinstance(batch, Mapping):
        out = model(**_to_device(batch, device))
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


def _loss(
    model: nn.Module, batch: Any, forward_fn: ForwardFn | None, device: torch.device, index: int
) -> torch.Tensor:
    loss = batch_loss(model, batch, forward_fn, device, f"batch {index}")
    if not loss.requires_grad:
        raise ValueError(f"the loss of batch {index} does not depend on any target weight; check target_modules")
    if not math.isfinite(loss.item()):
        raise ValueError(f"batch {index} gave a non-finite loss ({loss.item()}): check its inputs and labels")
    return loss.reshape(())


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_device(model: nn.Module) -> torch.device:
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
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Dropout during estimation is drawn from `seed`; the caller's RNG state is restored afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
