"""The initialization identity s·B0·A0 = −γ·√(n/r)·G·P_A, A0's distribution and seeding, and the solve."""

import math

import pytest
import torch

from gora import GoraConfig, GradientStats, draw_lora_A, init_layer, solve_lora_B
from gora.initialize import layer_scaling
from gora.targets import Target


def gora_init(name, G, r, config):
    """(A0, B0) of one layer from its mean gradient G, through the public stage-3 function."""
    stats = GradientStats(targets=[Target(name, *G.shape, transposed=False)], gradients={name: G}, num_batches=1)
    return init_layer(stats, name, r, config)


def projector(A):
    A = A.double()
    return A.T @ torch.linalg.inv(A @ A.T) @ A


@pytest.mark.parametrize(("m", "n", "r"), [(48, 64, 1), (48, 64, 8), (96, 40, 32), (64, 64, 60)])
@pytest.mark.parametrize("scaling", ["rslora", "reference"])
def test_delta_w0_identity(m, n, r, scaling):
    torch.manual_seed(0)
    G = torch.randn(m, n)
    config = GoraConfig(gamma=0.05, lora_alpha=16, scaling=scaling)
    A, B = gora_init("layer", G, r, config)
    s = layer_scaling(config, r)
    delta = s * B.double() @ A.double()
    expected = -0.05 * math.sqrt(n / r) * G.double() @ projector(A)
    assert torch.allclose(delta, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_rslora_scaling_is_per_layer_rank():
    """Property: "rslora" is α/√r_i (the paper); "reference" is α/r_ref for every layer, the research code's default
    (its --gora-dynamic-scaling and --gora-rank-stablize both off)."""
    assert layer_scaling(GoraConfig(lora_alpha=16), 4) == pytest.approx(8.0)
    assert layer_scaling(GoraConfig(lora_alpha=16, r=16, scaling="reference"), 4) == pytest.approx(1.0)
    assert layer_scaling(GoraConfig(lora_alpha=16, r=16, scaling="reference"), 9) == pytest.approx(1.0)


def test_delta_w0_norm_is_about_gamma_times_gradient_norm():
    torch.manual_seed(1)
    G = torch.randn(256, 512)
    A, B = gora_init("x", G, 16, GoraConfig(gamma=0.05))
    delta = layer_scaling(GoraConfig(), 16) * B @ A
    ratio = (delta.norm() / (0.05 * G.norm())).item()
    assert 0.8 < ratio < 1.2


def test_A0_is_kaiming_uniform_like_peft():
    A = draw_lora_A("m", 64, 400, seed=0)
    bound = 1 / math.sqrt(400)
    assert A.abs().max() <= bound and A.abs().max() > 0.99 * bound
    assert A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)


def test_A0_depends_only_on_seed_and_name_and_is_prefix_stable():
    a = draw_lora_A("model.layers.0.q_proj", 32, 300, seed=3)
    assert torch.equal(a, draw_lora_A("model.layers.0.q_proj", 32, 300, seed=3))
    assert torch.equal(a[:5], draw_lora_A("model.layers.0.q_proj", 5, 300, seed=3))
    assert not torch.equal(a, draw_lora_A("model.layers.1.q_proj", 32, 300, seed=3))
    assert not torch.equal(a, draw_lora_A("model.layers.0.q_proj", 32, 300, seed=4))


def test_gamma_zero_gives_zero_B():
    A, B = gora_init("x", torch.randn(8, 16), 4, GoraConfig(gamma=0.0))
    assert A.shape == (4, 16) and B.shape == (8, 4) and not B.any()


def test_ill_conditioned_solve_uses_float64_and_stays_accurate():
    torch.manual_seed(0)
    A = torch.randn(8, 64)
    A[7] = A[6] + 1e-4 * torch.randn(64)  # cond(AAᵀ) ~ 1e9
    Y = torch.randn(16, 64, dtype=torch.float64) @ A.T.double()
    B = solve_lora_B(Y, A, -1.0)
    expected = -Y @ torch.linalg.inv(A.double() @ A.T.double())
    assert torch.allclose(B.double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def test_rank_deficient_A_is_refused():
    A = torch.ones(3, 10)
    with pytest.raises(ValueError, match="rank-deficient"):
        solve_lora_B(torch.randn(5, 3), A, 1.0)
