"""PEFT glue: GoRA's allocation and initialization as a stock `peft.PeftModel`, and the one-call `get_gora_model`.

The adapter is plain LoRA: full-module-name `rank_pattern` (and `alpha_pattern` where the scaling needs it),
`r` = the largest rank, `use_rslora=True`, `init_lora_weights=True`; A0 and B0 are written into PEFT's own layers.
W0 is never modified.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .allocate import Allocation, allocate_ranks
from .batches import ForwardFn
from .config import GoraConfig
from .distributed import check_not_sharded
from .estimate import estimate_gradients
from .experts import lora_layer, parameter_patterns_quiet, to_peft_layout
from .gamma import check_start, held_out_batches, held_out_loss, search_gamma, unit_gamma_config
from .importance import compute_importances
from .initialize import init_gora_weights, layer_scaling
from .provenance import base_fingerprint
from .qlayers import bnb_kind
from .record import GoraRecord
from .stats import GradientStats

logger = logging.getLogger(__name__)


def make_lora_config(config: GoraConfig, allocation: Allocation, stats: GradientStats):
    """The plain `peft.LoraConfig` that carries GoRA's allocation."""
    from peft import LoraConfig

    ranks = allocation.adapted
    if not ranks:
        raise ValueError("every layer was allocated rank 0: raise min_rank or r")
    names = [t.name for t in stats.targets if t.name in ranks]  # model order
    parameters = [t.name for t in stats.targets if t.name in ranks and t.parameter]  # docs/moe.md
    alpha_pattern = {}
    if config.scaling == "reference":  # s_i = α/r_ref  ⇔  alpha_i = s_i·√r_i = α·√r_i/r_ref under rsLoRA
        alpha_pattern = {n: config.lora_alpha * math.sqrt(ranks[n]) / config.r for n in names}
    kwargs = dict(config.lora_kwargs)
    modules = [t for t in stats.targets if t.name in ranks and not t.parameter]
    kwargs.setdefault("fan_in_fan_out", bool(modules) and all(t.transposed for t in modules))
    if parameters:
        kwargs["target_parameters"] = parameters
    return LoraConfig(
        r=max(ranks.values()),
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        use_rslora=True,
        target_modules=[n for n in names if n not in parameters],
        rank_pattern={n: ranks[n] for n in names},
        alpha_pattern=alpha_pattern,
        init_lora_weights=True,
        **kwargs,
    )


def build_gora_model(
    model: nn.Module,
    config: GoraConfig,
    stats: GradientStats,
    allocation: Allocation,
    *,
    adapter_name: str = "default",
    timings: dict[str, float] | None = None,
    eval_batches: Sequence[Any] | None = None,
    forward_fn: ForwardFn | None = None,
):
    """Wrap `model` in a stock PeftModel whose LoRA layers carry GoRA's ranks, A0 and B0.

    With `config.gamma == "auto"`, γ is chosen on `eval_batches` (held-out batches, run through `forward_fn` if
    given) by rescaling B0 in place (gamma.py); the search is kept in `record.extra["gamma_search"]`. With a fixed
    γ > 0 and `eval_batches`, the start is checked: a first step that raises their loss is logged as a warning with
    the fix; either way `record.extra["start_check"]` keeps L(0) and L(γ).
    Everything that can fail is computed before PEFT touches the model, so a failure leaves it as it was.
    An FSDP2-sharded `model` is refused: build on an unsharded copy, then `fully_shard` the PeftModel.
    """
    from peft import get_peft_model

    check_not_sharded(model, "build_gora_model")
    start = time.perf_counter()
    auto = config.gamma == "auto"
    if auto and not eval_batches:
        raise ValueError(
            "gamma='auto' needs held-out batches: pass eval_batches=[...] to build_gora_model (get_gora_model takes "
            "them from the dataloader after the gradient batches, or from eval_dataloader)"
        )
    weights = init_gora_weights(stats, allocation, unit_gamma_config(config) if auto else config)  # auto: B0 at γ=1
    weights = {n: to_peft_layout(A, B) if A.dim() == 3 else (A, B) for n, (A, B) in weights.items()}  # experts
    lora_config = make_lora_config(config, allocation, stats)
    base_model = base_fingerprint(model, list(allocation.adapted))  # before PEFT wraps the targets
    init_s = time.perf_counter() - start
    check = bool(eval_batches) and (auto or config.gamma > 0)
    base_loss = held_out_loss(model, eval_batches, forward_fn=forward_fn, seed=config.seed) if check else 0.0  # L(0)
    with _quantized_flags(model), parameter_patterns_quiet(lora_config.target_parameters or ()):
        peft_model = get_peft_model(model, lora_config, adapter_name=adapter_name)  # bnb layers for bnb bases
    with _unloaded_on_failure(peft_model):  # from here on a failure leaves the model as it was
        _write_lora_weights(peft_model, weights, adapter_name)
        search = None
        if auto:  # lora_B ← γ_k·B0(1) for each candidate, then γ*·B0(1)
            search = search_gamma(
                peft_model,
                weights,
                eval_batches,
                config,
                base_loss=base_loss,
                forward_fn=forward_fn,
                adapter_name=adapter_name,
            )
        start_check = None
        if search is not None:
            init_loss = dict(zip(search.candidates, search.losses)).get(search.gamma, base_loss)
            start_check = check_start(base_loss, init_loss, search.gamma, "held-out batches")
        elif check:  # a fixed γ: L(γ) with the initial adapter in place
            init_loss = held_out_loss(
                peft_model.get_base_model(), eval_batches, forward_fn=forward_fn, seed=config.seed, strict=False
            )
            start_check = check_start(base_loss, init_loss, config.gamma, "held-out batches")
        elif config.gamma != 0:  # debug: gora finetune checks the start itself, on its eval set
            logger.debug(
                "GoRA: the initial step's effect on the loss is not checked (no held-out batches): pass "
                "eval_dataloader=... to get_gora_model, or use gamma='auto'"
            )
    timings = {**(timings or {}), "init_s": (timings or {}).get("init_s", 0.0) + init_s}
    if check:
        timings["gamma_s"] = time.perf_counter() - start - init_s  # L(0), the search or check, with PEFT's wrapping
    record = make_record(config, stats, allocation, timings, base_model=base_model)
    if search is not None:
        search.apply_to(record)
    if start_check is not None:
        record.extra["start_check"] = start_check.to_dict()
    attach_record(peft_model, record, adapter_name)
    _log_summary(allocation, stats)
    return peft_model


@contextlib.contextmanager
def _unloaded_on_failure(peft_model: Any) -> Iterator[None]:
    """If the body raises, remove the LoRA layers again (`peft_model.unload()`) so the base model is as it was."""
    try:
        yield
    except BaseException:
        peft_model.unload()
        raise


@contextlib.contextmanager
def _quantized_flags(model: nn.Module) -> Iterator[None]:
    """`model.is_loaded_in_4bit` / `is_loaded_in_8bit` set where the model holds such bitsandbytes layers.

    PEFT wraps a bitsandbytes base in its bnb LoRA layer only when the model carries the flag that transformers sets
    when it loads a model quantized; a model quantized by other means gets it here and keeps it (as a loaded one
    does), unless building the PeftModel fails.
    """
    kinds = {bnb_kind(module) for module in model.modules()} - {None}
    added = [f"is_loaded_in_{kind}" for kind in sorted(kinds) if not getattr(model, f"is_loaded_in_{kind}", False)]
    previous = {flag: model.__dict__[flag] for flag in added if flag in model.__dict__}
    for flag in added:
        setattr(model, flag, True)
    try:
        yield
    except BaseException:
        for flag in added:
            if flag in previous:
                setattr(model, flag, previous[flag])
            else:
                model.__dict__.pop(flag, None)
        raise


@dataclass(frozen=True)
class RunOptions:
    """How the stages run (what GoRA computes is `GoraConfig`): the arguments that `get_gora_model` and
    `get_qgora_model` take besides the model, the config and the dataloader."""

    forward_fn: ForwardFn | None = None
    adapter_name: str = "default"
    offload_to_cpu: bool = False
    show_progress: bool = True
    eval_dataloader: Iterable[Any] | None = None
    stats: GradientStats | None = None


@dataclass
class Estimated:
    """Stages 1 and 2 done: the statistics, the allocation, gamma="auto"'s held-out batches, the stage times."""

    stats: GradientStats
    allocation: Allocation
    eval_batches: list[Any] | None
    timings: dict[str, float] = field(default_factory=dict)


def get_gora_model(
    model: nn.Module,
    config: GoraConfig,
    dataloader: Iterable[Any],
    *,
    forward_fn: ForwardFn | None = None,
    adapter_name: str = "default",
    offload_to_cpu: bool = False,
    show_progress: bool = True,
    eval_dataloader: Iterable[Any] | None = None,
    stats: GradientStats | None = None,
):
    """Run GoRA on `model` and return a stock `peft.PeftModel`, ready to train.

    Args:
        model: A transformers (or any torch) model; its weights are never modified. It may be loaded quantized by
            bitsandbytes (`BitsAndBytesConfig(load_in_4bit=True)` or `load_in_8bit=True`): the quantized targets'
            gradients are then read through module hooks and the adapter is built of PEFT's bnb LoRA layers.
        config: The GoRA configuration.
        dataloader: Iterable of batches; the first `config.num_batches` are used. Without `forward_fn` each batch is
            a dict of keyword arguments for which the model returns an output with `.loss`.
        forward_fn: Optional `forward_fn(model, batch) -> loss` for models that do not return `.loss`.
        adapter_name: Name of the LoRA adapter.
        offload_to_cpu: Keep gradient accumulators on the CPU.
        show_progress: Show progress bars.
        eval_dataloader: Held-out batches (its first `config.gamma_batches`): for `gamma="auto"` (without it they are
            the `gamma_batches` batches of `dataloader` after the first `num_batches`), and with a fixed γ > 0 to
            check that the initial step lowers their loss (a warning with the fix when it raises it).
        stats: Gradient statistics estimated earlier on this model (`gora.load_gradient_stats`, which checks the
            model fingerprint): estimation is skipped and `dataloader` only supplies gamma="auto"'s held-out batches.

    Returns:
        A `peft.PeftModel`. `model.save_pretrained(dir)` writes a plain LoRA adapter plus `gora_record.json`.

    Raises:
        ValueError: for a model sharded with FSDP2 (before any work): estimate on it with the stage functions and
            build the adapter on an unsharded copy (`build_gora_model`), then shard the PeftModel.
    """
    check_not_sharded(model, "get_gora_model")
    options = RunOptions(
        forward_fn=forward_fn,
        adapter_name=adapter_name,
        offload_to_cpu=offload_to_cpu,
        show_progress=show_progress,
        eval_dataloader=eval_dataloader,
        stats=stats,
    )
    return build_estimated(model, config, estimate_and_allocate(model, config, dataloader, options), options)


def estimate_and_allocate(
    model: nn.Module,
    config: GoraConfig,
    dataloader: Iterable[Any],
    options: RunOptions | None = None,
    *,
    held_out: bool = True,
) -> Estimated:
    """Stages 1 and 2 with their timings, plus the held-out batches that gamma="auto" needs (else None).

    With `options.stats` (estimated earlier, e.g. loaded with `gora.load_gradient_stats`) stage 1 is skipped; the
    timings then have no "estimate_s". With `held_out=False` no held-out batches are taken (the allocation alone,
    with no adapter to build: `gora allocate`).
    """
    options = options or RunOptions()
    if options.eval_dataloader is not None and config.gamma == 0:
        raise ValueError(
            "eval_dataloader is used with gamma='auto' (to choose gamma) or a fixed gamma > 0 (to check the start); "
            "with gamma=0 the adapter starts as the pretrained model: drop it"
        )
    timings: dict[str, float] = {}
    stats = options.stats
    if stats is None:
        start = time.perf_counter()
        stats = estimate_gradients(
            model,
            config,
            dataloader,
            forward_fn=options.forward_fn,
            offload_to_cpu=options.offload_to_cpu,
            show_progress=options.show_progress,
        )
        timings["estimate_s"] = time.perf_counter() - start
    start = time.perf_counter()
    importances = compute_importances(model, stats, config.importance)
    allocation = allocate_ranks(importances, stats.shapes, config)
    timings["allocate_s"] = time.perf_counter() - start
    # held-out batches: gamma="auto" takes them (from eval_dataloader or after the gradient batches); a fixed γ only
    # from eval_dataloader, to check its start (never from the training data)
    wanted = config.gamma == "auto" or options.eval_dataloader is not None
    eval_batches = held_out_batches(config, dataloader, options.eval_dataloader) if held_out and wanted else None
    return Estimated(stats, allocation, eval_batches, timings)


def build_estimated(model: nn.Module, config: GoraConfig, estimated: Estimated, options: RunOptions):
    """Stage 3 and the PEFT wrap (`build_gora_model`) from what `estimate_and_allocate` returned."""
    return build_gora_model(
        model,
        config,
        estimated.stats,
        estimated.allocation,
        adapter_name=options.adapter_name,
        timings=estimated.timings,
        eval_batches=estimated.eval_batches,
        forward_fn=options.forward_fn,
    )


def make_record(
    config: GoraConfig,
    stats: GradientStats,
    allocation: Allocation,
    timings: dict[str, float] | None = None,
    *,
    base_model: dict[str, Any] | None = None,
) -> GoraRecord:
    shapes = stats.shapes
    return GoraRecord(
        config=config.to_dict(),
        num_batches=stats.num_batches,
        budget=allocation.budget,
        trainable_params=allocation.trainable_params,
        lora_params=allocation.lora_params,
        ranks=allocation.ranks,
        importances=allocation.importances,
        advantages=allocation.advantages,
        shapes={name: list(shapes[name]) for name in allocation.ranks},
        scalings={name: layer_scaling(config, r) for name, r in allocation.adapted.items()},
        no_grad=list(stats.no_grad),
        dropped=allocation.dropped,
        gamma=config.gamma,
        timings_s=dict(timings or {}),
        extra={"estimation": dict(stats.info)} if stats.info else {},
        base_model=dict(base_model or {}),
    )


def attach_record(peft_model: Any, record: GoraRecord, adapter_name: str = "default") -> None:
    """Keep the record on the model (`peft_model.gora_records[adapter]`) and write it on every `save_pretrained`.

    The PeftModel stays a stock PeftModel; only this instance's `save_pretrained` also writes `gora_record.json`
    into the folder PEFT writes the adapter to (a subfolder for adapters other than "default").
    """
    records = peft_model.__dict__.setdefault("gora_records", {})
    records[adapter_name] = record
    if "save_pretrained" in peft_model.__dict__:
        return
    original = peft_model.save_pretrained

    def save_pretrained(save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        result = original(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            selected = kwargs.get("selected_adapters") or list(peft_model.peft_config)
            for name in selected:
                if name in records:
                    folder = save_directory if name == "default" else os.path.join(save_directory, name)
                    records[name].save(folder)
        return result

    peft_model.save_pretrained = save_pretrained


@torch.no_grad()
def _write_lora_weights(peft_model: Any, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], adapter: str) -> None:
    base = peft_model.base_model.model
    for name, (A, B) in weights.items():
        module = lora_layer(base, name)
        lora_A, lora_B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        if lora_A.shape != A.shape or lora_B.shape != B.shape:
            raise RuntimeError(
                f"PEFT built {name} with A{tuple(lora_A.shape)}, B{tuple(lora_B.shape)}; GoRA expected "
                f"A{tuple(A.shape)}, B{tuple(B.shape)}"
            )
        lora_A.copy_(A.to(device=lora_A.device, dtype=lora_A.dtype))
        lora_B.copy_(B.to(device=lora_B.device, dtype=lora_B.dtype))


def _log_summary(allocation: Allocation, stats: GradientStats) -> None:
    adapted = allocation.adapted
    ranks = list(adapted.values())
    logger.info(
        "GoRA: %d layers adapted, ranks %d..%d (mean %.2f) from %d batches; trainable %d vs LoRA %d (%.3fx)",
        len(adapted),
        min(ranks),
        max(ranks),
        sum(ranks) / len(ranks),
        stats.num_batches,
        allocation.trainable_params,
        allocation.lora_params,
        allocation.param_ratio,
    )
    if allocation.dropped:
        logger.info("GoRA: rank 0 (no adapter) for %s", ", ".join(allocation.dropped))
    if not 0.9 <= allocation.param_ratio <= 1.1:
        logger.warning(
            "GoRA: %d trainable adapter parameters are %.2fx those of LoRA at the reference rank: importance sits on "
            "layers of unusual size or ranks hit min_rank/max_rank. Adjust r to match the budget if that matters",
            allocation.trainable_params,
            allocation.param_ratio,
        )
