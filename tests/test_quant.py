"""QGoRA on CPU: estimation in full precision (or on dequantized 4-bit weights), training on an NF4 base."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gora
from helpers import VOCAB, assert_close, llama_config, lm_batches

bnb = pytest.importorskip("bitsandbytes")

from transformers import BitsAndBytesConfig, LlamaForCausalLM  # noqa: E402

from gora.quant import dequantized_targets  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj"]
NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def make_qllama(seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama whose linear layers have in_features divisible by bitsandbytes' 4-bit block size (64)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(hidden_size=64, intermediate_size=128)).eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest single-threaded on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    make_qllama().save_pretrained(path)
    return path


def lora_params(peft_model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}


def test_qgora_from_full_precision_trains_and_reloads_in_plain_peft(base_dir, tmp_path):
    """Protects the QGoRA path end to end: A0/B0 come from the full-precision model (equal to plain GoRA's), the
    bases become NF4 Linear4bit layers under PEFT's bnb LoRA layers (lm_head stays full precision), a training step
    updates only the adapter, and save -> PeftModel.from_pretrained onto a base that transformers quantized from the
    same checkpoint gives identical outputs."""
    from peft import PeftModel
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    config = gora.GoraConfig(target_modules=TARGETS, r=4, num_batches=2)
    batches = lm_batches(2, length=12)
    model = LlamaForCausalLM.from_pretrained(base_dir)
    fp_reference = gora.get_gora_model(copy.deepcopy(model), config, batches, show_progress=False)
    peft_model = gora.get_qgora_model(model, config, batches, NF4, show_progress=False)

    initial = lora_params(peft_model)
    assert initial.keys() == lora_params(fp_reference).keys()
    for name, value in lora_params(fp_reference).items():
        assert torch.equal(initial[name], value), name  # the same computation on the same weights, in one process
    layer = peft_model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear4bit) and isinstance(layer.base_layer, bnb.nn.Linear4bit)
    assert layer.base_layer.weight.quant_type == "nf4"
    assert isinstance(peft_model.get_base_model().model.layers[0].self_attn.k_proj, bnb.nn.Linear4bit)
    assert type(peft_model.get_base_model().lm_head) is nn.Linear
    record = peft_model.gora_records["default"]
    assert record.extra["qgora"]["estimated_on"] == "full precision"
    assert "model.layers.1.mlp.down_proj" in record.extra["qgora"]["quantized_modules"]

    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    peft_model(**batches[0]).loss.backward()
    optimizer.step()
    trained = lora_params(peft_model)
    assert all(not torch.equal(trained[n], initial[n]) for n in trained if "lora_B" in n)
    assert all(torch.equal(p, frozen[n]) for n, p in peft_model.named_parameters() if not p.requires_grad)

    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(base_dir, quantization_config=NF4), tmp_path / "adapter"
    )
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    peft_model.eval()
    with torch.no_grad():
        # identical 4-bit tensors (test_quantize_base_matches_transformers) and the same adapter through the same
        # kernels in one process: bit for bit
        assert torch.equal(peft_model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    assert (tmp_path / "adapter" / "gora_record.json").is_file()


def test_prequantized_model_estimates_on_dequantized_weights_and_is_restored(base_dir):
    """Protects: on a model loaded in 4-bit, each target Linear4bit is swapped for its dequantized weight during
    estimation, so G is the gradient at the quantized base (equal to the gradient of a full-precision model holding
    the dequantized weights); afterwards every module is the same object with the same 4-bit data and flags; and the
    full QGoRA path then builds PEFT bnb LoRA layers over those very modules."""
    config = gora.GoraConfig(target_modules=TARGETS, r=4, num_batches=2)
    batches = lm_batches(2, length=12)
    model = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=NF4)
    before = {
        name: (module, module.weight.data.clone(), module.weight.quant_state.absmax.clone(), module.training)
        for name, module in model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit)
    }
    flags = [p.requires_grad for p in model.parameters()]

    with dequantized_targets(model, config) as swapped:
        assert len(swapped) == 6 and all(
            type(model.get_submodule(n)).__name__ == "_DequantizedLinear" for n in swapped
        )
        dequantized = {n: model.get_submodule(n).weight.detach().clone() for n in swapped}
        stats = gora.estimate_gradients(model, config, batches, show_progress=False)
    for name, (module, data, absmax, training) in before.items():
        now = model.get_submodule(name)
        assert now is module, name
        assert torch.equal(now.weight.data, data) and torch.equal(now.weight.quant_state.absmax, absmax), name
        assert now.training == training
    assert [p.requires_grad for p in model.parameters()] == flags

    fp = LlamaForCausalLM.from_pretrained(base_dir)  # every 4-bit layer's Ŵ in a full-precision model
    with torch.no_grad():
        for name, module in before.items():
            weight = dequantized.get(name)
            fp.get_submodule(name).weight.copy_(weight if weight is not None else gora.quant._dequantize(module[0]))
    fp_stats = gora.estimate_gradients(fp, config, batches, show_progress=False)
    for name, grad in stats.gradients.items():
        assert_close(grad, fp_stats.gradients[name], rtol=1e-4, msg=name)

    peft_model = gora.get_qgora_model(model, config, batches, show_progress=False)
    layer = peft_model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.base_layer is before["model.layers.0.self_attn.q_proj"][0]
    assert peft_model.gora_records["default"].extra["qgora"]["prequantized"] is True
    peft_model.train()
    peft_model(**batches[0]).loss.backward()
    assert layer.lora_B["default"].weight.grad is not None


def test_qgora_refusals_leave_model_as_it_was(base_dir):
    """Protects: bad input fails with a ValueError naming the fix, and a failure after quantization puts the
    original full-precision modules back (no half-quantized model)."""
    config = gora.GoraConfig(target_modules=TARGETS, r=4, num_batches=2)
    batches = lm_batches(4, length=12)
    quantized = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=NF4)
    with pytest.raises(ValueError, match="already quantized"):
        gora.get_qgora_model(quantized, config, batches, NF4, show_progress=False)
    with pytest.raises(ValueError, match="load_in_4bit=True"):
        gora.get_qgora_model(make_qllama(), config, batches, BitsAndBytesConfig(load_in_8bit=True))
    with pytest.raises(ValueError, match="not supported for gradient estimation"):
        gora.get_gora_model(quantized, config, batches, show_progress=False)  # the plain path still refuses 4-bit

    model = make_qllama()
    modules = dict(model.named_modules())

    def forward(model, batch):  # held-out losses (no grad) fail after the base was quantized
        if not torch.is_grad_enabled():
            raise RuntimeError("boom")
        return model(**batch).loss

    auto = gora.GoraConfig(target_modules=TARGETS, r=4, num_batches=2, gamma="auto", gamma_batches=1)
    with pytest.raises(RuntimeError, match="boom"):
        gora.get_qgora_model(model, auto, batches, NF4, forward_fn=forward, show_progress=False)
    assert all(module is modules[name] for name, module in model.named_modules())
    assert not hasattr(model, "is_loaded_in_4bit")


def test_cpu_inference_layout_is_refused(base_dir):
    """Protects: a 4-bit model that bitsandbytes repacked for CPU inference (eval forward without grad on an
    AVX512-BF16 CPU), through which it cannot backpropagate, is refused with a clear error instead of yielding
    wrong gradients."""
    model = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=NF4)
    with torch.no_grad():
        model(input_ids=lm_batches(1)[0]["input_ids"])
    if not getattr(model.model.layers[0].self_attn.q_proj.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack")
    config = gora.GoraConfig(target_modules=TARGETS, r=4, num_batches=2)
    with pytest.raises(ValueError, match="CPU inference layout"):
        gora.get_qgora_model(model, config, lm_batches(2), show_progress=False)


def test_quantize_base_matches_transformers(base_dir):
    """Protects: quantize_base produces the same 4-bit tensors and skips the same modules as transformers'
    from_pretrained(quantization_config=...), so adapters trained on either base are interchangeable."""
    model = LlamaForCausalLM.from_pretrained(base_dir)
    names = gora.quantize_base(model, NF4)
    loaded = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=NF4)
    assert names == sorted(n for n, m in loaded.named_modules() if isinstance(m, bnb.nn.Linear4bit))
    for (name, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert type(p) is type(q) and torch.equal(p.data, q.data), name


def test_auto_gamma_on_the_4bit_base_keeps_it_trainable():
    """Protects: gamma='auto' with QGoRA measures the held-out losses on the 4-bit base (γ = 0 is exactly its
    output) without letting bitsandbytes repack the weights into its CPU inference layout, so training still
    backpropagates through every 4-bit layer afterwards."""
    config = gora.GoraConfig(target_modules=TARGETS, r=4, num_batches=2, gamma="auto", gamma_batches=1)
    peft_model = gora.get_qgora_model(make_qllama(), config, lm_batches(3, length=12), NF4, show_progress=False)
    search = peft_model.gora_records["default"].extra["gamma_search"]
    assert len(search["losses"]) == len(search["candidates"]) and search["num_batches"] == 1
    assert not any(
        getattr(getattr(m, "quant_state", None), "packing_format_for_cpu", False) for m in peft_model.modules()
    )
    peft_model.train()
    peft_model(**lm_batches(1, seed=5)[0]).loss.backward()
    first = peft_model.get_base_model().model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert first.grad is not None and torch.count_nonzero(first.grad) > 0
