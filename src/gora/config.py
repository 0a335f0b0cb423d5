"""Typed configuration of GoRA, validated on construction.

`GoraConfig` holds every choice GoRA makes; everything else about the LoRA adapter (task type, modules to save,
bias, layers to transform, ...) passes through `lora_kwargs` to `peft.LoraConfig` untouched.
The CLI builds its options from these fields (their `metadata["help"]`), so there is one source of truth.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Importance = Literal["mean_abs_wg", "grad_nuclear", "wg_nuclear", "grad_frobenius", "wg_frobenius"]
Features = Literal["sqrt", "linear"]
Rounding = Literal["round", "floor"]
Scaling = Literal["rslora", "reference"]

IMPORTANCE_CHOICES: tuple[str, ...] = Importance.__args__  # type: ignore[attr-defined]
FEATURES_CHOICES: tuple[str, ...] = Features.__args__  # type: ignore[attr-defined]
ROUNDING_CHOICES: tuple[str, ...] = Rounding.__args__  # type: ignore[attr-defined]
SCALING_CHOICES: tuple[str, ...] = Scaling.__args__  # type: ignore[attr-defined]

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
    "target_parameters": "GoRA targets nn.Linear / Conv1D modules by name; use target_modules",
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
            (a list of suffixes, a regex string, or `"all-linear"`).
        r: Reference rank r_ref; the parameter budget is that of plain LoRA at this rank.
        min_rank: Smallest rank a targeted layer gets (r_min). 0 lets GoRA drop unimportant layers.
        max_rank: Largest rank a layer gets (r_max); also capped at min(out_features, in_features).
        lora_alpha: α; the adapter scaling is α/sqrt(r_i) (rsLoRA).
        lora_dropout: Dropout on the adapter input during training (as in PEFT).
        gamma: γ, the size of the gradient step that the initial adapter takes (0 = allocation only, B0 = 0).
        num_batches: N, the number of batches whose gradients are averaged.
        seed: Seed of A0 (drawn per module from (seed, module name)) and of dropout during estimation.
        importance: Layer importance I(W); `mean_abs_wg` = mean|W ⊙ G| (the paper's choice).
        features: f(m, n) in the budget and rank formulas: `sqrt` = sqrt(m+n) (paper), `linear` = m+n (research code).
        rounding: `round` (paper) or `floor` (research code) when turning real-valued ranks into integers.
        scaling: `rslora` = α/sqrt(r_i) per layer (paper); `reference` = α/sqrt(r_ref) for every layer (research code).
        lora_kwargs: Any other `peft.LoraConfig` argument (task_type, modules_to_save, bias, layers_to_transform, ...).
    """

    target_modules: Sequence[str] | str | None = field(
        default=None, metadata={"help": "modules to adapt: names/suffixes as PEFT matches them, or 'all-linear'"}
    )
    r: int = field(default=8, metadata={"help": "reference rank r_ref that sets the parameter budget"})
    min_rank: int = field(default=4, metadata={"help": "smallest rank of a layer (0 drops unimportant layers)"})
    max_rank: int = field(default=32, metadata={"help": "largest rank of a layer"})
    lora_alpha: float = field(default=16, metadata={"help": "alpha; adapter scaling is alpha/sqrt(rank)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input during training"})
    gamma: float = field(default=5e-2, metadata={"help": "step size of the gradient step taken at initialization"})
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
        metadata={"help": "alpha/sqrt(r_i) per layer, or alpha/sqrt(r_ref) everywhere", "choices": SCALING_CHOICES},
    )
    lora_kwargs: Mapping[str, Any] = field(
        default_factory=dict, metadata={"help": "other peft.LoraConfig arguments, passed through", "cli": False}
    )

    def __post_init__(self) -> None:
        tm = self.target_modules
        if tm is not None and not isinstance(tm, str):
            _check(
                all(isinstance(t, str) and t for t in tm),
                f"target_modules must be module names (strings), got {tm!r}",
            )
            object.__setattr__(self, "target_modules", tuple(tm))
            _check(len(tm) > 0, "target_modules is empty: name the modules to adapt, e.g. ['q_proj', 'v_proj']")
        for name in ("r", "min_rank", "max_rank", "num_batches", "seed"):
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
        _check(
            _is_real(self.gamma) and math.isfinite(self.gamma) and self.gamma >= 0,
            f"gamma must be a finite number >= 0 (0 = allocation only), got {self.gamma!r}",
        )
        for name, choices in (
            ("importance", IMPORTANCE_CHOICES),
            ("features", FEATURES_CHOICES),
            ("rounding", ROUNDING_CHOICES),
            ("scaling", SCALING_CHOICES),
        ):
            value = getattr(self, name)
            _check(value in choices, f"{name}={value!r} is not one of {', '.join(choices)}")
        _check(isinstance(self.lora_kwargs, Mapping), "lora_kwargs must be a mapping of LoraConfig arguments")
        self._check_lora_kwargs()
        object.__setattr__(self, "lora_kwargs", dict(self.lora_kwargs))

    def _check_lora_kwargs(self) -> None:
        from peft import LoraConfig

        known = {f.name for f in dataclasses.fields(LoraConfig)}
        for key in self.lora_kwargs:
            if key in GORA_OWNED_LORA_FIELDS:
                raise ValueError(f"lora_kwargs[{key!r}] is decided by GoRA: {GORA_OWNED_LORA_FIELDS[key]}")
            _check(key in known, f"lora_kwargs[{key!r}] is not a peft.LoraConfig argument: check the spelling")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the configuration."""
        out = dataclasses.asdict(self)
        if isinstance(out["target_modules"], tuple):
            out["target_modules"] = list(out["target_modules"])
        out["lora_kwargs"] = {k: _jsonable(v) for k, v in self.lora_kwargs.items()}
        return out


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
