"""QGoRA on CPU: quantized bases (bitsandbytes 4-bit and 8-bit) through get_gora_model (module-hook estimation, PEFT's
bnb LoRA layers), and get_qgora_model's estimation in full precision followed by NF4 quantization."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gora
from helpers import VOCAB, assert_close, assert_same, llama_config, lm_batches, snapshot

bnb = pytest.importorskip("bitsandbytes")

from transformers import BitsAndBytesConfig, LlamaForCausalLM  # noqa: E402

from gora.batches import eval_mode  # noqa: E402
from gora.qlayers import dequantize  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj"]
NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
# from_pretrained(..., quantization_config) is given dtype=float32 throughout: transformers 4.x loads a bitsandbytes
# model in float16 unless told (5.x keeps the checkpoint's float32), and the comparisons here are of float32 models


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
        LlamaForCausalLM.from_pretrained(base_dir, quantization_config=NF4, dtype=torch.float32), tmp_path / "adapter"
    )
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    peft_model.eval()
    with torch.no_grad():
        # identical 4-bit tensors (test_quantize_base_matches_transformers) and the same adapter through the same
        # kernels in one process: bit for bit
        assert torch.equal(peft_model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    assert (tmp_path / "adapter" / "gora_record.json").is_file()


def _dequantized_copy(base_dir, quantized) -> LlamaForCausalLM:
    """A full-precision model holding Ŵ = deq(Q(W0)) of every 4-bit layer of `quantized` (the rest as loaded)."""
    fp = LlamaForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                fp.get_submodule(name).weight.copy_(dequantize(module))
    return fp


@pytest.mark.parametrize("store", ["full", "sketch"])
def test_4bit_hook_route_equals_weight_route_on_dequantized_copy(base_dir, store):
    """Protects the hook route on 4-bit layers: hooks on Linear4bit give the gradient, sketch and importances that the
    weight route gives on nn.Linear layers holding the same dequantized weights, up to float rounding (full store:
    identical ranks); and the 4-bit model comes back exactly as it was, without hooks."""
    config = gora.GoraConfig(target_modules=TARGETS, r=4, num_batches=2, gradient_store=store, sketch_samples=64)
    batches = lm_batches(2, length=12)
    quantized = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=NF4, dtype=torch.float32)
    fp = _dequantized_copy(base_dir, quantized)
    before = snapshot(quantized)
    stats = gora.estimate_gradients(quantized, config, batches, show_progress=False)
    assert_same(before, snapshot(quantized))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in quantized.modules())
    assert stats.info["gradient_routes"] == {"weights": 0, "hooks": 6}
    reference = gora.estimate_gradients(fp, config, batches, show_progress=False)
    assert reference.info["gradient_routes"] == {"weights": 6, "hooks": 0}
    assert stats.gradients.keys() == reference.gradients.keys() and stats.sketches.keys() == reference.sketches.keys()
    for name, G in reference.gradients.items():
        assert_close(stats.gradients[name], G, rtol=1e-4, msg=name)
    for name, Y in reference.sketches.items():
        assert_close(stats.sketches[name], Y, rtol=1e-4, msg=name)
    importances = gora.compute_importances(quantized, stats, config.importance)  # dequantizes one layer at a time
    expected = gora.compute_importances(fp, reference, config.importance)
    assert importances == pytest.approx(expected, rel=1e-3)
    if store == "full":
        ranks = gora.allocate_ranks(importances, stats.shapes, config).ranks
        assert ranks == gora.allocate_ranks(expected, reference.shapes, config).ranks


def _probe_gradient(model, batches, names) -> dict[str, torch.Tensor]:
    """∂L/∂Δ at Δ = 0 for each named layer run as W + Δ, by plain autograd over the mean loss: the definition of
    the gradient at the quantized base that a LoRA update B·A (which enters exactly as Δ) sees."""
    deltas, handles = {}, []
    for name in names:
        module = model.get_submodule(name)
        delta = torch.zeros(module.out_features, module.in_features, requires_grad=True)
        deltas[name] = delta
        handles.append(
            module.register_forward_hook(lambda mod, args, out, d=delta: out + F.linear(args[0], d.to(out.dtype)))
        )
    model.train()
    try:
        for batch in batches:
            (model(**batch).loss / len(batches)).backward()
    finally:
        for handle in handles:
            handle.remove()
        model.eval()
    return {name: delta.grad for name, delta in deltas.items()}


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_gradient_is_the_gradient_at_the_base(base_dir, bits):
    """Protects the estimate on 4-bit and 8-bit bases: G from module hooks equals ∂L/∂Δ of the quantized model run as
    Q(W0) + Δ at Δ = 0, computed independently by autograd (8-bit has no dequantized-copy reference: its forward
    also quantizes the activations)."""
    qconfig = NF4 if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
    config = gora.GoraConfig(target_modules=TARGETS, r=4, num_batches=2)
    batches = lm_batches(2, length=12)
    model = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=qconfig, dtype=torch.float32)
    stats = gora.estimate_gradients(model, config, batches, show_progress=False)
    assert stats.info["gradient_routes"] == {"weights": 0, "hooks": 6}
    expected = _probe_gradient(model, batches, [t.name for t in stats.targets])
    for name, G in expected.items():
        assert_close(stats.gradients[name], G, rtol=1e-4, msg=name)


@pytest.mark.parametrize("bits", [4, 8])
def test_get_gora_model_on_a_quantized_base_trains_and_reloads_in_plain_peft(base_dir, tmp_path, bits):
    """Protects issue #13.2: `get_gora_model` takes a model loaded with BitsAndBytesConfig (4-bit or 8-bit) as
    `peft.get_peft_model` does: PEFT's bnb LoRA layers over the very same quantized modules, gamma='auto' chosen on
    the quantized base, a training step that moves only the adapter, and a saved adapter that plain PEFT loads onto
    a base transformers quantized from the same checkpoint with identical outputs."""
    from peft import PeftModel
    from peft.tuners.lora import bnb as lora_bnb

    qconfig = NF4 if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
    layer_cls = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    lora_cls = lora_bnb.Linear4bit if bits == 4 else lora_bnb.Linear8bitLt
    config = gora.GoraConfig(target_modules=TARGETS, r=4, num_batches=2, gamma="auto", gamma_batches=1)
    batches = lm_batches(3, length=12)
    model = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=qconfig, dtype=torch.float32)
    assert getattr(model, f"is_loaded_in_{bits}bit")
    base_q = model.model.layers[0].self_attn.q_proj
    peft_model = gora.get_gora_model(model, config, batches, show_progress=False)

    layer = peft_model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer, lora_cls) and layer.base_layer is base_q and isinstance(base_q, layer_cls)
    record = peft_model.gora_records["default"]
    assert record.extra["estimation"]["gradient_routes"] == {"weights": 0, "hooks": 6}
    assert record.extra["gamma_search"]["num_batches"] == 1
    # the base's fingerprint holds dequantized values, which a full-precision load does not reproduce: not checked
    assert record.base_model["quantized"] is True and record.check_base(model) is False
    assert not any(getattr(getattr(m, "quant_state", None), "packing_format_for_cpu", False) for m in model.modules())

    initial = lora_params(peft_model)
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
        LlamaForCausalLM.from_pretrained(base_dir, quantization_config=qconfig, dtype=torch.float32),
        tmp_path / "adapter",
    )
    assert isinstance(reloaded.get_base_model().model.layers[0].self_attn.q_proj, lora_cls)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    peft_model.eval()
    with torch.no_grad(), eval_mode(peft_model), eval_mode(reloaded):  # eval_mode: no CPU inference repacking
        # the same quantized tensors and the same adapter through the same kernels in one process: bit for bit
        assert torch.equal(peft_model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    assert (tmp_path / "adapter" / "gora_record.json").is_file()


def test_statistics_of_a_quantized_base_belong_to_it(base_dir, tmp_path):
    """Protects: statistics estimated on a 4-bit base save and load against that base (its fingerprint reads the
    dequantized weights) and give the same allocation again; the full-precision model they were quantized from is
    another model, and is refused."""
    config = gora.GoraConfig(target_modules=TARGETS, r=4, num_batches=2)
    model = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=NF4, dtype=torch.float32)
    stats = gora.estimate_gradients(model, config, lm_batches(2, length=12), show_progress=False)
    path = gora.save_gradient_stats(stats, tmp_path / "stats.safetensors", model)
    again = gora.load_gradient_stats(
        path, LlamaForCausalLM.from_pretrained(base_dir, quantization_config=NF4, dtype=torch.float32)
    )
    assert gora.compute_importances(model, again, config.importance) == gora.compute_importances(
        model, stats, config.importance
    )
    with pytest.raises(ValueError, match="different model"):
        gora.load_gradient_stats(path, LlamaForCausalLM.from_pretrained(base_dir))


def test_get_qgora_model_on_a_quantized_model_is_get_gora_model(base_dir):
    """Protects the older entry point: get_qgora_model on a model already quantized runs get_gora_model (module
    hooks, no dequantized copies) and records that."""
    config = gora.GoraConfig(target_modules=TARGETS, r=4, num_batches=2)
    batches = lm_batches(2, length=12)
    via_qgora = gora.get_qgora_model(
        LlamaForCausalLM.from_pretrained(base_dir, quantization_config=NF4, dtype=torch.float32),
        config,
        batches,
        show_progress=False,
    )
    via_gora = gora.get_gora_model(
        LlamaForCausalLM.from_pretrained(base_dir, quantization_config=NF4, dtype=torch.float32),
        config,
        batches,
        show_progress=False,
    )
    assert via_qgora.gora_records["default"].extra["qgora"]["prequantized"] is True
    assert via_qgora.gora_records["default"].ranks == via_gora.gora_records["default"].ranks
    for name, value in lora_params(via_gora).items():
        assert torch.equal(lora_params(via_qgora)[name], value), name  # the same computation in one process


def test_qgora_refusals_leave_model_as_it_was(base_dir):
    """Protects: bad input fails with a ValueError naming the fix, and a failure after quantization puts the
    original full-precision modules back (no half-quantized model)."""
    config = gora.GoraConfig(target_modules=TARGETS, r=4, num_batches=2)
    batches = lm_batches(4, length=12)
    quantized = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=NF4, dtype=torch.float32)
    with pytest.raises(ValueError, match="already quantized"):
        gora.get_qgora_model(quantized, config, batches, NF4, show_progress=False)
    with pytest.raises(ValueError, match="load_in_4bit=True"):
        gora.get_qgora_model(make_qllama(), config, batches, BitsAndBytesConfig(load_in_8bit=True))
    before = snapshot(quantized)
    weights_only = gora.GoraConfig(target_modules=TARGETS, r=4, num_batches=2, gradient_route="weights")
    with pytest.raises(ValueError, match=r"bitsandbytes layers do not have: model\.layers\.0\.self_attn\.q_proj"):
        gora.get_gora_model(quantized, weights_only, batches, show_progress=False)
    assert_same(before, snapshot(quantized))

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


def test_other_quantizations_are_refused_and_the_model_kept(base_dir):
    """Protects: a target quantized by something other than bitsandbytes (here torch.ao dynamic int8, whose packed
    weight GoRA cannot read) is refused with a ValueError naming the layers and the ways out; nothing changes."""
    import warnings

    model = LlamaForCausalLM.from_pretrained(base_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao quantization is deprecated, but still real
        torch.ao.quantization.quantize_dynamic(model.model.layers[1], {nn.Linear}, dtype=torch.qint8, inplace=True)
    modules = dict(model.named_modules())
    config = gora.GoraConfig(target_modules=TARGETS, r=4, num_batches=2)
    with pytest.raises(ValueError, match=r"quantized another way: model\.layers\.1\.self_attn\.q_proj.*load_in_4bit"):
        gora.get_gora_model(model, config, lm_batches(2), show_progress=False)
    assert all(module is modules[name] for name, module in model.named_modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_quantized_layers_the_hooks_cannot_see_are_refused(base_dir):
    """Protects: a 4-bit layer whose weight a patched forward multiplies without calling the module (as fused
    kernels do) is invisible to the module hooks: a ValueError names it, and the model is left as it was."""
    model = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=NF4, dtype=torch.float32)
    mlp = model.model.layers[1].mlp
    up = mlp.up_proj

    def fused(x):
        hidden = bnb.matmul_4bit(x, up.weight.t(), quant_state=up.weight.quant_state)
        return mlp.down_proj(F.silu(mlp.gate_proj(x)) * hidden)

    mlp.forward = fused
    before = snapshot(model)
    config = gora.GoraConfig(target_modules=TARGETS, r=4, num_batches=2)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj never saw their forward"):
        gora.get_gora_model(model, config, lm_batches(2), show_progress=False)
    assert_same(before, snapshot(model))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_cpu_inference_layout_is_refused(base_dir):
    """Protects: a 4-bit model that bitsandbytes repacked for CPU inference (eval forward without grad on an
    AVX512-BF16 CPU), through which it cannot backpropagate, is refused with a clear error instead of yielding
    wrong gradients."""
    model = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=NF4, dtype=torch.float32)
    with torch.no_grad():
        model(input_ids=lm_batches(1)[0]["input_ids"])
    if not getattr(model.model.layers[0].self_attn.q_proj.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("no CPU inference repacking here: needs bitsandbytes>=0.49 on a CPU with AVX512-BF16")
    config = gora.GoraConfig(target_modules=TARGETS, r=4, num_batches=2)
    with pytest.raises(ValueError, match="CPU inference layout"):
        gora.get_gora_model(model, config, lm_batches(2), show_progress=False)
    with pytest.raises(ValueError, match="CPU inference layout"):
        gora.get_qgora_model(model, config, lm_batches(2), show_progress=False)


def test_quantize_base_matches_transformers(base_dir):
    """Protects: quantize_base produces the same 4-bit tensors and skips the same modules as transformers'
    from_pretrained(quantization_config=...), so adapters trained on either base are interchangeable."""
    model = LlamaForCausalLM.from_pretrained(base_dir)
    names = gora.quantize_base(model, NF4)
    loaded = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=NF4, dtype=torch.float32)
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
