"""gora.app.run.runfolder: what a resume may change (every option decided, in one place), the saved configuration's
round trip, which runs may be resumed, and which checkpoint a resume continues from."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys

import pytest

from gora.app.commands.cli import build_parser
from gora.app.config.runconfig import DataConfig, TrainConfig
from gora.app.errors import UsageError
from gora.app.run.runfolder import (
    CONFIG,
    RESUME_FIXED,
    RESUME_MAY_CHANGE,
    STATUS,
    RunFolder,
    check_resumable,
    config_yaml,
    load_run_config,
    resume_configs,
)
from gora.config import GoraConfig


def _finetune_options() -> set[str]:
    return {a.dest for a in build_parser("finetune")._actions} - {"help", "quiet", "resume", "config", "print_config"}


def test_every_option_is_decided_once():
    """Protects the resume rules: every field of the three run dataclasses and every `gora finetune` option is in
    exactly one of RESUME_FIXED / RESUME_MAY_CHANGE, each with its reason, so a new option forces a decision."""
    fields = {f.name for cls in (DataConfig, TrainConfig, GoraConfig) for f in dataclasses.fields(cls)}
    decided = set(RESUME_FIXED) | set(RESUME_MAY_CHANGE)
    assert not set(RESUME_FIXED) & set(RESUME_MAY_CHANGE)
    assert decided == fields | {"preset"}
    assert _finetune_options() <= decided
    assert all(isinstance(r, str) and r for r in [*RESUME_FIXED.values(), *RESUME_MAY_CHANGE.values()])


def _configs():
    data = DataConfig(model="m", train_file="t.jsonl", max_train_samples=40)
    train = TrainConfig(output_dir="runs/x", learning_rate=1e-3, save_total_limit=None, loraplus_lr_ratio=16.0)
    gora = GoraConfig(
        target_modules=["query", "value"],
        gamma="auto",
        gamma_candidates=(0.1, 0.01),
        lora_kwargs={"task_type": "SEQ_CLS", "modules_to_save": ["classifier"]},
    )
    return data, train, gora


def test_saved_config_loads_back_equal(tmp_path):
    """Protects config.yaml: the effective configuration, written as a --config file, loads back into equal
    dataclasses (tuples, 'auto', None and lora_kwargs included), except output_dir, which it leaves unset."""
    data, train, gora = _configs()
    path = tmp_path / "config.yaml"
    path.write_text(config_yaml("finetune", "minilm-rt", data, train, gora))
    expected = dataclasses.replace(train, output_dir=None)
    assert load_run_config(path) == ("minilm-rt", data, expected, gora)


@pytest.fixture
def run(tmp_path) -> RunFolder:
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.write_text(CONFIG, config_yaml("finetune", None, *_configs()))
    folder.write(STATUS, {"state": "interrupted"})
    return folder


def test_resume_configs_layer_allowed_options_and_refuse_the_rest(run):
    """Protects the resume rules: harmless options are applied, options given again with the run's own value pass,
    and every option that would change the result is refused in one message naming it and the run's value."""
    _, _, train, gora = resume_configs(
        run,
        train={"threads": 1, "eval_batch_size": 8, "learning_rate": 0.001, "output_dir": str(run.path)},
        gora={"target_modules": ("query", "value"), "offload_to_cpu": True},
    )
    assert (train.threads, train.eval_batch_size, gora.offload_to_cpu) == (1, 8, True)
    assert train.output_dir == str(run.path) and train.learning_rate == 1e-3
    with pytest.raises(UsageError) as err:
        resume_configs(run, preset="smollm2-gsm", data={"max_length": 64}, gora={"target_modules": ("query",)})
    message = str(err.value)
    for part in ("--preset smollm2-gsm (the run has None)", "--max-length 64 (the run has 128)", "--target-modules"):
        assert part in message, message
    with pytest.raises(UsageError, match="--output-dir elsewhere"):
        resume_configs(run, train={"output_dir": "elsewhere"})
    with pytest.raises(UsageError, match="--threads must be a positive integer"):
        resume_configs(run, train={"threads": 0})


def test_check_resumable(run):
    """Protects against resuming what must not be: a finished run, or one whose process is alive on this machine;
    a run left "running" by a process that is gone (killed) may be resumed."""
    assert check_resumable(run)["state"] == "interrupted"
    run.update_status(state="finished")
    with pytest.raises(UsageError, match="has finished"):
        check_resumable(run)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run.write(STATUS, {"state": "running", "pid": alive.pid, "host": socket.gethostname()})
        with pytest.raises(UsageError, match=f"still running \\(process {alive.pid}\\)"):
            check_resumable(run)
    finally:
        alive.kill()
        alive.wait()
    assert check_resumable(run)["state"] == "running"  # its process is gone
    with pytest.raises(UsageError, match=r"no status\.json"):
        check_resumable(RunFolder(run.path.parent))


def test_last_checkpoint_is_the_latest_complete_one(run):
    """Protects the resume point: a checkpoint whose writing was cut off (no trainer_state.json, which the Trainer
    writes last) is never resumed from, whatever its step."""
    for step, complete in ((3, True), (12, True), (20, False)):
        folder = run.checkpoints / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"x")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert run.last_checkpoint() == run.checkpoints / "checkpoint-12"
    assert run.incomplete_checkpoints() == [run.checkpoints / "checkpoint-20"]
    assert run.relative(run.last_checkpoint()) == os.path.join("checkpoints", "checkpoint-12")
