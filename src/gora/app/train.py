"""A whole fine-tune: model and data in, GoRA (or LoRA) adapter, evaluation and report out.

    DataConfig + TrainConfig + GoraConfig
        → load_task        (data.py: model folder + rows → tokenizer, model, encoded train/eval sets; input checked first)
        → evaluate         (before; evaluate.py: accuracy / exact match of the final answer, eval loss)
        → GoRA             (estimate → allocate → init; or a plain LoRA/rsLoRA adapter at the same r)
        ── the run folder appears (runfolder.py): status.json, config.yaml, init/ (step-0 adapter + statistics)
        → transformers.Trainer (checkpoints/; optionally a LoRA+ optimizer: make_optimizer; SIGINT/SIGTERM:
                           callbacks.py) → adapter/ (written as soon as training ends)
        → export_adapter   (adapter-serving/: the same adapter as plain LoRA for vLLM and llama.cpp, written with
                           adapter/)
        → evaluate         (after) → report.json + plots; status.json says "finished"

`resume_finetune` (`gora finetune --resume`) continues a run that stopped, from its saved configuration, step-0
adapter and last checkpoint. The `gora` command (cli.py) builds the dataclasses from its options; the same functions
serve Python callers. Tasks: sequence classification (accuracy) and causal-LM supervised fine-tuning (chat messages,
prompt/completion or prompt/response; loss on what the model should write; eval loss, or exact match of the final
answer under greedy generation). The model may be bfloat16/float16 (mixed-precision training) or 4-bit
(bitsandbytes; the library estimates through module hooks); under torchrun / accelerate launch every rank runs this
and rank 0 writes (parallel.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import GoraConfig
from ..distributed import world_size
from ..experts import check_parameter_layers
from ..export import DTYPES, export_adapter, unexported_serving
from ..fileio import staged_folder
from ..model import attach_record
from ..record import RECORD_NAME, GoraRecord
from .callbacks import EpochEndSave, GracefulStop, SignalStop, StatusCallback, signal_name
from .data import TaskData, UsageError, load_task
from .evaluate import evaluate, headline_metric
from .parallel import launched, on_main, same_on_all_ranks, shard
from .report import loss_curve
from .runconfig import DEFAULT_PRESET, PRESETS, AllocateConfig, DataConfig, Method, TrainConfig
from .runfolder import (
    ADAPTER,
    CONFIG,
    FAILED,
    FINISHED,
    INTERRUPTED,
    PROGRESS,
    RUNNING,
    SERVING,
    STATS,
    STATUS,
    TRAINER_STATE,
    RunFolder,
    RunStopped,
    check_resumable,
    config_dict,
    config_yaml,
    first_line,
    now,
    resume_configs,
)

if TYPE_CHECKING:
    from ..stats import GradientStats

logger = logging.getLogger(__name__)

# --- adapters and the optimizer ------------------------------------------------------------------------------------


def make_optimizer(
    model: nn.Module,
    *,
    learning_rate: float,
    weight_decay: float = 0.0,
    loraplus_lr_ratio: float | None = None,
) -> torch.optim.Optimizer | None:
    """The LoRA+ optimizer (AdamW; lora_B and other 1-D parameters at `loraplus_lr_ratio` x `learning_rate`), built
    with PEFT's `create_loraplus_optimizer`; None without a ratio (the Trainer then builds its default AdamW).

    Pass it as `Trainer(..., optimizers=(make_optimizer(...), None))`.
    """
    if loraplus_lr_ratio is None:
        return None
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model,
        torch.optim.AdamW,
        lr=learning_rate,
        loraplus_lr_ratio=loraplus_lr_ratio,
        loraplus_weight_decay=weight_decay,
    )


def lora_model(model: nn.Module, config: GoraConfig, method: Method) -> Any:
    """Plain LoRA at GoRA's settings: the same targets, r = config.r everywhere, α = config.lora_alpha, scaling α/r
    (`lora`, PEFT's default) or α/√r (`rslora`), PEFT's default init (B = 0)."""
    from peft import LoraConfig, get_peft_model

    from ..targets import find_targets

    targets = find_targets(model, config)
    modules = [t for t in targets if not t.parameter]
    kwargs = dict(config.lora_kwargs)
    kwargs.setdefault("fan_in_fan_out", bool(modules) and all(t.transposed for t in modules))
    if len(modules) < len(targets):  # target_parameters (docs/moe.md)
        kwargs["target_parameters"] = [t.name for t in targets if t.parameter]
    lora_config = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=[t.name for t in modules],
        use_rslora=method == "rslora",
        **kwargs,
    )
    peft_model = get_peft_model(model, lora_config)
    peft_model.__dict__["lora_shapes"] = {t.name: t.shape for t in targets}  # (E, m, n) for an expert stack
    return peft_model


# --- bitsandbytes 4-bit bases (--load-in-4bit) ---------------------------------------------------------------------
# The one place where the command adapts the library to a model loaded in 4-bit: today `get_gora_model` and its stages
# refuse quantized targets, so they run on a view of the model whose target Linear4bit layers are swapped for
# nn.Linear layers holding the dequantized weights (what `gora.get_qgora_model` does for a pre-quantized model); the
# adapter is then built on the 4-bit model itself. Once the library takes bitsandbytes layers directly, this becomes
# `contextlib.nullcontext()` (and the statistics can be kept in init/, see `_create_run_folder`).


def float32_trainables(peft_model: Any) -> None:
    """Keep every trained parameter in float32 (the LoRA weights are already, through PEFT's autocast_adapter_dtype;
    this also covers modules_to_save, e.g. a new classification head, on a bfloat16/float16 model), so the optimizer
    and fp16 loss scaling work in float32 while the frozen base stays in its dtype."""
    for param in peft_model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()


# --- the whole run -------------------------------------------------------------------------------------------------


def default_output_dir(train: TrainConfig, data: DataConfig) -> str:
    """outputs/<method>-<task>-<timestamp>."""
    return os.path.join("outputs", f"{train.method}-{data.task}-{datetime.now():%Y%m%d-%H%M%S}")


def estimation_loader(task: TaskData, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    """Batches for gradient estimation: the training set in a seeded random order that is the same on every pass
    (so the batches after the first N, which gamma='auto' takes as held-out batches, never repeat gradient ones)."""
    order = torch.randperm(len(task.train_set), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = [task.train_set[i] for i in order]
    # under torch.distributed rank r takes batches r, r + K, ...: the K ranks' i-th batches together are the i-th
    # batch of one process with batch size K x batch_size (as the Trainer's data-parallel batches are)
    batches = shard([rows[i : i + batch_size] for i in range(0, len(rows), batch_size)])
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, collate_fn=task.collator)


def check_run(data: DataConfig, train: TrainConfig) -> None:
    """Refuse option combinations the dataclasses cannot judge alone (each sees its own fields).

    Raises:
        UsageError: an --eval-metric the task does not have, a --report-to integration that is not installed.
    """
    if train.eval_metric == "exact_match" and data.task != "sft":
        raise UsageError("--eval-metric exact_match scores generated answers, which needs --task sft")
    if train.eval_metric == "accuracy" and data.task != "classification":
        raise UsageError("--eval-metric accuracy needs --task classification; sft has loss and exact_match")
    if train.report_to:
        from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

        for name in train.report_to:
            if name not in INTEGRATION_TO_CALLBACK:
                raise UsageError(
                    f"--report-to {name}: not a Trainer integration (one of {', '.join(sorted(INTEGRATION_TO_CALLBACK))})"
                )
            if name not in get_available_reporting_integrations():
                raise UsageError(f"--report-to {name}: {name} is not installed: pip install {name}")


def start_processes(data: DataConfig, train: TrainConfig | AllocateConfig, show_progress: bool) -> torch.device:
    """This process's device, with torch.distributed started first when torchrun / accelerate launch started
    several processes (parallel.py): the Trainer's own device logic (`TrainingArguments.device`).

    Raises:
        UsageError: a --dtype this device cannot train in (`check_precision`).
    """
    from .data import check_precision

    check_precision(data, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if not isinstance(train, TrainConfig):
        train = TrainConfig(batch_size=train.batch_size, train_seed=train.train_seed, threads=train.threads)
    device = _training_arguments(train, Path("."), show_progress, data).device
    if launched() and not torch.distributed.is_initialized():
        raise UsageError("started by torchrun / accelerate launch, but torch.distributed did not start")
    return device


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
    task, stats, timings = _start_run(data, train, gora, preset, output_dir, device)
    fingerprints = _fingerprints(task, gora)
    logger.info(
        "%s: %d training / %d evaluation examples from %s%s",
        data.task,
        len(task.train_set),
        len(task.eval_set),
        task.sources["train"],
        f" ({task.sources['format']})" if "format" in task.sources else "",
    )
    _training_arguments(train, existing.checkpoints, show_progress, data)  # refused settings found before writing
    metrics: dict[str, Any] = {}
    if train.eval_before:
        start = time.perf_counter()
        metrics["before"] = evaluate(task.model, task, data, train)
        timings["eval_before_s"] = time.perf_counter() - start
    peft_model, params, stats = _adapt(task, gora, train, timings, show_progress, stats)
    if train.method == "gora" and train.eval_before:
        start = time.perf_counter()
        metrics["init"] = evaluate(peft_model, task, data, train)
        timings["eval_init_s"] = time.perf_counter() - start
    progress = {
        "trained": False,
        "metrics": metrics,
        "params": params,
        "timings_s": timings,
        "fingerprints": fingerprints,
        "log_history": [],
        "sessions": 1,
        "processes": world_size(),
    }
    config = config_yaml("finetune", preset, data, train, gora)
    kept = stats if train.keep_stats else None
    on_main(
        lambda: _create_run_folder(output_dir, train.overwrite, config, progress, peft_model, kept),
        "writing the run folder",
    )
    run = RunFolder(output_dir)
    return _run_session(run, task, peft_model, data, train, gora, preset, show_progress)


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
    _training_arguments(train_config, run.checkpoints, show_progress, data_config)
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
    return _run_session(run, task, peft_model, data_config, train_config, gora_config, preset, show_progress)


def _fingerprints(task: TaskData, gora: GoraConfig) -> dict[str, str]:
    """sha256 of the base model's targets and leading weights (`gora.stats.model_fingerprint`) and of the encoded
    training and evaluation data, so a resume refuses a model or data that changed since the run started."""
    import hashlib

    from ..stats import model_fingerprint
    from ..targets import find_targets

    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()

    model = model_fingerprint(task.model, find_targets(task.model, gora))
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
    from ..stats import save_gradient_stats

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


def _final_folders(
    peft_model: Any, task: TaskData, run: RunFolder, serving: dict[str, Any]
) -> dict[str, Callable[[Path], None]]:
    """The final artifact folders, written as soon as training has finished (before evaluation), each whole and in
    this order: name in the run folder -> a function filling a fresh folder. Another artifact is one more entry.

    adapter/ is the adapter as trained (PEFT, with gora_record.json); adapter-serving/ is the same function as one
    plain LoRA adapter that vLLM and llama.cpp scale as PEFT does (`gora.export_adapter`), its summary put in
    `serving`."""

    def adapter(folder: Path) -> None:
        peft_model.save_pretrained(folder)
        task.tokenizer.save_pretrained(folder)

    def adapter_serving(folder: Path) -> None:
        result = export_adapter(run.adapter, folder, overwrite=True)
        final = dataclasses.replace(result, adapter_dir=str(run.adapter), output_dir=str(run.path / SERVING))
        serving.update(final.to_dict())

    if any(getattr(c, "target_parameters", None) for c in peft_model.peft_config.values()):  # docs/moe.md
        serving.update(unexported_serving(run.adapter))
        return {ADAPTER: adapter}
    return {ADAPTER: adapter, SERVING: adapter_serving}


def _run_session(
    run: RunFolder,
    task: TaskData,
    peft_model: Any,
    data: DataConfig,
    train: TrainConfig,
    gora: GoraConfig,
    preset: str | None,
    show_progress: bool,
) -> dict[str, Any]:
    """Train (from the last complete checkpoint, if any), write the final folders, evaluate, report; status.json
    says at every point where the run stands, and any stop raises `RunStopped` with what is safe."""
    progress = run.progress()
    timings = dict(progress["timings_s"])
    run.update_status(state=RUNNING, error=None, traceback=None, sessions=progress.get("sessions", 1))
    with GracefulStop() as stop:
        if not progress["trained"]:
            log_history = _train_stage(run, task, peft_model, data, train, show_progress, stop, timings)
            progress = run.progress()
        else:
            log_history = progress["log_history"]
        metrics = dict(progress["metrics"])
        try:
            if "after" not in metrics:
                run.update_status(stage="evaluate", message=f"evaluating; the adapter is in {run.adapter}")
                start = time.perf_counter()
                metrics["after"] = evaluate(peft_model, task, data, train)
                timings["eval_after_s"] = time.perf_counter() - start
                run.update_progress(metrics=metrics, timings_s=timings)
            run.update_status(stage="report", message=f"writing the report; the adapter is in {run.adapter}")
            record = getattr(peft_model, "gora_records", {}).get("default")
            report = _finetune_report(data, train, gora, preset, task, metrics, progress, timings, log_history, record)
            report["outputs"] = on_main(lambda: _write_report(report, run, log_history), "writing the report") or {}
        except BaseException as err:
            what = "the evaluation" if "after" not in metrics else "writing the report"
            raise _stopped_after_training(run, what, err) from err
    run.update_status(
        state=FINISHED, stage="done", message=f"finished; the adapter is in {run.adapter}, the report in {run.path}"
    )
    return report


def _train_stage(
    run: RunFolder,
    task: TaskData,
    peft_model: Any,
    data: DataConfig,
    train: TrainConfig,
    show_progress: bool,
    stop: GracefulStop,
    timings: dict[str, float],
) -> list[dict]:
    """Train from step 0 or the last complete checkpoint, then write the final folders; returns the training log.

    Raises:
        RunStopped: a signal (a checkpoint of the step is written first; a second signal stops at once) or a
            failure; status.json says which, at what step, and which checkpoint a resume continues from.
    """
    checkpoint = run.last_checkpoint()
    start_step = _checkpoint_step(checkpoint)
    run.update_status(
        state=RUNNING,
        stage="train",
        step=start_step,
        last_checkpoint=run.relative(checkpoint),
        message="training (Ctrl-C: finish the step, write a checkpoint and stop)",
    )
    start = time.perf_counter()
    trainer = None
    try:
        if checkpoint is not None and _finished_in(checkpoint):  # the Trainer would take one more step
            logger.info("%s holds the end of training: loading it", checkpoint)
            peft_model.load_adapter(str(checkpoint), adapter_name="default", is_trainable=True)
            log_history = json.loads((checkpoint / TRAINER_STATE).read_text())["log_history"]
            step = total = start_step
        else:
            callbacks = [stop, StatusCallback(run), *([EpochEndSave()] if train.save_strategy == "auto" else [])]
            trainer = _trainer(peft_model, task, data, train, run, show_progress, callbacks)
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            log_history = list(trainer.state.log_history)
            step, total = trainer.state.global_step, trainer.state.max_steps
    except BaseException as err:
        step = trainer.state.global_step if trainer is not None else start_step
        total = trainer.state.max_steps if trainer is not None else None
        raise _stopped_in_training(run, "training", err, step, total, stop) from err
    timings["train_s"] = timings.get("train_s", 0.0) + time.perf_counter() - start
    if stop.signum is not None and step < total:
        message = (
            f"interrupted by {signal_name(stop.signum)} at step {step} of {total}; checkpoint {run.last_checkpoint()} "
            f"written; resume with: {run.resume_command()}"
        )
        run.update_progress(timings_s=timings)
        run.update_status(state=INTERRUPTED, stage="train", step=step, message=message)
        raise RunStopped(message, 128 + stop.signum)
    run.update_status(stage="save", message="training finished; writing the adapter")
    try:
        start = time.perf_counter()

        def write_final_folders() -> None:
            serving: dict[str, Any] = {}
            for name, write in _final_folders(peft_model, task, run, serving).items():
                with staged_folder(run.path / name, overwrite=True) as tmp:
                    write(tmp)
            timings["save_s"] = time.perf_counter() - start
            run.update_progress(trained=True, log_history=log_history, timings_s=timings, serving=serving)

        on_main(write_final_folders, "writing the trained adapter")
    except BaseException as err:
        raise _stopped_in_training(run, "writing the trained adapter", err, step, total, stop) from err
    if stop.signum is not None:  # the signal came with the last step: training is complete, the adapter written
        message = (
            f"interrupted by {signal_name(stop.signum)} after training finished; the trained adapter is safe in "
            f"{run.adapter}; resume with: {run.resume_command()} (to evaluate and write the report)"
        )
        run.update_status(state=INTERRUPTED, stage="evaluate", adapter_safe=True, message=message)
        raise RunStopped(message, 128 + stop.signum)
    run.update_status(adapter_safe=True)
    return log_history


def _checkpoint_step(checkpoint: Path | None) -> int:
    return 0 if checkpoint is None else int(checkpoint.name.rsplit("-", 1)[1])


def _finished_in(checkpoint: Path) -> bool:
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    return state.get("max_steps", 0) > 0 and state["global_step"] >= state["max_steps"]


def _stopped_in_training(
    run: RunFolder, what: str, err: BaseException, step: int, total: int | None, stop: GracefulStop
) -> RunStopped:
    """Mark the run interrupted (a signal: stopped at once) or failed (an error) during `what` (training, or
    writing the trained adapter), and say which checkpoint a resume continues from."""
    at = f"step {step} of {total}" if total else f"step {step}"
    last = run.last_checkpoint()
    resume_from = f"checkpoint {last}" if last is not None else "step 0 (no checkpoint was written yet)"
    again = "a second " if stop.signum is not None else ""
    return _run_stopped(
        run,
        err,
        on_signal=lambda name: (
            f"stopped at once by {again}{name} at {at}; nothing was deleted; a resume continues from {resume_from}: "
            f"{run.resume_command()}"
        ),
        on_error=(
            f"{what} failed at {at} ({first_line(err)}); the step-0 adapter and the checkpoints in {run.path} are "
            f"kept; once the cause is fixed, resume from {resume_from} with: {run.resume_command()} (traceback in "
            f"{run.path / STATUS})"
        ),
        step=step,
    )


def _stopped_after_training(run: RunFolder, what: str, err: BaseException) -> RunStopped:
    """Mark a run whose training finished (the adapter is written) interrupted or failed during `what`."""
    again = "to evaluate and write the report"
    return _run_stopped(
        run,
        err,
        on_signal=lambda name: (
            f"stopped by {name} during {what}, after training finished; the trained adapter is safe in "
            f"{run.adapter}; resume with: {run.resume_command()} ({again})"
        ),
        on_error=(
            f"training finished but {what} failed ({first_line(err)}); the trained adapter is safe in {run.adapter}; "
            f"once the cause is fixed, resume with: {run.resume_command()} ({again}; traceback in {run.path / STATUS})"
        ),
        adapter_safe=True,
    )


def _run_stopped(
    run: RunFolder, err: BaseException, on_signal: Callable[[str], str], on_error: str, **status: Any
) -> RunStopped:
    """Record in status.json how the run stopped and return the RunStopped to raise: a signal (KeyboardInterrupt,
    SignalStop) marks it interrupted, exit status 128 + the signal number, message `on_signal(signal name)`; any
    other error marks it failed, exit status 1, with the error's first line and traceback. `status`: further
    status.json fields."""
    import traceback

    if isinstance(err, KeyboardInterrupt):
        signum = err.signum if isinstance(err, SignalStop) else signal.SIGINT
        message = on_signal(signal_name(signum))
        run.update_status(state=INTERRUPTED, message=message, **status)
        return RunStopped(message, 128 + signum)
    run.update_status(
        state=FAILED, message=on_error, error=first_line(err), traceback=traceback.format_exc(), **status
    )
    return RunStopped(on_error, 1)


def _start_run(
    data: DataConfig,
    run: TrainConfig | AllocateConfig,
    gora: GoraConfig,
    preset: str | None,
    output_dir: str,
    device: torch.device,
) -> tuple[TaskData, GradientStats | None, dict[str, float]]:
    """The first steps of `finetune` and `allocate_only`: the cheap checks (output folder, `run.load_stats` file),
    then the task and, with `run.load_stats`, the saved gradient statistics, timed ("load_s", "load_stats_s").

    Nothing is written, so a refusal here (a mismatched statistics file included) leaves no output folder.
    """
    from ..fileio import check_output_folder

    check_output_folder(output_dir, run.overwrite)  # before any slow step
    if run.load_stats is not None and not Path(run.load_stats).is_file():
        raise UsageError(f"--load-stats {run.load_stats!r}: no such file (write one with gora allocate --save-stats)")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    task = load_task(data, run, PRESETS[preset] if preset else None, device)
    timings["load_s"] = time.perf_counter() - start
    if run.load_stats is None:
        return task, None, timings
    start = time.perf_counter()
    stats = load_saved_stats(run.load_stats, task.model, gora)
    timings["load_stats_s"] = time.perf_counter() - start
    return task, stats, timings


def load_saved_stats(path: str, model: nn.Module, gora: GoraConfig) -> GradientStats:
    """Gradient statistics written by `gora allocate --save-stats`, for allocating (and initializing) on `model`.

    Raises:
        UsageError: not a statistics file, statistics of another model (`gora.load_gradient_stats` checks the
            fingerprint), of other target modules than `gora` selects (allocation would silently follow the file),
            or a sketch drawn with another seed (found here, before any evaluation or training).
    """
    from ..stats import load_gradient_stats
    from ..targets import find_targets

    try:
        stats = load_gradient_stats(path, model)
        wanted = [t.name for t in find_targets(model, gora)]
    except ValueError as err:
        raise UsageError(f"--load-stats {path!r} cannot be used: {err}") from err
    saved = [t.name for t in stats.targets]
    if saved != wanted:
        raise UsageError(
            f"--load-stats {path!r} holds statistics of {len(saved)} target modules but --target-modules selects "
            f"{len(wanted)} ({', '.join(sorted(set(saved) ^ set(wanted))[:4]) or 'another order'} differ): pass the "
            "--target-modules the statistics were saved with, or re-estimate without --load-stats"
        )
    if stats.sketches and stats.seed != gora.seed:
        raise UsageError(
            f"--load-stats {path!r} holds a sketch drawn with --seed {stats.seed}, this run has --seed {gora.seed}: "
            f"A0 must be the sketch's random matrix, so pass --seed {stats.seed}"
        )
    return stats


def _adapt(
    task: TaskData,
    gora: GoraConfig,
    train: TrainConfig,
    timings: dict[str, float],
    show_progress: bool,
    stats: GradientStats | None = None,
) -> tuple[Any, dict[str, Any], GradientStats | None]:
    """The adapter, its parameter counts and (GoRA) the gradient statistics it was built from: GoRA (estimating,
    or from `stats`), or plain LoRA/rsLoRA (no statistics)."""
    from ..model import RunOptions, build_estimated, estimate_and_allocate

    start = time.perf_counter()
    if train.method == "gora":
        loader = estimation_loader(task, train.batch_size, train.train_seed)
        options = RunOptions(show_progress=show_progress, stats=stats)
        estimated = estimate_and_allocate(task.model, gora, loader, options)
        peft_model = build_estimated(task.model, gora, estimated, options)
        stats = estimated.stats
        record = peft_model.gora_records["default"]
        for key, value in record.timings_s.items():
            timings[f"gora_{key}"] = value
        timings["gora_s"] = time.perf_counter() - start
        ranks = dict(record.ranks)
        adapter, lora = record.trainable_params, record.lora_params
        shapes = {k: tuple(v) for k, v in record.shapes.items()}
    else:
        peft_model = lora_model(task.model, gora, train.method)
        shapes = peft_model.lora_shapes
        ranks = dict.fromkeys(shapes, gora.r)
        adapter = lora = gora.r * sum((s[0] if len(s) == 3 else 1) * (s[-2] + s[-1]) for s in shapes.values())
        timings[f"{train.method}_init_s"] = time.perf_counter() - start
    float32_trainables(peft_model)
    trainable, total = peft_model.get_nb_trainable_parameters()
    params = {
        "adapter": adapter,
        "lora_same_r": lora,
        "ratio_to_lora": adapter / lora,
        "trainable_total": trainable,
        "model_total": total,
        "ranks": ranks,
        "shapes": {k: list(v) for k, v in shapes.items()},
    }
    return peft_model, params, stats


def _training_arguments(train: TrainConfig, folder: Path, show_progress: bool, data: DataConfig) -> Any:
    """The Trainer's settings (checkpoints in `folder`); built before the run folder is written, so settings the
    Trainer refuses are bad input like any other. Mixed precision follows --dtype (bf16 / fp16 autocast; the adapter
    and the other trained parameters stay float32)."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    # transformers 5 takes the warmup share as a float warmup_steps < 1 (warmup_ratio is gone); 4.x as warmup_ratio
    v5 = "warmup_ratio" not in names
    warmup = {"warmup_steps": train.warmup_ratio} if v5 else {"warmup_ratio": train.warmup_ratio}
    # later 5.x name gradient checkpointing activation_checkpointing (the old names warn)
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    checkpointing = {ckpt: train.gradient_checkpointing, f"{ckpt}_kwargs": {"use_reentrant": False}}
    return TrainingArguments(
        output_dir=str(folder),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.eval_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        **checkpointing,  # non-reentrant: the frozen base's inputs need no grad
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        **warmup,
        lr_scheduler_type=train.lr_scheduler,
        logging_steps=train.logging_steps,
        save_strategy="steps" if train.save_strategy == "auto" else train.save_strategy,  # auto: + EpochEndSave
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        seed=train.train_seed,
        report_to=list(train.report_to or []) or "none",
        bf16=data.dtype == "bfloat16",
        fp16=data.dtype == "float16",
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        disable_tqdm=not show_progress,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every trained parameter is used in every step
    )


def _trainer(
    peft_model: Any,
    task: TaskData,
    data: DataConfig,
    train: TrainConfig,
    run: RunFolder,
    show_progress: bool,
    callbacks: list[Any],
) -> Any:
    """transformers' Trainer for the run: checkpoints under <run>/checkpoints/, the LoRA+ optimizer if asked,
    TensorBoard logs (--report-to tensorboard) under <run>/logs/ unless TENSORBOARD_LOGGING_DIR says otherwise."""
    from transformers import Trainer
    from transformers.integrations import TensorBoardCallback

    optimizer = make_optimizer(
        peft_model,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        loraplus_lr_ratio=train.loraplus_lr_ratio,
    )
    trainer = Trainer(
        model=peft_model,
        args=_training_arguments(train, run.checkpoints, show_progress, data),
        train_dataset=task.train_set,
        data_collator=task.collator,
        optimizers=(optimizer, None),
        callbacks=callbacks,
    )
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(run.path / "logs")
    if data.task == "classification":
        # transformers 5: sequence-classification models take **kwargs, so the Trainer hands them num_items_in_batch
        # and then expects a loss normalized by it: it skips its division by the gradient-accumulation steps and
        # multiplies by the number of processes. Their loss is a plain mean that ignores num_items_in_batch
        # (measured on BERT, transformers 5.24: --gradient-accumulation-steps 2 doubled the loss and gradients).
        # Off, the Trainer divides by the accumulation steps and DDP averages the ranks' means: the mean over the
        # global batch. (Causal LMs do use num_items_in_batch: the loss is then the mean over all learned tokens.)
        trainer.model_accepts_loss_kwargs = False
    if not show_progress:  # -q: without tqdm the Trainer prints every log dict instead; the report keeps them
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def _finetune_report(
    data: DataConfig,
    train: TrainConfig,
    gora: GoraConfig,
    preset: str | None,
    task: TaskData,
    metrics: dict[str, Any],
    progress: dict[str, Any],
    timings: dict[str, float],
    log_history: list[dict],
    record: GoraRecord | None,
) -> dict[str, Any]:
    from .report import rank_table

    metric = headline_metric(data, train)
    params = progress["params"]
    return {
        "task": data.task,
        "method": train.method,
        "preset": preset if data.train_file is None or data.model is None else None,
        "metric": metric,
        "metrics": metrics,
        "params": params,
        "rank_table": rank_table(params["ranks"]).to_dict(),
        "timings_s": timings,
        "sources": task.sources,
        "sizes": {"train": len(task.train_set), "eval": len(task.eval_set)},
        "labels": task.label_names,
        "config": config_dict(preset, data, train, gora),
        "gora": {"num_batches": record.num_batches, "gamma": record.gamma, "extra": record.extra} if record else None,
        "sessions": progress.get("sessions", 1),
        "serving": progress.get("serving"),
        "log_history": log_history,
    }


def _write_report(report: dict[str, Any], run: RunFolder, log_history: list[dict]) -> dict[str, str]:
    """ranks.png, loss.png, then report.json, each written whole (`atomic_write`) into the run folder."""
    from ..fileio import atomic_write
    from .report import RankTable, plot_loss_curve, plot_rank_heatmap, write_json

    table = RankTable(
        **{
            "layers": report["rank_table"]["layers"],
            "types": report["rank_table"]["module_types"],
            "cells": report["rank_table"]["ranks"],
        }
    )
    title = f"{report['method']} ranks (r={report['config']['gora']['r']})"
    final = str(run.path)
    outputs = {
        "folder": final,
        "adapter": str(run.adapter),
        **({"adapter_serving": os.path.join(final, SERVING)} if os.path.isdir(os.path.join(final, SERVING)) else {}),
        "report": os.path.join(final, "report.json"),
        "status": os.path.join(final, STATUS),
        "init": str(run.init),
    }
    atomic_write(run.path / "ranks.png", lambda tmp: plot_rank_heatmap(table, tmp, title=title))
    outputs["rank_heatmap"] = os.path.join(final, "ranks.png")
    if loss_curve(log_history)[0]:
        loss_title = f"{report['method']} training loss"
        atomic_write(run.path / "loss.png", lambda tmp: plot_loss_curve(log_history, tmp, title=loss_title))
        outputs["loss_curve"] = os.path.join(final, "loss.png")
    if run.checkpoint_steps():
        outputs["checkpoints"] = str(run.checkpoints)
    report["outputs"] = outputs
    atomic_write(run.path / "report.json", lambda tmp: write_json(report, tmp))
    return outputs


# --- allocation only, and merging ----------------------------------------------------------------------------------


def allocate_only(
    data: DataConfig,
    alloc: AllocateConfig,
    gora: GoraConfig,
    *,
    preset: str | None = DEFAULT_PRESET,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Gradient estimation (or `alloc.load_stats`) and allocation, no training.

    Writes the output folder (ranks.png, report.json) and, with `alloc.save_stats`, the gradient statistics
    (safetensors, `gora.save_gradient_stats`). Returns the report.
    """
    from ..allocate import allocate_ranks
    from ..estimate import estimate_gradients
    from ..fileio import staged_folder
    from ..importance import compute_importances
    from .report import rank_table

    device = start_processes(data, alloc, show_progress)
    output_dir = alloc.output_dir or os.path.join("outputs", f"allocate-{datetime.now():%Y%m%d-%H%M%S}")
    output_dir = same_on_all_ranks(output_dir)
    load_stats, save_stats = alloc.load_stats, alloc.save_stats
    task, stats, timings = _start_run(data, alloc, gora, preset, output_dir, device)
    if stats is None:
        start = time.perf_counter()
        loader = estimation_loader(task, alloc.batch_size, alloc.train_seed)
        stats = estimate_gradients(task.model, gora, loader, show_progress=show_progress)
        timings["estimate_s"] = time.perf_counter() - start
    start = time.perf_counter()
    importances = compute_importances(task.model, stats, gora.importance)
    allocation = allocate_ranks(importances, stats.shapes, gora)
    timings["allocate_s"] = time.perf_counter() - start
    report = {
        "ranks": allocation.ranks,
        "importances": allocation.importances,
        "rank_table": rank_table(allocation.ranks).to_dict(),
        "params": {
            "adapter": allocation.trainable_params,
            "lora_same_r": allocation.lora_params,
            "ratio_to_lora": allocation.param_ratio,
        },
        "budget": allocation.budget,
        "num_batches": stats.num_batches,
        "stats": {"loaded_from": load_stats, "saved_to": save_stats},
        "timings_s": timings,
        "sources": task.sources,
        "config": {"data": dataclasses.asdict(data), "gora": gora.to_dict()},
    }
    report["outputs"] = {
        "folder": output_dir,
        "rank_heatmap": os.path.join(output_dir, "ranks.png"),
        "report": os.path.join(output_dir, "report.json"),
        "config": os.path.join(output_dir, CONFIG),
    }

    def write() -> None:
        from .report import plot_rank_heatmap, write_json

        with staged_folder(output_dir, alloc.overwrite) as tmp:
            plot_rank_heatmap(rank_table(allocation.ranks), tmp / "ranks.png", title=f"GoRA ranks (r={gora.r})")
            write_json(report, tmp / "report.json")
            (tmp / CONFIG).write_text(config_yaml("allocate", preset, data, alloc, gora))
        if save_stats is not None:
            from .. import save_gradient_stats

            save_gradient_stats(stats, save_stats, task.model)

    on_main(write, "writing the output folder")
    return report


def merge_adapter(
    adapter: str,
    output_dir: str,
    *,
    base: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> dict[str, str]:
    """Merge a saved adapter into its base model (`merge_and_unload`, in float32) and save a plain transformers
    folder (safetensors) that loads without PEFT.

    Args:
        adapter: Folder with adapter_config.json (as `gora finetune` writes under adapter/).
        output_dir: Where to write the merged model (and the tokenizer, if the adapter folder or base has one).
        base: Base model folder (default: `base_model_name_or_path` in adapter_config.json).
        dtype: dtype of the saved weights ("float32", "bfloat16", "float16").
        overwrite: Replace a non-empty `output_dir`.

    Raises:
        UsageError: no adapter there, no base model, or a base model whose modules do not match the adapter's
            (nothing is written).
    """
    import json

    from peft import PeftConfig, PeftModel, PeftType
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from ..fileio import check_output_folder, staged_folder

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise UsageError(f"{adapter!r} has no adapter_config.json: give the adapter folder (e.g. <run>/adapter)")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    check_output_folder(output_dir, overwrite)
    peft_config = PeftConfig.from_pretrained(adapter)
    base = base or peft_config.base_model_name_or_path
    if not base or not (Path(base) / "config.json").is_file():
        raise UsageError(
            f"base model {base!r} not found: pass --base, the folder of the model the adapter was made on"
        )
    task_type = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("task_type")
    loader = AutoModelForSequenceClassification if task_type == "SEQ_CLS" else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if task_type == "SEQ_CLS":
        kwargs.update(_head_kwargs(adapter))
    model = loader.from_pretrained(base, **kwargs)
    if peft_config.peft_type == PeftType.LORA and (Path(adapter) / "adapter_model.safetensors").is_file():
        _check_base_fits(model, adapter, base)
    _check_base_weights(model, adapter, base)
    try:
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as err:  # what PEFT raises for a base it cannot load the adapter on
        raise UsageError(f"the adapter {adapter!r} cannot be loaded on base model {base!r}: {err}") from err
    merged = merged.to(DTYPES[dtype])
    with staged_folder(output_dir, overwrite) as tmp:
        merged.save_pretrained(tmp)
        for folder in (adapter, base):
            try:
                AutoTokenizer.from_pretrained(folder).save_pretrained(tmp)
                break
            except Exception:  # no tokenizer there; try the next folder
                continue
    return {"model": output_dir, "base": base, "adapter": adapter, "dtype": dtype}


def _check_base_fits(model: nn.Module, adapter: str, base: str) -> None:
    """Every module the LoRA adapter adapts exists in `model` with the weight shape its A and B imply.

    Raises:
        UsageError: naming the first modules that are missing or of another shape.
    """
    from ..export import read_adapter

    saved = read_adapter(adapter)
    problems, covered = check_parameter_layers(  # target_parameters: fused expert stacks (docs/moe.md)
        model,
        saved.config.target_parameters or [],
        {n: (saved.tensors[x.a_key].shape, saved.tensors[x.b_key].shape) for n, x in saved.layers.items()},
    )
    for name, layer in ((n, x) for n, x in saved.layers.items() if n not in covered):
        A, B = saved.tensors[layer.a_key], saved.tensors[layer.b_key]
        out_in = (int(B.shape[0]), int(A.shape[1]))
        if layer.a_key.endswith("lora_embedding_A") or saved.config.fan_in_fan_out:  # weight stored [in, out]
            out_in = out_in[::-1]
        try:
            weight = model.get_submodule(name).weight
        except AttributeError:
            problems.append(f"{name} does not exist in the base model")
            continue
        if tuple(weight.shape[:2]) != out_in:
            problems.append(f"{name} has a weight of shape {tuple(weight.shape)}, the adapter's is {out_in}")
    if problems:
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise UsageError(
            f"base model {base!r} does not match the adapter {adapter!r}: {'; '.join(problems[:2])}{more}. Pass "
            "--base, the folder of the model the adapter was made on"
        )


def _check_base_weights(model: nn.Module, adapter: str, base: str) -> None:
    """The base's weights are those the GoRA adapter was made on (`GoraRecord.check_base`), where it can tell.

    Raises:
        UsageError: they differ (nothing is written).
    """
    if not (Path(adapter) / RECORD_NAME).is_file():
        logger.info("%s has no %s: the base model's weights are not checked, only its shapes", adapter, RECORD_NAME)
        return
    try:
        checked = GoraRecord.load(adapter).check_base(model)
    except ValueError as err:
        raise UsageError(f"{err} (base model {base!r}, adapter {adapter!r}): pass --base, its folder") from err
    if not checked:
        logger.warning(
            "the base model's weights are not checked against the adapter's record (it was made on a quantized base "
            "or by an older gora): make sure %r is the model the adapter was made on",
            base,
        )


def _head_kwargs(adapter: str) -> dict[str, Any]:
    """num_labels of a classification adapter, read from the saved head's weight shape."""
    from safetensors import safe_open

    path = Path(adapter) / "adapter_model.safetensors"
    if not path.is_file():
        return {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            if "modules_to_save" not in key and key.endswith(("classifier.weight", "score.weight", "out_proj.weight")):
                return {"num_labels": handle.get_slice(key).get_shape()[0]}
    return {}
