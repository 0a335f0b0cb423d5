"""Stage 3: initialization of A0 and B0 (float32; cast to the adapter dtype only when written into PEFT's layers).

    A0 ~ Kaiming-uniform(a=√5) as PEFT draws it: U(−1/√n, 1/√n), from a generator seeded by (seed, module name)
    s_i · B0 · A0 = −γ · √(n / r_i) · G · P_A,   P_A = A0ᵀ (A0 A0ᵀ)⁻¹ A0   (row space of A0)
    ⇒ B0 = −(γ √(n / r_i) / s_i) · Y · K⁻¹,      Y = G A0ᵀ  [m, r_i],   K = A0 A0ᵀ  [r_i, r_i]

The minus sign makes the first forward take one gradient-descent step of size γ (the research code's HEAD lost it);
√(n/r_i) undoes the shrinking of ‖G·P_A‖ ≈ √(r_i/n)·‖G‖ by a random projection, so ‖ΔW0‖ ≈ γ·‖G‖.

An expert stack (G of shape [E, m, n], docs/moe.md) is E layers sharing r_i: A0_e is drawn as for a layer named
`f"{name}.{e}"`, and B0_e solves the same equation with G_e, so s_i·B0_e·A0_e = −γ·√(n/r_i)·G_e·P_{A_e} per expert.

B0 needs G only through Y = G·A0ᵀ, so the same solve serves both stores: with `gradient_store="full"` Y is computed
from G; with `"sketch"` Y is the first r_i columns of the sketch G·A_maxᵀ (A0 = A_max[:r_i], the prefix property of
`draw_lora_A`).
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import TYPE_CHECKING

import torch

from .config import GoraConfig

if TYPE_CHECKING:
    from .allocate import Allocation
    from .stats import GradientStats

logger = logging.getLogger(__name__)

_COND_FLOAT32 = 1e3  # cond(K) above which the solve runs in float64
_COND_SINGULAR = 1e12  # cond(K) above which A0 is treated as rank-deficient


def module_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, module name): A0 does not depend on process count or module order."""
    digest = hashlib.sha256(f"gora:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def draw_lora_A(name: str, rank: int, in_features: int, seed: int) -> torch.Tensor:
    """A0 [rank, n] on the CPU in float32. The first k rows of a draw of rank R equal the draw of rank k."""
    generator = torch.Generator(device="cpu").manual_seed(module_seed(seed, name))
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=√5) on fan_in = n, exactly as PEFT's default
    return torch.empty(rank, in_features, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def layer_scaling(config: GoraConfig, rank: int) -> float:
    """s_i: α/√r_i (`scaling="rslora"`: the paper, and the research code's scripts) or α/r_ref for every layer
    (`scaling="reference"`: the research code's default, `--gora-dynamic-scaling` and `--gora-rank-stablize` off)."""
    return config.lora_alpha / (math.sqrt(rank) if config.scaling == "rslora" else config.r)


def solve_lora_B(Y: torch.Tensor, A: torch.Tensor, coefficient: float) -> torch.Tensor:
    """B = coefficient · Y · (A Aᵀ)⁻¹ by a Cholesky solve (float32, float64 when A Aᵀ is ill-conditioned).

    Args:
        Y: G·Aᵀ, shape [m, r].
        A: A0, shape [r, n].
        coefficient: −γ·√(n/r)/s.
    """
    A64 = A.to(torch.float64)
    K64 = A64 @ A64.T
    eig = torch.linalg.eigvalsh(K64)
    cond = float(eig[-1] / eig[0]) if eig[0] > 0 else math.inf
    if cond > _COND_SINGULAR:
        raise ValueError(
            f"A0 is numerically rank-deficient (cond(A Aᵀ) = {cond:.2e}, r={A.shape[0]}, n={A.shape[1]}): "
            "lower max_rank below in_features"
        )
    dtype = torch.float32 if cond < _COND_FLOAT32 else torch.float64
    K = K64.to(dtype) if dtype == torch.float64 else (A @ A.T).to(torch.float32)
    L = torch.linalg.cholesky(K)
    # B Kᵀ = Y  ⇔  K Bᵀ = Yᵀ (K symmetric)
    Bt = torch.cholesky_solve(Y.T.to(dtype), L)
    return (coefficient * Bt.T).to(torch.float32).contiguous()


def init_layer(stats: GradientStats, name: str, rank: int, config: GoraConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 [r, n], B0 [m, r]) of one layer, float32, from its mean gradient G or its sketch Y = G·A_maxᵀ.

    Raises:
        ValueError: no statistics for `name`; a sketch narrower than `rank` or drawn with another seed.
    """
    if name in stats.gradients and stats.gradients[name].dim() == 3:
        return init_experts(name, stats.gradients[name], rank, config)
    if name in stats.gradients:
        G = stats.gradients[name]
        m, n = G.shape
        device = G.device
    elif name in stats.sketches:
        Y_max = stats.sketches[name]
        (m, k), n, device = Y_max.shape, stats.shapes[name][1], Y_max.device
        if rank > k:
            raise ValueError(
                f"{name} got rank {rank} but its sketch has only {k} columns (max_rank at estimation): "
                f"re-estimate with max_rank >= {rank} or lower max_rank"
            )
        if config.seed != stats.seed:
            raise ValueError(
                f"the sketch was drawn with seed {stats.seed} but config.seed is {config.seed}: A0 must be the "
                f"sketch's random matrix, so use GoraConfig(seed={stats.seed})"
            )
    else:
        raise ValueError(f"no gradient statistics for {name!r}: estimate gradients for this layer first")
    A = draw_lora_A(name, rank, n, config.seed).to(device)  # a sketch: = A_max[:rank]
    if config.gamma == 0:
        return A, torch.zeros(m, rank, dtype=torch.float32, device=device)
    Y = G.to(torch.float32) @ A.T if name in stats.gradients else Y_max[:, :rank].contiguous()  # G·A0ᵀ
    coefficient = -config.gamma * math.sqrt(n / rank) / layer_scaling(config, rank)  # −γ·√(n/r_i)/s_i
    return A, solve_lora_B(Y, A, coefficient)


def init_experts(name: str, G: torch.Tensor, rank: int, config: GoraConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 [E, r, n], B0 [E, m, r]) of an expert stack with mean gradients G [E, m, n]: each expert e as a layer
    named `f"{name}.{e}"` (its own A0_e), all at rank r. An expert that no token reached has G_e = 0, so B0_e = 0."""
    experts, m, n = G.shape
    A = torch.stack([draw_lora_A(f"{name}.{e}", rank, n, config.seed) for e in range(experts)]).to(G.device)
    if config.gamma == 0:
        return A, torch.zeros(experts, m, rank, dtype=torch.float32, device=G.device)
    coefficient = -config.gamma * math.sqrt(n / rank) / layer_scaling(config, rank)  # −γ·√(n/r_i)/s_i
    B = [solve_lora_B(G[e].to(torch.float32) @ A[e].T, A[e], coefficient) for e in range(experts)]  # Y_e = G_e·A0_eᵀ
    return A, torch.stack(B)


def init_gora_weights(
    stats: GradientStats, allocation: Allocation, config: GoraConfig
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Stage 3 for every layer with r_i > 0: module name -> (A0 [r_i, n], B0 [m, r_i]), float32 ([E, r_i, n],
    [E, m, r_i] for an expert stack)."""
    return {name: init_layer(stats, name, rank, config) for name, rank in allocation.adapted.items()}
