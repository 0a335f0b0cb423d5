"""Multi-process estimation: 2 gloo processes on CPU (tests/_dist_worker.py), compared with one process.

Each rank sees half of 8 global batches; one process sees all 8. Llama here has no dropout, so the runs must agree
up to float32 summation order.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gora
from _dist_worker import BATCHES, TRAIN_LR, config
from helpers import FUSED_EXPERTS, assert_close, lm_batches, make_llama, make_mixtral, needs_fused_experts

WORKER = Path(__file__).with_name("_dist_worker.py")
SCENARIOS = (
    "ddp",
    "sketch",
    "hooks_ddp",
    "hooks_sketch",
    "fsdp",
    "adaptive",
    "peft",
    "empty_full",
    "empty_sketch",
    "empty_fsdp",
    "empty_adaptive",
    "bad_batch",
    "bad_pilot",
    "uneven_fsdp",
    "gamma",
    "gamma_short",
    "fsdp_inject",
    "fsdp_build",
    *(["experts"] if FUSED_EXPERTS else []),  # transformers 4.x's Mixtral has no fused experts to target
)
TIMEOUT_S = 600  # a collective that some rank never joins fails the tests here instead of hanging CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    env["OMP_NUM_THREADS"] = "1"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out), ",".join(SCENARIOS)],
            env={**env, "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    try:
        logs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0] for p in procs]
        pytest.fail(
            f"the 2 ranks did not finish within {TIMEOUT_S}s (a collective that one rank never joined?):\n"
            + "\n".join(log[-2000:] for log in logs)
        )
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return out


def _load(out: Path, scenario: str) -> tuple[list[dict], list[dict]]:
    metas = [json.loads((out / f"{scenario}.rank{r}.json").read_text()) for r in range(2)]
    tensors = [torch.load(out / f"{scenario}.rank{r}.pt") for r in range(2)]
    return metas, tensors


def _single(batches: list | None = None, make=make_llama, **kwargs):
    """The single-process run over all 8 global batches (or over `batches`)."""
    batches = lm_batches(BATCHES) if batches is None else batches
    cfg = config(num_batches=len(batches), **kwargs)
    model = make()
    stats = gora.estimate_gradients(model, cfg, batches, show_progress=False)
    allocation = gora.allocate_ranks(gora.compute_importances(model, stats, cfg.importance), stats.shapes, cfg)
    return stats, allocation, gora.init_gora_weights(stats, allocation, cfg)


def _assert_ranks_identical(metas: list[dict], tensors: list[dict]) -> None:
    """Bit for bit: both ranks run the same code on the same all-reduced sums (an all-reduce returns one result to
    every rank) on one machine, so nothing may differ at all."""
    assert metas[0]["ranks"] == metas[1]["ranks"]
    assert metas[0]["importances"] == metas[1]["importances"]
    assert tensors[0].keys() == tensors[1].keys()
    for key in tensors[0]:
        assert torch.equal(tensors[0][key], tensors[1][key]), key


@pytest.mark.parametrize("scenario", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(dist_out, scenario):
    """Property: under DDP and FSDP2, G, ranks, A0 and B0 are bitwise identical on both ranks and equal to one
    process seeing all the global batches (A0 exactly, G and B0 to float32 precision)."""
    _assert_equal_single(*_load(dist_out, scenario), lm_batches(BATCHES))


def test_sketch_two_ranks(dist_out):
    """Property: in sketch mode both ranks agree exactly (samples drawn from all-reduced pilot statistics) and the
    sketch Y = G·A_maxᵀ, being linear in the batches, equals the single-process sketch."""
    metas, tensors = _load(dist_out, "sketch")
    _assert_ranks_identical(metas, tensors)
    stats, _, _ = _single(gradient_store="sketch")
    assert stats.sketches
    for name, Y in stats.sketches.items():
        assert_close(tensors[0][f"Y/{name}"], Y, rtol=1e-5, msg=name)


def test_hook_route_two_ranks_equal_one_process(dist_out):
    """Property: the module-hook route (the one quantized layers take) feeds the same stores, so the end-of-run
    all-reduce gives both ranks identical statistics, equal to one process on the weight route: G, ranks, A0, B0
    under DDP, and the sketch Y."""
    _assert_equal_single(*_load(dist_out, "hooks_ddp"), lm_batches(BATCHES))
    metas, tensors = _load(dist_out, "hooks_sketch")
    _assert_ranks_identical(metas, tensors)
    assert metas[0]["info"]["gradient_routes"]["weights"] == 0
    stats, _, _ = _single(gradient_store="sketch")
    for name, Y in stats.sketches.items():
        assert_close(tensors[0][f"Y/{name}"], Y, rtol=1e-5, msg=name)


def test_adaptive_decision_same_on_every_rank(dist_out):
    """Property: adaptive stopping decides on all-reduced statistics, so both ranks stop after the same batch."""
    metas, _ = _load(dist_out, "adaptive")
    reports = [m["info"]["adaptive"] for m in metas]
    assert reports[0] == reports[1]
    assert reports[0]["batches_per_rank"] <= BATCHES // 2
    assert metas[0]["num_batches"] == 2 * reports[0]["batches_per_rank"]


def test_get_gora_model_adapters_identical(dist_out):
    """Property: the one-call API builds the same LoRA weights on every rank, equal to the single-process ones."""
    states = [torch.load(dist_out / f"peft.rank{r}.pt") for r in range(2)]
    model = gora.get_gora_model(make_llama(), config(num_batches=BATCHES), lm_batches(BATCHES), show_progress=False)
    single = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert states[0].keys() == states[1].keys() == single.keys()
    for key in single:
        assert torch.equal(states[0][key], states[1][key]), key  # same code, same reduced sums: bit for bit
        assert_close(states[0][key], single[key], rtol=1e-4, msg=key)  # other summation order: float rounding


@needs_fused_experts
def test_expert_stacks_two_ranks_equal_one_process(dist_out):
    """Property: fused expert parameters (target_parameters) under DDP: G per expert, ranks, A0 and B0 of every
    expert are identical on both ranks and equal to one process over all the batches."""
    metas, tensors = _load(dist_out, "experts")
    assert any(k.startswith("G/") and tensors[0][k].dim() == 3 for k in tensors[0])
    kwargs = dict(target_modules=["q_proj", "v_proj"], target_parameters="all-experts")
    _assert_equal_single(metas, tensors, lm_batches(BATCHES), make=make_mixtral, **kwargs)


def _assert_equal_single(metas: list[dict], tensors: list[dict], batches: list, **single) -> None:
    """Both ranks identical, and equal to one process over `batches` (G and B0 to float32 precision, A0 exactly)."""
    _assert_ranks_identical(metas, tensors)
    stats, allocation, weights = _single(batches, **single)
    assert metas[0]["num_batches"] == stats.num_batches == len(batches)
    assert metas[0]["ranks"] == allocation.ranks
    for name, G in stats.gradients.items():
        assert_close(tensors[0][f"G/{name}"], G, rtol=1e-5, msg=name)
    for name, (A, B) in weights.items():
        assert torch.equal(tensors[0][f"A/{name}"], A)  # drawn from (seed, name) by the same generator: exact
        assert_close(tensors[0][f"B/{name}"], B, rtol=1e-4, msg=name)


def test_rank_without_batches_adds_nothing(dist_out):
    """Property: without per-batch collectives (full and sketch stores), a rank whose dataloader is empty joins
    every collective with zero sums, so both ranks finish identical and G is the mean over the batches that exist:
    equal to one process over rank 0's 4 batches."""
    _assert_equal_single(*_load(dist_out, "empty_full"), lm_batches(BATCHES)[: BATCHES // 2])
    metas, tensors = _load(dist_out, "empty_sketch")
    _assert_ranks_identical(metas, tensors)
    assert metas[0]["num_batches"] == BATCHES // 2
    assert metas[0]["info"]["batches_per_rank"] == BATCHES // 2 and metas[1]["info"]["batches_per_rank"] == 0


@pytest.mark.parametrize("scenario", ["empty_fsdp", "empty_adaptive"])
def test_rank_without_batches_fails_on_every_rank(dist_out, scenario):
    """Property: under FSDP2 and adaptive stopping (a collective per batch) an empty rank would leave the other
    waiting forever; instead both ranks raise the same error, naming the empty rank and the fix, and do not hang."""
    errors = [(dist_out / f"{scenario}.rank{r}.err").read_text() for r in range(2)]
    assert errors[0] == errors[1]
    assert "rank(s) [1] of 2 got no batch" in errors[0] and "at least one batch" in errors[0]


@pytest.mark.parametrize("scenario", ["bad_batch", "bad_pilot"])
def test_error_on_one_rank_raised_on_every_rank(dist_out, scenario):
    """Property: a batch that fails on one rank only (here: no labels, so no loss; in the N batches or in the
    sketch's pilot batch) does not leave the other rank waiting in the next collective: the failing rank raises its
    own error and the other a RuntimeError naming it."""
    errors = [(dist_out / f"{scenario}.rank{r}.err").read_text() for r in range(2)]
    assert errors[1].startswith("ValueError:") and "loss" in errors[1]
    assert errors[0].startswith("RuntimeError: rank(s) [1] failed during")


def test_uneven_fsdp_ranks_stop_together(dist_out):
    """Property: under FSDP2 with 4 batches on rank 0 and 3 on rank 1, both ranks stop after 3 (no hang) and G is
    the mean of the 6 batches run: equal to one process over those 6."""
    batches = lm_batches(BATCHES)
    _assert_equal_single(*_load(dist_out, "uneven_fsdp"), batches[0:3] + batches[4:7])


def test_gamma_auto_same_on_every_rank(dist_out):
    """Property: with gamma="auto" each rank holds out different batches, but the held-out losses are averaged
    over ranks, so both choose the same γ from the same losses and build identical adapters; the search equals one
    process's over all 4 held-out batches (K counted over ranks)."""
    searches = [json.loads((dist_out / f"gamma.rank{r}.json").read_text())["gamma_search"] for r in range(2)]
    assert searches[0] == searches[1]
    single = (
        gora.get_gora_model(
            make_llama(),
            config(num_batches=BATCHES, gamma="auto", gamma_batches=4),
            lm_batches(BATCHES),
            eval_dataloader=lm_batches(4, seed=1),
            show_progress=False,
        )
        .gora_records["default"]
        .extra["gamma_search"]
    )
    assert searches[0]["num_batches"] == single["num_batches"] == 4
    assert searches[0]["gamma"] == single["gamma"]
    for name in ("losses", "base_loss"):
        assert_close(torch.tensor(searches[0][name]), torch.tensor(single[name]), rtol=1e-4, msg=name)
    states = [torch.load(dist_out / f"gamma.rank{r}.pt") for r in range(2)]
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key  # same code, same reduced losses: bit for bit


def test_gamma_auto_short_held_out_fails_on_every_rank(dist_out):
    """Property: a rank short of held-out batches makes both ranks raise (no rank waits in the loss all-reduce)."""
    errors = [(dist_out / f"gamma_short.rank{r}.err").read_text() for r in range(2)]
    assert "rank(s) [1]" in errors[0] and "rank(s) [1]" in errors[1]
    assert "gamma_batches=2" in errors[1]


def test_get_gora_model_refuses_fsdp2_sharded_model(dist_out):
    """Property: LoRA layers are not put into an already fully_shard-ed model (FSDP would never synchronize their
    gradients); both ranks get the same error, which spells out the supported flow."""
    errors = [(dist_out / f"fsdp_inject.rank{r}.err").read_text() for r in range(2)]
    assert errors[0] == errors[1]
    assert "sharded with FSDP2" in errors[0] and "build_gora_model(unsharded" in errors[0]


def test_fsdp2_flow_trains_and_saves_the_single_process_adapter(dist_out, tmp_path):
    """Property: the documented FSDP2 flow (estimate on the sharded model, build on an unsharded copy, fully_shard
    the PeftModel) gives A0/B0 equal on both ranks and to one process; one FSDP2 training step updates LoRA like one
    process stepping on the mean loss of both ranks' batches; the saved adapter loads in plain PEFT."""
    from peft import PeftModel

    inits = [torch.load(dist_out / f"fsdp_build.init.rank{r}.pt") for r in range(2)]
    trained = [torch.load(dist_out / f"fsdp_build.rank{r}.pt") for r in range(2)]
    batches = lm_batches(BATCHES)
    single = gora.get_gora_model(make_llama(), config(num_batches=BATCHES), batches, show_progress=False)
    lora = {k: v for k, v in single.named_parameters() if "lora_" in k}
    assert inits[0].keys() == inits[1].keys() == lora.keys()
    for key, value in lora.items():
        assert torch.equal(inits[0][key], inits[1][key]), key  # same code, same reduced sums: bit for bit
        assert_close(inits[0][key], value.detach(), rtol=1e-4, msg=key)
    if (dist_out / "fsdp_build.factor.rank0.txt").read_text() != "1":
        pytest.skip(
            f"torch {torch.__version__}'s gloo backend sums where FSDP2 asks it to average, so FSDP2's own training "
            "step is twice one process's (torch 2.13 averages); gora's estimation above corrects for it"
        )
    optimizer = torch.optim.SGD(lora.values(), lr=TRAIN_LR)
    single.train()
    ((single(**batches[0]).loss + single(**batches[BATCHES // 2]).loss) / 2).backward()  # rank 0's and 1's first
    optimizer.step()
    assert trained[0].keys() == trained[1].keys() == lora.keys()
    for key, value in lora.items():
        assert torch.equal(trained[0][key], trained[1][key]), key  # FSDP2 gives every rank the same reduced grads
        assert_close(trained[0][key], value.detach(), rtol=1e-4, msg=key)
    loaded = PeftModel.from_pretrained(make_llama(), dist_out / "fsdp_adapter")
    for key, value in loaded.named_parameters():
        if "lora_" in key:
            assert torch.equal(value, trained[0][key]), key  # saved and loaded, not computed: exact


def test_zero3_parameters_refused(llama):
    """Property: DeepSpeed ZeRO-3 partitioned parameters get a clear error instead of silently empty gradients."""
    next(llama.parameters()).ds_id = 0
    with pytest.raises(ValueError, match="ZeRO-3"):
        gora.estimate_gradients(llama, config(), lm_batches(2), show_progress=False)
