"""Which modules GoRA adapts (targets.py): PEFT's matching rules, layouts, refusals, shared weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gora
from gora import GoraConfig
from gora.targets import find_targets, get_weight
from helpers import (
    assert_close,
    assert_same,
    llama_config,
    lm_batches,
    make_gpt2,
    make_llama,
    manual_mean_gradient,
    snapshot,
)


def test_a_peft_model_is_refused():
    peft_model = gora.get_gora_model(make_llama(), GoraConfig(target_modules=["q_proj"], num_batches=1), lm_batches(1))
    with pytest.raises(ValueError, match="already carries PEFT adapter"):
        gora.get_gora_model(peft_model, GoraConfig(target_modules=["v_proj"], num_batches=1), lm_batches(1))


def test_default_targets_come_from_peft_for_known_architectures():
    stats = gora.estimate_gradients(make_llama(), GoraConfig(num_batches=1), lm_batches(1), show_progress=False)
    assert {t.name.rsplit(".", 1)[-1] for t in stats.targets} == {"q_proj", "v_proj"}


def test_all_linear_targets_every_linear_but_the_output_layer():
    model = make_llama()
    stats = gora.estimate_gradients(model, GoraConfig(target_modules="all-linear", num_batches=1), lm_batches(1))
    names = {t.name for t in stats.targets}
    assert "lm_head" not in names and len(names) == 2 * 7


def test_weight_view_matches_layout():
    model = make_gpt2()
    config = GoraConfig(target_modules=["c_fc"], num_batches=1)
    target = find_targets(model, config)[0]
    assert target.transposed and get_weight(model, target).shape == (target.m, target.n) == (128, 32)


def test_tied_target_weight_is_warned_about(caplog):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with caplog.at_level("WARNING"):
        find_targets(model, GoraConfig(target_modules=["lm_head"]))
    assert "shares its weight with model.embed_tokens" in caplog.text


def _two_layers_sharing_one_weight():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(8, 8)
            self.second = nn.Linear(8, 8)
            self.second.weight = self.first.weight  # one Parameter, two modules
            self.other = nn.Linear(8, 8)

        def forward(self, x):
            return self.other(self.second(self.first(x)))

    torch.manual_seed(0)
    return Shared()


def test_two_targets_on_one_weight_are_refused_up_front():
    """Property: two targets that share one weight Parameter (one gradient: the sum over both uses) are refused
    before any forward pass, with an error naming both modules and the fix; the model is untouched."""
    model = _two_layers_sharing_one_weight()
    before = snapshot(model)
    config = GoraConfig(target_modules=["first", "second", "other"], num_batches=1, r=2, min_rank=1, max_rank=4)
    with pytest.raises(ValueError, match=r"share one weight Parameter: first = second.*target only one module"):
        gora.get_gora_model(model, config, [torch.randn(2, 8)], forward_fn=lambda m, x: m(x).square().mean())
    assert_same(before, snapshot(model))
    # one of the two is fine: its gradient is the sum over both uses, as for any tied weight (warned about)
    config = GoraConfig(target_modules=["first", "other"], num_batches=1, r=2, min_rank=1, max_rank=4)
    peft_model = gora.get_gora_model(model, config, [torch.randn(2, 8)], forward_fn=lambda m, x: m(x).square().mean())
    assert set(peft_model.peft_config["default"].rank_pattern) == {"first", "other"}


def test_tied_lm_head_target_runs_end_to_end(caplog):
    """Property: a target tied to a module that is not a target (lm_head = embed_tokens) works: its G is the sum of
    the gradients of both uses (as autograd gives it), the adapter sits on lm_head only, and a warning says so."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(layers=1, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batches = lm_batches(2)
    config = GoraConfig(target_modules=["lm_head", "q_proj"], num_batches=2, r=2, min_rank=1, max_rank=4)
    with caplog.at_level("WARNING"):
        stats = gora.estimate_gradients(model, config, batches, show_progress=False)
    assert "shares its weight with model.embed_tokens" in caplog.text
    expected = manual_mean_gradient(model, batches, stats.targets)
    assert_close(stats.gradients["lm_head"], expected["lm_head"], rtol=1e-4)
    peft_model = gora.get_gora_model(model, config, batches, show_progress=False)
    assert hasattr(peft_model.base_model.model.lm_head, "lora_A")
    assert not hasattr(peft_model.base_model.model.model.embed_tokens, "lora_A")
