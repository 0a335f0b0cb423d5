"""What the tests share: tiny config-built models and batches (no downloads; CPU; seconds), the check that a
model was left untouched, the mean gradient by plain autograd, and a magnitude-scaled float comparison.

All models are dropout-free, so train-mode gradients are deterministic and comparable across runs/processes.
Tests import this module (`from helpers import ...`); `conftest.py` only turns some of it into fixtures.
"""

from __future__ import annotations

import pytest
import torch
import transformers

VOCAB = 96
# transformers 5 fuses a mixture-of-experts layer's experts into 3-D parameters (GoRA's `target_parameters`);
# 4.x builds one nn.Linear per expert, which ordinary target_modules reach (test_experts_4x.py)
FUSED_EXPERTS = int(transformers.__version__.split(".")[0]) >= 5
needs_fused_experts = pytest.mark.skipif(
    not FUSED_EXPERTS, reason=f"needs transformers>=5: fused experts (here {transformers.__version__})"
)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_config(layers: int = 2, **overrides):
    """The tiny Llama's config (hidden 32, 4 heads, 2 KV heads); `overrides` replace any field."""
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaConfig(**{**fields, **overrides})


def make_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(layers)).eval()


MOE_FIELDS = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def mixtral_config(experts: int = 4, **overrides):
    """A tiny Mixtral (hidden 32, experts of intermediate 24, top-2 routing) whose experts are fused 3-D parameters
    gate_up_proj (E, 48, 32) and down_proj (E, 32, 24)."""
    from transformers import MixtralConfig

    fields = dict(MOE_FIELDS, intermediate_size=24, num_local_experts=experts, num_experts_per_tok=2)
    return MixtralConfig(**{**fields, **overrides})


def make_mixtral(seed: int = 0, experts: int = 4):
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    return MixtralForCausalLM(mixtral_config(experts)).eval()


def make_qwen3_moe(seed: int = 0, experts: int = 4):
    """A tiny Qwen3-MoE (experts of intermediate 16, top-2): gate_up_proj (E, 32, 32), down_proj (E, 32, 16)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        **MOE_FIELDS,
        head_dim=8,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_experts=experts,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    return Qwen3MoeForCausalLM(config).eval()


def make_gpt_oss(seed: int = 0, experts: int = 4):
    """A tiny gpt-oss, whose experts are stored transposed (`is_transposed`): gate_up_proj (E, 32, 32) = (E, in,
    out), down_proj (E, 16, 32) = (E, in=I, out=H)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    config = GptOssConfig(
        **MOE_FIELDS,
        head_dim=8,
        intermediate_size=16,
        num_local_experts=experts,
        num_experts_per_tok=2,
        layer_types=["full_attention", "full_attention"],
    )
    return GptOssForCausalLM(config).eval()


def make_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


def bert_config(num_labels: int = 2, **overrides):
    """The tiny dropout-free BERT's config (hidden 32, 2 layers); `overrides` replace any field."""
    from transformers import BertConfig

    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertConfig(**{**fields, **overrides})


def make_bert(seed: int = 0, num_labels: int = 2):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(bert_config(num_labels)).eval()


def lm_batches(n: int = 4, batch: int = 2, length: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Causal-LM batches with labels, so model(**b).loss exists."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def cls_batches(n: int = 4, batch: int = 4, length: int = 10, seed: int = 0, num_labels: int = 2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, length), generator=g)
        labels = torch.randint(0, num_labels, (batch,), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, msg: str | None = None) -> None:
    """actual equals expected up to float rounding: |a − e| <= rtol·|e| + rtol·max|e| elementwise.

    The absolute part scales with the magnitude of what is compared: a fixed tiny atol fails on elements near zero,
    whose last bits depend on the float32 summation order of the CPU's SIMD kernels (Intel vs AMD).
    """
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=rtol * scale, check_dtype=False, check_device=False, msg=msg
    )


def snapshot(model):
    """Everything of a model that GoRA must leave as it was: weights, requires_grad flags, modes, grads, types."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "flags": {k: p.requires_grad for k, p in model.named_parameters()},
        "modes": {k: m.training for k, m in model.named_modules()},
        "grads": {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        "types": {k: type(m) for k, m in model.named_modules()},
    }


def assert_same(before, after):
    """Bit-equality of two snapshots: nothing was computed, only restored, so nothing may differ at all."""
    assert before["flags"] == after["flags"]
    assert before["modes"] == after["modes"]
    assert before["types"] == after["types"]
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k
    for k, g in before["grads"].items():
        h = after["grads"][k]
        assert (g is None and h is None) or torch.equal(g, h), k


def manual_mean_gradient(model, batches, targets):
    """G by plain autograd, one batch at a time, with dropout off — the definition, written independently (float64)."""
    model.train()
    sums = {t.name: torch.zeros(t.m, t.n, dtype=torch.float64) for t in targets}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for t in targets:
            g = model.get_submodule(t.name).weight.grad
            sums[t.name] += (g.T if t.transposed else g).double()
    model.zero_grad(set_to_none=True)
    model.eval()
    return {k: v / len(batches) for k, v in sums.items()}


def assert_stock_peft_round_trip(peft_model, make_base, batch, folder) -> None:
    """The adapter is stock PEFT: saved, then `PeftModel.from_pretrained` on a fresh base (`make_base()`) gives
    identical logits on `batch`, and `merge_and_unload` computes the same function (up to float rounding)."""
    from peft import PeftModel

    with torch.no_grad():
        want = peft_model(**batch).logits
    peft_model.save_pretrained(folder)
    loaded = PeftModel.from_pretrained(make_base(), folder).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, want)
        merged = loaded.merge_and_unload()
        assert_close(merged(**batch).logits, want, rtol=1e-5)
