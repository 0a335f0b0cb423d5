"""gora.app.run.train: a fine-tune never loses finished work. A signal mid-training writes a checkpoint and `--resume`
finishes the run with the very adapter an uninterrupted run trains; a failure after training keeps the trained
adapter; a resume refuses options that would change the result; bad input before training still leaves nothing.

The first interrupted run is the real `gora finetune` in a subprocess, the second and everything else run in-process;
tests/_interrupt_child.py holds training at one step until the test's signal has arrived, so the signal always lands
mid-training.
All runs share one configuration on a tiny BERT (12 steps of batch 4 over 43 rows: the run crosses an epoch, so data
order and RNG are restored across an epoch boundary; lora_dropout 0.1, so the dropout RNG matters).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

import gora.app.run.session as session_module
import gora.app.run.train as train_module
from _interrupt_child import hold_training_at
from _tiny_folders import save_bert, sentiment_rows, write_jsonl
from gora.app.commands.cli import main

CHILD = Path(__file__).with_name("_interrupt_child.py")
STEPS, SAVE_STEPS = 12, 4


def _options(bert: Path, data: Path) -> list[str]:
    return [
        *["--model", str(bert), "--train-file", str(data), "--target-modules", "query", "value"],
        *["--r", "4", "--min-rank", "2", "--max-rank", "8", "--lora-dropout", "0.1", "--num-batches", "2"],
        *["--batch-size", "4", "--eval-batch-size", "16", "--max-steps", str(STEPS), "--save-strategy", "steps"],
        *["--save-steps", str(SAVE_STEPS), "--logging-steps", "1", "--threads", "1", "-q"],
    ]


@pytest.fixture(scope="module")
def options(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("inputs")
    return _options(save_bert(folder / "bert"), write_jsonl(folder / "train.jsonl", sentiment_rows(48)))


def _run(argv: list[str]) -> tuple[int, str]:
    """`gora` in this process: (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(argv)
    return status, err.getvalue()


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter/adapter_model.safetensors"))


def _losses(run: Path) -> list[float]:
    return [e["loss"] for e in json.loads((run / "report.json").read_text())["log_history"] if "loss" in e]


def _assert_same_adapter(run: Path, reference: Path, *, losses: bool = True) -> None:
    # bit for bit: the same computations in the same order on the same machine, one thread; what a resume must
    # restore (adapter, AdamW moments, schedule, RNG, the sampler's order past the epoch boundary) all enters them
    got, want = _adapter(run), _adapter(reference)
    assert got.keys() == want.keys()
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key
    if losses:
        assert _losses(run) == _losses(reference)


def _status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def _checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def _files(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def reference(options, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert _run(["finetune", *options, "--output-dir", str(out)])[0] == 0
    assert _status(out)["state"] == "finished"
    return out


def _interrupt(options: list[str], out: Path, pause_at: int, signals: list[int]) -> tuple[int, str]:
    """Run `gora finetune` in a subprocess held at step `pause_at + 1`; send `signals` there, each once the previous
    one has been handled; return (exit status, stderr)."""
    marker, log = out.with_name("marker"), out.with_name("stderr.txt")
    cmd = [sys.executable, str(CHILD), str(marker), str(pause_at), str(len(signals)), "finetune", *options]
    with log.open("w") as stderr:
        proc = subprocess.Popen([*cmd, "--output-dir", str(out)], stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            for signum, word in zip(signals, ("paused", "signalled")):
                deadline = time.monotonic() + 600
                while not (marker.is_file() and marker.read_text() == word):
                    assert proc.poll() is None, f"the run ended before {word!r}: {log.read_text()[-3000:]}"
                    assert time.monotonic() < deadline, f"no {word!r} after 600 s"
                    time.sleep(0.01)
                proc.send_signal(signum)
            status = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
    return status, log.read_text()


def test_signal_mid_training_checkpoints_and_resume_equals_uninterrupted(options, reference, tmp_path):
    """Protects the interrupt contract: SIGINT at step 7 of 12 finishes that step, writes its checkpoint (keeping
    the last 2), marks the run interrupted and exits 130 with one line holding the exact resume command; the
    step-0 adapter and statistics are on disk. `--resume` then completes the run, and its adapter and loss curve
    equal the uninterrupted run's bit for bit."""
    out = tmp_path / "run"
    status, stderr = _interrupt(options, out, pause_at=6, signals=[signal.SIGINT])
    assert status == 130, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert line == (
        f"gora finetune: interrupted by SIGINT at step 7 of {STEPS}; checkpoint {out}/checkpoints/checkpoint-7 "
        f"written; resume with: gora finetune --resume {out}"
    )
    state = _status(out)
    assert (state["state"], state["stage"], state["step"]) == ("interrupted", "train", 7)
    assert state["last_checkpoint"] == "checkpoints/checkpoint-7"
    assert _checkpoints(out) == ["checkpoint-4", "checkpoint-7"]  # --save-total-limit 2 (default)
    for name in ("adapter_config.json", "adapter_model.safetensors", "gora_record.json", "gradient_stats.safetensors"):
        assert (out / "init" / name).is_file(), name
    assert not (out / "adapter").exists() and not (out / "report.json").exists()

    assert _run(["finetune", "--resume", str(out), "-q"])[0] == 0
    _assert_same_adapter(out, reference)
    assert _status(out)["state"] == "finished"
    assert json.loads((out / "report.json").read_text())["sessions"] == 2


def test_second_signal_stops_at_once_deleting_nothing(options, reference, tmp_path):
    """Protects the second Ctrl-C: it stops in the middle of step 6 at once (no checkpoint of it), exits 130 with
    the resume command, deletes nothing (checkpoint-4 and init/ stay); the resume continues from checkpoint-4 and
    still ends with the uninterrupted run's adapter. (In this process, the signals sent to it by a thread: the
    handlers are the same, and a second interpreter start is saved.)"""
    out, marker = tmp_path / "run", tmp_path / "marker"

    def send_two_sigints():
        for word in ("paused", "signalled"):
            deadline = time.monotonic() + 600
            while not (marker.is_file() and marker.read_text() == word) and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGINT)

    sender = threading.Thread(target=send_two_sigints, daemon=True)
    with hold_training_at(marker, pause_at=5, signals=2):
        sender.start()
        status, stderr = _run(["finetune", *options, "--output-dir", str(out)])
    sender.join(timeout=10)
    assert status == 130, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("gora finetune: stopped at once by a second SIGINT at step 5 of 12; nothing was deleted")
    assert line.endswith(f"checkpoint {out}/checkpoints/checkpoint-4: gora finetune --resume {out}")
    assert _checkpoints(out) == ["checkpoint-4"]
    assert _status(out)["state"] == "interrupted" and (out / "init/adapter_model.safetensors").is_file()

    assert _run(["finetune", "--resume", str(out), "-q"])[0] == 0
    _assert_same_adapter(out, reference)


@pytest.fixture(scope="module")
def eval_failed(options, tmp_path_factory) -> tuple[Path, int, str]:
    """A run whose final evaluation raised (the third call of `evaluate`: before, after GoRA's init, after)."""
    out = tmp_path_factory.mktemp("eval-failed") / "run"
    real, calls = train_module.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("evaluation exploded\nsecond line")
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        for module in (train_module, session_module):  # before training and after GoRA's init; after training
            patch.setattr(module, "evaluate", evaluate)
        status, stderr = _run(["finetune", *options, "--output-dir", str(out)])
    return out, status, stderr


def test_failure_after_training_keeps_the_trained_adapter(eval_failed, reference, tmp_path):
    """Protects finished work: an error in the final evaluation leaves the trained adapter (the uninterrupted run's,
    bit for bit) and the checkpoints, exits 1 with one line that says what failed, that the adapter is safe and how
    to resume; the resume evaluates and reports without training again, and may change harmless options."""
    failed, status, stderr = eval_failed
    assert status == 1
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(
        "gora finetune: training finished but the evaluation failed (RuntimeError: evaluation exploded); the trained "
        f"adapter is safe in {failed}/adapter; once the cause is fixed, resume with: gora finetune --resume {failed}"
    )
    state = _status(failed)
    assert (state["state"], state["stage"], state["adapter_safe"]) == ("failed", "evaluate", True)
    assert state["error"] == "RuntimeError: evaluation exploded" and "Traceback" in state["traceback"]
    assert _checkpoints(failed) == ["checkpoint-12", "checkpoint-8"]
    assert not (failed / "report.json").exists()
    _assert_same_adapter(failed, reference, losses=False)  # the report with the losses was not written
    # the step-0 statistics belong to the base model (fingerprint checked on load), so --load-stats can reuse them
    from transformers import AutoModelForSequenceClassification

    from gora import load_gradient_stats

    bert = yaml.safe_load((failed / "config.yaml").read_text())["model"]
    stats = load_gradient_stats(
        failed / "init/gradient_stats.safetensors", AutoModelForSequenceClassification.from_pretrained(bert)
    )
    assert sorted(stats.gradients) == sorted(json.loads((failed / "init/gora_record.json").read_text())["ranks"])

    out = tmp_path / "run"
    shutil.copytree(failed, out)
    adapter, checkpoints = _files(out / "adapter"), _files(out / "checkpoints")
    (out / ".adapter-serving.partial-k1ll3d").mkdir()  # what a kill during the final writes leaves (fileio)
    (out / ".adapter-serving.partial-k1ll3d" / "adapter_config.json").write_text("{")
    (out / ".report.k1ll3d.tmp.json").write_text("{")
    allowed = ["--eval-batch-size", "8", "--threads", "1", "--logging-steps", "2", "--save-total-limit", "1"]
    assert _run(["finetune", "--resume", str(out), *allowed, "-q"])[0] == 0
    assert _files(out / "adapter") == adapter and _files(out / "checkpoints") == checkpoints  # no training
    report = json.loads((out / "report.json").read_text())
    assert report["sessions"] == 2 and set(report["metrics"]) == {"before", "init", "after"}
    assert report["config"]["train"]["eval_batch_size"] == 8
    assert _status(out)["state"] == "finished"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the cut-off writes were removed


def test_resume_refuses_options_that_change_the_result(eval_failed, tmp_path):
    """Protects the saved configuration: a resume with another learning rate (and rank) is refused with status 2, a
    message naming each option with the run's value, and the run folder byte for byte as it was."""
    out = tmp_path / "run"
    shutil.copytree(eval_failed[0], out)
    before = _files(out)
    status, stderr = _run(["finetune", "--resume", str(out), "--learning-rate", "1e-3", "--r", "8", "-q"])
    assert status == 2
    assert "--learning-rate 0.001 (the run has 0.0005)" in stderr and "--r 8 (the run has 4)" in stderr
    status, stderr = _run(["finetune", "--resume", str(out), "--config", str(out / "config.yaml"), "-q"])
    assert status == 2 and "drop --config" in stderr  # a resume reads the run's own config.yaml
    assert _files(out) == before


def test_new_run_into_an_unfinished_run_points_to_resume(eval_failed, options, tmp_path):
    """Protects an unfinished run from a mistyped command: a new run into its folder is refused (status 2, folder
    unchanged) with the resume command."""
    out = tmp_path / "run"
    shutil.copytree(eval_failed[0], out)
    before = _files(out)
    status, stderr = _run(["finetune", *options, "--output-dir", str(out)])
    assert status == 2 and f"gora finetune --resume {out}" in stderr and "--overwrite" in stderr
    assert _files(out) == before


def test_failure_before_training_leaves_no_folder(options, tmp_path, monkeypatch):
    """Protects "bad input loses nothing" up to the last moment before training: a failure while writing the
    step-0 statistics (a full disk) leaves no output folder and no temporary one."""

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("gora.app.run.train.save_gradient_stats", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _run(["finetune", *options, "--output-dir", str(tmp_path / "run")])
    assert list(tmp_path.iterdir()) == []


def test_default_checkpoints_every_save_steps_and_every_epoch_end(options, tmp_path):
    """Protects what a run killed outright (SIGKILL, power loss) can lose under the default --save-strategy auto: at
    most min(--save-steps, one epoch) steps. 14 steps over 11-step epochs with --save-steps 4: checkpoints at
    4, 8, 12 (every 4 steps), 11 (the epoch's end) and 14 (the last step), each written once."""
    argv = [o for o in options if o != "--save-strategy" and o != "steps"]
    argv[argv.index("--max-steps") + 1] = "14"
    out = tmp_path / "run"
    assert _run(["finetune", *argv, "--save-total-limit", "none", "--output-dir", str(out)])[0] == 0
    steps = sorted(int(name.split("-")[1]) for name in _checkpoints(out))
    assert steps == [4, 8, 11, 12, 14]
    history = json.loads((out / "checkpoints/checkpoint-14/trainer_state.json").read_text())
    assert history["global_step"] == 14 and history["epoch"] > 1
