"""A whole fine-tune, top to bottom in call order: model and data in, GoRA (or LoRA) adapter, evaluation and report out.

    DataConfig + TrainConfig + GoraConfig
        → startup.py       (option checks, processes and device; load_task: model folder + rows → tokenizer, model,
                           encoded train/eval sets, input checked first; --load-stats read and checked)
        → evaluate         (before; the task kind's metrics, tasks.py: accuracy / exact match, eval loss)
        → adapters.py      (GoRA through the library: estimate → allocate → init; or plain LoRA/rsLoRA, same r)
        ── the run folder appears (runfolder.py): status.json, config.yaml, init/ (step-0 adapter + statistics)
        → session.py       (transformers.Trainer, trainer_setup.py: checkpoints/, optionally a LoRA+ optimizer;
                           SIGINT/SIGTERM: callbacks.py → adapter/ and adapter-serving/ written as soon as training
                           ends → evaluate (after) → report.json + plots, report.py; status.json says "finished")

`resume_finetune` (`gora finetune --resume`) continues a run that stopped, from its saved configuration, step-0
adapter and last checkpoint. The `gora` command (cli.py) builds the dataclasses from its options; the same functions
serve Python callers. Tasks: sequence classification (accuracy) and causal-LM supervised fine-tuning (chat messages,
prompt/completion or prompt/response; loss on what the model should write; eval loss, or exact match of the final
answer under greedy generation). The model may be bfloat16/float16 (mixed-precision training) or 4-bit
(bitsandbytes; the library estimates through module hooks); under torchrun / accelerate launch every rank runs this
and rank 0 writes (parallel.py). `gora allocate` is allocate.py, `gora merge` merge.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from typing import TYPE_CHECKING, Any

from ...config import GoraConfig
from ...distributed import world_size
from ...fileio import staged_folder
from ...gamma import check_start
from ...model import attach_record
from ...provenance import targets_fingerprint
from ...record import RECORD_NAME, GoraRecord
from ...stats import save_gradient_stats
from ..config.runconfig import DEFAULT_PRESET, PRESETS, DataConfig, TrainConfig
from ..errors import UsageError
from ..parallel import on_main, same_on_all_ranks
from ..tasks.data import load_task
from ..tasks.registry import evaluate
from ..tasks.taskkind import TaskData
from .adapters import build_adapter, float32_trainables
from .runfolder import (
    CONFIG,
    PROGRESS,
    RUNNING,
    STATS,
    STATUS,
    TRAINER_STATE,
    RunFolder,
    check_resumable,
    config_yaml,
    now,
    resume_configs,
)
from .session import run_session
from .startup import check_run, default_output_dir, start_processes, start_run
from .trainer_setup import training_arguments

if TYPE_CHECKING:
    from ...stats import GradientStats

logger = logging.getLogger(__name__)


def finetune(
    data: DataConfig,
    train: TrainConfig,
    gora: GoraConfig,
    *,
    preset: str | None = DEFAULT_PRESET,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run a whole fine-tune and write its output folder; returns the report (also written as report.json).

    Nothing is written before training starts, so bad input (found while loading, estimating, initializing or
    evaluating before training) leaves no folder. From then on the folder exists and says where the run stands
    (status.json, runfolder.py): the configuration, the gradient statistics, the step-0 adapter and the checkpoints
    survive any failure, and `resume_finetune` (`gora finetune --resume`) continues the run. The trained adapter is
    written as soon as training ends, before the evaluation and the report.

    Raises:
        UsageError / ValueError: bad input, with what to change (nothing is written).
        RunStopped: the run stopped after training started (a signal, a failure); the message says what is safe
            and how to resume.
    """
    check_run(data, train)
    device = start_processes(data, train, show_progress)
    output_dir = same_on_all_ranks(train.output_dir or default_output_dir(train, data))
    train = dataclasses.replace(train, output_dir=output_dir)
    existing = RunFolder(output_dir)
    if existing.is_run() and not train.overwrite:
        state = existing.status().get("state", "unknown state")
        raise UsageError(
            f"output folder {output_dir!r} holds a gora finetune run ({state}): continue it with "
            f"`{existing.resume_command()}`, choose another --output-dir, or pass --overwrite to replace it"
        )
    task, stats, timings = start_run(data, train, gora, preset, output_dir, device)
    fingerprints = _fingerprints(task, gora)
    logger.info(
        "%s: %d training / %d evaluation examples from %s%s",
        data.task,
        len(task.train_set),
        len(task.eval_set),
        task.sources["train"],
        f" ({task.sources['format']})" if "format" in task.sources else "",
    )
    training_arguments(train, existing.checkpoints, show_progress, data)  # refused settings found before writing
    metrics: dict[str, Any] = {}
    if train.eval_before:
        start = time.perf_counter()
        metrics["before"] = evaluate(task.model, task, data, train)
        timings["eval_before_s"] = time.perf_counter() - start
    peft_model, params, stats = build_adapter(task, gora, train, timings, show_progress, stats)
    start_check = None
    if train.method == "gora" and train.eval_before:
        start = time.perf_counter()
        metrics["init"] = evaluate(peft_model, task, data, train)
        timings["eval_init_s"] = time.perf_counter() - start
        record = peft_model.gora_records[peft_model.active_adapter]  # its gamma: the chosen one under gamma="auto"
        start_check = check_start(metrics["before"]["loss"], metrics["init"]["loss"], record.gamma, "eval set")
    progress = {
        "trained": False,
        "metrics": metrics,
        "params": params,
        "timings_s": timings,
        "fingerprints": fingerprints,
        "log_history": [],
        "sessions": 1,
        "processes": world_size(),
        "start_check": start_check.to_dict() if start_check else None,
    }
    config = config_yaml("finetune", preset, data, train, gora)
    kept = stats if train.keep_stats else None
    on_main(
        lambda: _create_run_folder(output_dir, train.overwrite, config, progress, peft_model, kept),
        "writing the run folder",
    )
    run = RunFolder(output_dir)
    return run_session(run, task, peft_model, data, train, gora, preset, show_progress)


def resume_finetune(
    run_dir: str | os.PathLike[str],
    *,
    preset: str | None = None,
    data: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    gora: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Continue a fine-tune that stopped (`gora finetune --resume <run_dir>`); returns the report.

    The run's saved configuration is used; `preset`, `data`, `train`, `gora` are settings given for this resume
    (field -> value), refused when they would change the result (runfolder.RESUME_FIXED). The adapter is rebuilt from
    the saved step-0 adapter (never re-estimated) and the Trainer continues from the last complete checkpoint
    (optimizer, scheduler, RNG and data order restored), so the result equals that of an uninterrupted run. A run
    whose training had finished is evaluated and reported from its saved adapter.

    Raises:
        UsageError: not a resumable run, a refused option, or a model/data that differ from the run's (nothing in
            the run folder is changed).
        RunStopped: as `finetune`.
    """
    from peft import PeftModel

    run = RunFolder(run_dir)
    check_resumable(run)
    preset, data_config, train_config, gora_config = resume_configs(
        run, preset=preset, data=data, train=train, gora=gora
    )
    device = start_processes(data_config, train_config, show_progress)
    progress = run.progress()
    started_with = progress.get("processes", 1)
    if started_with != world_size():
        raise UsageError(
            f"--resume {run.path}: the run was started with {started_with} process(es) and this is {world_size()}; "
            "the batch size is per process, so another number would train another adapter: resume with "
            f"`{run.resume_command(processes=started_with)}`"
        )
    task = load_task(data_config, train_config, PRESETS[preset] if preset else None, device)
    _check_fingerprints(run, progress.get("fingerprints", {}), _fingerprints(task, gora_config))
    training_arguments(train_config, run.checkpoints, show_progress, data_config)
    # the trained adapter when training had finished; else the step-0 adapter, which the checkpoint then updates
    source = run.adapter if progress["trained"] else run.init
    peft_model = PeftModel.from_pretrained(task.model, str(source), is_trainable=not progress["trained"])
    float32_trainables(peft_model)
    if (source / RECORD_NAME).is_file():
        attach_record(peft_model, GoraRecord.load(source))

    def start_session() -> None:  # after every rank has checked the run (check_resumable reads status.json)
        for folder in run.incomplete_checkpoints():
            logger.warning("removing %s: a checkpoint whose writing was cut off (no %s)", folder, TRAINER_STATE)
            shutil.rmtree(folder)
        for path in run.cut_off_writes():
            logger.warning("removing %s: left by a write that was cut off", path)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        run.update_progress(sessions=progress.get("sessions", 1) + 1)

    on_main(start_session, "starting the resumed session")
    return run_session(run, task, peft_model, data_config, train_config, gora_config, preset, show_progress)


def _fingerprints(task: TaskData, gora: GoraConfig) -> dict[str, str]:
    """sha256 of the base model's targets and leading weights (`gora.provenance.targets_fingerprint`) and of the encoded
    training and evaluation data, so a resume refuses a model or data that changed since the run started."""
    import hashlib

    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()

    model = targets_fingerprint(task.model, gora)
    return {
        "model": model,
        "train": digest(task.train_set),
        "eval": digest([task.eval_set, task.eval_rows]),
    }


def _check_fingerprints(run: RunFolder, saved: dict[str, str], now: dict[str, str]) -> None:
    changed = [name for name in ("model", "train", "eval") if name in saved and saved[name] != now[name]]
    if changed:
        what = {"model": "the base model's weights", "train": "the training data", "eval": "the evaluation data"}
        raise UsageError(
            f"--resume {run.path}: {' and '.join(what[c] for c in changed)} differ from those the run started with "
            "(sha256 in progress.json): restore them, or start a new run with another --output-dir"
        )


def _create_run_folder(
    output_dir: str,
    overwrite: bool,
    config: str,
    progress: dict[str, Any],
    peft_model: Any,
    stats: GradientStats | None,
) -> RunFolder:
    """The run folder, made whole under a temporary name and renamed into place just before training: the
    configuration, the progress so far, init/ (the step-0 adapter: PEFT's own save plus gora_record.json; for GoRA
    the gradient statistics `stats`, if given, for --load-stats), an empty checkpoints/ and status.json (running).
    A resume rebuilds the adapter from init/, so it never estimates."""

    run = RunFolder(output_dir)
    with staged_folder(output_dir, overwrite) as tmp:
        staged = RunFolder(tmp)
        staged.write_text(CONFIG, config)
        staged.write(PROGRESS, progress)
        peft_model.save_pretrained(staged.init)
        if stats is not None:
            save_gradient_stats(stats, staged.init / STATS, peft_model.get_base_model())
        staged.checkpoints.mkdir()
        staged.write(STATUS, run.status_fields(state=RUNNING, stage="train", started=now(), step=0))
    return run
