"""The memory model (memory.py): its exact terms equal what the library allocates, and its arithmetic is sound.

Whether its totals match measured peaks is a benchmark question (benchmarks/studies/qgora_memory.py, docs/BENCHMARKS.md),
not a test's: here only the parts that are exact by construction are compared."""

from __future__ import annotations

import pytest
import torch

import gora
from gora.memory import LLAMA_3_70B, DecoderShape, estimate_peak_bytes, max_tokens
from helpers import llama_config, lm_batches

bnb = pytest.importorskip("bitsandbytes")

from transformers import BitsAndBytesConfig, LlamaForCausalLM  # noqa: E402

CONFIG = llama_config(hidden_size=256, intermediate_size=896, num_attention_heads=4, num_key_value_heads=2)


def _tensor_bytes(model) -> int:
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers(recurse=True)])
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:  # absmax, nested absmax, code tables: what the 4-bit weight needs besides its nibbles
            total += sum(
                v.numel() * v.element_size()
                for k, v in state.as_dict(packed=True).items()
                if k != "quant_state.bitsandbytes__nf4"
            )
    return total


@pytest.mark.parametrize("double_quant", [False, True])
def test_weights_term_is_the_4bit_models_tensor_bytes(tmp_path, double_quant):
    """Property: for a model transformers loads in 4-bit (bfloat16 compute), the predicted weight bytes are its
    tensors' bytes (packed nibbles, absmax statistics, bfloat16 embeddings, output layer and norms), to 2%."""
    torch.manual_seed(0)
    LlamaForCausalLM(CONFIG).to(torch.bfloat16).save_pretrained(tmp_path)
    qconfig = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=qconfig, dtype=torch.bfloat16)
    predicted = estimate_peak_bytes(DecoderShape.from_config(CONFIG), 64, double_quant=double_quant).weights
    rope = sum(b.numel() * b.element_size() for b in model.model.rotary_emb.buffers())
    assert predicted == pytest.approx(_tensor_bytes(model) - rope, rel=0.02)


@pytest.mark.parametrize("store", ["full", "sketch"])
def test_statistics_term_is_what_estimation_keeps(store):
    """Property: the predicted statistics are the bytes estimation reports keeping: exactly for the full store
    (4·m·n per layer); for the sketch, Y exactly plus the samples' budget (split across layers with rounding)."""
    model = LlamaForCausalLM(CONFIG)
    config = gora.GoraConfig(target_modules="all-linear", num_batches=1, gradient_store=store, sketch_samples=256)
    stats = gora.estimate_gradients(model, config, lm_batches(1), show_progress=False)
    predicted = estimate_peak_bytes(
        DecoderShape.from_config(CONFIG), 24, mode=store, sketch_samples=256, max_rank=config.max_rank
    ).statistics
    if store == "full":
        assert predicted == stats.info["statistics_bytes"]
    else:
        assert predicted == pytest.approx(stats.info["statistics_bytes"], rel=0.02)


def test_modes_and_tokens_order_the_totals():
    """Property: more tokens never need less memory; on a real model's shapes the hook route (kept inputs,
    statistics) costs more than a plain forward+backward, and the full store more than the sketch."""
    shape = DecoderShape.from_config(CONFIG)
    for mode in ("plain", "sketch", "full"):
        totals = [estimate_peak_bytes(shape, t, mode=mode).total for t in (64, 256, 1024, 4096)]
        assert totals == sorted(totals)
    for tokens in (256, 2048):
        totals = [estimate_peak_bytes(LLAMA_3_70B, tokens, mode=m).total for m in ("plain", "sketch", "full")]
        assert totals == sorted(totals)


def test_max_tokens_is_the_largest_batch_within_the_budget():
    budget = 80e9
    tokens = max_tokens(LLAMA_3_70B, budget, mode="sketch", double_quant=True)
    assert estimate_peak_bytes(LLAMA_3_70B, tokens, mode="sketch", double_quant=True).total <= budget
    assert estimate_peak_bytes(LLAMA_3_70B, tokens + 1, mode="sketch", double_quant=True).total > budget
    assert tokens >= 1024  # the target: Llama-3-70B, 4-bit, sketch, within 80 GB (here at 1024 tokens)


def test_bad_arguments_are_refused():
    shape = DecoderShape.from_config(CONFIG)
    with pytest.raises(ValueError, match="mode must be"):
        estimate_peak_bytes(shape, 8, mode="lora")
    with pytest.raises(ValueError, match="bits must be 4, 8 or 16"):
        estimate_peak_bytes(shape, 8, bits=3)
    with pytest.raises(ValueError, match="targets must be among"):
        estimate_peak_bytes(shape, 8, targets=["lm_head"])
