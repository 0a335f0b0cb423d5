"""Stage 1 (estimate.py): the exact mean gradient over exactly the first N batches, the model and the caller's RNG left as
they were, non-finite gradients refused, adaptive stopping."""

from __future__ import annotations

import pytest
import torch

import gora
from gora import GoraConfig
from helpers import (
    LLAMA_TARGETS,
    assert_close,
    assert_same,
    lm_batches,
    make_gpt2,
    make_llama,
    manual_mean_gradient,
    snapshot,
)


@pytest.mark.parametrize(("make", "targets"), [(make_llama, LLAMA_TARGETS), (make_gpt2, ["c_attn", "c_proj", "c_fc"])])
def test_estimated_gradient_is_the_exact_mean_over_all_batches(make, targets):
    model = make()
    batches = lm_batches(n=5)
    config = GoraConfig(target_modules=targets, num_batches=5)
    stats = gora.estimate_gradients(model, config, batches, show_progress=False)
    expected = manual_mean_gradient(make(), batches, stats.targets)
    assert stats.num_batches == 5 and not stats.no_grad
    for name, g in stats.gradients.items():
        assert g.dtype == torch.float32
        assert_close(g, expected[name], rtol=1e-4, msg=name)


def test_only_the_first_num_batches_are_used():
    batches = lm_batches(n=6)
    config = GoraConfig(target_modules=["q_proj"], num_batches=2)
    stats = gora.estimate_gradients(make_llama(), config, iter(batches), show_progress=False)
    expected = manual_mean_gradient(make_llama(), batches[:2], stats.targets)
    assert stats.num_batches == 2
    for name, g in stats.gradients.items():
        assert_close(g, expected[name], rtol=1e-4, msg=name)


def test_estimation_leaves_flags_modes_grads_and_weights_as_they_were():
    model = make_llama()
    model.model.layers[0].train()  # mixed modes must come back mixed
    model.lm_head.weight.requires_grad_(False)
    model.model.layers[1].self_attn.q_proj.weight.grad = torch.full_like(
        model.model.layers[1].self_attn.q_proj.weight, 3.0
    )
    before = snapshot(model)
    gora.estimate_gradients(model, GoraConfig(target_modules=LLAMA_TARGETS, num_batches=3), lm_batches(3))
    assert_same(before, snapshot(model))


def test_user_rng_state_is_untouched_by_estimation():
    state = torch.random.get_rng_state()
    gora.estimate_gradients(make_llama(), GoraConfig(target_modules=["q_proj"], num_batches=2), lm_batches(2))
    assert torch.equal(state, torch.random.get_rng_state())


def _adaptive_config(**kwargs) -> gora.GoraConfig:
    base = dict(target_modules="all-linear", r=4, min_rank=1, max_rank=8, num_batches=8, adaptive_batches=True)
    return gora.GoraConfig(**{**base, **kwargs})


@pytest.mark.parametrize("store", ["full", "sketch"])
def test_stops_at_min_batches_when_importances_converge(llama, store):
    """Property: with identical batches the running mean, hence every importance, is constant from the first batch,
    so estimation stops at adaptive_min_batches and reports it."""
    batches = lm_batches(1) * 8
    stats = gora.estimate_gradients(
        llama, _adaptive_config(gradient_store=store, sketch_samples=64), batches, show_progress=False
    )
    assert stats.num_batches == 3
    report = stats.info["adaptive"]
    assert report["stopped_early"] and report["batches"] == 3
    assert all(change <= 1e-5 for change in report["max_relative_change"])


def test_never_exceeds_num_batches(llama):
    """Property: with a threshold no batch can meet, estimation runs exactly num_batches and never more."""
    stats = gora.estimate_gradients(
        llama, _adaptive_config(num_batches=5, adaptive_threshold=1e-12), lm_batches(9), show_progress=False
    )
    assert stats.num_batches == 5
    assert not stats.info["adaptive"]["stopped_early"]
    assert len(stats.info["adaptive"]["max_relative_change"]) == 5 - 3 + 1


def test_batches_used_reach_the_record(llama):
    """Property: the number of batches actually used is what the adapter's record reports."""
    model = gora.get_gora_model(llama, _adaptive_config(), lm_batches(1) * 8, show_progress=False)
    record = model.gora_records["default"]
    assert record.num_batches == 3
    assert record.extra["estimation"]["adaptive"]["stopped_early"]


def test_adaptive_config_validated():
    """Property: impossible adaptive settings fail at construction with the fix in the message."""
    with pytest.raises(ValueError, match="adaptive_min_batches"):
        _adaptive_config(num_batches=2, adaptive_min_batches=3)
    with pytest.raises(ValueError, match="adaptive_threshold"):
        _adaptive_config(adaptive_threshold=0)
    with pytest.raises(ValueError, match="adaptive_min_batches must be >= 2"):
        _adaptive_config(adaptive_min_batches=1)
    assert gora.GoraConfig(num_batches=2).adaptive_min_batches == 3  # off by default: no constraint
