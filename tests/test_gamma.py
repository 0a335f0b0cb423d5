"""Adaptive γ (GoraConfig(gamma="auto")): held-out selection against the pretrained model, by rescaling B0 in place."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import gora
from gora.gamma import (
    BRACKET_EVALS,
    DEFAULT_GAMMA_CANDIDATES,
    START_TOLERANCE,
    StartCheck,
    bracket_losses,
    choose_gamma,
    held_out_loss,
    start_index,
)
from helpers import VOCAB, assert_close, make_llama

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
FEW = (1e-2, 1e-1, 1.0)  # a short grid where the test is about plumbing, not the grid


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest single-threaded on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rule_batches(n: int, seed: int, batch: int = 4, length: int = 16, sign: float | None = None) -> list[dict]:
    """Sequences that count upwards mod VOCAB: one gradient step on some of them lowers the loss on others."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = (torch.randint(0, VOCAB, (batch, 1), generator=g) + torch.arange(length)) % VOCAB
        b = {"input_ids": ids, "labels": ids.clone(), "idx": i}
        if sign is not None:
            b["sign"] = sign
        out.append(b)
    return out


def lm_forward(model, batch):
    return batch.get("sign", 1.0) * model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


def auto_config(**kw) -> gora.GoraConfig:
    kw = {"target_modules": TARGETS, "r": 4, "num_batches": 4, "gamma": "auto", "gamma_batches": 2, **kw}
    return gora.GoraConfig(**kw)


def lora_B(peft_model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_B" in n}


def test_auto_gamma_lowers_held_out_loss(tmp_path):
    """Protects: 'auto' picks a γ > 0 whose held-out loss is below the pretrained model's, and the returned model
    really has that loss; the search (candidates, losses, base loss) is reported in the saved record."""
    model = make_llama()
    batches = rule_batches(6, seed=0)
    pretrained = held_out_loss(model, batches[4:], forward_fn=lm_forward)
    config = auto_config(gamma_search="grid")
    peft_model = gora.get_gora_model(model, config, batches, forward_fn=lm_forward, show_progress=False)
    record = peft_model.gora_records["default"]
    search = record.extra["gamma_search"]
    assert search["base_loss"] == pytest.approx(pretrained, rel=1e-6)
    assert search["candidates"] == list(DEFAULT_GAMMA_CANDIDATES)
    assert len(search["losses"]) == len(search["candidates"])
    assert record.gamma == search["gamma"] > 0
    chosen = search["losses"][search["candidates"].index(record.gamma)]
    assert chosen == min(search["losses"]) < pretrained
    assert held_out_loss(peft_model.get_base_model(), batches[4:], forward_fn=lm_forward) == pytest.approx(chosen)
    peft_model.save_pretrained(tmp_path)
    saved = gora.GoraRecord.load(tmp_path)
    assert saved.gamma == record.gamma and saved.extra["gamma_search"]["losses"] == search["losses"]
    assert saved.config["gamma"] == "auto"


def test_auto_gamma_is_zero_when_every_candidate_hurts(caplog):
    """Protects: when every candidate raises the held-out loss (here the held-out objective is the negated training
    loss, which rises along −G), γ = 0, B0 = 0, the model computes exactly the pretrained outputs, and a warning
    says so."""
    model = make_llama()
    ids = rule_batches(1, seed=9)[0]["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    batches = rule_batches(4, seed=0, sign=1.0) + rule_batches(2, seed=1, sign=-1.0)
    with caplog.at_level(logging.WARNING, logger="gora.gamma"):
        peft_model = gora.get_gora_model(model, auto_config(), batches, forward_fn=lm_forward, show_progress=False)
    search = peft_model.gora_records["default"].extra["gamma_search"]
    assert all(loss > search["base_loss"] for loss in search["losses"])
    assert peft_model.gora_records["default"].gamma == 0.0
    assert all(torch.count_nonzero(b) == 0 for b in lora_B(peft_model).values())
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, expected)  # base output + exactly 0 (B0 = 0): exact
    assert "no candidate" in caplog.text and "gamma = 0" in caplog.text


def test_held_out_batches_are_disjoint_eval_mode_one_forward_each():
    """Protects: the gradient uses batches 0..N-1 (train mode, with grad); the search uses the next K batches only,
    in eval mode without grad, one forward per candidate per batch plus K for the pretrained loss."""
    calls = []

    def recording_forward(model, batch):
        calls.append((batch["idx"], torch.is_grad_enabled(), model.training))
        return lm_forward(model, batch)

    config = auto_config(gamma_candidates=FEW, gamma_search="grid")
    gora.get_gora_model(
        make_llama().train(), config, rule_batches(8, 0), forward_fn=recording_forward, show_progress=False
    )
    estimation, search = calls[:4], calls[4:]
    assert estimation == [(i, True, True) for i in range(4)]
    assert len(search) == 2 * (3 + 1)
    assert {idx for idx, _, _ in search} == {4, 5}
    assert not any(grad or training for _, grad, training in search)


def test_one_shot_iterator_gives_exactly_n_gradient_then_k_held_out_batches():
    """Protects: from a one-shot iterator, estimation takes exactly batches 0..N-1 (it does not read batch N and drop
    it) and the search the next K, N..N+K-1: N + K batches consumed in all, in order, none skipped or read twice."""
    consumed, calls = [], []

    def stream():
        for batch in rule_batches(10, 0):
            consumed.append(batch["idx"])
            yield batch

    def recording_forward(model, batch):
        calls.append((batch["idx"], torch.is_grad_enabled()))
        return lm_forward(model, batch)

    config = auto_config(gamma_candidates=FEW)
    gora.get_gora_model(make_llama(), config, stream(), forward_fn=recording_forward, show_progress=False)
    assert consumed == list(range(config.num_batches + config.gamma_batches))  # 0..5: 4 + 2, no more
    assert [idx for idx, grad in calls if grad] == [0, 1, 2, 3]
    assert {idx for idx, grad in calls if not grad} == {4, 5}


def test_auto_equals_fixed_gamma_and_is_deterministic():
    """Protects: rescaling B0(1) in place gives the initialization that γ = γ* would (B0 is linear in γ), A0 is
    untouched, two runs agree bit for bit, and every module's train/eval flag is as without the search."""
    batches = rule_batches(6, 0)
    auto = gora.get_gora_model(
        make_llama().train(), auto_config(gamma_candidates=FEW), batches, forward_fn=lm_forward, show_progress=False
    )
    again = gora.get_gora_model(
        make_llama().train(), auto_config(gamma_candidates=FEW), batches, forward_fn=lm_forward, show_progress=False
    )
    gamma = auto.gora_records["default"].gamma
    fixed_config = gora.GoraConfig(target_modules=TARGETS, r=4, num_batches=4, gamma=gamma)
    fixed = gora.get_gora_model(
        make_llama().train(), fixed_config, batches, forward_fn=lm_forward, show_progress=False
    )
    for (name, p), (_, q), (_, f) in zip(auto.named_parameters(), again.named_parameters(), fixed.named_parameters()):
        assert torch.equal(p, q), name  # the same computation twice in one process: deterministic on any CPU
        assert_close(p, f, rtol=1e-5, msg=name)  # γ*·B0(1) against B0(γ*): equal up to float rounding
    assert auto.gora_records["default"].extra == again.gora_records["default"].extra
    assert [m.training for m in auto.modules()] == [m.training for m in fixed.modules()]
    assert all(m.training for m in auto.modules())


def test_eval_dataloader_and_running_out_leave_model_untouched():
    """Protects: eval_dataloader supplies the held-out batches; a dataloader that runs out before N + K batches
    raises a ValueError naming the fix and leaves the model exactly as it was (no LoRA layers, same weights)."""
    model = make_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match=r"ran out.*eval_dataloader"):
        gora.get_gora_model(model, auto_config(gamma_batches=3), rule_batches(5, 0), show_progress=False)
    assert [n for n, _ in model.named_modules()] == names
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    peft_model = gora.get_gora_model(
        model,
        auto_config(gamma_candidates=FEW),
        rule_batches(4, 0),
        eval_dataloader=rule_batches(3, 7),
        show_progress=False,
    )
    assert peft_model.gora_records["default"].extra["gamma_search"]["source"] == "eval_dataloader"
    with pytest.raises(ValueError, match="with gamma=0 the adapter starts as the pretrained model: drop it"):
        gora.get_gora_model(make_llama(), auto_config(gamma=0.0), [], eval_dataloader=[], show_progress=False)


@pytest.mark.parametrize("gamma", ["auto", 1.0], ids=["search", "fixed-check"])
def test_a_failure_after_peft_wraps_the_model_leaves_it_as_it_was(gamma):
    """Protects: an error raised once PEFT has wrapped the model (here the held-out forward fails after L(0), inside
    the γ search or the fixed-γ start check) propagates unchanged and leaves the user's model as it was: no LoRA
    layers, the same module tree, bit-identical weights."""
    model = make_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_modules()]
    held_out = [{**batch, "held_out": True} for batch in rule_batches(2, 7)]
    calls = []

    def failing_forward(m, batch):
        if batch.get("held_out"):
            calls.append(batch["idx"])
            if len(calls) > len(held_out):  # L(0) succeeds; the first forward with the adapter in place fails
                raise RuntimeError("held-out forward failed")
        return lm_forward(m, batch)

    with pytest.raises(RuntimeError, match="held-out forward failed"):
        gora.get_gora_model(
            model,
            auto_config(gamma=gamma),
            rule_batches(4, 0),
            eval_dataloader=held_out,
            forward_fn=failing_forward,
            show_progress=False,
        )
    assert len(calls) == len(held_out) + 1
    assert [n for n, _ in model.named_modules()] == names
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_build_gora_model_needs_held_out_batches():
    """Protects: the staged API refuses gamma='auto' without held-out batches before PEFT touches the model."""
    model = make_llama()
    config = auto_config()
    stats = gora.estimate_gradients(model, config, rule_batches(4, 0), show_progress=False)
    allocation = gora.allocate_ranks(gora.compute_importances(model, stats, config.importance), stats.shapes, config)
    with pytest.raises(ValueError, match="eval_batches"):
        gora.build_gora_model(model, config, stats, allocation)
    assert not any("lora" in n for n, _ in model.named_modules())


def test_choose_gamma_rule():
    """Protects: γ* = argmin among candidates strictly below the pretrained loss, smallest γ on ties, NaN/inf never
    chosen, 0 when none is below."""
    assert choose_gamma([0.1, 0.01, 1.0], [2.0, 2.5, 1.9], base_loss=3.0) == 1.0
    assert choose_gamma([0.1, 0.2], [2.0, 2.0], base_loss=3.0) == 0.1
    assert choose_gamma([0.1, 0.2], [math.nan, math.inf], base_loss=3.0) == 0.0
    assert choose_gamma([0.1, 0.2], [3.0, 3.5], base_loss=3.0) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gamma": "Auto"}, "or 'auto'"),
        ({"gamma": -0.1}, "gamma must be"),
        ({"gamma_candidates": (0.1,)}, "only used with gamma='auto'"),
        ({"gamma": "auto", "gamma_candidates": ()}, "non-empty"),
        ({"gamma": "auto", "gamma_candidates": (0.0, 0.1)}, "> 0"),
        ({"gamma": "auto", "gamma_candidates": "0.1"}, "sequence"),
        ({"gamma": "auto", "gamma_search": "golden"}, "gamma_search='golden' is not one of bracket, grid"),
        ({"gamma_batches": 0}, "gamma_batches"),
    ],
)
def test_config_validation(kwargs, message):
    """Protects: bad gamma settings fail on construction with a message naming the field."""
    with pytest.raises(ValueError, match=message):
        gora.GoraConfig(**kwargs)
    assert gora.GoraConfig(gamma="auto", gamma_candidates=[0.2, 0.1, 0.2]).gamma_candidates == (0.1, 0.2)


# ------------------------------------------------------------------------------------------------- bracket search


def _bracket(losses: list[float], base: float, start: int | None = None) -> tuple[dict[int, float], float]:
    grid = list(DEFAULT_GAMMA_CANDIDATES)
    calls = []

    def loss_at(i):
        calls.append(i)
        return losses[i]

    seen = bracket_losses(len(grid), start_index(grid) if start is None else start, loss_at, base)
    assert len(calls) == len(set(calls)) == len(seen) <= BRACKET_EVALS  # each candidate evaluated once, at most 3
    chosen = choose_gamma([grid[i] for i in seen], [seen[i] for i in seen], base)
    return seen, chosen


def test_bracket_starts_at_the_papers_gamma():
    """Protects: the bracket search starts at the candidate nearest the paper's γ = 5e-2 (the default grid holds it)."""
    grid = list(DEFAULT_GAMMA_CANDIDATES)
    assert grid[start_index(grid)] == 5e-2
    assert start_index([1e-2, 1e-1, 1.0]) == 1  # log-nearest: 0.1 is 2x away, 0.01 5x


@pytest.mark.parametrize("best", range(len(DEFAULT_GAMMA_CANDIDATES)))
def test_bracket_finds_the_grid_minimum_near_the_start(best):
    """Protects: on a loss that is unimodal in log γ (a V over the grid, every candidate below L(0)), the bracket
    search picks the grid's γ* whenever γ* is at most one step above the paper's γ or one below, and otherwise a γ no
    further from it than the start; it never evaluates more than 3 candidates."""
    losses = [1.0 + 0.1 * abs(i - best) for i in range(len(DEFAULT_GAMMA_CANDIDATES))]
    _, chosen = _bracket(losses, base=2.0)
    grid = list(DEFAULT_GAMMA_CANDIDATES)
    start = start_index(grid)
    if abs(best - start) <= 1 or best == start + 2:
        assert chosen == grid[best]
    else:
        assert losses[grid.index(chosen)] <= losses[start]


def test_bracket_backs_off_when_the_papers_step_raises_the_loss():
    """Protects: when γ = 5e-2 raises the loss, the search backs off 4x (then tries the candidate between), picks a
    γ that lowers it when one of those does, and γ = 0 when three candidates all raise it."""
    grid = list(DEFAULT_GAMMA_CANDIDATES)
    start = start_index(grid)
    # L rises above L(0) = 2 from the candidate just below the start: 4x below helps, 2x below hurts
    losses = [1.9, 1.85, 1.8, 1.78, 1.75, 2.1, 3.0, 4.0, 5.0]
    seen, chosen = _bracket(losses, base=2.0)
    assert sorted(seen) == [start - 2, start - 1, start] and chosen == grid[start - 2]
    losses = [1.9, 1.85, 1.8, 1.78, 1.75, 1.7, 3.0, 4.0, 5.0]  # 2x below is the best
    assert _bracket(losses, base=2.0)[1] == grid[start - 1]
    seen, chosen = _bracket([2.5] * len(grid), base=2.0)  # nothing helps: 5e-2, 1.25e-2, 3.1e-3, then 0
    assert sorted(seen) == [start - 4, start - 2, start] and chosen == 0.0
    assert _bracket([math.nan] * len(grid), base=2.0)[1] == 0.0


def test_bracket_on_a_model_evaluates_what_the_grid_does():
    """Protects: the bracket search on a real model evaluates at most 3 candidates, each with exactly the loss the
    full grid measures for it (the same held-out forwards), and picks γ* by the same rule among them."""
    batches = rule_batches(6, seed=0)
    searches = {}
    for kind in ("grid", "bracket"):
        peft_model = gora.get_gora_model(
            make_llama(), auto_config(gamma_search=kind), batches, forward_fn=lm_forward, show_progress=False
        )
        searches[kind] = peft_model.gora_records["default"].extra["gamma_search"]
    grid, bracket = searches["grid"], searches["bracket"]
    assert bracket["search"] == "bracket" and len(bracket["candidates"]) <= BRACKET_EVALS
    on_grid = dict(zip(grid["candidates"], grid["losses"]))
    for gamma, loss in zip(bracket["candidates"], bracket["losses"]):
        assert loss == pytest.approx(on_grid[gamma], rel=1e-6)
    assert bracket["gamma"] == choose_gamma(bracket["candidates"], bracket["losses"], bracket["base_loss"])


# ---------------------------------------------------------------------------------------------------- start check


def test_a_start_that_raises_the_held_out_loss_is_reported(caplog):
    """Protects: with a fixed γ and eval_dataloader, a first step that raises the held-out loss is logged as a
    warning naming the fix (gamma='auto', a smaller gamma) and kept in the record with both losses; a γ that lowers
    it is recorded as not raised, with no warning. Without held-out batches nothing is measured."""
    batches, held_out = rule_batches(4, 0), rule_batches(2, 7)
    against = rule_batches(2, 7, sign=-1.0)  # the negated loss, which rises along −G
    with caplog.at_level(logging.WARNING, logger="gora"):
        peft_model = gora.get_gora_model(
            make_llama(),
            auto_config(gamma=1.0),
            batches,
            eval_dataloader=against,
            forward_fn=lm_forward,
            show_progress=False,
        )
    check = peft_model.gora_records["default"].extra["start_check"]
    assert check["raised"] and check["init_loss"] > check["base_loss"] + START_TOLERANCE * abs(check["base_loss"])
    assert "gamma='auto'" in check["message"] and "smaller gamma (e.g. 0.25)" in check["message"]
    assert check["message"] in caplog.text
    assert check["base_loss"] == pytest.approx(held_out_loss(make_llama(), against, forward_fn=lm_forward))
    caplog.clear()
    auto = gora.get_gora_model(
        make_llama(), auto_config(), batches, eval_dataloader=held_out, forward_fn=lm_forward, show_progress=False
    )
    search = auto.gora_records["default"].extra["gamma_search"]
    fixed = gora.get_gora_model(
        make_llama(),
        auto_config(gamma=search["gamma"]),
        batches,
        eval_dataloader=held_out,
        forward_fn=lm_forward,
        show_progress=False,
    )
    check = fixed.gora_records["default"].extra["start_check"]
    assert search["gamma"] > 0 and not check["raised"] and "message" not in check
    assert check["init_loss"] == pytest.approx(min(search["losses"]), rel=1e-5)
    assert "raised the loss" not in caplog.text
    plain = gora.get_gora_model(
        make_llama(), auto_config(gamma=1e3), batches, forward_fn=lm_forward, show_progress=False
    )
    assert "start_check" not in plain.gora_records["default"].extra


def test_start_check_rule():
    """Protects: 'raised' means L(γ) above L(0) by more than START_TOLERANCE (relative), or not finite."""
    assert not StartCheck(2.0, 2.0 * (1 + START_TOLERANCE / 2), 0.05, "x").raised
    assert StartCheck(2.0, 2.0 * (1 + 2 * START_TOLERANCE), 0.05, "x").raised
    assert not StartCheck(-2.0, -2.0 * (1 - START_TOLERANCE / 2), 0.05, "x").raised  # a negative objective
    assert StartCheck(-2.0, -2.0 * (1 - 2 * START_TOLERANCE), 0.05, "x").raised
    assert StartCheck(2.0, math.inf, 0.05, "x").raised and StartCheck(2.0, math.nan, 0.05, "x").raised
    assert StartCheck(2.0, math.inf, 0.05, "x").to_dict()["init_loss"] is None
