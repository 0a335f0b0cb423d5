"""Adaptive number of gradient batches (`GoraConfig(adaptive_batches=True)`)."""

from __future__ import annotations

import pytest

import gora
from conftest import lm_batches


def _config(**kwargs) -> gora.GoraConfig:
    base = dict(target_modules="all-linear", r=4, min_rank=1, max_rank=8, num_batches=8, adaptive_batches=True)
    return gora.GoraConfig(**{**base, **kwargs})


@pytest.mark.parametrize("store", ["full", "sketch"])
def test_stops_at_min_batches_when_importances_converge(llama, store):
    """Property: with identical batches the running mean, hence every importance, is constant from the first batch,
    so estimation stops at adaptive_min_batches and reports it."""
    batches = lm_batches(1) * 8
    stats = gora.estimate_gradients(
        llama, _config(gradient_store=store, sketch_samples=64), batches, show_progress=False
    )
    assert stats.num_batches == 3
    report = stats.info["adaptive"]
    assert report["stopped_early"] and report["batches"] == 3
    assert all(change <= 1e-5 for change in report["max_relative_change"])


def test_never_exceeds_num_batches(llama):
    """Property: with a threshold no batch can meet, estimation runs exactly num_batches and never more."""
    stats = gora.estimate_gradients(
        llama, _config(num_batches=5, adaptive_threshold=1e-12), lm_batches(9), show_progress=False
    )
    assert stats.num_batches == 5
    assert not stats.info["adaptive"]["stopped_early"]
    assert len(stats.info["adaptive"]["max_relative_change"]) == 5 - 3 + 1


def test_batches_used_reach_the_record(llama):
    """Property: the number of batches actually used is what the adapter's record reports."""
    model = gora.get_gora_model(llama, _config(), lm_batches(1) * 8, show_progress=False)
    record = model.gora_records["default"]
    assert record.num_batches == 3
    assert record.extra["estimation"]["adaptive"]["stopped_early"]


def test_adaptive_config_validated():
    """Property: impossible adaptive settings fail at construction with the fix in the message."""
    with pytest.raises(ValueError, match="adaptive_min_batches"):
        _config(num_batches=2, adaptive_min_batches=3)
    with pytest.raises(ValueError, match="adaptive_threshold"):
        _config(adaptive_threshold=0)
    with pytest.raises(ValueError, match="adaptive_min_batches must be >= 2"):
        _config(adaptive_min_batches=1)
    assert gora.GoraConfig(num_batches=2).adaptive_min_batches == 3  # off by default: no constraint
