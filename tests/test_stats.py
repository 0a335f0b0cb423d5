"""Gradient statistics as an artifact: `save_gradient_stats` / `load_gradient_stats`."""

from __future__ import annotations

import os

import pytest
import torch

import gora
from helpers import assert_close, lm_batches, make_llama


def _config(store: str = "full") -> gora.GoraConfig:
    return gora.GoraConfig(
        target_modules="all-linear",
        r=4,
        min_rank=1,
        max_rank=8,
        num_batches=3,
        gradient_store=store,
        sketch_samples=64,
    )


def _lora_state(model, config, stats):
    allocation = gora.allocate_ranks(gora.compute_importances(model, stats, config.importance), stats.shapes, config)
    peft_model = gora.build_gora_model(model, config, stats, allocation)
    return {k: v.detach().clone() for k, v in peft_model.state_dict().items() if "lora_" in k}


@pytest.mark.parametrize("store", ["full", "sketch"])
def test_round_trip_gives_the_same_adapter(tmp_path, store):
    """Property: statistics loaded from disk give the same ranks and adapter as the originals, with no forward
    (bitwise-equal tensors; B0 to float32 rounding, since BLAS results may depend on memory alignment)."""
    config = _config(store)
    stats = gora.estimate_gradients(make_llama(), config, lm_batches(3), show_progress=False)
    path = gora.save_gradient_stats(stats, tmp_path / "stats.safetensors", make_llama())
    loaded = gora.load_gradient_stats(path, make_llama())
    assert (loaded.store, loaded.num_batches, loaded.seed) == (store, 3, 0)
    assert loaded.importances == stats.importances and loaded.no_grad == stats.no_grad
    original, again = _lora_state(make_llama(), config, stats), _lora_state(make_llama(), config, loaded)
    assert original.keys() == again.keys()
    for key in original:
        assert_close(again[key], original[key], rtol=1e-5, msg=key)
    assert [p.name for p in tmp_path.iterdir()] == ["stats.safetensors"]  # no temporary file left


def test_mismatched_model_refused(tmp_path):
    """Property: statistics never load onto another model: other weights or other layers give a clear error."""
    stats = gora.estimate_gradients(make_llama(), _config(), lm_batches(3), show_progress=False)
    path = gora.save_gradient_stats(stats, tmp_path / "stats.safetensors", make_llama())
    with pytest.raises(ValueError, match="different model"):
        gora.load_gradient_stats(path, make_llama(seed=1))
    with pytest.raises(ValueError, match=r"no module|shape"):
        gora.load_gradient_stats(path, make_llama(layers=1))
    gora.load_gradient_stats(path, make_llama().to(torch.bfloat16))  # same checkpoint in another dtype: accepted


def test_statistics_for_another_configuration_refused(tmp_path):
    """Property: given the configuration they are for, statistics of other target modules, or a sketch drawn with
    another seed (A0 must be the sketch's random matrix), are refused; the configuration they were made with loads."""
    import dataclasses

    config = _config("sketch")
    stats = gora.estimate_gradients(make_llama(), config, lm_batches(3), show_progress=False)
    path = gora.save_gradient_stats(stats, tmp_path / "stats.safetensors", make_llama())
    gora.load_gradient_stats(path, make_llama(), config=config)
    with pytest.raises(ValueError, match="target_modules selects"):
        gora.load_gradient_stats(path, make_llama(), config=dataclasses.replace(config, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="seed=0"):
        gora.load_gradient_stats(path, make_llama(), config=dataclasses.replace(config, seed=1))


def test_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch):
    """Property: a save that fails midway leaves the previous file intact and no temporary file behind."""
    stats = gora.estimate_gradients(make_llama(), _config(), lm_batches(3), show_progress=False)
    path = gora.save_gradient_stats(stats, tmp_path / "stats.safetensors", make_llama())
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(KeyboardInterrupt):
        gora.save_gradient_stats(stats, path, make_llama())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["stats.safetensors"]


def test_foreign_file_refused(tmp_path):
    """Property: a safetensors file not written by gora, or not a safetensors file, is refused clearly."""
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="no gora header"):
        gora.load_gradient_stats(tmp_path / "other.safetensors", make_llama())
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="safetensors"):
        gora.load_gradient_stats(tmp_path / "junk.safetensors", make_llama())
    with pytest.raises(FileNotFoundError):
        gora.load_gradient_stats(tmp_path / "missing.safetensors", make_llama())
