"""What a kind of task (classification, SFT, ...) is to the application: `TaskKind`, the object that owns a task's
columns, model type, labels, encoding, collator, model head, Trainer adjustments and evaluation; and `TaskData`,
everything loaded for a run. Each kind is one module (classification.py, sft.py) registered in tasks.py; the rest of
the application asks the run's `TaskKind` instead of testing the task's name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from torch import nn

    from ..config.runconfig import DataConfig, TrainConfig


@dataclass
class TaskData:
    """Everything loaded for a run: model, tokenizer, rows and encoded sets (`eval_examples`: the SFT evaluation
    examples as text, for generation)."""

    model: nn.Module
    tokenizer: Any
    model_path: str
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    train_set: list[dict[str, Any]]
    eval_set: list[dict[str, Any]]
    collator: Any
    label_names: list[str] | None = None
    sources: dict[str, str] = field(default_factory=dict)
    eval_examples: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class Encoded:
    """A task's encoded sets: token ids per example, the collator that pads a batch, and (SFT) the evaluation
    examples as text."""

    train_set: list[dict[str, Any]]
    eval_set: list[dict[str, Any]]
    collator: Any
    eval_examples: list[Any] = field(default_factory=list)


class TaskKind:
    """One kind of task; a subclass per kind, one instance registered in tasks.py under `name` (--task)."""

    name: str
    default_metric: str  # the headline metric without --eval-metric
    refused_metrics: ClassVar[
        dict[str, str]
    ]  # an --eval-metric this kind does not have -> the message that refuses it

    def headline_metric(self, train: TrainConfig) -> str:
        """The metric a run reports first: --eval-metric, else the kind's default."""
        return train.eval_metric or self.default_metric

    def check_model_type(self, model_type: str) -> None:
        """Raise UsageError when a model of this transformers `model_type` cannot do this task."""
        raise NotImplementedError

    def columns(self, data: DataConfig, rows: list[dict[str, Any]], sources: dict[str, str]) -> tuple[list, list]:
        """(the columns every row needs, the option naming each), from the training `rows`."""
        raise NotImplementedError

    def labels(self, data: DataConfig, model_config: Any, rows: list[dict[str, Any]]) -> Any:
        """The label space of `rows` (classification), or None."""
        return None

    def prepare_tokenizer(self, tokenizer: Any) -> None:
        """Adjust the tokenizer for training (e.g. the padding side)."""

    def encode(
        self,
        data: DataConfig,
        tokenizer: Any,
        labels: Any,
        train_rows: list[dict[str, Any]],
        eval_rows: list[dict[str, Any]],
        sources: dict[str, str],
    ) -> Encoded:
        raise NotImplementedError

    def load_model(self, path: str, kwargs: dict[str, Any], data: DataConfig, model_config: Any, labels: Any) -> Any:
        """The model for this task, `from_pretrained(path, **kwargs)` with the task's head."""
        raise NotImplementedError

    def adjust_trainer(self, trainer: Any) -> None:
        """Adjust transformers' Trainer for this task's loss."""

    def evaluate(self, model: nn.Module, task: TaskData, data: DataConfig, train: TrainConfig) -> dict[str, Any]:
        """The task's metrics on this rank's share of the evaluation set, combined over ranks."""
        raise NotImplementedError
