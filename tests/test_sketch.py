"""Sketch mode (`GoraConfig(gradient_store="sketch")`): bounded memory, same adapters where the ranks agree."""

from __future__ import annotations

import pytest
import torch

import gora
from gora.initialize import draw_lora_A
from gora.sketch import SketchStore, sketch_rank
from gora.targets import Target
from helpers import assert_close, lm_batches, make_gpt2, make_llama


def _config(store: str, **kwargs) -> gora.GoraConfig:
    base = dict(target_modules="all-linear", r=4, min_rank=1, max_rank=8, num_batches=4, sketch_samples=64)
    return gora.GoraConfig(**{**base, "gradient_store": store, **kwargs})


def _run(model, store: str, **kwargs):
    config = _config(store, **kwargs)
    stats = gora.estimate_gradients(model, config, lm_batches(4), show_progress=False)
    allocation = gora.allocate_ranks(gora.compute_importances(model, stats, config.importance), stats.shapes, config)
    return stats, allocation, gora.init_gora_weights(stats, allocation, config)


def test_nuclear_importance_refused_in_sketch_mode():
    """Property: nuclear norms need the full G, so the sketch store refuses them up front with the fix."""
    with pytest.raises(ValueError, match="gradient_store='full'"):
        gora.GoraConfig(gradient_store="sketch", importance="wg_nuclear")
    with pytest.raises(ValueError, match="gradient_store"):
        gora.GoraConfig(gradient_store="compressed")


@pytest.mark.parametrize("make", [make_llama, make_gpt2])
def test_sketch_is_G_times_A_max(make):
    """Property: Y = G·A_maxᵀ exactly (linear in the batches), including Conv1D layers and models with dropout
    (GPT-2: the pilot pass runs on a forked RNG, so the N batches see the same dropout masks as full mode)."""
    full, _, _ = _run(make(), "full")
    sketch, _, _ = _run(make(), "sketch")
    assert sketch.sketches, "the tiny model should have sketched layers at sketch_samples=64"
    assert sketch.num_batches == full.num_batches == 4
    for name, Y in sketch.sketches.items():
        k = Y.shape[1]
        A_max = draw_lora_A(name, k, full.gradients[name].shape[1], 0)
        assert_close(Y, full.gradients[name] @ A_max.T, rtol=1e-4, msg=name)
    for name, G in sketch.gradients.items():  # small layers stored whole
        assert_close(G, full.gradients[name], rtol=1e-5, msg=name)


def test_same_adapters_where_ranks_agree(llama):
    """Property: where sketch and full give a layer the same rank, A0 is identical and B0 matches to float32
    precision; ranks stay within ±1 and the trainable parameters within 10% on this tiny model."""
    _, full_alloc, full_w = _run(make_llama(), "full")
    _, sketch_alloc, sketch_w = _run(make_llama(), "sketch", sketch_samples=256)
    same = [n for n in full_alloc.ranks if full_alloc.ranks[n] == sketch_alloc.ranks[n]]
    assert len(same) >= 0.8 * len(full_alloc.ranks)
    assert all(abs(full_alloc.ranks[n] - sketch_alloc.ranks[n]) <= 1 for n in full_alloc.ranks)
    assert abs(sketch_alloc.trainable_params / full_alloc.trainable_params - 1) < 0.1
    for name in same:
        assert torch.equal(full_w[name][0], sketch_w[name][0])
        assert_close(sketch_w[name][1], full_w[name][1], rtol=1e-4, msg=name)


def test_sampled_importance_is_unbiased():
    """Property: the importance-sampled estimate of mean|W⊙G| is unbiased (mean over seeds within 2%) and each
    estimate is close (pilot = a noisy version of G, as the first batch is of the mean gradient)."""
    g = torch.Generator().manual_seed(0)
    m, n = 96, 80
    W = torch.randn(m, n, generator=g) * torch.rand(1, n, generator=g)
    G = torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g) + 0.3 * torch.randn(m, n, generator=g)
    pilot = G + 0.5 * torch.randn(m, n, generator=g)
    true = float((W * G).abs().mean())
    target = Target("layer", m, n, transposed=False)
    estimates = []
    for seed in range(30):
        config = gora.GoraConfig(gradient_store="sketch", sketch_samples=512, max_rank=8, seed=seed)
        store = SketchStore([target], config, torch.device("cpu"))
        assert "layer" in store.sketches and sketch_rank(target, config) == 8
        store.pilot_fold(target, pilot, W)
        store.finish_pilot(lambda name: W, {"layer": False})
        store.fold(target, G)
        estimates.append(store.estimate("layer", store.samplers["layer"].values))
    errors = [e / true - 1 for e in estimates]
    assert abs(sum(errors) / len(errors)) < 0.02
    assert max(abs(e) for e in errors) < 0.15


def test_sketch_memory_smaller_and_model_restored(llama):
    """Property: the sketch statistics are smaller than full ones, and estimation leaves the model as it was."""
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    flags = {k: p.requires_grad for k, p in llama.named_parameters()}
    sketch = gora.estimate_gradients(llama, _config("sketch"), lm_batches(4), show_progress=False)
    full = gora.estimate_gradients(make_llama(), _config("full"), lm_batches(4), show_progress=False)
    assert sketch.info["statistics_bytes"] < 0.7 * full.info["statistics_bytes"]
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())
    assert {k: p.requires_grad for k, p in llama.named_parameters()} == flags
    assert all(p.grad is None for p in llama.parameters()) and not llama.training


def test_sketch_init_checks_seed_and_rank(llama):
    """Property: a sketch only initializes with its own A_max: another seed or a rank above its width is refused."""
    stats, allocation, _ = _run(llama, "sketch")
    with pytest.raises(ValueError, match="seed"):
        gora.init_gora_weights(stats, allocation, _config("sketch", seed=1))
    name = next(iter(stats.sketches))
    too_wide = gora.allocate_ranks({name: 1.0}, {name: stats.shapes[name]}, _config("sketch", max_rank=16, r=16))
    with pytest.raises(ValueError, match="max_rank"):
        gora.init_gora_weights(stats, too_wide, _config("sketch", max_rank=16, r=16))
    with pytest.raises(ValueError, match="full gradient"):
        gora.compute_importances(llama, stats, "grad_frobenius")


def test_samples_split_in_proportion_to_pilot_ranks():
    """Property: the sample budget (sketch_samples per sketched layer) is split s_i ∝ r̂_i, the ranks that
    allocate_ranks gives the pilot importances, so a layer whose rank a relative error moves more gets more samples;
    the allocation uses the pilot of every layer (whole-stored ones too) and is the same as allocate_ranks'."""
    from gora.sketch import MIN_SAMPLES

    g = torch.Generator().manual_seed(0)
    shapes = {"a": (128, 96), "b": (128, 96), "c": (128, 96), "small": (2, 3)}
    targets = [Target(name, m, n, transposed=False) for name, (m, n) in shapes.items()]
    config = gora.GoraConfig(gradient_store="sketch", sketch_samples=400, r=8, min_rank=1, max_rank=32)
    store = SketchStore(targets, config, torch.device("cpu"))
    assert set(store.sketches) == {"a", "b", "c"} and set(store.whole.sums) == {"small"}
    weights = {name: torch.randn(*shape, generator=g) for name, shape in shapes.items()}
    scale = {"a": 1.0, "b": 3.0, "c": 9.0, "small": 5.0}  # pilot |W ⊙ g_1| grows with the scale
    for t in targets:
        store.pilot_fold(t, scale[t.name] * torch.randn(t.m, t.n, generator=g), weights[t.name])
    pilot = {}
    for name, (R, _) in store._pilot.items():
        pilot[name] = float(R.sum()) / (shapes[name][0] * shapes[name][1])
    pilot["small"] = float(store._pilot_whole["small"]) / 6
    expected_ranks = gora.allocate_ranks(pilot, shapes, config).ranks
    store.finish_pilot(lambda name: weights[name], dict.fromkeys(shapes, False))
    counts = {name: int(store.samplers[name].values.numel()) for name in store.sketches}
    total = sum(expected_ranks[n] for n in counts)
    for name, count in counts.items():
        assert count == max(MIN_SAMPLES, round(3 * 400 * expected_ranks[name] / total))
    assert counts["a"] < counts["b"] < counts["c"]
    assert abs(sum(counts.values()) - 3 * 400) <= 3
