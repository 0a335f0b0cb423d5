"""Stage 1 (estimate.py): the exact mean gradient over exactly the first N batches, the model and the caller's RNG left as
they were, non-finite gradients refused, adaptive stopping."""

from __future__ import annotations

import pytest
import torch

import gora
from gora import GoraConfig
from helpers import (
    LLAMA_TARGETS,
    assert_close,
    assert_same,
    lm_batches,
    make_gpt2,
    make_llama,
    manual_mean_gradient,
    snapshot,
)


@pytest.mark.parametrize(("make", "targets"), [(make_llama, LLAMA_TARGETS), (make_gpt2, ["c_attn", "c_proj", "c_fc"])])
def test_estimated_gradient_is_the_exact_mean_over_all_batches(make, targets):
    model = make()
    batches = lm_batches(n=5)
    config = GoraConfig(target_modules=targets, num_batches=5)
    stats = gora.estimate_gradients(model, config, batches, show_progress=False)
    expected = manual_mean_gradient(make(), batches, stats.targets)
    assert stats.num_batches == 5 and not stats.no_grad
    for name, g in stats.gradients.items():
        assert g.dtype == torch.float32
        assert_close(g, expected[name], rtol=1e-4, msg=name)


def test_only_the_first_num_batches_are_used():
    batches = lm_batches(n=6)
    config = GoraConfig(target_modules=["q_proj"], num_batches=2)
    stats = gora.estimate_gradients(make_llama(), config, iter(batches), show_progress=False)
    expected = manual_mean_gradient(make_llama(), batches[:2], stats.targets)
    assert stats.num_batches == 2
    for name, g in stats.gradients.items():
        assert_close(g, expected[name], rtol=1e-4, msg=name)


def test_estimation_leaves_flags_modes_grads_and_weights_as_they_were():
    model = make_llama()
    model.model.layers[0].train()  # mixed modes must come back mixed
    model.lm_head.weight.requires_grad_(False)
    model.model.layers[1].self_attn.q_proj.weight.grad = torch.full_like(
        model.model.layers[1].self_attn.q_proj.weight, 3.0
    )
    before = snapshot(model)
    gora.estimate_gradients(model, GoraConfig(target_modules=LLAMA_TARGETS, num_batches=3), lm_batches(3))
    assert_same(before, snapshot(model))


def test_user_rng_state_is_untouched_by_estimation():
    model, batches = make_llama(), lm_batches(2)  # built first: make_llama seeds the global generator itself
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    gora.estimate_gradients(model, GoraConfig(target_modules=["q_proj"], num_batches=2), batches)
    assert torch.equal(state, torch.random.get_rng_state())


def _adaptive_config(**kwargs) -> gora.GoraConfig:
    base = dict(target_modules="all-linear", r=4, min_rank=1, max_rank=8, num_batches=8, adaptive_batches=True)
    return gora.GoraConfig(**{**base, **kwargs})


@pytest.mark.parametrize("route", ["weights", "hooks"])
@pytest.mark.parametrize("store", ["full", "sketch"])
def test_stops_at_min_batches_when_importances_converge(llama, store, route):
    """Property: with identical batches the running mean, hence every importance, is constant from the first batch,
    so estimation stops at adaptive_min_batches and reports it (on either gradient route)."""
    batches = lm_batches(1) * 8
    config = _adaptive_config(gradient_store=store, sketch_samples=64, gradient_route=route)
    stats = gora.estimate_gradients(llama, config, batches, show_progress=False)
    assert stats.num_batches == 3
    report = stats.info["adaptive"]
    assert report["stopped_early"] and report["batches"] == 3
    assert all(change <= 1e-5 for change in report["max_relative_change"])


def test_never_exceeds_num_batches(llama):
    """Property: with a threshold no batch can meet, estimation runs exactly num_batches and never more."""
    stats = gora.estimate_gradients(
        llama, _adaptive_config(num_batches=5, adaptive_threshold=1e-12), lm_batches(9), show_progress=False
    )
    assert stats.num_batches == 5
    assert not stats.info["adaptive"]["stopped_early"]
    assert len(stats.info["adaptive"]["max_relative_change"]) == 5 - 3 + 1


def test_batches_used_reach_the_record(llama):
    """Property: the number of batches actually used is what the adapter's record reports."""
    model = gora.get_gora_model(llama, _adaptive_config(), lm_batches(1) * 8, show_progress=False)
    record = model.gora_records["default"]
    assert record.num_batches == 3
    assert record.extra["estimation"]["adaptive"]["stopped_early"]


def test_adaptive_config_validated():
    """Property: impossible adaptive settings fail at construction with the fix in the message."""
    with pytest.raises(ValueError, match="adaptive_min_batches"):
        _adaptive_config(num_batches=2, adaptive_min_batches=3)
    with pytest.raises(ValueError, match="adaptive_threshold"):
        _adaptive_config(adaptive_threshold=0)
    with pytest.raises(ValueError, match="adaptive_min_batches must be >= 2"):
        _adaptive_config(adaptive_min_batches=1)
    assert gora.GoraConfig(num_batches=2).adaptive_min_batches == 3  # off by default: no constraint


# -- the module-hook route (gradient_route="hooks"): G_b = Σ_tokens dyᵀ x, fed into the same stores ----------------

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def _routes(make, targets, store: str, batches, forward_fn=None, **kwargs):
    """(weight route, hook route) statistics and allocations of two fresh copies of the same model."""
    out = []
    for route in ("weights", "hooks"):
        model = make()
        config = GoraConfig(
            target_modules=targets,
            num_batches=len(batches),
            gradient_store=store,
            gradient_route=route,
            r=4,
            min_rank=1,
            max_rank=8,
            sketch_samples=64,
            **kwargs,
        )
        stats = gora.estimate_gradients(model, config, batches, forward_fn=forward_fn, show_progress=False)
        allocation = gora.allocate_ranks(
            gora.compute_importances(model, stats, config.importance), stats.shapes, config
        )
        out.append((stats, allocation))
    return out


def _assert_routes_agree(weights, hooks, rtol=1e-5):
    (w_stats, _), (h_stats, _) = weights, hooks
    assert h_stats.info["gradient_routes"] == {"weights": 0, "hooks": len(h_stats.targets)}
    assert w_stats.info["gradient_routes"] == {"weights": len(w_stats.targets), "hooks": 0}
    assert h_stats.gradients.keys() == w_stats.gradients.keys() and h_stats.sketches.keys() == w_stats.sketches.keys()
    for name, G in w_stats.gradients.items():
        assert h_stats.gradients[name].dtype == torch.float32
        assert_close(h_stats.gradients[name], G, rtol=rtol, msg=name)
    for name, Y in w_stats.sketches.items():
        assert_close(h_stats.sketches[name], Y, rtol=rtol, msg=name)
    for name, value in w_stats.importances.items():  # sampled importance: same samples, G at them to float rounding
        assert value == pytest.approx(h_stats.importances[name], rel=100 * rtol)


@pytest.mark.parametrize(("make", "targets"), [(make_llama, LLAMA_TARGETS), (make_gpt2, GPT2_TARGETS)])
@pytest.mark.parametrize("store", ["full", "sketch"])
def test_hook_route_equals_weight_route(make, targets, store):
    """Property: Σ_tokens dyᵀx from module hooks is the weight gradient, for nn.Linear (Llama, bias-free) and Conv1D
    (GPT-2, [in, out] layout, with bias), in both stores: G and Y equal up to float rounding, and with the full
    store identical ranks."""
    weights, hooks = _routes(make, targets, store, lm_batches(3))
    _assert_routes_agree(weights, hooks)
    if store == "full":
        assert hooks[1].ranks == weights[1].ranks


def test_hook_route_ignores_padding():
    """Property: padded tokens (attention_mask 0, labels -100) have dy = 0, so they add nothing to Σ dyᵀx: the hook
    route equals the weight route on padded batches, and G does not change when the padded tokens change."""
    batches = lm_batches(3, length=12)
    padded = []
    for seed, batch in enumerate(batches):
        mask = torch.ones_like(batch["attention_mask"])
        mask[0, 7:] = 0  # the first sequence is 7 tokens long
        ids = batch["input_ids"].clone()
        ids[0, 7:] = torch.randint(0, 96, (5,), generator=torch.Generator().manual_seed(seed))
        padded.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    other = [{**b, "input_ids": b["input_ids"].masked_fill(b["attention_mask"] == 0, 0)} for b in padded]
    weights, hooks = _routes(make_llama, LLAMA_TARGETS, "full", padded)
    _assert_routes_agree(weights, hooks)
    _, (other_stats, _) = _routes(make_llama, LLAMA_TARGETS, "full", other)
    for name, G in hooks[0].gradients.items():
        assert_close(other_stats.gradients[name], G, rtol=1e-5, msg=name)


def test_hook_route_with_several_forwards_per_batch():
    """Property: a batch whose loss sums several forwards (gradient accumulation inside forward_fn) gets every
    forward's dyᵀx, exactly as the weight gradient accumulates them."""

    def two_halves(model, batch):
        halves = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(2)]
        return sum(model(**half).loss for half in halves)

    weights, hooks = _routes(make_llama, LLAMA_TARGETS, "full", lm_batches(2), forward_fn=two_halves)
    _assert_routes_agree(weights, hooks)
    assert hooks[1].ranks == weights[1].ranks


def test_hook_route_accumulates_float32_from_bfloat16():
    """Property: on a bfloat16 model the hook route reads bfloat16 x and dy and accumulates Σ dyᵀx in float32; it
    matches the bfloat16 weight gradients (each rounded to bfloat16 per batch) to bfloat16 precision."""
    weights, hooks = _routes(lambda: make_llama().to(torch.bfloat16), LLAMA_TARGETS, "full", lm_batches(2))
    for name, G in weights[0].gradients.items():
        assert hooks[0].gradients[name].dtype == torch.float32
        assert_close(hooks[0].gradients[name], G, rtol=2e-2, msg=name)


def test_hook_route_leaves_the_model_as_it_was():
    """Property: after the hook route, weights, flags, modes and grads are as they were and no hook is left on any
    module (target weights never required grad on this route)."""
    model = make_llama()
    model.model.layers[0].train()
    model.model.layers[1].mlp.up_proj.weight.grad = torch.full_like(model.model.layers[1].mlp.up_proj.weight, 2.0)
    before = snapshot(model)
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda module, args, out: seen.append(module.weight.requires_grad)
    )
    config = GoraConfig(target_modules=LLAMA_TARGETS, num_batches=2, gradient_route="hooks")
    gora.estimate_gradients(model, config, lm_batches(2), show_progress=False)
    assert seen == [False, False]
    assert_same(before, snapshot(model))
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())
    assert sum(len(m._forward_hooks) for m in model.modules()) == 1  # the test's own


def test_layers_the_hooks_cannot_see_are_refused():
    """Property: a forward that uses a target's weight without calling the module (as fused kernels do) hides it
    from the module hooks; estimation names the layer instead of returning a gradient of zero, and the model is
    left as it was."""
    import torch.nn.functional as F

    model = make_llama()
    mlp = model.model.layers[1].mlp
    mlp.forward = lambda x: mlp.down_proj(F.silu(mlp.gate_proj(x)) * F.linear(x, mlp.up_proj.weight))
    before = snapshot(model)
    config = GoraConfig(target_modules=LLAMA_TARGETS, num_batches=2, gradient_route="hooks")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj.*never saw their forward"):
        gora.estimate_gradients(model, config, lm_batches(2), show_progress=False)
    assert_same(before, snapshot(model))
    stats = gora.estimate_gradients(  # the weight route sees the weight's gradient whatever computes with it
        model, GoraConfig(target_modules=LLAMA_TARGETS, num_batches=2), lm_batches(2), show_progress=False
    )
    assert "model.layers.1.mlp.up_proj" in stats.gradients


def test_gradient_route_validated():
    with pytest.raises(ValueError, match="gradient_route='both' is not one of auto, weights, hooks"):
        GoraConfig(gradient_route="both")
