"""`torchrun --nproc_per_node 2 -m gora finetune ...` on CPU (gloo): the same run as one process whose batch is
the two ranks' batches together, written once by rank 0.

Two runs under torchrun (2 processes, --batch-size 4) against the same runs in one process (--batch-size 8): a
sequence classification (a mean over examples: the Trainer's DDP averages the ranks' means) and a causal-LM SFT
(a mean over learned tokens: the Trainer counts them over both ranks) with gamma='auto' and exact match, so
estimation, the γ search, training and the gathered evaluation are all split over the ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _tiny_folders import save_bert, save_llama, sentiment_rows, sum_rows, write_jsonl
from gora.app.commands.cli import main
from helpers import assert_close

TIMEOUT_S = 600  # a collective that some rank never joins fails the test instead of hanging CI


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    cls, sums = sentiment_rows(48), sum_rows(40)
    return {
        "bert": save_bert(folder / "bert"),
        "llama": save_llama(folder / "llama"),
        "cls_train": write_jsonl(folder / "cls_train.jsonl", cls[:32]),  # 32 rows: every batch full on both ranks
        "cls_eval": write_jsonl(folder / "cls_eval.jsonl", cls[32:]),  # 16 rows; the SFT evaluation has 8: uneven
        "sft_train": write_jsonl(folder / "sft_train.jsonl", sums[:32]),
        "sft_eval": write_jsonl(folder / "sft_eval.jsonl", sums[32:] + sums[:1]),
    }


def _options(inputs: dict[str, Path], task: str) -> list[str]:
    common = ["-q", "--threads", "1", "--max-steps", "4", "--num-batches", "2", "--logging-steps", "1"]
    common += ["--save-strategy", "steps", "--save-steps", "2"]  # no dropout: each rank draws its own masks
    if task == "cls":
        data = ["--model", str(inputs["bert"]), "--target-modules", "query", "value"]
    else:
        data = ["--model", str(inputs["llama"]), "--task", "sft", "--target-modules", "q_proj", "v_proj"]
        data += ["--gamma", "auto", "--gamma-batches", "1", "--eval-metric", "exact_match", "--max-new-tokens", "3"]
    files = ["--train-file", str(inputs[f"{task}_train"]), "--eval-file", str(inputs[f"{task}_eval"])]
    return ["finetune", *common, *data, *files]


def _torchrun(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gora"]
    return subprocess.run([*cmd, *argv], capture_output=True, text=True, env=env, timeout=TIMEOUT_S, check=False)


def _adapter(run: Path, folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("task", ["cls", "sft"])
def test_two_processes_equal_one_with_their_batches_together(inputs, tmp_path, task, capsys):
    """Protects `torchrun -m gora finetune`: with 2 gloo ranks of batch 4, the step-0 adapter (ranks, A0, B0, and
    γ), the trained adapter, the training losses and every evaluation figure equal one process of batch 8 up to float
    rounding; rank 0 alone writes one complete run folder (with each rank's RNG state in the checkpoints) and prints
    one summary; a resume in another number of processes is refused."""
    two, one = tmp_path / "two", tmp_path / "one"
    result = _torchrun([*_options(inputs, task), "--batch-size", "4", "--output-dir", str(two)])
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert result.stdout.count("== gora finetune:") == 1  # rank 0 prints
    assert main([*_options(inputs, task), "--batch-size", "8", "--output-dir", str(one)]) == 0

    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # one folder, no partial ones
    assert json.loads((two / "status.json").read_text())["state"] == "finished"
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert (two / "checkpoints/checkpoint-4/rng_state_1.pth").is_file()  # each rank's RNG, for a resume
    reports = {run: json.loads((run / "report.json").read_text()) for run in (one, two)}
    assert reports[two]["params"]["ranks"] == reports[one]["params"]["ranks"]
    assert reports[two]["gora"]["gamma"] == reports[one]["gora"]["gamma"]
    assert reports[two]["sizes"] == reports[one]["sizes"]
    for folder in ("init", "adapter"):
        got, want = _adapter(two, folder), _adapter(one, folder)
        assert got.keys() == want.keys()
        for key, tensor in want.items():
            assert_close(got[key], tensor, rtol=1e-4, msg=f"{folder}/{key}")
    for stage, metrics in reports[one]["metrics"].items():
        gathered = reports[two]["metrics"][stage]
        for name in ("accuracy", "loss", "exact_match", "generated"):
            if name in metrics:
                assert gathered[name] == pytest.approx(metrics[name], rel=1e-5), (stage, name)
    losses = [[e["loss"] for e in reports[run]["log_history"] if "loss" in e] for run in (one, two)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)

    if task == "sft":  # a resume in another number of processes would train another adapter: refused
        stopped = tmp_path / "stopped"
        shutil.copytree(two, stopped)
        status = json.loads((stopped / "status.json").read_text())
        (stopped / "status.json").write_text(json.dumps({**status, "state": "failed"}))
        before = sorted(p.name for p in stopped.rglob("*"))
        capsys.readouterr()
        assert main(["finetune", "--resume", str(stopped), "-q"]) == 2
        assert f"torchrun --nproc_per_node 2 -m gora finetune --resume {stopped}" in capsys.readouterr().err
        assert sorted(p.name for p in stopped.rglob("*")) == before
