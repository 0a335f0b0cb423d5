"""Typed configuration of GoRA, validated on construction.

`GoraConfig` holds every choice GoRA makes; everything else about the LoRA adapter (task type, modules to save,
bias, layers to transform, ...) passes to `peft.LoraConfig` untouched, given either as keywords of their own
(`GoraConfig(task_type="SEQ_CLS")`, checked against LoraConfig's fields) or in `lora_kwargs`.
The CLI builds its options from these fields (their `metadata["help"]`), so there is one source of truth.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Importance = Literal["mean_abs_wg", "grad_nuclear", "wg_nuclear", "grad_frobenius", "wg_frobenius"]
Features = Literal["sqrt", "linear"]
Rounding = Literal["round", "floor"]
Scaling = Literal["rslora", "reference"]
GradientStore = Literal["full", "sketch"]
GradientRoute = Literal["auto", "weights", "hooks"]
GammaSearchKind = Literal["bracket", "grid"]

IMPORTANCE_CHOICES: tuple[str, ...] = Importance.__args__  # type: ignore[attr-defined]
FEATURES_CHOICES: tuple[str, ...] = Features.__args__  # type: ignore[attr-defined]
ROUNDING_CHOICES: tuple[str, ...] = Rounding.__args__  # type: ignore[attr-defined]
SCALING_CHOICES: tuple[str, ...] = Scaling.__args__  # type: ignore[attr-defined]
GRADIENT_STORE_CHOICES: tuple[str, ...] = GradientStore.__args__  # type: ignore[attr-defined]
GRADIENT_ROUTE_CHOICES: tuple[str, ...] = GradientRoute.__args__  # type: ignore[attr-defined]
GAMMA_SEARCH_CHOICES: tuple[str, ...] = GammaSearchKind.__args__  # type: ignore[attr-defined]
NUCLEAR_IMPORTANCES: tuple[str, ...] = ("grad_nuclear", "wg_nuclear")
# `target_parameters` switch: every 3-D floating-point parameter of the model (the fused expert stacks of MoE models)
ALL_EXPERTS = "all-experts"

# LoraConfig fields that GoRA decides itself: passing them through `lora_kwargs` would contradict the allocation.
GORA_OWNED_LORA_FIELDS: dict[str, str] = {
    "r": "set GoraConfig.r (the reference rank r_ref)",
    "lora_alpha": "set GoraConfig.lora_alpha",
    "lora_dropout": "set GoraConfig.lora_dropout",
    "target_modules": "set GoraConfig.target_modules",
    "rank_pattern": "GoRA computes per-layer ranks; tune GoraConfig.min_rank/max_rank/r instead",
    "alpha_pattern": "GoRA computes per-layer scalings; choose GoraConfig.scaling instead",
    "use_rslora": "GoRA always uses rsLoRA scaling; choose GoraConfig.scaling instead",
    "init_lora_weights": "GoRA initializes the adapter itself",
    "use_dora": "DoRA is a different method; GoRA yields plain LoRA adapters",
    "target_parameters": "set GoraConfig.target_parameters",
    "eva_config": "EVA is a different initialization",
    "lora_ga_config": "LoRA-GA is a different initialization",
    "corda_config": "CorDA is a different initialization",
}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class GoraConfig:
    """Configuration of GoRA (Gradient-driven Adaptive Low Rank Adaptation, arXiv 2502.12171).

    Args:
        target_modules: Module names or name suffixes, matched exactly as `peft.LoraConfig.target_modules`
            (a list of suffixes, a regex string, or `"all-linear"`). None = PEFT's defaults for the model type;
            `[]` = no module (with `target_parameters`, as in PEFT).
        target_parameters: Parameter names or name suffixes, matched as `peft.LoraConfig.target_parameters`
            (`"experts.gate_up_proj"`, `"mlp.experts.down_proj"`), 2-D or 3-D (a stack of E expert matrices), or
            `"all-experts"`: every 3-D parameter (the fused experts of Mixtral, Qwen3-MoE, ...). docs/moe.md.
        r: Reference rank r_ref; the parameter budget is that of plain LoRA at this rank.
        min_rank: Smallest rank a targeted layer gets (r_min). 0 lets GoRA drop unimportant layers.
        max_rank: Largest rank a layer gets (r_max); also capped at min(out_features, in_features).
        lora_alpha: α; the adapter scaling is α/sqrt(r_i) (rsLoRA).
        lora_dropout: Dropout on the adapter input during training (as in PEFT).
        gamma: γ, the size of the gradient step that the initial adapter takes (0 = allocation only, B0 = 0), or
            "auto": chosen among `gamma_candidates` by the loss on `gamma_batches` held-out batches (gamma.py).
        gamma_candidates: Candidate γ values for gamma="auto" (None = 5e-2·2^k, k = −6..2: 7.8e-4 … 0.2).
        gamma_batches: K, the number of held-out batches that gamma="auto" evaluates each candidate on.
        gamma_search: How gamma="auto" walks the candidates: `bracket` = at most 3 candidates, starting at the one
            nearest the paper's 5e-2 and stepping up while the loss falls or backing off while the step raises it;
            `grid` = every candidate (gamma.py).
        num_batches: N, the number of batches whose gradients are averaged.
        seed: Seed of A0 (drawn per module from (seed, module name)) and of dropout during estimation.
        importance: Layer importance I(W); `mean_abs_wg` = mean|W ⊙ G| (the paper's choice).
        features: f(m, n) in the budget and rank formulas: `sqrt` = sqrt(m+n) (paper), `linear` = m+n (research code).
        rounding: `round` (paper) or `floor` (research code) when turning real-valued ranks into integers.
        scaling: `rslora` = α/sqrt(r_i) per layer (the paper, and the research code's scripts); `reference` = α/r_ref
            for every layer (the research code's default, with `--gora-dynamic-scaling` and `--gora-rank-stablize`
            both off).
        gradient_store: What estimation keeps per layer: `full` = the float32 mean gradient G (m x n); `sketch` =
            Y = G·A_maxᵀ (m x max_rank) plus G at a fixed sample of entries for the importance (bounded memory;
            not with nuclear-norm importances).
        gradient_route: How estimation reads each layer's gradient: `weights` = the weight's own gradient (a
            post-accumulate-grad hook), `hooks` = G = Σ_tokens dyᵀx from module hooks on the layer's input x and
            output gradient dy (no weight gradient is ever formed), `auto` = hooks for bitsandbytes 4-bit / 8-bit
            layers (they have no weight gradient) and weights for nn.Linear / Conv1D. Both give G up to float
            rounding.
        offload_to_cpu: Keep the gradient statistics on the CPU instead of the model's device.
        sketch_samples: Entries of G sampled per sketched layer, on average, for the importance in sketch mode; the
            total is split across layers in proportion to their ranks under the pilot batch (more samples where a
            relative error moves the rank more). More samples: ranks closer to `full`, a little more memory.
        adaptive_batches: Stop estimation early once every layer's importance changes by at most
            `adaptive_threshold` (relative) between consecutive batches, after `adaptive_min_batches` batches.
        adaptive_threshold: τ, the relative change of importance below which estimation stops.
        adaptive_min_batches: Smallest number of batches before adaptive stopping may stop.
        lora_kwargs: Any other `peft.LoraConfig` argument (task_type, modules_to_save, bias, layers_to_transform, ...);
            they may also be given as keywords of their own: `GoraConfig(task_type="SEQ_CLS")`.
    """

    target_modules: Sequence[str] | str | None = field(
        default=None, metadata={"help": "modules to adapt: names/suffixes as PEFT matches them, or 'all-linear'"}
    )
    target_parameters: Sequence[str] | str | None = field(
        default=None,
        metadata={
            "help": "parameters to adapt (PEFT's target_parameters): names/suffixes of 2-D or 3-D (fused expert) "
            f"parameters, or '{ALL_EXPERTS}' for every 3-D parameter"
        },
    )
    r: int = field(default=8, metadata={"help": "reference rank r_ref that sets the parameter budget"})
    min_rank: int = field(default=4, metadata={"help": "smallest rank of a layer (0 drops unimportant layers)"})
    max_rank: int = field(default=32, metadata={"help": "largest rank of a layer"})
    lora_alpha: float = field(default=16, metadata={"help": "alpha; adapter scaling is alpha/sqrt(rank)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input during training"})
    gamma: float | Literal["auto"] = field(
        default=5e-2,
        metadata={"help": "step size of the gradient step taken at initialization, or 'auto' (held-out loss)"},
    )
    gamma_candidates: tuple[float, ...] | None = field(
        default=None, metadata={"help": "candidate gammas for gamma='auto' (default 5e-2 * 2^k, k=-6..2)"}
    )
    gamma_batches: int = field(default=4, metadata={"help": "held-out batches that gamma='auto' evaluates"})
    gamma_search: GammaSearchKind = field(
        default="bracket",
        metadata={
            "help": "gamma='auto': bracket (at most 3 candidates from 5e-2) or grid (every candidate)",
            "choices": GAMMA_SEARCH_CHOICES,
        },
    )
    num_batches: int = field(default=64, metadata={"help": "number of batches N for gradient estimation"})
    seed: int = field(default=0, metadata={"help": "seed of A0 and of dropout during estimation"})
    importance: Importance = field(
        default="mean_abs_wg", metadata={"help": "layer importance metric", "choices": IMPORTANCE_CHOICES}
    )
    features: Features = field(
        default="sqrt", metadata={"help": "budget features: sqrt(m+n) (paper) or m+n", "choices": FEATURES_CHOICES}
    )
    rounding: Rounding = field(
        default="round", metadata={"help": "rank rounding: round (paper) or floor", "choices": ROUNDING_CHOICES}
    )
    scaling: Scaling = field(
        default="rslora",
        metadata={
            "help": "alpha/sqrt(r_i) per layer (paper), or alpha/r_ref everywhere (research code's default)",
            "choices": SCALING_CHOICES,
        },
    )
    gradient_store: GradientStore = field(
        default="full",
        metadata={
            "help": "gradient statistics: full mean G, or a low-memory sketch (G·A_maxᵀ + sampled entries)",
            "choices": GRADIENT_STORE_CHOICES,
        },
    )
    gradient_route: GradientRoute = field(
        default="auto",
        metadata={
            "help": "read G from weight gradients or from module hooks (dy^T x); auto: hooks for bitsandbytes layers",
            "choices": GRADIENT_ROUTE_CHOICES,
        },
    )
    offload_to_cpu: bool = field(default=False, metadata={"help": "keep gradient statistics on the CPU"})
    sketch_samples: int = field(
        default=1024,
        metadata={"help": "entries of G sampled per layer (on average) for the importance in sketch mode"},
    )
    adaptive_batches: bool = field(
        default=False, metadata={"help": "stop estimation once every layer's importance has converged"}
    )
    adaptive_threshold: float = field(
        default=0.1, metadata={"help": "relative importance change between batches that counts as converged"}
    )
    adaptive_min_batches: int = field(
        default=3, metadata={"help": "smallest number of batches before adaptive stopping may stop"}
    )
    lora_kwargs: Mapping[str, Any] = field(
        default_factory=dict,
        metadata={"help": "other peft.LoraConfig arguments, passed through: a mapping, e.g. '{bias: lora_only}'"},
    )

    def __post_init__(self) -> None:
        tm = self.target_modules
        if tm is not None and not isinstance(tm, str):
            _check(
                all(isinstance(t, str) and t for t in tm),
                f"target_modules must be module names (strings), got {tm!r}",
            )
            object.__setattr__(self, "target_modules", tuple(tm))
            _check(
                len(tm) > 0 or self.target_parameters is not None,
                "target_modules is empty: name the modules to adapt, e.g. ['q_proj', 'v_proj']",
            )
        for name in ("r", "min_rank", "max_rank", "num_batches", "seed", "sketch_samples", "adaptive_min_batches"):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and not isinstance(value, bool),
                f"{name} must be an integer, got {value!r}",
            )
        _check(self.r > 0, f"r must be a positive integer (the reference rank), got {self.r}")
        _check(self.min_rank >= 0, f"min_rank must be >= 0, got {self.min_rank}")
        _check(self.max_rank > 0, f"max_rank must be a positive integer, got {self.max_rank}")
        _check(
            self.min_rank <= self.max_rank,
            f"min_rank ({self.min_rank}) > max_rank ({self.max_rank}): lower min_rank or raise max_rank",
        )
        _check(self.num_batches > 0, f"num_batches must be a positive integer, got {self.num_batches}")
        _check(
            _is_real(self.lora_alpha) and self.lora_alpha > 0,
            f"lora_alpha must be a positive number, got {self.lora_alpha!r}",
        )
        _check(
            _is_real(self.lora_dropout) and 0.0 <= self.lora_dropout < 1.0,
            f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}",
        )
        self._check_gamma()
        for name, choices in (
            ("importance", IMPORTANCE_CHOICES),
            ("features", FEATURES_CHOICES),
            ("rounding", ROUNDING_CHOICES),
            ("scaling", SCALING_CHOICES),
            ("gamma_search", GAMMA_SEARCH_CHOICES),
        ):
            value = getattr(self, name)
            _check(value in choices, f"{name}={value!r} is not one of {', '.join(choices)}")
        self._check_estimation()
        self._check_target_parameters()
        _check(isinstance(self.lora_kwargs, Mapping), "lora_kwargs must be a mapping of LoraConfig arguments")
        self._check_lora_kwargs()
        object.__setattr__(self, "lora_kwargs", dict(self.lora_kwargs))

    def _check_target_parameters(self) -> None:
        tp = self.target_parameters
        if tp is None:
            return
        if isinstance(tp, str):
            _check(
                tp == ALL_EXPERTS,
                f"target_parameters={tp!r}: give a list of parameter names (e.g. ['experts.gate_up_proj', "
                f"'experts.down_proj']) or '{ALL_EXPERTS}' (every 3-D parameter)",
            )
        else:
            _check(
                len(tp) > 0 and all(isinstance(t, str) and t for t in tp),
                f"target_parameters must be a non-empty list of parameter names (strings), got {tp!r}",
            )
            object.__setattr__(self, "target_parameters", tuple(tp))
        # PEFT's ParamWrapper applies no dropout (x cannot be factored out of the expert's matmul): docs/moe.md
        _check(
            self.lora_dropout == 0,
            f"lora_dropout={self.lora_dropout!r} with target_parameters: PEFT's parameter adapters (ParamWrapper) "
            "cannot apply dropout; set lora_dropout=0",
        )
        _check(
            self.gradient_store == "full",
            "gradient_store='sketch' does not handle target_parameters (expert stacks): use gradient_store='full'",
        )
        _check(
            self.gradient_route != "hooks",
            "gradient_route='hooks' reads module inputs, which fused expert parameters do not have per expert: use "
            "gradient_route='auto' or 'weights' with target_parameters",
        )

    def _check_estimation(self) -> None:
        _check(
            self.gradient_store in GRADIENT_STORE_CHOICES,
            f"gradient_store={self.gradient_store!r} is not one of {', '.join(GRADIENT_STORE_CHOICES)}",
        )
        _check(
            self.gradient_route in GRADIENT_ROUTE_CHOICES,
            f"gradient_route={self.gradient_route!r} is not one of {', '.join(GRADIENT_ROUTE_CHOICES)}",
        )
        _check(
            not (self.gradient_store == "sketch" and self.importance in NUCLEAR_IMPORTANCES),
            f"importance={self.importance!r} needs the full gradient G (a nuclear norm), which "
            "gradient_store='sketch' does not keep: use importance='mean_abs_wg' or gradient_store='full'",
        )
        for name in ("offload_to_cpu", "adaptive_batches"):
            _check(isinstance(getattr(self, name), bool), f"{name} must be True or False, got {getattr(self, name)!r}")
        _check(self.sketch_samples > 0, f"sketch_samples must be a positive integer, got {self.sketch_samples}")
        _check(
            _is_real(self.adaptive_threshold)
            and math.isfinite(self.adaptive_threshold)
            and self.adaptive_threshold > 0,
            f"adaptive_threshold must be a finite number > 0 (a relative change), got {self.adaptive_threshold!r}",
        )
        _check(
            self.adaptive_min_batches >= 2,
            f"adaptive_min_batches must be >= 2 (a change needs two batches), got {self.adaptive_min_batches}",
        )
        _check(
            not self.adaptive_batches or self.adaptive_min_batches <= self.num_batches,
            f"adaptive_min_batches ({self.adaptive_min_batches}) > num_batches ({self.num_batches}): "
            "lower adaptive_min_batches or raise num_batches",
        )

    def _check_gamma(self) -> None:
        _check(
            self.gamma == "auto" or (_is_real(self.gamma) and math.isfinite(self.gamma) and self.gamma >= 0),
            f"gamma must be a finite number >= 0 (0 = allocation only) or 'auto' (chosen on held-out batches), "
            f"got {self.gamma!r}",
        )
        _check(
            isinstance(self.gamma_batches, int)
            and not isinstance(self.gamma_batches, bool)
            and self.gamma_batches > 0,
            f"gamma_batches must be a positive integer (held-out batches for gamma='auto'), got {self.gamma_batches!r}",
        )
        candidates = self.gamma_candidates
        if candidates is None:
            return
        _check(
            self.gamma == "auto",
            f"gamma_candidates is only used with gamma='auto' (gamma is {self.gamma!r}): set gamma='auto' or drop it",
        )
        _check(
            not isinstance(candidates, (str, bytes)) and isinstance(candidates, Sequence) and len(candidates) > 0,
            f"gamma_candidates must be a non-empty sequence of numbers > 0, got {candidates!r}",
        )
        _check(
            all(_is_real(c) and math.isfinite(c) and c > 0 for c in candidates),
            f"gamma_candidates must all be finite numbers > 0 (gamma = 0 is always the fallback), got {candidates!r}",
        )
        object.__setattr__(self, "gamma_candidates", tuple(sorted({float(c) for c in candidates})))

    def _check_lora_kwargs(self) -> None:
        for key in self.lora_kwargs:
            _check_lora_field(key, "lora_kwargs")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the configuration."""
        out = dataclasses.asdict(self)
        for key in ("target_modules", "target_parameters"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        out["lora_kwargs"] = {k: _jsonable(v) for k, v in self.lora_kwargs.items()}
        return out


_OWN_FIELDS = frozenset(f.name for f in dataclasses.fields(GoraConfig))


def _accept_lora_fields(cls: type[GoraConfig]) -> None:
    """Let `GoraConfig(...)` take `peft.LoraConfig` fields as keywords of their own (PEFT users write
    `task_type="SEQ_CLS"`): they join `lora_kwargs`, checked against LoraConfig with the nearest name on a typo."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: GoraConfig, *args: Any, **kwargs: Any) -> None:
        extra = {key: kwargs.pop(key) for key in list(kwargs) if key not in _OWN_FIELDS}
        if extra:
            given = kwargs.get("lora_kwargs") or {}
            _check(isinstance(given, Mapping), "lora_kwargs must be a mapping of LoraConfig arguments")
            for key in extra:
                _check_lora_field(key, "")
                _check(
                    key not in given,
                    f"{key!r} is given twice, as GoraConfig({key}=...) and in lora_kwargs: give it once",
                )
            kwargs["lora_kwargs"] = {**given, **extra}
        init(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[method-assign]


def _check_lora_field(key: str, where: str) -> None:
    """A LoraConfig field that GoRA passes through; else a ValueError naming the fix (or the nearest name)."""
    from peft import LoraConfig

    label = f"{where}[{key!r}]" if where else f"GoraConfig({key}=...)"
    if key in GORA_OWNED_LORA_FIELDS:
        raise ValueError(f"{label} is decided by GoRA: {GORA_OWNED_LORA_FIELDS[key]}")
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    if key not in known:
        close = difflib.get_close_matches(key, sorted(known if where else known | _OWN_FIELDS), n=1)
        hint = f": did you mean {close[0]!r}?" if close else ": check the spelling"
        what = "" if where else " (nor a GoraConfig field)"
        raise ValueError(f"{label}: {key!r} is not a peft.LoraConfig argument{what}{hint}")


_accept_lora_fields(GoraConfig)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)
