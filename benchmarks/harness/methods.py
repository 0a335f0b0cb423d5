"""Each method as transformers / PEFT ship it, built on the same base model, data and calibration batches.

A method is a name plus options (`METHODS`). `build(method, task, spec)` turns the base model into the model to
train and returns the wall time of its data-driven estimation (`estimate_s`: gradients, activations) and of the
rest of its construction (`init_s`: allocation, SVDs, initialization, PEFT wrapping).

Budgets: every LoRA-type method targets the same modules at r = spec["r"]. GoRA allocates ranks at LoRA's
budget (its rounding lands within ±10%); `gora-matched` raises GoRA's reference rank until its count is the one
closest to LoRA's; EVA redistributes the same total rank (rho = 2); AdaLoRA starts at init_r = 1.5 r and prunes
to a final average of r (its own convention: the final budget is LoRA's, the count reported is at the start).
`spec["gora_min_rank"]`, when set, replaces GoRA's default min_rank (4) in every GoRA variant but `gora-fixed`.

Scaling: the `-rs` baselines (PiSSA, LoRA-GA, EVA) use rsLoRA's α/√r_i like GoRA, so that they differ from GoRA in
their initialization and allocation, not in the size of their steps. PEFT applies the scaling consistently in
them: PiSSA divides the singular values by the scaling before splitting them and subtracts s·B·A from W0, LoRA-GA
subtracts s·B·A from W0 (both start at the base model's function; tests/test_benchmarks.py checks it), EVA starts at
B = 0 and, with adjust_scaling_factors=False, keeps α for every rank, so s_i = α/√r_i.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from .measure import Timer
from .tasks import TaskData

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """A method: its kind (how it is built) and options."""

    kind: str  # full | lora | loraga | adalora | eva | gora
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    loraplus: float | None = None  # LoRA+ ratio lr_B / lr_A, via peft.optimizers.create_loraplus_optimizer


METHODS: dict[str, Method] = {
    "full": Method("full", "full fine-tuning (all weights)"),
    "lora": Method("lora", "LoRA (PEFT default init, alpha/r scaling)"),
    "rslora": Method("lora", "rsLoRA (alpha/sqrt(r) scaling)", {"use_rslora": True}),
    "pissa": Method("lora", "PiSSA (init_lora_weights='pissa'; modifies W0)", {"init_lora_weights": "pissa"}),
    "pissa-rs": Method(
        "lora",
        "PiSSA with rsLoRA scaling (alpha/sqrt(r); modifies W0)",
        {"init_lora_weights": "pissa", "use_rslora": True},
    ),
    "loraga": Method("loraga", "LoRA-GA (preprocess_loraga + init_lora_weights='lora_ga'; modifies W0)"),
    "loraga-rs": Method("loraga", "LoRA-GA with rsLoRA scaling (alpha/sqrt(r); modifies W0)", {"use_rslora": True}),
    "adalora": Method(
        "adalora",
        "AdaLoRA (init_r=1.5r -> target_r=r; tinit 10%, final phase 20% of the steps; update_and_allocate every step)",
    ),
    "eva": Method("eva", "EVA (init_lora_weights='eva', rho=2, initialize_lora_eva_weights)"),
    "eva-rs": Method(
        "eva",
        "EVA with rsLoRA scaling (alpha/sqrt(r_i), adjust_scaling_factors=False; rho=2)",
        {"use_rslora": True, "adjust_scaling_factors": False},
    ),
    "rslora-r32": Method(
        "lora", "rsLoRA at r = 32 whatever the budget (the capacity reference)", {"use_rslora": True, "r": 32}
    ),
    "gora": Method(
        "gora", "GoRA (gamma 5e-2, mean|W*G|; ranks 4..32, or from the block's gora_min_rank up: each block says)"
    ),
    "gora-auto": Method(
        "gora",
        "GoRA, gamma='auto' (chosen on 4 training batches after the N calibration batches)",
        {"gamma": "auto"},
    ),
    "gora-gamma0": Method("gora", "GoRA, gamma=0: allocation only (B0 = 0)", {"gamma": 0.0}),
    "gora-fixed": Method("gora", "GoRA, min_rank=max_rank=r: initialization only", {"fixed_rank": True}),
    "gora-random": Method(
        "gora",
        "GoRA's ranks shuffled among layers of the same shape (seeded): allocation without its choice of layer",
        {"shuffle": True},
    ),
    "gora-matched": Method(
        "gora", "GoRA, reference rank set so that its count is the closest to LoRA's", {"match": True}
    ),
    "lora+loraplus": Method("lora", "LoRA trained with LoRA+ (lr_B = 16 lr_A)", loraplus=16.0),
    "gora+loraplus": Method("gora", "GoRA trained with LoRA+ (lr_B = 16 lr_A)", loraplus=16.0),
    # LoRA+ check (nlu): which part of GoRA + LoRA+ makes it collapse
    "rslora+loraplus": Method(
        "lora", "rsLoRA trained with LoRA+ (lr_B = 16 lr_A): rsLoRA's scaling, B0 = 0", {"use_rslora": True}, 16.0
    ),
    "gora-gamma0+loraplus": Method(
        "gora", "GoRA, gamma=0 (B0 = 0), trained with LoRA+ (lr_B = 16 lr_A)", {"gamma": 0.0}, 16.0
    ),
    "gora+loraplus4": Method("gora", "GoRA trained with LoRA+ at ratio 4 (lr_B = 4 lr_A)", loraplus=4.0),
    # paper ablations (nlu)
    "gora-rank6-15": Method("gora", "GoRA, rank range 6..15", {"min_rank": 6, "max_rank": 15}),
    "gora-gamma3e-2": Method("gora", "GoRA, gamma 3e-2", {"gamma": 3e-2}),
    "gora-gamma8e-2": Method("gora", "GoRA, gamma 8e-2", {"gamma": 8e-2}),
    "gora-imp-grad_nuclear": Method("gora", "GoRA, importance = nuclear norm of G", {"importance": "grad_nuclear"}),
    "gora-imp-wg_nuclear": Method("gora", "GoRA, importance = nuclear norm of W*G", {"importance": "wg_nuclear"}),
}

DATA_DRIVEN = {"loraga", "eva", "gora"}
ALPHA = 16
ADALORA_TINIT = 0.1  # share of the steps before AdaLoRA starts pruning
ADALORA_TFINAL = 0.2  # share of the steps at the end with the budget fixed


def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_reference_params(model: torch.nn.Module, targets: list[str], r: int) -> int:
    """r·Σ(m+n) over the linear modules plain LoRA would adapt (PEFT's suffix matching; adapter weights only)."""
    total = 0
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            total += r * (weight.shape[0] + weight.shape[1])
    return total


def _forward_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def plain_fwd_bwd(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Seconds for one forward + backward of the unmodified model per batch (all weights trainable, as loaded).

    The lower bound of any gradient-based initializer on these batches. Gradients are dropped afterwards.
    """
    was_training = model.training
    model.train()
    with Timer() as t:
        for batch in batches:
            _forward_loss(model, batch).backward()
            model.zero_grad(set_to_none=True)
    model.train(was_training)
    return t.s


def _gora_config(task: TaskData, spec: dict[str, Any], options: dict[str, Any], r: int):
    import gora

    kwargs: dict[str, Any] = {
        "target_modules": task.target_modules,
        "r": r,
        "lora_alpha": ALPHA,
        "num_batches": spec["num_batches"],
        "seed": spec.get("init_seed", spec["seed"]),
        "lora_kwargs": {"task_type": task.task_type},
    }
    if spec.get("gora_min_rank") is not None:
        kwargs["min_rank"] = spec["gora_min_rank"]
    for key in ("gamma", "min_rank", "max_rank", "importance"):
        if key in options:
            kwargs[key] = options[key]
    if options.get("fixed_rank"):
        kwargs["min_rank"] = kwargs["max_rank"] = r
    return gora.GoraConfig(**kwargs)


def build_gora(task: TaskData, spec: dict[str, Any], options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    import gora

    r = spec["r"]
    info: dict[str, Any] = {}
    if options.get("shuffle"):
        config = _gora_config(task, spec, options, r)
        with Timer() as t_est:
            stats = gora.estimate_gradients(task.model, config, task.calib_batches, show_progress=False)
        with Timer() as t_init:
            importances = gora.compute_importances(task.model, stats, config.importance)
            allocation = gora.allocate_ranks(importances, stats.shapes, config)
            ranks = shuffled_ranks(allocation.ranks, stats.shapes, spec.get("init_seed", spec["seed"]))
            model = gora.build_gora_model(task.model, config, stats, dataclasses.replace(allocation, ranks=ranks))
        record = model.gora_records["default"]
        moved = sum(ranks[k] != allocation.ranks[k] for k in ranks)
        info.update(estimate_s=t_est.s, init_s=t_init.s, shuffled_layers=moved, gora_ranks=allocation.ranks)
    elif not options.get("match"):
        config = _gora_config(task, spec, options, r)
        held_out = None
        if config.gamma == "auto":  # the training batches after the N calibration ones (never the validation split)
            n = spec["num_batches"]
            held_out = task.train_batches[n : n + config.gamma_batches]
        with Timer() as t:
            model = gora.get_gora_model(
                task.model, config, task.calib_batches, show_progress=False, eval_dataloader=held_out
            )
        record = model.gora_records["default"]
        estimate_s = record.timings_s["estimate_s"]
        info.update(estimate_s=estimate_s, init_s=t.s - estimate_s)
    else:  # estimate once, then raise r_ref until GoRA's adapter count is the closest to LoRA's
        target = lora_reference_params(task.model, task.target_modules, r)
        config = _gora_config(task, spec, options, r)
        with Timer() as t_est:
            stats = gora.estimate_gradients(task.model, config, task.calib_batches, show_progress=False)
        with Timer() as t_init:
            importances = gora.compute_importances(task.model, stats, config.importance)
            best = None
            for r_ref in range(1, 4 * r + 1):
                cfg = _gora_config(task, spec, options, r_ref)
                alloc = gora.allocate_ranks(importances, stats.shapes, cfg)
                gap = abs(alloc.trainable_params - target)
                if best is None or gap < best[0]:
                    best = (gap, cfg, alloc)
            _, config, allocation = best
            model = gora.build_gora_model(task.model, config, stats, allocation)
        record = model.gora_records["default"]
        info.update(estimate_s=t_est.s, init_s=t_init.s, matched_r_ref=config.r)
    ranks = [v for v in record.ranks.values() if v > 0]
    info.update(
        adapter_params=record.trainable_params,
        lora_adapter_params_at_r_ref=record.lora_params,
        ranks_min=min(ranks),
        ranks_max=max(ranks),
        ranks_mean=sum(ranks) / len(ranks),
        gamma=record.gamma,
    )
    return model, info


def shuffled_ranks(ranks: dict[str, int], shapes: dict[str, tuple[int, int]], seed: int) -> dict[str, int]:
    """GoRA's ranks permuted at random among layers of the same shape (m, n), so the parameter count and the
    multiset of ranks stay exactly GoRA's and only which layer gets which rank changes."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name in sorted(ranks):
        groups.setdefault(tuple(shapes[name]), []).append(name)
    rng = random.Random(seed)
    out: dict[str, int] = {}
    for names in groups.values():
        values = [ranks[n] for n in names]
        rng.shuffle(values)
        out.update(zip(names, values))
    return {name: out[name] for name in ranks}


def _lora_config(task: TaskData, r: int, **fields: Any) -> Any:
    """PEFT's LoraConfig at rank `r` and α = ALPHA on the task's target modules and task type; `fields`: the
    method's own settings (its init, rsLoRA's scaling, ...)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=ALPHA, target_modules=task.target_modules, task_type=task.task_type, **fields)


def _wrap(task: TaskData, config: Any, estimate_s: float = 0.0) -> tuple[Any, dict[str, Any]]:
    """`get_peft_model` on the task's model, timed (`init_s`); `estimate_s`: what the method spent before it."""
    from peft import get_peft_model

    with Timer() as t:
        model = get_peft_model(task.model, config)
    return model, {"estimate_s": estimate_s, "init_s": t.s}


def build_lora(task: TaskData, spec: dict[str, Any], options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    options = dict(options)
    r = options.pop("r", spec["r"])
    return _wrap(task, _lora_config(task, r, **options))


def build_loraga(task: TaskData, spec: dict[str, Any], options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    config = _lora_config(task, spec["r"], init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(), **options)
    base = task.model

    def train_step() -> None:
        for batch in task.calib_batches:
            _forward_loss(base, batch).backward()

    with Timer() as t_est:
        preprocess_loraga(base, config, train_step)
    return _wrap(task, config, estimate_s=t_est.s)


def build_eva(task: TaskData, spec: dict[str, Any], options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    from peft import EvaConfig, initialize_lora_eva_weights
    from peft.tuners.lora.eva import prepare_layer_inputs_fn_language_modeling

    def prepare_layer_inputs(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
        # BERT's pooler sees one vector per sequence ([batch, hidden], a non-contiguous slice that PEFT's input
        # hash cannot .view()): use it whole, made contiguous; token inputs exactly as PEFT does
        x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
        if x.dim() == 2:
            return x.contiguous()
        return prepare_layer_inputs_fn_language_modeling(layer_input, model_input, layer_name)

    config = _lora_config(
        task,
        spec["r"],
        init_lora_weights="eva",
        eva_config=EvaConfig(
            rho=2.0,
            tau=spec.get("eva_tau", 0.99),
            use_label_mask=task.task_type == "CAUSAL_LM",
            adjust_scaling_factors=options.get("adjust_scaling_factors", True),
        ),
        use_rslora=options.get("use_rslora", False),
    )
    model, info = _wrap(task, config)
    with Timer() as t_est:  # incremental PCA of layer inputs over the calibration batches, then the SVD init
        initialize_lora_eva_weights(
            model, task.calib_batches, prepare_layer_inputs_fn=prepare_layer_inputs, show_progress_bar=False
        )
    info["estimate_s"] = t_est.s
    return model, info


def build_adalora(task: TaskData, spec: dict[str, Any], options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    from peft import AdaLoraConfig

    total = spec["steps"]
    config = AdaLoraConfig(
        init_r=round(1.5 * spec["r"]),
        target_r=spec["r"],
        tinit=max(1, round(ADALORA_TINIT * total)),
        tfinal=max(1, round(ADALORA_TFINAL * total)),
        deltaT=max(1, total // 25),
        total_step=total,
        lora_alpha=ALPHA,
        target_modules=task.target_modules,
        task_type=task.task_type,
    )
    return _wrap(task, config)


def build_full(task: TaskData, spec: dict[str, Any], options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    for p in task.model.parameters():
        p.requires_grad_(True)
    return task.model, {"estimate_s": 0.0, "init_s": 0.0}


BUILDERS = {
    "full": build_full,
    "lora": build_lora,
    "loraga": build_loraga,
    "eva": build_eva,
    "adalora": build_adalora,
    "gora": build_gora,
}


def build(name: str, task: TaskData, spec: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Build method `name` on `task.model`; returns (model to train, info with estimate_s and init_s)."""
    method = METHODS[name]
    return BUILDERS[method.kind](task, spec, method.options)


def scalings(model: Any) -> dict[str, float]:
    """rank -> the adapter scaling s of the LoRA layers with that rank (one value per rank; a conflict raises)."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, float] = {}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter, r in module.r.items():
                s = float(module.scaling[adapter])
                if out.setdefault(str(r), s) != s:
                    raise ValueError(f"rank {r} has two scalings, {out[str(r)]} and {s}")
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def adalora_rank_total(model: Any, capacity: bool = False) -> int:
    """Σ of AdaLoRA's ranks: the non-zero entries of every lora_E (or, with `capacity`, their number), to check
    that the budget schedule pruned the ranks from init_r toward target_r."""
    total = 0
    for n, p in model.named_parameters():
        if "lora_E" in n:
            total += p.numel() if capacity else int((p.detach() != 0).sum())
    return total
