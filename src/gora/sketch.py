"""Bounded-memory gradient statistics (`GoraConfig(gradient_store="sketch")`): a `GradientStore` (stores.py).

A0 is random and known before estimation, so B0 needs G only through Y = G·A0ᵀ. Sketch mode draws
A_max = draw_lora_A(name, k, n, seed) with k = min(max_rank, m, n) rows (regenerated in each hook, never stored)
and accumulates, per layer and per batch,

    Y   += g_b · A_maxᵀ                      [m, k]  exact and linear in the batches; A0 = A_max[:r_i]
    v_t += g_b[i_t, j_t]   for t = 1..s      sampled entries of G for the importance

From module hooks (a quantized layer: no g_b exists, routes.py) the same sums come from the layer's input x and
output gradient dy, with g_b never formed: Y += dyᵀ (x A_maxᵀ), v_t += Σ_tokens dy_{i_t} x_{j_t}.

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
from .initialize import draw_lora_A, module_seed
from .stores import FullStore, Outer, token_chunks
from .targets import Target

logger = logging.getLogger(__name__)

UNIFORM_MIX = (
    0.1  # λ: share of uniformly drawn samples, so q_ij > 0 everywhere (unbiasedness) and heavy tails stay bounded
)
_ROW_BLOCK = 256  # sampled rows whose conditional column distributions are drawn at once
_BLOCK_ELEMENTS = 1 << 22  # entries of W (and of the pilot's g) read as float32/float64 at once (16/32 MiB)
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

    needs_pilot = True

    def __init__(self, targets: list[Target], config: GoraConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.by_name = {t.name: t for t in targets}
        self.whole = FullStore([t for t in targets if store_whole(t, config)], config, device)
        self.sketches = {
            t.name: torch.zeros(t.m, sketch_rank(t, config), dtype=torch.float32, device=device)
            for t in targets
            if t.name not in self.whole.sums
        }
        self.samplers: dict[str, _Sampler] = {}
        self._pilot: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # sketched layers: (R, C)
        self._pilot_whole: dict[str, torch.Tensor] = {}  # whole layers: Σ|W ⊙ g_1| (for the pilot allocation)

    # -- pilot pass: row and column sums of |W ⊙ g_1| --------------------------------------------------------
    def pilot_fold(self, target: Target, grad: torch.Tensor | Outer, weight: torch.Tensor) -> None:
        """Add the row and column sums of |W ⊙ g| (a layer called several times in the pilot batch adds each call's:
        an envelope as valid as that of the summed gradient, since any q with λ > 0 keeps Î unbiased).

        `grad` is g [m, n], or an `Outer` (module hooks) formed here a block of rows at a time; W and g are read in
        float32 blocks of rows, so no whole float32 copy of either is made.
        """
        m, n = weight.shape
        step = max(1, _BLOCK_ELEMENTS // n)
        R = torch.empty(m, dtype=torch.float64)
        C = torch.zeros(n, dtype=torch.float64, device=weight.device)
        for start in range(0, m, step):
            rows = slice(start, start + step)
            g = grad.rows(rows) if isinstance(grad, Outer) else grad[rows].float()
            a = (weight[rows].float() * g).abs_()  # |W ⊙ g_1|, one block of rows
            R[rows] = a.sum(1, dtype=torch.float64).cpu()
            C += a.sum(0, dtype=torch.float64)
        name, C = target.name, C.cpu()
        if name in self.sketches:
            if name in self._pilot:
                R, C = R + self._pilot[name][0], C + self._pilot[name][1]
            self._pilot[name] = (R, C)
        else:
            total = R.sum().reshape(1)
            self._pilot_whole[name] = total + self._pilot_whole[name] if name in self._pilot_whole else total

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
        for name in self.whole.sums:
            total = self._pilot_whole.get(name, torch.zeros(1, dtype=torch.float64))
            sums[name] = float(all_reduce_sum_(total) if reduce[name] else total)
        counts = self.sample_counts(
            {name: value / (self.by_name[name].m * self.by_name[name].n) for name, value in sums.items()}
        )
        for name, (R, C) in pilot.items():  # one layer's W at a time (dequantized for a quantized layer)
            self.samplers[name] = self._draw(self.by_name[name], weight_of(name).detach(), R, C, counts[name])
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
        """Draw s entries of a layer and keep what Î needs of W there (|W_t|/q_t): W itself is not kept.

        W [m, n] may be in any float dtype, on any device: it is read there in float64 blocks of rows (never copied
        whole), and only the sampled rows' distributions and values come to the CPU, where the draws are made."""
        m, n = t.m, t.n
        g = torch.Generator().manual_seed(module_seed(self.config.seed, f"sketch:{t.name}"))
        rows_per_block = max(1, _BLOCK_ELEMENTS // n)
        C_W = C.to(W.device)
        WC = torch.cat(  # Σ_j |W_ij| C_j
            [(W[i : i + rows_per_block].double().abs() @ C_W).cpu() for i in range(0, m, rows_per_block)]
        )
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
                block = srows[start : start + _ROW_BLOCK].to(W.device)
                scols[start : start + _ROW_BLOCK] = torch.multinomial(
                    (W[block].double().abs() * C_W).float().cpu(), 1, replacement=True, generator=g
                ).squeeze(1)
            rows[structured], cols[structured] = srows, scols
        w = W[rows.to(W.device), cols.to(W.device)].double().cpu()
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
        if name in self.whole.sums:
            self.whole.fold(target, grad)
            return
        A = draw_lora_A(name, self.sketches[name].shape[1], target.n, self.config.seed).to(grad.device)
        self.sketches[name].add_((grad.float() @ A.T).to(self.device))  # Y += g_b · A_maxᵀ
        sampler = self.samplers[name]
        flat = grad.reshape(-1)
        sampler.values.add_(flat[sampler.index.to(flat.device, torch.int64)].to(self.device, torch.float32))

    def fold_outer(self, target: Target, x: torch.Tensor, dy: torch.Tensor) -> None:
        """Y += dyᵀ (x A_maxᵀ) and v_t += Σ_tokens dy_{i_t} x_{j_t}: g itself is never formed."""
        name = target.name
        if name in self.whole.sums:
            self.whole.fold_outer(target, x, dy)
            return
        Y, sampler = self.sketches[name], self.samplers[name]
        A = draw_lora_A(name, Y.shape[1], target.n, self.config.seed).to(x.device)
        index = sampler.index.to(x.device, torch.int64)
        rows, cols = index // target.n, index % target.n
        Y_b = Y if Y.device == x.device else torch.zeros(Y.shape, dtype=torch.float32, device=x.device)
        v_b = torch.zeros(len(index), dtype=torch.float32, device=x.device)
        for x_c, dy_c in token_chunks(x, dy, width=len(index)):
            Y_b.addmm_(dy_c.T, x_c @ A.T)
            v_b.add_((dy_c[:, rows] * x_c[:, cols]).sum(0))
        if Y_b is not Y:
            Y.add_(Y_b.to(Y.device))
        sampler.values.add_(v_b.to(sampler.values.device))

    def running_importance(
        self, target: Target, weight_of: Callable[[str], torch.Tensor], reduce: bool, batches: int
    ) -> float | None:
        if target.name in self.whole.sums:
            return self.whole.running_importance(target, weight_of, reduce, batches)
        values = self.samplers[target.name].values
        values = all_reduce_sum_(values.clone()) if reduce else values
        return self.estimate(target.name, values) / batches if bool(values.any()) else None

    def finish(self, name: str, reduce: bool, batches: int) -> tuple[str, torch.Tensor, float | None]:
        if name in self.whole.sums:
            return self.whole.finish(name, reduce, batches)
        Y = self.sketches.pop(name)
        values = self.samplers[name].values
        values = (all_reduce_sum_(values) if reduce else values).div_(batches)
        return "sketches", (all_reduce_sum_(Y) if reduce else Y).div_(batches), self.estimate(name, values)

    def estimate(self, name: str, values: torch.Tensor) -> float:
        """Î of a sketched layer from the mean gradient at its samples."""
        t, sampler = self.by_name[name], self.samplers[name]
        if self.config.importance == "mean_abs_wg":  # (1/mn)(1/s) Σ |W_t||G_t| / q_t
            return float((sampler.coef.double() * values.double().abs()).mean() / (t.m * t.n))
        return float((sampler.coef.double() * values.double().square()).mean().sqrt())  # Frobenius: √((1/s)Σ x²/q)

    def nbytes(self) -> int:
        tensors = [*self.sketches.values()] + [x for s in self.samplers.values() for x in (s.index, s.coef, s.values)]
        return self.whole.nbytes() + sum(x.numel() * x.element_size() for x in tensors)
