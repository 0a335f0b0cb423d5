"""Stage 1: gradient estimation.

G = (1/N) Σ_k ∂L_k/∂W over the first N batches, for every target weight W (paper: "gradient pre-computation").
Each target's batch gradient reaches a store by one of two routes (`GoraConfig.gradient_route`), a small class each
(routes.py):

- `_WeightRoute` (nn.Linear, Conv1D): a post-accumulate-grad hook on W folds ∂L/∂W into the store as soon as
  backward has produced it, then frees it, so at most about one layer's gradient exists at a time;
- `_ModuleRoute` (bitsandbytes 4-bit / 8-bit layers, whose packed weight has no gradient; any layer on request): for
  y = x·Wᵀ the batch gradient is G_b = Σ_tokens dyᵀ x, so module hooks that see the layer's input x (forward) and its
  output gradient dy (backward) feed the store without any weight gradient or dequantized weight.

Two stores share one interface (`GradientStore`, stores.py), fed either way: `FullStore` keeps S = Σ_k g_k (m x n
float32) per layer; `sketch.SketchStore` keeps Y = S·A_maxᵀ and S at sampled entries (bounded memory; it needs a
pilot pass over the first batch). The model comes back exactly as it was: weights, requires_grad flags, train/eval modes, `.grad`
fields, and no hook left behind.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .batches import ForwardFn, batch_loss, first_batches, model_device, modes_restored, seeded
from .config import GoraConfig
from .distributed import (
    all_true,
    check_not_zero3,
    fail_together,
    is_distributed,
    ranks_where_false,
    sharded_grad_factor,
    sum_counts,
    unwrap_model,
    world_size,
)
from .distributed import rank as dist_rank
from .experts import report_unreached_experts
from .routes import Route, _ModuleRoute, _WeightRoute, choose_routes
from .sketch import SketchStore
from .stats import GradientStats
from .stores import FullStore, GradientStore, Outer
from .targets import Target, find_targets, get_weight, target_weight

logger = logging.getLogger(__name__)

_END = object()  # end of a batch stream (a batch may be anything, even None)


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
        model: The base model (not a PeftModel), in any dtype, possibly wrapped in DDP or sharded by FSDP2, possibly
            loaded quantized by bitsandbytes (4-bit or 8-bit: those targets take the module-hook route); it is not
            modified.
        config: GoRA configuration (targets, N, seed, gradient_store, adaptive stopping).
        dataloader: Any iterable of batches (this rank's batches under torch.distributed); exactly the first
            `num_batches` are taken from it. Without `forward_fn`, each batch is a dict of keyword arguments that
            makes the model return an output with a `.loss`.
        forward_fn: Optional `forward_fn(model, batch)` returning the scalar loss (or an output with `.loss`), for
            models or batches that do not fit the dict convention.
        offload_to_cpu: Keep the float32 statistics on the CPU instead of the model's device (also
            `GoraConfig.offload_to_cpu`).
        show_progress: Show a tqdm progress bar (rank 0 only).

    Raises:
        ValueError: empty dataloader (on every rank; on any rank under FSDP2 or adaptive_batches), a batch
            without loss, a non-finite loss or gradient, no gradient reaching any target, ZeRO-3 parameters,
            hook-route targets whose forward never ran as a module call (fused kernels), any target problem that
            `find_targets` or `choose_routes` reports. The model is left exactly as it was.
    """
    model = unwrap_model(model)
    check_not_zero3(model)
    targets = find_targets(model, config)
    routes = choose_routes(model, targets, config)  # module name -> "weights" or "hooks"
    device = model_device(model)
    store_device = torch.device("cpu") if (offload_to_cpu or config.offload_to_cpu) else device
    store_cls = SketchStore if config.gradient_store == "sketch" else FullStore
    store: GradientStore = store_cls(targets, config, store_device)
    adaptive = _Adaptive(config) if config.adaptive_batches else None
    with _estimation_state(model, targets, routes), seeded(config.seed + dist_rank(), device):
        run = _Estimation(model, targets, routes, store, forward_fn, device, seed=config.seed + dist_rank())
        with run.hooks():
            batches = first_batches(dataloader, config.num_batches)
            with fail_together(is_distributed(), "gradient estimation"):
                first = next(batches, _END)
            lockstep = is_distributed() and (any(run.sharded) or adaptive is not None)
            any_batch = _check_batches_on_ranks(first is not _END, lockstep, config)  # before any other collective
            # without per-batch collectives (lockstep), an error on one rank is raised on every rank after the block
            together = is_distributed() and not lockstep
            if any_batch and store.needs_pilot:  # every rank joins finish_pilot (a rank without a batch: zero sums)
                with fail_together(together, "the pilot batch of gradient estimation"):
                    run.pilot(None if first is _END else first)
                store.finish_pilot(run.weight_of, run.reduce)
            stream = itertools.chain([] if first is _END else [first], batches)
            progress = tqdm(
                _while_every_rank_has_one(stream) if lockstep else stream,
                total=config.num_batches,
                desc="GoRA gradients",
                disable=not show_progress or dist_rank() != 0,
            )
            with fail_together(together, "gradient estimation"):
                for index, batch in enumerate(progress):
                    run.step(batch, index)
                    if adaptive is not None and adaptive.converged(run, index + 1):
                        break
        return _finish(run, config, adaptive)


class _Estimation:
    """One estimation: the targets and their routes, the store, the hooks and the per-target gradient counts."""

    def __init__(
        self,
        model: nn.Module,
        targets: list[Target],
        routes: dict[str, str],
        store: GradientStore,
        forward_fn: ForwardFn | None,
        device: torch.device,
        seed: int,
    ) -> None:
        self.model, self.targets, self.store = model, targets, store
        self.forward_fn, self.device, self.seed = forward_fn, device, seed
        self.routes: list[Route] = [
            _ModuleRoute(self, t, model.get_submodule(t.name))
            if routes[t.name] == "hooks"
            else _WeightRoute(self, t, target_weight(model, t))
            for t in targets
        ]
        self.sharded = [isinstance(r, _WeightRoute) and r.sharded for r in self.routes]
        # statistics of plain weights are summed over ranks at the end; FSDP2 gradients arrive averaged over ranks
        self.reduce = {t.name: is_distributed() and not s for t, s in zip(targets, self.sharded)}
        self.shard_factor = sharded_grad_factor() if any(self.sharded) else 1  # gloo under torch 2.8 sums
        self.counts = dict.fromkeys((t.name for t in targets), 0)
        self.batches = 0
        self.in_pilot = False
        self._by_name = {t.name: t for t in targets}

    def weight_of(self, name: str) -> torch.Tensor:
        """W of a target in the [m, n] layout (an FSDP2 shard gathered, a quantized layer dequantized)."""
        return get_weight(self.model, self._by_name[name])

    def fold(self, target: Target, grad: torch.Tensor) -> None:
        """One batch's weight gradient g [m, n] of `target` (route "weights")."""
        if self.in_pilot:
            self.store.pilot_fold(target, grad, self.weight_of(target.name))
        else:
            self.counts[target.name] += 1
            self.store.fold(target, grad)

    def fold_outer(self, target: Target, x: torch.Tensor, dy: torch.Tensor) -> None:
        """One forward call's input x and output gradient dy of `target` (route "hooks")."""
        if self.in_pilot:  # the pilot needs |W ⊙ g_1|: Ŵ of this one layer, and g_1 a block of rows at a time
            self.store.pilot_fold(target, Outer(x, dy), self.weight_of(target.name))
        else:
            self.counts[target.name] += 1
            self.store.fold_outer(target, x, dy)

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        handles = [handle for route in self.routes for handle in route.attach()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def step(self, batch: Any, index: int) -> None:
        """Forward and backward of one batch; the routes fold every target's gradient."""
        loss = batch_loss(self.model, batch, self.forward_fn, self.device, f"batch {index}")
        if not loss.requires_grad:
            raise ValueError(f"the loss of batch {index} does not depend on any target weight; check target_modules")
        if not math.isfinite(loss.item()):
            raise ValueError(f"batch {index} gave a non-finite loss ({loss.item()}): check its inputs and labels")
        loss.reshape(()).backward()
        for route in self.routes:
            route.after_backward()
        if not self.in_pilot:
            self.batches += 1

    def pilot(self, batch: Any) -> None:
        """The sketch store's pilot pass over the first batch, with a forked RNG (the N batches see the dropout of
        `gradient_store="full"`); a rank without a batch adds nothing."""
        if batch is None:
            return
        self.in_pilot = True
        try:
            with seeded(self.seed, self.device):
                self.step(batch, 0)
        finally:
            self.in_pilot = False

    def unseen(self) -> list[str]:
        """Targets of the hook route whose forward never ran as a module call on any rank."""
        hooked = [(r.target.name, r.calls) for r in self.routes if isinstance(r, _ModuleRoute)]
        totals = sum_counts([calls for _, calls in hooked])
        return [name for (name, _), total in zip(hooked, totals) if total == 0]


def _finish(run: _Estimation, config: GoraConfig, adaptive: _Adaptive | None) -> GradientStats:
    """Sum the statistics over ranks (once), divide by the number of batches, check they are finite."""
    names = [t.name for t in run.targets]
    local_batches = run.batches
    global_batches, *reduced_counts = sum_counts([local_batches] + [run.counts[n] for n in names])
    if global_batches == 0:
        raise ValueError("the dataloader yielded no batch: GoRA needs at least one batch to estimate gradients")
    if local_batches < config.num_batches and (adaptive is None or not adaptive.stopped):
        logger.warning("the dataloader ran out after %d of num_batches=%d batches", local_batches, config.num_batches)
    unseen = run.unseen()
    if unseen:
        raise ValueError(
            f"the module hooks that read the gradient of {_names(unseen)} never saw their forward run: a fused "
            "kernel or a patched forward uses their weights without calling these modules (or they are unused). "
            "Run the model without such kernels for estimation, or leave these layers out of target_modules"
        )
    counts = {n: reduced if run.reduce[n] else run.counts[n] for n, reduced in zip(names, reduced_counts)}
    no_grad = [n for n in names if counts[n] == 0]
    if len(no_grad) == len(names):
        raise ValueError(
            "no target layer received a gradient: the loss does not depend on the targeted modules. "
            "Check target_modules and that the batches run through them"
        )
    if no_grad:
        logger.warning("%d target(s) got no gradient and get no adapter: %s", len(no_grad), ", ".join(no_grad))
    stats_bytes = run.store.nbytes()
    tables: dict[str, dict[str, torch.Tensor]] = {"gradients": {}, "sketches": {}}
    importances: dict[str, float] = {}
    non_finite = []
    for name in names:
        if name in no_grad:
            continue
        total = global_batches if run.reduce[name] else local_batches * run.shard_factor  # FSDP2: averaged grads
        kind, tensor, importance = run.store.finish(name, run.reduce[name], total)
        tables[kind][name] = tensor
        if importance is not None:
            importances[name] = importance
        # a NaN or inf in any batch's gradient stays in the sum: one check of the statistics covers every batch
        if not bool(torch.isfinite(tensor).all()) or (importance is not None and not math.isfinite(importance)):
            non_finite.append(name)
    if non_finite:  # the statistics are identical on every rank, so every rank raises this
        raise ValueError(
            f"non-finite gradient for {non_finite[:4]} in at least one of the {global_batches} batches: check the "
            "data, lower the loss scale, or run estimation in float32"
        )
    info: dict[str, Any] = {
        "store": config.gradient_store,
        "world_size": world_size(),
        "batches_per_rank": local_batches,
        "statistics_bytes": stats_bytes,
        "gradient_routes": {kind: sum(r.kind == kind for r in run.routes) for kind in ("weights", "hooks")},
    }
    if run.store.needs_pilot:
        info["pilot_batches"] = 1
        info["sketch_samples"] = config.sketch_samples
    if adaptive is not None:
        info["adaptive"] = adaptive.report(local_batches, global_batches)
    report_unreached_experts(tables["gradients"], info, global_batches)
    return GradientStats(
        targets=run.targets,
        gradients=tables["gradients"],
        num_batches=global_batches,
        no_grad=no_grad,
        store=config.gradient_store,
        sketches=tables["sketches"],
        importances=importances,
        importance_metric=config.importance if importances else None,
        seed=config.seed,
        info=info,
    )


def _names(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


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

    @torch.no_grad()
    def converged(self, run: _Estimation, k: int) -> bool:
        config = self.config
        if k < config.adaptive_min_batches - 1:
            return False
        current = {}
        for target in run.targets:
            reduce = run.reduce[target.name]
            total = k * world_size() if reduce else k * run.shard_factor
            value = run.store.running_importance(target, run.weight_of, reduce, total)
            if value is not None:
                current[target.name] = value
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


@contextlib.contextmanager
def _estimation_state(model: nn.Module, targets: list[Target], routes: dict[str, str]) -> Iterator[None]:
    """Only the weights of the weight route require grad (none on the hook route), train mode; afterwards flags,
    modes and `.grad` are as they were."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    weights = [target_weight(model, t) for t in targets if routes[t.name] == "weights"]
    with modes_restored(model):
        try:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
            for w in weights:
                w.requires_grad_(True)
            model.train()
            yield
        finally:
            for p, flag, grad in zip(params, flags, grads):
                p.requires_grad_(flag)
                p.grad = grad
