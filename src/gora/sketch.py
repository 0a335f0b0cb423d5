"""Bounded-memory gradient statistics (`GoraConfig(gradient_store="sketch")`) and initialization from them.

A0 is random and known before estimation, so B0 needs G only through Y = G·A0ᵀ. Sketch mode draws
A_max = draw_lora_A(name, k, n, seed) with k = min(max_rank, m, n) rows (regenerated in each hook, never stored)
and accumulates, per layer and per batch,

    Y   += g_b · A_maxᵀ                      [m, k]  exact and linear in the batches; A0 = A_max[:r_i]
    v_t += g_b[i_t, j_t]   for t = 1..s      sampled entries of G for the importance

The importance I = (1/mn) Σ_ij |W_ij G_ij| is estimated without bias by importance sampling,

    Î = (1/mn) · (1/s) Σ_t |W_t| |G_t| / q_t,     q_ij = (1−λ) · |W_ij| R_i C_j / Z + λ / (mn),

where R_i, C_j are the row and column sums of |W ⊙ g_1| from a pilot pass over the first batch (every rank's
first batch under torch.distributed) and Z normalizes. The pilot pass runs with a forked RNG, so the N batches see
exactly the dropout masks of `gradient_store="full"`. Layers for which G itself is smaller than Y plus the samples
are stored whole.

The per-sample spread of |W_t||G_t|/q_t is about the same in every layer (|G| is ~half-normal around the envelope
R_i C_j: relative std ~1 per sample), so Î has relative error ε_i ∝ 1/√s_i, and a layer's rank r_i = round(b·a_i/f_i)
moves by about r_i·ε_i ∝ r_i/√s_i. Splitting the samples as s_i ∝ r_i² would give every layer the same rank error
(the smallest largest error); s_i ∝ r_i^(2/3) would change the fewest ranks (the smallest Σ r_i/√s_i). GoRA splits
the budget (sketch_samples per sketched layer, on average) between the two,

    s_i ∝ r̂_i,     r̂_i = the rank allocate_ranks gives the pilot importances (1/mn) Σ|W ⊙ g_1|,

(benchmarks/memory.py measures the resulting ranks against "full" for several sketch_samples and seeds).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .allocate import allocate_ranks
from .config import GoraConfig
from .distributed import all_reduce_sum_
from .initialize import draw_lora_A, gora_init, layer_scaling, module_seed, solve_lora_B
from .targets import Target

logger = logging.getLogger(__name__)

UNIFORM_MIX = (
    0.1  # λ: share of uniformly drawn samples, so q_ij > 0 everywhere (unbiasedness) and heavy tails stay bounded
)
_ROW_BLOCK = 256  # sampled rows whose conditional column distributions are drawn at once
MIN_SAMPLES = 64  # fewest samples of a sketched layer, whatever its pilot rank


@dataclass
class _Sampler:
    index: torch.Tensor  # flat indices i·n + j into the [m, n] layout, int32 (int64 for huge layers)
    coef: torch.Tensor  # per-sample factor of the metric: |W_t|/q_t, W_t²/q_t or 1/q_t (float32)
    values: torch.Tensor  # running sum over batches of G at the samples (float32)


def sketch_rank(target: Target, config: GoraConfig) -> int:
    """k = min(max_rank, m, n): the columns of Y, the largest rank a layer can get."""
    return min(config.max_rank, target.m, target.n)


def store_whole(target: Target, config: GoraConfig) -> bool:
    """Whether G [m, n] is no larger than Y [m, k] plus the sample buffers (3 numbers per sample)."""
    samples = min(config.sketch_samples, target.m * target.n)
    return target.m * target.n <= target.m * sketch_rank(target, config) + 3 * samples


class SketchStore:
    """Accumulators of sketch mode: Y per sketched layer, sampled entries, and whole G for small layers."""

    def __init__(self, targets: list[Target], config: GoraConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.by_name = {t.name: t for t in targets}
        self.whole = {
            t.name: torch.zeros(t.m, t.n, dtype=torch.float32, device=device)
            for t in targets
            if store_whole(t, config)
        }
        self.sketches = {
            t.name: torch.zeros(t.m, sketch_rank(t, config), dtype=torch.float32, device=device)
            for t in targets
            if t.name not in self.whole
        }
        self.samplers: dict[str, _Sampler] = {}
        self._pilot: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # sketched layers: (R, C)
        self._pilot_whole: dict[str, torch.Tensor] = {}  # whole layers: Σ|W ⊙ g_1| (for the pilot allocation)

    # -- pilot pass: row and column sums of |W ⊙ g_1| --------------------------------------------------------
    def pilot_fold(self, target: Target, grad: torch.Tensor, weight: torch.Tensor) -> None:
        a = (weight.detach().float() * grad.float()).abs()  # |W ⊙ g_1|
        if target.name in self.sketches:
            self._pilot[target.name] = (a.sum(1, dtype=torch.float64).cpu(), a.sum(0, dtype=torch.float64).cpu())
        else:
            self._pilot_whole[target.name] = a.sum(dtype=torch.float64).cpu().reshape(1)

    def finish_pilot(self, weight_of: Callable[[str], torch.Tensor], reduce: dict[str, bool]) -> None:
        """Draw each layer's fixed sample of entries (identical on every rank: same seed, same reduced R, C, W).

        Args:
            weight_of: Module name -> W [m, n] (gathered one layer at a time under FSDP2).
            reduce: Module name -> whether to sum the pilot statistics over ranks.
        """
        pilot: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in self.sketches:  # the same order on every rank, so the collectives match
            t = self.by_name[name]
            R, C = self._pilot.get(
                name, (torch.zeros(t.m, dtype=torch.float64), torch.zeros(t.n, dtype=torch.float64))
            )
            if reduce[name]:
                all_reduce_sum_(R)
                all_reduce_sum_(C)
            pilot[name] = R, C
        sums = {name: float(R.sum()) for name, (R, C) in pilot.items()}
        for name in self.whole:
            total = self._pilot_whole.get(name, torch.zeros(1, dtype=torch.float64))
            sums[name] = float(all_reduce_sum_(total) if reduce[name] else total)
        counts = self.sample_counts(
            {name: value / (self.by_name[name].m * self.by_name[name].n) for name, value in sums.items()}
        )
        for name, (R, C) in pilot.items():
            self.samplers[name] = self._draw(
                self.by_name[name], weight_of(name).detach().float().cpu(), R, C, counts[name]
            )
        self._pilot.clear()
        self._pilot_whole.clear()

    def sample_counts(self, pilot_importances: dict[str, float]) -> dict[str, int]:
        """s_i ∝ r̂_i over the sketched layers, r̂ = the ranks of the pilot importances (every layer's).

        The total is sketch_samples per sketched layer; each layer gets at least MIN_SAMPLES and at most m·n.
        """
        if not self.sketches:
            return {}
        if all(math.isfinite(v) for v in pilot_importances.values()) and sum(pilot_importances.values()) > 0:
            shapes = {name: (t.m, t.n) for name, t in self.by_name.items()}
            pilot_ranks = allocate_ranks(pilot_importances, shapes, self.config).ranks
        else:  # no pilot signal (no batch reached the targets): equal split
            pilot_ranks = dict.fromkeys(pilot_importances, 1)
        weights = {name: max(pilot_ranks[name], 1) for name in self.sketches}  # s_i ∝ r̂_i
        total, norm = self.config.sketch_samples * len(self.sketches), sum(weights.values())
        return {
            name: min(max(MIN_SAMPLES, round(total * w / norm)), self.by_name[name].m * self.by_name[name].n)
            for name, w in weights.items()
        }

    def _draw(self, t: Target, W: torch.Tensor, R: torch.Tensor, C: torch.Tensor, s: int) -> _Sampler:
        m, n = t.m, t.n
        g = torch.Generator().manual_seed(module_seed(self.config.seed, f"sketch:{t.name}"))
        absW = W.abs().double()
        WC = absW @ C  # Σ_j |W_ij| C_j
        Z = float((R * WC).sum())  # Σ_ij |W_ij| R_i C_j
        lam = UNIFORM_MIX if Z > 0 and math.isfinite(Z) else 1.0
        structured = torch.rand(s, generator=g) >= lam
        rows = torch.randint(0, m, (s,), generator=g)
        cols = torch.randint(0, n, (s,), generator=g)
        k = int(structured.sum())
        if k:
            srows = torch.multinomial((R * WC).float(), k, replacement=True, generator=g)
            scols = torch.empty_like(srows)
            for start in range(0, k, _ROW_BLOCK):  # column | row ∝ |W_ij| C_j
                block = srows[start : start + _ROW_BLOCK]
                scols[start : start + _ROW_BLOCK] = torch.multinomial(
                    (absW[block] * C).float(), 1, replacement=True, generator=g
                ).squeeze(1)
            rows[structured], cols[structured] = srows, scols
        w = W[rows, cols].double()
        q = lam / (m * n) + ((1 - lam) * w.abs() * R[rows] * C[cols] / Z if lam < 1 else 0.0)
        metric = self.config.importance
        numerator = (
            w.abs() if metric == "mean_abs_wg" else w.square() if metric == "wg_frobenius" else torch.ones_like(w)
        )
        index = rows.to(torch.int64) * n + cols
        dtype = torch.int32 if m * n < 2**31 else torch.int64
        return _Sampler(
            index=index.to(device=self.device, dtype=dtype),
            coef=(numerator / q).to(device=self.device, dtype=torch.float32),
            values=torch.zeros(s, dtype=torch.float32, device=self.device),
        )

    # -- the N batches --------------------------------------------------------------------------------------
    def fold(self, target: Target, grad: torch.Tensor) -> None:
        name = target.name
        if name in self.whole:
            self.whole[name].add_(grad.to(device=self.device, dtype=torch.float32))
            return
        A = draw_lora_A(name, self.sketches[name].shape[1], target.n, self.config.seed).to(grad.device)
        self.sketches[name].add_((grad.float() @ A.T).to(self.device))  # Y += g_b · A_maxᵀ
        sampler = self.samplers[name]
        flat = grad.reshape(-1)
        sampler.values.add_(flat[sampler.index.to(flat.device, torch.int64)].to(self.device, torch.float32))

    def estimate(self, name: str, values: torch.Tensor) -> float:
        """Î of a sketched layer from the mean gradient at its samples."""
        t, sampler = self.by_name[name], self.samplers[name]
        if self.config.importance == "mean_abs_wg":  # (1/mn)(1/s) Σ |W_t||G_t| / q_t
            return float((sampler.coef.double() * values.double().abs()).mean() / (t.m * t.n))
        return float((sampler.coef.double() * values.double().square()).mean().sqrt())  # Frobenius: √((1/s)Σ x²/q)

    def nbytes(self) -> int:
        tensors = [*self.whole.values(), *self.sketches.values()]
        tensors += [x for s in self.samplers.values() for x in (s.index, s.coef, s.values)]
        return sum(x.numel() * x.element_size() for x in tensors)


def init_layer(
    stats, name: str, rank: int, config: GoraConfig, gamma: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 [r, n], B0 [m, r]) of one layer from either store: its mean gradient G, or its sketch Y = G·A_maxᵀ.

    With a sketch, A0 = A_max[:r] (the draw has the prefix property) and Y·A... = Y[:, :r] = G·A0ᵀ, so B0 is the
    same Cholesky solve as with G: s·B0·A0 = −γ·√(n/r)·G·P_A.
    """
    if name in stats.gradients:
        return gora_init(name, stats.gradients[name], rank, config, gamma)
    if name not in stats.sketches:
        raise ValueError(f"no gradient statistics for {name!r}: estimate gradients for this layer first")
    Y = stats.sketches[name]
    m, k = Y.shape
    n = stats.shapes[name][1]
    if rank > k:
        raise ValueError(
            f"{name} got rank {rank} but its sketch has only {k} columns (max_rank at estimation): "
            f"re-estimate with max_rank >= {rank} or lower max_rank"
        )
    if config.seed != stats.seed:
        raise ValueError(
            f"the sketch was drawn with seed {stats.seed} but config.seed is {config.seed}: A0 must be the sketch's "
            f"random matrix, so use GoraConfig(seed={stats.seed})"
        )
    gamma = config.gamma if gamma is None else gamma
    A = draw_lora_A(name, rank, n, config.seed).to(Y.device)  # = A_max[:rank]
    if gamma == 0:
        return A, torch.zeros(m, rank, dtype=torch.float32, device=Y.device)
    coefficient = -gamma * math.sqrt(n / rank) / layer_scaling(config, rank)  # −γ·√(n/r_i)/s_i
    return A, solve_lora_B(Y[:, :rank].contiguous(), A, coefficient)
