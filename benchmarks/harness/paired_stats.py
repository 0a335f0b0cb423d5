"""The statistics of the evidence suites: learning-rate selection, paired bootstrap intervals, McNemar's test.

- `select_lr`: per method, the learning rate with the best mean validation metric over the tuning seeds.
- `paired_bootstrap`: the mean of per-example differences between two methods run on the same seeds (same data,
  same head init, same test examples), with a 95% interval from resampling seeds and test examples together.
- `mcnemar_exact`: exact two-sided McNemar test (binomial on the discordant pairs).
- `verdict`: better / tied / worse from an interval.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LrChoice:
    """The learning rate chosen for one method, and the table it was chosen from.

    Attributes:
        lr: The chosen learning rate (None when no learning rate is eligible).
        table: lr -> (mean metric, mean loss, runs) over the tuning seeds, for every lr that was run.
        reason: Why `lr` won (or why none did), in words.
    """

    lr: float | None
    table: dict[float, tuple[float | None, float | None, int]]
    reason: str


def select_lr(
    records: Iterable[Mapping[str, Any]],
    lrs: Sequence[float],
    seeds: Sequence[int],
    metric: str = "metric",
    lower_is_better: bool = False,
) -> LrChoice:
    """Pick the learning rate of one method from its tuning runs.

    Rule: only learning rates with a finished, non-diverged run for every tuning seed are eligible; among them the
    best mean validation `metric` wins (the highest; the lowest with `lower_is_better`, e.g. an NLL); a tie (equal
    means) goes to the lower mean validation loss, and a tie on both to the smaller learning rate.

    Args:
        records: The method's tuning records (keys "lr", "seed", `metric`, "eval_loss", "diverged").
        lrs: The learning-rate grid.
        seeds: The tuning seeds.
        metric: The record key of the validation metric.
        lower_is_better: The metric is a loss (lower is better) rather than a score.
    """
    by_lr: dict[float, dict[int, Mapping[str, Any]]] = {}
    for r in records:
        by_lr.setdefault(float(r["lr"]), {})[int(r["seed"])] = r
    table: dict[float, tuple[float | None, float | None, int]] = {}
    eligible: list[tuple[float, float, float]] = []
    for lr in lrs:
        runs = by_lr.get(float(lr), {})
        good = [
            runs[s] for s in seeds if s in runs and not runs[s].get("diverged") and runs[s].get(metric) is not None
        ]
        mean = sum(r[metric] for r in good) / len(good) if good else None
        losses = [r["eval_loss"] for r in good if r.get("eval_loss") is not None and math.isfinite(r["eval_loss"])]
        loss = sum(losses) / len(losses) if len(losses) == len(good) and good else None
        table[float(lr)] = (mean, loss, len(runs))
        if len(good) == len(seeds):
            eligible.append((float(lr), mean, loss if loss is not None else math.inf))
    if not eligible:
        return LrChoice(None, table, "no learning rate has a finished, non-diverged run on every tuning seed")
    sign = 1.0 if lower_is_better else -1.0
    best = min(eligible, key=lambda e: (sign * e[1], e[2], e[0]))
    ties = [e for e in eligible if e[1] == best[1]]
    reason = (
        f"{'lowest' if lower_is_better else 'best'} mean validation {metric} {best[1]:.4f} over seeds {list(seeds)}"
    )
    if len(ties) > 1:
        reason += f" (tied with {[e[0] for e in ties if e[0] != best[0]]}; lower loss, then smaller lr, wins)"
    return LrChoice(best[0], table, reason)


def paired_bootstrap(
    diff: np.ndarray,
    n_boot: int = 4000,
    seed: int = 0,
    level: float = 0.95,
    strata: Sequence[Any] | None = None,
) -> tuple[float, float, float]:
    """Mean of paired differences with a percentile bootstrap interval, resampling seeds and examples.

    Args:
        diff: [seeds, examples] per-example differences (e.g. correct_A − correct_B in {−1, 0, 1}) of two methods
            trained on the same seeds and evaluated on the same examples; a 1-D array is one value per seed.
        n_boot: Bootstrap replicates.
        seed: Seed of the resampling.
        level: Coverage of the interval.
        strata: Optional label per row (e.g. the budget of each paired run when pooling budgets): rows are then
            resampled within their stratum, so every replicate keeps each stratum's number of rows.

    Returns:
        (mean, low, high). Each replicate draws the seeds with replacement and, independently, the examples with
        replacement, so the interval covers both the training noise (seeds) and the test-set sampling (examples).
    """
    d = np.asarray(diff, dtype=np.float64)
    if d.ndim == 1:
        d = d[:, None]
    n_seeds, n_examples = d.shape
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    groups = None
    if strata is not None:
        labels = list(strata)
        if len(labels) != n_seeds:
            raise ValueError(f"strata has {len(labels)} labels for {n_seeds} rows")
        groups = [np.array([i for i, x in enumerate(labels) if x == g]) for g in dict.fromkeys(labels)]
    for b in range(n_boot):
        if groups is None:
            s = rng.integers(0, n_seeds, n_seeds)
        else:
            s = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        if n_examples == 1:
            stats[b] = d[s, 0].mean()
            continue
        # mean over the drawn seeds x drawn examples = mean over drawn examples of the column means of drawn seeds
        e = rng.integers(0, n_examples, n_examples)
        stats[b] = d[s].mean(axis=0)[e].mean()
    tail = (1 - level) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    return float(d.mean()), float(low), float(high)


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: P(|X − n/2| ≥ |b − n/2|) for X ~ Binomial(n = b + c, 1/2).

    Args:
        b: Discordant pairs where the first method is right and the second wrong.
        c: Discordant pairs where the first method is wrong and the second right.
    """
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def discordant(correct_a: Sequence[Sequence[int]], correct_b: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(b, c) summed over paired runs: examples A got right and B wrong, and the reverse."""
    a, bb = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    return int((a & ~bb).sum()), int((~a & bb).sum())


def verdict(low: float, high: float) -> str:
    """ "better" when the whole interval is above 0, "worse" when below, else "tied"."""
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "tied"


def bits(values: Iterable[bool | int]) -> str:
    """Per-example 0/1 values as a compact string ("0110...")."""
    return "".join("1" if v else "0" for v in values)


def unbits(text: str) -> list[int]:
    return [1 if ch == "1" else 0 for ch in text]
