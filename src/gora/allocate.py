"""Stage 2: rank allocation (pure: importances and shapes in, ranks out; no torch, no PEFT).

a_i = I_i / Σ_j I_j                                  (advantage, normalised importance)
b   = r_ref · Σ_i E_i·f(m_i, n_i)                    (budget; f = sqrt(m+n) in the paper, m+n in the code)
r_i = clip(round(b · a_i / (E_i·f(m_i, n_i))), r_min, min(r_max, m_i, n_i))

E_i = 1 for a layer; E_i = E for a stack of E experts sharing one rank (shape (E, m, n)), which counts as E layers
of [m, n] (its importance is the sum over its experts, importance.py): docs/moe.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .config import GoraConfig


@dataclass(frozen=True)
class Allocation:
    """The ranks GoRA gives each layer, and what they cost.

    Attributes:
        ranks: Module name -> rank r_i (0 = no adapter, possible only with min_rank=0).
        advantages: Module name -> a_i, the normalised importance.
        importances: Module name -> I_i.
        budget: b = r_ref · Σ E_i·f(m_i, n_i).
        trainable_params: Σ r_i·E_i·(m_i + n_i) of the adapters GoRA builds.
        lora_params: r_ref·Σ E_i·(m_i + n_i), plain LoRA at the reference rank on the same layers.
    """

    ranks: dict[str, int]
    advantages: dict[str, float]
    importances: dict[str, float]
    budget: float
    trainable_params: int
    lora_params: int

    @property
    def param_ratio(self) -> float:
        """trainable_params / lora_params (the paper promises 1 ± 0.1)."""
        return self.trainable_params / self.lora_params

    @property
    def dropped(self) -> list[str]:
        return [name for name, r in self.ranks.items() if r == 0]

    @property
    def adapted(self) -> dict[str, int]:
        return {name: r for name, r in self.ranks.items() if r > 0}


def features(m: int, n: int, kind: str) -> float:
    """f(m, n): sqrt(m+n) (paper) or m+n (research code)."""
    return math.sqrt(m + n) if kind == "sqrt" else float(m + n)


def allocate_ranks(
    importances: Mapping[str, float], shapes: Mapping[str, tuple[int, int]], config: GoraConfig
) -> Allocation:
    """Allocate a rank to every layer in proportion to its importance, at the parameter budget of LoRA at r_ref.

    Args:
        importances: Module name -> I_i >= 0.
        shapes: Module name -> (m, n) = (out_features, in_features), or (E, m, n) for an expert stack.
        config: r (r_ref), min_rank, max_rank, features, rounding.
    """
    if not importances:
        raise ValueError("no layer to allocate: importances is empty")
    missing = sorted(set(importances) - set(shapes))
    if missing:
        raise ValueError(f"no shape given for {missing[:4]}")
    bad = {k: v for k, v in importances.items() if not (math.isfinite(v) and v >= 0)}
    if bad:
        raise ValueError(f"importances must be finite and >= 0; got {dict(list(bad.items())[:4])}")
    total = math.fsum(importances.values())
    if total <= 0:
        raise ValueError(
            "every layer has importance 0 (all gradients vanish on the targets): check that the loss depends "
            "on the targeted modules and that the batches carry labels"
        )
    f = {name: _count(shapes[name]) * features(*shapes[name][-2:], config.features) for name in importances}
    budget = config.r * math.fsum(f.values())  # b = r_ref · Σ E_i·f(m_i, n_i)
    rnd = (lambda x: math.floor(x + 0.5)) if config.rounding == "round" else math.floor
    ranks, advantages = {}, {}
    for name, importance in importances.items():
        m, n = shapes[name][-2:]
        a = importance / total  # a_i
        advantages[name] = a
        ranks[name] = min(max(rnd(budget * a / f[name]), config.min_rank), config.max_rank, m, n)  # r_i
    return Allocation(
        ranks=ranks,
        advantages=advantages,
        importances=dict(importances),
        budget=budget,
        trainable_params=sum(r * _params_per_rank(shapes[name]) for name, r in ranks.items()),
        lora_params=config.r * sum(_params_per_rank(shapes[name]) for name in ranks),
    )


def _count(shape: tuple[int, ...]) -> int:
    """E_i: the number of [m, n] matrices that share the rank (1 for a layer)."""
    return shape[0] if len(shape) == 3 else 1


def _params_per_rank(shape: tuple[int, ...]) -> int:
    """Adapter parameters per unit of rank: E_i·(m_i + n_i)."""
    return _count(shape) * (shape[-2] + shape[-1])
