"""Mixture-of-experts models under transformers 4.x, whose experts are one nn.Linear each (Mixtral's
`block_sparse_moe.experts.{e}.w1/w2/w3`, Qwen3-MoE's `mlp.experts.{e}.gate_proj/up_proj/down_proj`): GoRA reaches
them with ordinary `target_modules`, each expert a layer with its own rank; fused expert stacks
(`target_parameters`) are refused with the transformers release they need. transformers 5 fuses the experts
(test_experts.py covers that)."""

from __future__ import annotations

import pytest
import torch

import gora
from helpers import FUSED_EXPERTS, assert_stock_peft_round_trip, lm_batches, make_mixtral, make_qwen3_moe

pytestmark = pytest.mark.skipif(
    FUSED_EXPERTS, reason="transformers>=5 fuses the experts into 3-D parameters: test_experts.py covers them"
)
EXPERT_MODULES = {"mixtral": ["w1", "w2", "w3"], "qwen3_moe": ["gate_proj", "up_proj", "down_proj"]}
MAKERS = {"mixtral": make_mixtral, "qwen3_moe": make_qwen3_moe}


def config(kind: str, **kwargs) -> gora.GoraConfig:
    base = dict(target_modules=["q_proj", "v_proj", *EXPERT_MODULES[kind]], r=4, min_rank=1, max_rank=8, num_batches=3)
    return gora.GoraConfig(**{**base, **kwargs})


@pytest.mark.parametrize("kind", list(MAKERS))
def test_per_expert_linears_are_layers_that_reload_in_plain_peft_and_merge(kind, tmp_path):
    """Property: every expert's linear layers are GoRA targets of their own (a rank each in rank_pattern), the
    adapter reloads in stock PEFT with identical logits, and merge_and_unload computes the same function."""

    batch = lm_batches(1, seed=5)[0]
    peft_model = gora.get_gora_model(MAKERS[kind](), config(kind), lm_batches(3), show_progress=False).eval()
    ranks = peft_model.peft_config["default"].rank_pattern
    experts = [name for name in ranks if ".experts." in name]
    assert len(experts) == 2 * 4 * 3  # layers x experts x linear layers per expert
    assert_stock_peft_round_trip(peft_model, MAKERS[kind], batch, tmp_path / "adapter")


def test_fused_expert_targets_name_the_transformers_release_they_need():
    """Property: target_parameters='all-experts' on 4.x's Mixtral (no 3-D parameters) is a ValueError that names
    transformers>=5 and the target_modules alternative, and the model is left as it was."""
    model = make_mixtral()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    cfg = gora.GoraConfig(target_modules=["q_proj"], target_parameters="all-experts", r=4, num_batches=3)
    with pytest.raises(ValueError, match=r"transformers>=5 .*target_modules"):
        gora.get_gora_model(model, cfg, lm_batches(3), show_progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    assert not any(hasattr(m, "lora_A") for m in model.modules())
