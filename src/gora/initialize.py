"""Stage 3: initialization of A0 and B0 (float32; cast to the adapter dtype only when written into PEFT's layers).

    A0 ~ Kaiming-uniform(a=√5) as PEFT draws it: U(−1/√n, 1/√n), from a generator seeded by (seed, module name)
    s_i · B0 · A0 = −γ · √(n / r_i) · G · P_A,   P_A = A0ᵀ (A0 A0ᵀ)⁻¹ A0   (row space of A0)
    ⇒ B0 = −(γ √(n / r_i) / s_i) · Y · K⁻¹,      Y = G A0ᵀ  [m, r_i],   K = A0 A0ᵀ  [r_i, r_i]

The minus sign makes the first forward take one gradient-descent step of size γ (the research code's HEAD lost it);
√(n/r_i) undoes the shrinking of ‖G·P_A‖ ≈ √(r_i/n)·‖G‖ by a random projection, so ‖ΔW0‖ ≈ γ·‖G‖.
"""

from __future__ import annotations

import hashlib
import logging
import math

import torch

from .config import GoraConfig

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
    """s_i: α/√r_i (rsLoRA with the layer's own rank) or α/√r_ref (the research code's default)."""
    return config.lora_alpha / math.sqrt(rank if config.scaling == "rslora" else config.r)


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


def gora_init(
    name: str, grad: torch.Tensor, rank: int, config: GoraConfig, gamma: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 [r, n], B0 [m, r]) of one layer from its mean gradient G [m, n], both float32 on G's device."""
    m, n = grad.shape
    gamma = config.gamma if gamma is None else gamma
    A = draw_lora_A(name, rank, n, config.seed).to(grad.device)
    if gamma == 0:
        return A, torch.zeros(m, rank, dtype=torch.float32, device=grad.device)
    s = layer_scaling(config, rank)
    coefficient = -gamma * math.sqrt(n / rank) / s  # −γ·√(n/r_i)/s_i
    Y = grad.to(torch.float32) @ A.T  # G A0ᵀ
    return A, solve_lora_B(Y, A, coefficient)
