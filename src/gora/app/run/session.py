"""One session of a fine-tune's run folder, from training to the report: train (from step 0 or the last complete
checkpoint), write the final folders (adapter/, adapter-serving/), evaluate, report; status.json says at every point
where the run stands, and a signal or a failure stops the run with `RunStopped`, whose message says what is safe and
how to resume."""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...config import GoraConfig
from ...export import export_adapter, unexported_serving
from ...fileio import staged_folder
from ..config.runconfig import DataConfig, TrainConfig
from ..parallel import on_main
from ..tasks.registry import evaluate
from ..tasks.taskkind import TaskData
from .callbacks import EpochEndSave, GracefulStop, SignalStop, StatusCallback, signal_name
from .report import (
    finetune_report,
    write_report,
)
from .runfolder import (
    ADAPTER,
    FAILED,
    FINISHED,
    INTERRUPTED,
    RUNNING,
    SERVING,
    STATUS,
    TRAINER_STATE,
    RunFolder,
    RunStopped,
    first_line,
)
from .trainer_setup import make_trainer

logger = logging.getLogger(__name__)


def run_session(
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
            report = finetune_report(data, train, gora, preset, task, metrics, progress, timings, log_history, record)
            report["outputs"] = on_main(lambda: write_report(report, run, log_history), "writing the report") or {}
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
            trainer = make_trainer(peft_model, task, data, train, run, show_progress, callbacks)
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


def _final_folders(
    peft_model: Any, task: TaskData, run: RunFolder, serving: dict[str, Any]
) -> dict[str, Callable[[Path], None]]:
    """The final artifact folders, written as soon as training has finished (before evaluation), each whole and in
    this order: name in the run folder -> a function filling a fresh folder. Another artifact is one more entry.

    adapter/ is the adapter as trained (PEFT and vLLM >= 0.32, with gora_record.json); adapter-serving/ is the same
    function as one plain LoRA adapter that older vLLM, SGLang and llama.cpp scale as PEFT does
    (`gora.export_adapter`), its summary put in `serving`."""

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
