"""GoRA on fused expert parameters (`target_parameters`, docs/moe.md): config-built Mixtral and Qwen3-MoE models
(experts as 3-D parameters) and a dense Llama with a 2-D parameter target.

Properties: G of a stack is its own mean gradient per expert; the per-expert first step ΔW0_e = −γ·√(n/r)·G_e·P_{A_e};
the allocation of a stack of E experts equals that of E layers with its mean importance, at LoRA's budget; experts
no token reached are reported and left out of the importance; the adapter is stock PEFT (reload, merge); bad input
is refused with the model untouched.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

import gora
from gora.experts import from_peft_layout, lora_layer, to_peft_layout
from gora.initialize import draw_lora_A, layer_scaling
from gora.targets import find_targets
from helpers import (
    assert_close,
    assert_same,
    assert_stock_peft_round_trip,
    lm_batches,
    make_gpt_oss,
    make_llama,
    make_mixtral,
    make_qwen3_moe,
    needs_fused_experts,
    snapshot,
)

MAKERS = {"mixtral": make_mixtral, "qwen3_moe": make_qwen3_moe, "gpt_oss": make_gpt_oss}  # gpt-oss: transposed


def config(**kwargs) -> gora.GoraConfig:
    base = dict(
        target_modules=["q_proj", "v_proj"],
        target_parameters="all-experts",
        r=4,
        min_rank=1,
        max_rank=8,
        num_batches=3,
        gamma=0.1,
    )
    return gora.GoraConfig(**{**base, **kwargs})


def _stacks(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.dim() == 3}


def manual_stack_gradients(model, batches) -> dict[str, torch.Tensor]:
    """G of every 3-D parameter by plain autograd, one batch at a time (float64): the definition, independently."""
    model.train()
    stacks = _stacks(model)
    sums = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in stacks.items()}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for n, p in stacks.items():
            sums[n] += p.grad.double()
    model.zero_grad(set_to_none=True)
    model.eval()
    return {n: s / len(batches) for n, s in sums.items()}


@needs_fused_experts
@pytest.mark.parametrize("kind", list(MAKERS))
def test_targets_are_the_expert_stacks_in_pefts_orientation(kind):
    """Property: "all-experts" and PEFT-style suffixes select the same 3-D parameters; each is E experts of
    [m, n] = [out, in] as PEFT's ParamWrapper reads them: (E, out, in) stored, or (E, in, out) where the module sets
    is_transposed (gpt-oss); down_proj maps the intermediate size back to the hidden size."""
    model = MAKERS[kind]()
    targets = find_targets(model, config(target_modules=[]))
    by_suffix = find_targets(model, config(target_modules=[], target_parameters=["gate_up_proj", "down_proj"]))
    assert targets == by_suffix and len(targets) == 4
    hidden = model.config.hidden_size
    transposed = kind == "gpt_oss"
    for t in targets:
        stored = tuple(model.get_parameter(t.name).shape)
        assert t.parameter and t.experts == 4 and t.transposed == transposed
        assert stored == ((4, t.n, t.m) if transposed else (4, t.m, t.n))
        if t.name.endswith("down_proj"):
            assert t.m == hidden and t.n < hidden


@needs_fused_experts
@pytest.mark.parametrize("kind", list(MAKERS))
def test_stack_gradient_is_its_own_mean_gradient_per_expert(kind):
    """Property: G of a 3-D target is the float32 mean over the N batches of that parameter's own gradient, every
    expert block (compared with plain autograd in float64)."""
    model = MAKERS[kind]()
    batches = lm_batches(3)
    want = manual_stack_gradients(model, batches)
    stats = gora.estimate_gradients(model, config(target_modules=[]), batches, show_progress=False)
    assert set(stats.gradients) == set(want)
    transposed = {t.name: t.transposed for t in stats.targets}
    for name, G in stats.gradients.items():
        expected = want[name].transpose(-2, -1) if transposed[name] else want[name]  # G is [E, out, in]
        assert G.dtype == torch.float32 and G.shape == expected.shape
        assert_close(G, expected.float(), rtol=1e-4, msg=name)


@needs_fused_experts
@pytest.mark.parametrize("kind", list(MAKERS))
def test_first_step_is_one_descent_step_per_expert(kind):
    """Property (the method, per expert): in the PeftModel's own ParamWrapper, s·B0_e·A0_e = −γ·√(n/r)·G_e·P_{A_e}
    for every expert e, with A0_e drawn as for a layer named f"{name}.{e}"; PEFT's delta weight agrees."""
    model = MAKERS[kind]()
    batches = lm_batches(3)
    cfg = config()
    stats = gora.estimate_gradients(model, cfg, batches, show_progress=False)
    peft_model = gora.get_gora_model(model, cfg, batches, show_progress=False, stats=stats)
    record = peft_model.gora_records["default"]
    base = peft_model.get_base_model()
    checked = 0
    for name, G in stats.gradients.items():
        if G.dim() != 3:
            continue
        layer, r = lora_layer(base, name), record.ranks[name]
        s = layer.scaling["default"]
        assert s == pytest.approx(layer_scaling(cfg, r))
        A, B = from_peft_layout(layer.lora_A["default"].weight, layer.lora_B["default"].weight, G.shape[0])
        delta = layer.get_delta_weight("default")  # PEFT's own ΔW, in the stored layout
        if stats.targets[[t.name for t in stats.targets].index(name)].transposed:  # gpt-oss: (E, in, out)
            delta = delta.transpose(-2, -1)
        for e in range(G.shape[0]):
            n = G.shape[2]
            assert torch.equal(A[e], draw_lora_A(f"{name}.{e}", r, n, cfg.seed))
            P = A[e].T @ torch.linalg.solve(A[e] @ A[e].T, A[e])  # projector onto the row space of A0_e
            want = -cfg.gamma * math.sqrt(n / r) * G[e] @ P
            assert_close(s * B[e] @ A[e], want, rtol=1e-4, msg=f"{name}[{e}]")
            assert_close(delta[e], want, rtol=1e-4, msg=f"{name}[{e}] (PEFT)")
            checked += 1
    assert checked == 4 * 4


def test_peft_layout_round_trip():
    """Property: to_peft_layout / from_peft_layout are inverse, and the packed pair gives PEFT's per-expert product
    (B.reshape(m, r, E)[:, :, e] @ A.reshape(E, r, n)[e])."""
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 2, 5, generator=g), torch.randn(3, 4, 2, generator=g)
    lora_A, lora_B = to_peft_layout(A, B)
    assert lora_A.shape == (6, 5) and lora_B.shape == (4, 6)
    A2, B2 = from_peft_layout(lora_A, lora_B, 3)
    assert torch.equal(A2, A) and torch.equal(B2, B)
    peft = torch.einsum("ore,eri->eoi", lora_B.reshape(4, 2, 3), lora_A.reshape(3, 2, 5))
    assert_close(peft, B @ A)


def test_a_stack_is_allocated_as_E_layers_of_its_mean_importance():
    """Property (allocation rule): a stack of E experts with importance E·Ī gets the rank that each of E separate
    layers of the same shape and importance Ī would get, and costs E·(m+n) per unit of rank; the budget and LoRA's
    parameter count over the same targets count E matrices."""
    cfg = gora.GoraConfig(target_modules=["x"], r=8, min_rank=1, max_rank=64)
    E, mean, other = 6, 0.3, 1.1
    stacked = gora.allocate_ranks({"stack": E * mean, "dense": other}, {"stack": (E, 48, 32), "dense": (32, 32)}, cfg)
    parts = {f"e{i}": mean for i in range(E)}
    split = gora.allocate_ranks({**parts, "dense": other}, {**dict.fromkeys(parts, (48, 32)), "dense": (32, 32)}, cfg)
    assert stacked.ranks["stack"] == split.ranks["e0"] and stacked.ranks["dense"] == split.ranks["dense"]
    assert stacked.budget == pytest.approx(split.budget)
    assert stacked.lora_params == split.lora_params == 8 * (E * 80 + 64)
    assert stacked.trainable_params == split.trainable_params


@needs_fused_experts
@pytest.mark.parametrize("kind", list(MAKERS))
def test_budget_and_trainable_parameters_of_the_peft_model(kind):
    """Property: the PeftModel's trainable parameters are the allocation's Σ r_i·E_i·(m_i + n_i), and LoRA's
    budget over the same targets is r_ref·Σ E_i·(m_i + n_i) (stacks count all their experts)."""
    model = MAKERS[kind]()
    cfg = config()
    peft_model = gora.get_gora_model(model, cfg, lm_batches(3), show_progress=False)
    record = peft_model.gora_records["default"]
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == record.trainable_params
    lora = sum(cfg.r * (s[0] if len(s) == 3 else 1) * (s[-2] + s[-1]) for name, s in record.shapes.items())
    assert record.lora_params == lora
    assert {len(s) for s in record.shapes.values()} == {2, 3}


class _NeverExpert:
    """A forward hook on a Mixtral router that never routes to `expert` (its slot goes to another expert)."""

    def __init__(self, expert: int, experts: int) -> None:
        self.expert, self.experts = expert, experts

    def __call__(self, module, args, output):
        logits, scores, indices = output
        indices = indices.clone()
        for row in indices:
            for k in range(row.numel()):
                if row[k] == self.expert:
                    row[k] = next(e for e in range(self.experts) if e != self.expert and e not in row.tolist())
        return logits, scores, indices


@needs_fused_experts
def test_unreached_experts_are_reported_and_left_out_of_the_importance(caplog):
    """Property: an expert no token reached has G_e = 0; it is reported (warning and record), its B0_e is 0, and
    its stack's importance is E times the mean over the experts reached (not dragged down by the zero)."""
    model = make_mixtral()
    model.model.layers[0].mlp.gate.register_forward_hook(_NeverExpert(2, 4))
    cfg = config()
    batches = lm_batches(3)
    with caplog.at_level(logging.WARNING, logger="gora"):
        stats = gora.estimate_gradients(model, cfg, batches, show_progress=False)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert stats.info["unreached_experts"] == {name: [2], "model.layers.0.mlp.experts.down_proj": [2]}
    assert "no token reached these experts" in caplog.text
    G = stats.gradients[name]
    W = model.model.layers[0].mlp.experts.gate_up_proj.detach()
    importances = gora.compute_importances(model, stats, cfg.importance)
    per_expert = [float((W[e] * G[e]).abs().mean()) for e in (0, 1, 3)]
    assert importances[name] == pytest.approx(4 * sum(per_expert) / 3, rel=1e-5)
    peft_model = gora.get_gora_model(model, cfg, batches, show_progress=False, stats=stats)
    layer = lora_layer(peft_model.get_base_model(), name)
    _, B = from_peft_layout(layer.lora_A["default"].weight, layer.lora_B["default"].weight, 4)
    assert not B[2].any() and all(B[e].any() for e in (0, 1, 3))
    assert peft_model.gora_records["default"].extra["estimation"]["unreached_experts"][name] == [2]


@needs_fused_experts
@pytest.mark.parametrize("kind", list(MAKERS))
def test_saved_adapter_reloads_in_plain_peft_and_merges(kind, tmp_path):
    """Property: the adapter is stock PEFT: `PeftModel.from_pretrained` on a fresh base gives identical logits
    (the ranks come back from rank_pattern), and merge_and_unload computes the same function."""

    batch = lm_batches(1, seed=5)[0]
    peft_model = gora.get_gora_model(MAKERS[kind](), config(), lm_batches(3), show_progress=False).eval()
    assert_stock_peft_round_trip(peft_model, MAKERS[kind], batch, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "gora_record.json").is_file()
    record = peft_model.gora_records["default"]  # the base it was made on, read through the expert stacks too
    assert any("experts" in m for m in record.base_model["modules"])
    assert record.check_base(MAKERS[kind]()) is True
    with pytest.raises(ValueError, match="not the base model"):
        record.check_base(MAKERS[kind](seed=1))


@needs_fused_experts
def test_a_training_step_moves_the_expert_adapters_down_the_loss():
    """Property: the expert adapters are trainable like any LoRA: their lora_A / lora_B get gradients, and one
    small SGD step on the adapter lowers the loss of that batch."""
    peft_model = gora.get_gora_model(make_mixtral(), config(), lm_batches(3), show_progress=False)
    peft_model.train()
    batch = lm_batches(1, seed=7)[0]
    params = [p for p in peft_model.parameters() if p.requires_grad]
    loss = peft_model(**batch).loss
    loss.backward()
    expert_grads = [
        p.grad for n, p in peft_model.named_parameters() if "experts" in n and "lora_" in n and p.grad is not None
    ]
    assert len(expert_grads) == 2 * 4 and all(g.any() for g in expert_grads)
    with torch.no_grad():
        for p in params:
            p -= 1e-3 * p.grad
        assert peft_model(**batch).loss < loss


def test_dense_model_with_a_2d_parameter_target(tmp_path):
    """Property: a 2-D parameter target (PEFT's ParamWrapper on an nn.Linear weight) gets the layer formula:
    its G equals the module's, s·B0·A0 = −γ·√(n/r)·G·P_A with A0 drawn for the parameter's name, and the adapter
    reloads in plain PEFT to identical logits."""
    from peft import PeftModel

    batches = lm_batches(3)
    cfg = config(target_modules=["q_proj"], target_parameters=["mlp.down_proj.weight"])
    stats = gora.estimate_gradients(make_llama(), cfg, batches, show_progress=False)
    dense = gora.estimate_gradients(
        make_llama(),
        config(target_modules=["q_proj", "down_proj"], target_parameters=None),
        batches,
        show_progress=False,
    )
    name = "model.layers.0.mlp.down_proj.weight"
    assert_close(stats.gradients[name], dense.gradients["model.layers.0.mlp.down_proj"], rtol=1e-5)
    peft_model = gora.get_gora_model(make_llama(), cfg, batches, show_progress=False, stats=stats).eval()
    layer, r = lora_layer(peft_model.get_base_model(), name), peft_model.gora_records["default"].ranks[name]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    G = stats.gradients[name]
    assert torch.equal(A, draw_lora_A(name, r, G.shape[1], cfg.seed))
    P = A.T @ torch.linalg.solve(A @ A.T, A)
    assert_close(layer.scaling["default"] * B @ A, -cfg.gamma * math.sqrt(G.shape[1] / r) * G @ P, rtol=1e-4)
    batch = lm_batches(1, seed=3)[0]
    with torch.no_grad():
        want = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_llama(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, want)


@needs_fused_experts
def test_saved_statistics_round_trip(tmp_path):
    """Property: statistics of expert stacks save and load (fingerprinted on the stacks) and rebuild the same
    adapter; another model's weights are refused."""
    model, cfg, batches = make_mixtral(), config(), lm_batches(3)
    stats = gora.estimate_gradients(model, cfg, batches, show_progress=False)
    gora.save_gradient_stats(stats, tmp_path / "g.safetensors", model)
    loaded = gora.load_gradient_stats(tmp_path / "g.safetensors", model)
    assert loaded.targets == stats.targets and loaded.info == stats.info
    for name, G in stats.gradients.items():
        assert torch.equal(loaded.gradients[name], G)
    with pytest.raises(ValueError, match="different model"):
        gora.load_gradient_stats(tmp_path / "g.safetensors", make_mixtral(seed=1))


@needs_fused_experts
def test_gamma_auto_on_experts():
    """Property: gamma="auto" rescales the expert adapters too: every lora_B (packed) is γ*·B0(1)."""
    batches = lm_batches(6)
    cfg = config(gamma="auto", gamma_batches=2)
    peft_model = gora.get_gora_model(make_mixtral(), cfg, batches, show_progress=False)
    record = peft_model.gora_records["default"]
    chosen = record.gamma
    assert isinstance(chosen, float) and "gamma_search" in record.extra
    unit = gora.get_gora_model(make_mixtral(), config(gamma=1.0), batches, show_progress=False)
    got = {n: p for n, p in peft_model.named_parameters() if "experts" in n and "lora_B" in n}
    want = dict(unit.named_parameters())
    assert got
    for n, p in got.items():
        assert_close(p, chosen * want[n], rtol=1e-4, msg=n)


REFUSALS = {
    "name matching nothing": (dict(target_parameters=["experts.no_such_proj"]), "matches no parameter"),
    "module name matching nothing": (dict(target_modules=["no_such_proj"]), "matches no nn.Linear"),
    "a 1-D parameter": (dict(target_parameters=["input_layernorm.weight"]), "2-D parameters and 3-D"),
    "a parameter of a module target": (
        dict(target_modules=["q_proj"], target_parameters=["q_proj.weight"]),
        "adapt each weight once",
    ),
}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=needs_fused_experts) if c == "module name matching nothing" else c for c in REFUSALS],
)  # that case's config also asks for all-experts, which 4.x's Mixtral lacks
def test_bad_targets_are_refused_with_the_model_untouched(case):
    """Property: a parameter name that matches nothing, a parameter that is neither 2-D nor 3-D, or a weight
    targeted both ways is a ValueError naming it, and the model is exactly as it was."""
    kwargs, message = REFUSALS[case]
    model = make_mixtral()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        gora.get_gora_model(model, config(**kwargs), lm_batches(3), show_progress=False)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lora_dropout=0.1), "cannot apply dropout"),
        (dict(use_dora=True), "DoRA is a different method"),
        (dict(lora_kwargs={"use_dora": True}), "DoRA is a different method"),
        (dict(gradient_store="sketch"), "gradient_store='sketch' does not handle target_parameters"),
        (dict(gradient_route="hooks"), "gradient_route='hooks'"),
        (dict(target_parameters="experts"), "'all-experts'"),
        (dict(target_parameters=[]), "non-empty list"),
    ],
)
def test_config_refuses_what_parameter_adapters_cannot_do(kwargs, message):
    """Property: what PEFT's ParamWrapper or GoRA's expert path cannot do is refused when the config is made."""
    with pytest.raises(ValueError, match=message):
        config(**kwargs)


@needs_fused_experts
def test_export_names_the_engines_that_cannot_serve_expert_adapters(tmp_path):
    """Property: `export_adapter` refuses a target_parameters adapter, naming vLLM and llama.cpp, writing nothing."""
    peft_model = gora.get_gora_model(make_mixtral(), config(), lm_batches(3), show_progress=False)
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"vLLM or llama\.cpp"):
        gora.export_adapter(tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_qgora_refuses_expert_stacks_with_the_model_untouched():
    """Property: QGoRA (4-bit base) does not handle target_parameters and says so before changing anything."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    model = make_mixtral()
    before = snapshot(model)
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="QGoRA does not handle target_parameters"):
        gora.get_qgora_model(model, config(), lm_batches(3), quantization_config=nf4, show_progress=False)
    assert_same(before, snapshot(model))


@needs_fused_experts
def test_prepare_trainer_trains_the_expert_adapters(tmp_path):
    """Property: `prepare_trainer` on a Mixtral builds the adapter from the trainer's own batches; training moves
    the expert adapters and leaves the base's expert stacks as they were."""
    from transformers import Trainer, TrainingArguments

    model = make_mixtral()
    rows = [{"input_ids": b["input_ids"][i], "labels": b["labels"][i]} for b in lm_batches(8) for i in range(2)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    stacks = {n: p.detach().clone() for n, p in _stacks(model).items()}
    peft_model = gora.prepare_trainer(trainer, config(num_batches=2), show_progress=False)
    start = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "experts" in n and "lora_" in n}
    assert len(start) == 2 * 4
    trainer.train()
    moved = dict(peft_model.named_parameters())
    assert all(not torch.equal(moved[n], p) for n, p in start.items())
    for name, value in stacks.items():
        assert torch.equal(lora_layer(peft_model.get_base_model(), name).get_param(), value), name


@needs_fused_experts
def test_adaptive_stopping_over_expert_stacks():
    """Property: adaptive stopping reads the stacks' running importances; stopping after k batches gives exactly
    the statistics of a plain estimation over those k batches."""
    batches = lm_batches(5)
    cfg = config(num_batches=5, adaptive_batches=True, adaptive_threshold=1e6, adaptive_min_batches=2)
    stats = gora.estimate_gradients(make_mixtral(), cfg, batches, show_progress=False)
    assert stats.info["adaptive"]["stopped_early"] and stats.num_batches == 2
    plain = gora.estimate_gradients(make_mixtral(), config(num_batches=2), batches, show_progress=False)
    for name, G in plain.gradients.items():
        assert_close(stats.gradients[name], G, rtol=1e-6, msg=name)
