"""The PEFT glue end to end (model.py): the ΔW0 identity inside PEFT's layers, the descent sign, determinism, plain-PEFT
round trips, merging, pass-through options, and that the user's model is never changed (on success or failure)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import gora
from gora import GoraConfig
from gora.initialize import layer_scaling
from gora.targets import find_targets
from helpers import (
    LLAMA_TARGETS,
    assert_close,
    assert_same,
    cls_batches,
    lm_batches,
    make_bert,
    make_gpt2,
    make_llama,
    manual_mean_gradient,
    snapshot,
)


@pytest.mark.parametrize(("make", "targets"), [(make_llama, LLAMA_TARGETS), (make_gpt2, ["c_attn", "c_proj", "c_fc"])])
def test_peft_layers_carry_delta_w0_equal_to_minus_gamma_scaled_projected_gradient(make, targets):
    """s_i·B0·A0 = −γ·√(n/r_i)·G·P_A for every adapted layer, read back from PEFT's own layers."""
    config = GoraConfig(target_modules=targets, num_batches=3, min_rank=1, max_rank=16, gamma=0.05)
    batches = lm_batches(3)
    G = manual_mean_gradient(make(), batches, find_targets(make(), config))
    peft_model = gora.get_gora_model(make(), config, batches, show_progress=False)
    ranks = peft_model.peft_config["default"].rank_pattern
    assert set(ranks) == set(G)
    for name, r in ranks.items():
        layer = peft_model.base_model.model.get_submodule(name)
        A = layer.lora_A["default"].weight.double()
        B = layer.lora_B["default"].weight.double()
        assert layer.scaling["default"] == pytest.approx(layer_scaling(config, r))
        P = A.T @ torch.linalg.inv(A @ A.T) @ A
        n = A.shape[1]
        expected = -0.05 * math.sqrt(n / r) * G[name] @ P
        delta = layer.scaling["default"] * B @ A
        assert torch.allclose(delta, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item()), name
        if layer.fan_in_fan_out:  # PEFT's own delta weight agrees (Conv1D layout)
            assert_close(layer.get_delta_weight("default").T, delta, rtol=1e-5, msg=name)
        else:
            assert_close(layer.get_delta_weight("default"), delta, rtol=1e-5, msg=name)


def test_initialization_takes_a_descent_step_on_a_toy_regression():
    """The first forward of the adapted model has a lower loss than the base model: the sign is −G, not +G."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    x = torch.randn(64, 16)
    y = torch.randn(64, 8)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]

    def forward_fn(m, batch):
        return nn.functional.mse_loss(m(batch[0]), batch[1])

    with torch.no_grad():
        before = nn.functional.mse_loss(model(x), y).item()
    config = GoraConfig(target_modules=["0", "2"], num_batches=4, min_rank=2, max_rank=8, r=4, gamma=0.5)
    peft_model = gora.get_gora_model(model, config, batches, forward_fn=forward_fn, show_progress=False)
    with torch.no_grad():
        after = nn.functional.mse_loss(peft_model(x), y).item()
        flipped = nn.functional.mse_loss(_with_flipped_B(peft_model)(x), y).item()
    assert after < before < flipped


def _with_flipped_B(peft_model):
    for module in peft_model.modules():
        if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
            module.lora_B["default"].weight.neg_()
    return peft_model


def test_same_seed_same_adapter_other_seed_other_A():
    config = GoraConfig(target_modules=["q_proj", "v_proj"], num_batches=2, seed=7)
    a = gora.get_gora_model(make_llama(), config, lm_batches(2), show_progress=False)
    b = gora.get_gora_model(make_llama(), config, lm_batches(2), show_progress=False)
    c = gora.get_gora_model(make_llama(), GoraConfig(**{**config.to_dict(), "seed": 8}), lm_batches(2))
    sa, sb, sc = (_lora_state(m) for m in (a, b, c))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if "lora_A" in k)


def _lora_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


RELOAD = textwrap.dedent(
    """
    import builtins, json, sys, torch
    real_import = builtins.__import__
    def guarded(name, *args, **kwargs):
        if name == "gora" or name.startswith("gora."):
            raise ImportError("gora must not be needed to load the adapter")
        return real_import(name, *args, **kwargs)
    builtins.__import__ = guarded
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    base_dir, adapter_dir, kind = sys.argv[1:4]
    cls = AutoModelForSequenceClassification if kind == "cls" else AutoModelForCausalLM
    model = PeftModel.from_pretrained(cls.from_pretrained(base_dir), adapter_dir).eval()
    ids = torch.tensor(json.loads(sys.argv[4]))
    with torch.no_grad():
        print(json.dumps(model(input_ids=ids).logits.tolist()))
    """
)


@pytest.mark.parametrize(
    ("make", "targets", "kind", "lora_kwargs"),
    [
        (make_llama, LLAMA_TARGETS, "lm", {"task_type": "CAUSAL_LM"}),
        (make_gpt2, ["c_attn", "c_fc"], "lm", {}),
        (make_bert, ["query", "value"], "cls", {"task_type": "SEQ_CLS"}),
    ],
)
def test_saved_adapter_reloads_in_plain_peft_without_gora_with_identical_logits(
    tmp_path, make, targets, kind, lora_kwargs
):
    base = make()
    base.save_pretrained(tmp_path / "base")
    batches = cls_batches(3) if kind == "cls" else lm_batches(3)
    config = GoraConfig(
        target_modules=targets, num_batches=3, min_rank=1, max_rank=16, gamma=0.1, lora_kwargs=lora_kwargs
    )
    peft_model = gora.get_gora_model(base, config, batches, show_progress=False).eval()
    if kind == "cls":  # the new head is trained as PEFT would (modules_to_save): perturb it so reload must carry it
        with torch.no_grad():
            peft_model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["use_rslora"] is True
    assert saved["r"] == max(saved["rank_pattern"].values())
    assert not any("gora" in key for key in saved)
    record = json.loads((tmp_path / "adapter" / "gora_record.json").read_text())
    assert record["ranks"] == {k: v for k, v in saved["rank_pattern"].items()}
    ids = [[1, 5, 9, 3, 7, 2], [4, 4, 8, 1, 0, 6]]
    with torch.no_grad():
        expected = peft_model(input_ids=torch.tensor(ids)).logits
    out = subprocess.run(
        [sys.executable, "-c", RELOAD, str(tmp_path / "base"), str(tmp_path / "adapter"), kind, json.dumps(ids)],
        capture_output=True,
        text=True,
        check=True,
    )
    reloaded = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    # another process, same weights and kernels: equal up to float rounding (BLAS may pick other kernels for other
    # memory alignments), to 1e-6 of the largest logit
    assert_close(reloaded, expected.float(), rtol=1e-6)


def test_merge_and_unload_gives_the_same_outputs_and_leaves_no_adapter():
    config = GoraConfig(target_modules=LLAMA_TARGETS, num_batches=2, gamma=0.2)
    peft_model = gora.get_gora_model(make_llama(), config, lm_batches(2), show_progress=False).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()
        got = merged(input_ids=ids).logits
    assert not any("lora" in k for k in merged.state_dict())
    assert_close(got, expected, rtol=1e-5)
    assert not torch.equal(
        merged.model.layers[0].self_attn.q_proj.weight, make_llama().model.layers[0].self_attn.q_proj.weight
    )


def test_record_refuses_another_base_with_the_same_shapes(tmp_path):
    """The saved record identifies the base the adapter was made on: the same checkpoint passes in any dtype (values
    compared rounded to bfloat16), before or after PEFT wraps it; other weights of the same shapes are refused, and a
    record without the base (an older gora) says it cannot tell."""
    config = GoraConfig(target_modules=LLAMA_TARGETS, num_batches=2)
    peft_model = gora.get_gora_model(make_llama(), config, lm_batches(2), show_progress=False)
    peft_model.save_pretrained(tmp_path)
    record = gora.GoraRecord.load(tmp_path)
    assert len(record.base_model["modules"]) == 4 and record.base_model["quantized"] is False
    assert record.check_base(make_llama()) and record.check_base(make_llama().to(torch.bfloat16))
    assert record.check_base(peft_model)  # a PeftModel: its base layers are read
    with pytest.raises(ValueError, match="not the base model the adapter was made on"):
        record.check_base(make_llama(seed=1))
    nudged = make_llama()
    with torch.no_grad():  # one recorded value moved by more than bfloat16 rounding
        nudged.get_submodule(record.base_model["modules"][-1]).weight[0, 0] += 0.05
    with pytest.raises(ValueError, match="differ"):
        record.check_base(nudged)
    record.base_model = {}
    assert record.check_base(make_llama(seed=1)) is False


def test_base_weights_are_never_modified():
    model = make_llama()
    reference = {k: v.clone() for k, v in make_llama().state_dict().items()}
    peft_model = gora.get_gora_model(model, GoraConfig(target_modules=LLAMA_TARGETS, num_batches=2), lm_batches(2))
    base_state = peft_model.get_base_model().state_dict()
    for key, value in reference.items():
        peft_key = key.replace(".weight", ".base_layer.weight") if any(f".{t}." in key for t in LLAMA_TARGETS) else key
        assert torch.equal(base_state[peft_key], value), key


def test_sequence_classification_head_trains_as_in_peft():
    config = GoraConfig(target_modules=["query", "value"], num_batches=2, lora_kwargs={"task_type": "SEQ_CLS"})
    peft_model = gora.get_gora_model(make_bert(), config, cls_batches(2), show_progress=False)
    trainable = {k for k, p in peft_model.named_parameters() if p.requires_grad}
    assert any("classifier" in k and "modules_to_save" in k for k in trainable)
    assert all("lora_" in k or "classifier" in k for k in trainable)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    batch = cls_batches(1)[0]
    for _ in range(5):
        loss = peft_model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0]


def test_unused_target_is_reported_and_left_without_adapter(caplog):
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(8, 8)
            self.unused = nn.Linear(8, 8)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    model = TwoBranches()
    batches = [torch.randn(4, 8) for _ in range(2)]
    config = GoraConfig(target_modules=["used", "unused"], num_batches=2, min_rank=1, max_rank=4, r=2)
    with caplog.at_level("WARNING"):
        peft_model = gora.get_gora_model(model, config, batches, forward_fn=lambda m, x: m(x).square().mean())
    assert "unused" in caplog.text
    assert hasattr(peft_model.base_model.model.used, "lora_A")
    assert not hasattr(peft_model.base_model.model.unused, "lora_A")
    assert peft_model.gora_records["default"].no_grad == ["unused"]


def test_min_rank_zero_drops_layers_from_the_adapter():
    config = GoraConfig(target_modules=LLAMA_TARGETS, num_batches=2, min_rank=0, max_rank=32, r=1)
    peft_model = gora.get_gora_model(make_llama(), config, lm_batches(2), show_progress=False)
    record = peft_model.gora_records["default"]
    assert record.dropped, "with r=1 and min_rank=0 some layers should be dropped"
    for name in record.dropped:
        assert not hasattr(peft_model.base_model.model.get_submodule(name), "lora_A")
    assert set(peft_model.peft_config["default"].rank_pattern) == {k for k, v in record.ranks.items() if v > 0}


def test_record_reports_budget_and_parameters():
    config = GoraConfig(target_modules=LLAMA_TARGETS, num_batches=2)
    peft_model = gora.get_gora_model(make_llama(), config, lm_batches(2), show_progress=False)
    record = peft_model.gora_records["default"]
    lora_count = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert record.trainable_params == lora_count
    assert record.lora_params == 8 * sum(m + n for m, n in record.shapes.values())
    assert set(record.timings_s) >= {"estimate_s", "allocate_s", "init_s"}
    assert record.versions["gora"] == gora.__version__


class InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _int8_layer(model):
    layer = model.model.layers[0].self_attn.q_proj
    layer.weight = nn.Parameter(torch.zeros_like(layer.weight, dtype=torch.int8), requires_grad=False)
    return model


def _inf_grad_loss(model, batch):
    out = model(**batch)
    w = model.model.layers[0].self_attn.q_proj.weight
    return out.loss + 0.0 * InfGrad.apply(w).sum()


BAD_INPUTS = {
    "no match": (lambda m: m, {"target_modules": ["nonexistent_proj"]}, lambda: lm_batches(2), None, "matches no"),
    "empty dataloader": (lambda m: m, {}, lambda: [], None, "no batch"),
    "no loss": (
        lambda m: m,
        {},
        lambda: [{"input_ids": b["input_ids"]} for b in lm_batches(2)],
        None,
        "no scalar loss",
    ),
    "not a dict": (lambda m: m, {}, lambda: [torch.ones(2, 3, dtype=torch.long)], None, "forward_fn"),
    "non-finite loss": (
        lambda m: m,
        {},
        lambda: lm_batches(2),
        lambda m, b: m(**b).loss * float("inf"),
        "non-finite loss",
    ),
    "non-finite gradient": (
        lambda m: m,
        {},
        lambda: lm_batches(2),
        lambda m, b: _inf_grad_loss(m, b),
        "non-finite gradient",
    ),
    "quantized layer": (_int8_layer, {}, lambda: lm_batches(2), None, "quantized"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_clearly_and_leaves_the_model_untouched(case):
    prepare, overrides, batches, forward_fn, match = BAD_INPUTS[case]
    model = prepare(make_llama())
    before = snapshot(model)
    config = GoraConfig(**{"target_modules": ["q_proj", "v_proj"], "num_batches": 2, **overrides})
    with pytest.raises(ValueError, match=match):
        gora.get_gora_model(model, config, batches(), forward_fn=forward_fn, show_progress=False)
    assert_same(before, snapshot(model))


def test_bfloat16_model_gets_float32_statistics_and_adapters():
    model = make_llama().to(torch.bfloat16)
    config = GoraConfig(target_modules=["q_proj", "v_proj"], num_batches=2, gamma=0.05)
    stats = gora.estimate_gradients(model, config, lm_batches(2), show_progress=False)
    assert all(g.dtype == torch.float32 for g in stats.gradients.values())
    peft_model = gora.get_gora_model(model, config, lm_batches(2), show_progress=False)
    layer = peft_model.base_model.model.model.layers[0].self_attn.v_proj
    assert layer.lora_B["default"].weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype keeps them fp32
    assert layer.lora_B["default"].weight.abs().sum() > 0
    assert layer.base_layer.weight.dtype == torch.bfloat16


def test_allocation_alone_takes_no_held_out_batches():
    """Protects `estimate_and_allocate(..., held_out=False)` (what `gora allocate` runs): with gamma="auto" and a
    dataloader of exactly num_batches batches it allocates as the full call would, instead of failing for want of
    the held-out batches that only the adapter's γ search needs."""
    from gora.model import estimate_and_allocate

    config = GoraConfig(target_modules=LLAMA_TARGETS, num_batches=2, gamma="auto", gamma_batches=2)
    model = make_llama()
    with pytest.raises(ValueError, match="gamma"):
        estimate_and_allocate(model, config, lm_batches(2))
    alone = estimate_and_allocate(model, config, lm_batches(2), held_out=False)
    full = estimate_and_allocate(model, config, lm_batches(4))
    assert alone.eval_batches is None and len(full.eval_batches) == 2
    assert alone.allocation.ranks == full.allocation.ranks
    assert set(alone.timings) == {"estimate_s", "allocate_s"}


def test_plain_lora_baseline_has_gora_targets_and_rank_r():
    """Protects the baseline the app trains against (`gora.baseline.get_lora_model`): plain PEFT LoRA on exactly
    GoRA's targets, rank r everywhere, rsLoRA scaling α/√r only when asked, B = 0 (PEFT's init: no change at step 0)."""
    from gora.baseline import get_lora_model

    config = GoraConfig(target_modules=LLAMA_TARGETS, r=4, lora_alpha=8)
    for rslora in (False, True):
        model = make_llama()
        names = [t.name for t in find_targets(model, config)]
        peft_model = get_lora_model(model, config, use_rslora=rslora)
        assert sorted(peft_model.lora_shapes) == sorted(names)
        for name in names:
            layer = peft_model.base_model.model.get_submodule(name)
            assert layer.lora_A["default"].weight.shape[0] == 4
            assert not layer.lora_B["default"].weight.any()
            assert layer.scaling["default"] == (8 / math.sqrt(4) if rslora else 8 / 4)
