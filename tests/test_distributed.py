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
from _dist_worker import BATCHES, config
from conftest import lm_batches, make_llama

WORKER = Path(__file__).with_name("_dist_worker.py")
SCENARIOS = ("ddp", "sketch", "fsdp", "adaptive", "peft")


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
        logs = [p.communicate(timeout=180)[0] for p in procs]
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


def _single(**kwargs):
    """The single-process run over all 8 global batches."""
    cfg = config(num_batches=BATCHES, **kwargs)
    model = make_llama()
    stats = gora.estimate_gradients(model, cfg, lm_batches(BATCHES), show_progress=False)
    allocation = gora.allocate_ranks(gora.compute_importances(model, stats, cfg.importance), stats.shapes, cfg)
    return stats, allocation, gora.init_gora_weights(stats, allocation, cfg)


def _assert_ranks_identical(metas: list[dict], tensors: list[dict]) -> None:
    assert metas[0]["ranks"] == metas[1]["ranks"]
    assert metas[0]["importances"] == metas[1]["importances"]
    assert tensors[0].keys() == tensors[1].keys()
    for key in tensors[0]:
        assert torch.equal(tensors[0][key], tensors[1][key]), key


@pytest.mark.parametrize("scenario", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(dist_out, scenario):
    """Property: under DDP and FSDP2, G, ranks, A0 and B0 are bitwise identical on both ranks and equal to one
    process seeing all the global batches (A0 exactly, G and B0 to float32 precision)."""
    metas, tensors = _load(dist_out, scenario)
    _assert_ranks_identical(metas, tensors)
    stats, allocation, weights = _single()
    assert metas[0]["num_batches"] == stats.num_batches == BATCHES
    assert metas[0]["ranks"] == allocation.ranks
    for name, G in stats.gradients.items():
        torch.testing.assert_close(tensors[0][f"G/{name}"], G, rtol=1e-5, atol=1e-9)
    for name, (A, B) in weights.items():
        assert torch.equal(tensors[0][f"A/{name}"], A)
        torch.testing.assert_close(tensors[0][f"B/{name}"], B, rtol=1e-4, atol=1e-9)


def test_sketch_two_ranks(dist_out):
    """Property: in sketch mode both ranks agree exactly (samples drawn from all-reduced pilot statistics) and the
    sketch Y = G·A_maxᵀ, being linear in the batches, equals the single-process sketch."""
    metas, tensors = _load(dist_out, "sketch")
    _assert_ranks_identical(metas, tensors)
    stats, _, _ = _single(gradient_store="sketch")
    assert stats.sketches
    for name, Y in stats.sketches.items():
        torch.testing.assert_close(tensors[0][f"Y/{name}"], Y, rtol=1e-5, atol=1e-9)


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
        assert torch.equal(states[0][key], states[1][key]), key
        torch.testing.assert_close(states[0][key], single[key], rtol=1e-4, atol=1e-9)


def test_zero3_parameters_refused(llama):
    """Property: DeepSpeed ZeRO-3 partitioned parameters get a clear error instead of silently empty gradients."""
    next(llama.parameters()).ds_id = 0
    with pytest.raises(ValueError, match="ZeRO-3"):
        gora.estimate_gradients(llama, config(), lm_batches(2), show_progress=False)
