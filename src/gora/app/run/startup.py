"""The first steps of `gora finetune` and `gora allocate`, before anything is written: option combinations checked,
the processes and the device (torch.distributed under torchrun / accelerate launch), the task loaded and, with
--load-stats, the saved gradient statistics read and checked against the model and the configuration."""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...config import GoraConfig
from ...fileio import check_output_folder
from ...stats import load_gradient_stats
from ..config.cliconfig import name_options
from ..config.runconfig import PRESETS, AllocateConfig, DataConfig, TrainConfig
from ..errors import UsageError
from ..parallel import launched
from ..tasks.data import load_task
from ..tasks.models import check_precision
from ..tasks.registry import task_kind
from ..tasks.taskkind import TaskData
from .trainer_setup import training_arguments

if TYPE_CHECKING:
    from ...stats import GradientStats

logger = logging.getLogger(__name__)


def default_output_dir(train: TrainConfig, data: DataConfig) -> str:
    """outputs/<method>-<task>-<timestamp>."""
    return os.path.join("outputs", f"{train.method}-{data.task}-{datetime.now():%Y%m%d-%H%M%S}")


def check_run(data: DataConfig, train: TrainConfig) -> None:
    """Refuse option combinations the dataclasses cannot judge alone (each sees its own fields).

    Raises:
        UsageError: an --eval-metric the task does not have, a --report-to integration that is not installed.
    """
    refused = task_kind(data.task).refused_metrics.get(train.eval_metric or "")
    if refused:
        raise UsageError(refused)
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

    check_precision(data, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if not isinstance(train, TrainConfig):
        train = TrainConfig(batch_size=train.batch_size, train_seed=train.train_seed, threads=train.threads)
    device = training_arguments(train, Path("."), show_progress, data).device
    if launched() and not torch.distributed.is_initialized():
        raise UsageError("started by torchrun / accelerate launch, but torch.distributed did not start")
    return device


def start_run(
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
            fingerprint), of other target modules than `gora` selects, or a sketch drawn with another seed (found
            here, before any evaluation or training; the library's message names the options to change).
    """
    try:
        return load_gradient_stats(path, model, config=gora)
    except ValueError as err:
        raise UsageError(f"--load-stats {path!r} cannot be used: {name_options(str(err), GoraConfig)}") from err
