"""The task kinds the application fine-tunes for, by --task name: one module each (classification.py, sft.py), one
line here. A new kind is a `TaskKind` subclass in its own module, added to `TASKS` (and to `runconfig.Task`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...batches import model_device
from .classification import Classification
from .sft import Sft
from .taskkind import TaskData, TaskKind

if TYPE_CHECKING:
    from ..config.runconfig import DataConfig, TrainConfig

TASKS: dict[str, TaskKind] = {kind.name: kind for kind in (Classification(), Sft())}


def task_kind(name: str) -> TaskKind:
    """The task kind of --task `name`."""
    return TASKS[name]


def headline_metric(data: DataConfig, train: TrainConfig) -> str:
    """The metric a run reports first: --eval-metric, else accuracy (classification) or the eval loss (SFT)."""
    return task_kind(data.task).headline_metric(train)


def evaluate(model: nn.Module, task: TaskData, data: DataConfig, train: TrainConfig) -> dict[str, Any]:
    """The task's metrics: classification {"accuracy", "loss"}; sft {"loss"}, with --eval-metric exact_match also
    {"exact_match", "examples", "generated"}. Under torch.distributed: this rank's share, combined over ranks."""
    with _autocast(model, data):
        return task_kind(data.task).evaluate(model, task, data, train)


def _autocast(model: nn.Module, data: DataConfig) -> Any:
    """Autocast in the model's dtype when it is bfloat16/float16 (as the Trainer trains it), else nothing."""
    import contextlib

    if data.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(model_device(model).type, dtype=getattr(torch, data.dtype))
