"""Sequence classification: a label column mapped to class ids, texts (or text pairs) tokenized, a classification
head on the model, accuracy and the mean loss as metrics. `Classification` is the task kind (--task classification)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...batches import eval_mode, model_device, to_device
from ..errors import UsageError
from ..parallel import shard, weighted_means
from .evaluate import by_length
from .taskkind import Encoded, TaskData, TaskKind


@dataclass(frozen=True)
class LabelSpace:
    """How the label column maps to class ids."""

    label2id: dict[str, int]
    names: list[str]

    @property
    def num_labels(self) -> int:
        return len(self.names)

    def encode(self, value: Any) -> int:
        return self.label2id[_label_key(value)]


def _label_key(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def label_space(
    labels: Sequence[Any], *, num_labels: int | None = None, model_label2id: dict[str, int] | None = None
) -> LabelSpace:
    """Class ids for the values of a label column.

    Integer labels (also "0", "1" in CSV) are their own ids, 0..K-1. Other labels are names: mapped through the
    model's own `label2id` when it has real names, else sorted.

    Raises:
        UsageError: negative or fractional numbers, or more classes than `num_labels` allows.
    """
    keys = sorted({_label_key(v) for v in labels})
    if any(isinstance(v, float) and not v.is_integer() for v in labels):
        raise UsageError("labels are fractional numbers: classification needs integer class ids or class names")
    if all(_is_int(k) for k in keys):
        ids = sorted(int(k) for k in keys)
        if ids[0] < 0:
            raise UsageError(f"label {ids[0]} is negative: class ids must be 0, 1, ..., K-1")
        k = max(ids[-1] + 1, num_labels or 0)
        names = [str(i) for i in range(k)]
    elif model_label2id and set(keys) <= set(model_label2id):
        names = [name for name, _ in sorted(model_label2id.items(), key=lambda kv: kv[1])]
    else:
        names = keys
    if num_labels is not None and len(names) > num_labels:
        raise UsageError(
            f"the labels need {len(names)} classes ({', '.join(names[:8])}) but --num-labels is {num_labels}: "
            "raise --num-labels or fix the label column"
        )
    if len(names) < 2:
        raise UsageError(f"the label column has a single class ({names[0]}): classification needs at least two")
    return LabelSpace({name: i for i, name in enumerate(names)}, names)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def encode_classification(
    rows: Sequence[dict[str, Any]],
    tokenizer: Any,
    labels: LabelSpace,
    *,
    text_column: str,
    label_column: str,
    text_pair_column: str | None = None,
    max_length: int,
) -> list[dict[str, Any]]:
    """Token ids (unpadded; a `DataCollatorWithPadding` pads each batch) and integer `labels` for every row."""
    texts = [str(r[text_column]) for r in rows]
    pairs = [str(r[text_pair_column]) for r in rows] if text_pair_column else None
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    out = []
    for i, row in enumerate(rows):
        key = _label_key(row[label_column])
        if key not in labels.label2id:
            raise UsageError(f"label {row[label_column]!r} is not one of the classes {labels.names}")
        out.append({**{k: v[i] for k, v in encoded.items()}, "labels": labels.label2id[key]})
    return out


def _check_head(model_config: Any, needed: int, requested: int | None) -> None:
    archs = getattr(model_config, "architectures", None) or []
    has_head = any(a.endswith("ForSequenceClassification") for a in archs)
    if has_head and requested is None and model_config.num_labels != needed:
        raise UsageError(
            f"the model's classification head has {model_config.num_labels} classes but the labels need {needed}: "
            f"fix the label column, or pass --num-labels {needed} to replace the head with a new one"
        )


@torch.no_grad()
def evaluate_classification(
    model: nn.Module, dataset: Sequence[dict], collator: Any, batch_size: int, *, keep_predictions: bool = False
) -> dict:
    """{"accuracy", "loss"} of `model` on an encoded classification set, in eval mode; with `keep_predictions`
    also "predictions", the predicted class id of every example in the order of `dataset`."""
    correct, loss_sum, count = 0, 0.0, 0
    device = model_device(model)
    order = by_length(dataset)
    predictions: list[int] = [0] * len(dataset)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = to_device(collator([dataset[i] for i in chunk]), device)
            out = model(**batch)
            n = batch["labels"].shape[0]
            predicted = out.logits.argmax(-1)
            correct += int((predicted == batch["labels"]).sum())
            loss_sum += float(out.loss) * n
            count += n
            for i, label in zip(chunk, predicted.tolist()):
                predictions[i] = label
    metrics: dict[str, Any] = {"accuracy": correct / count, "loss": loss_sum / count}
    if keep_predictions:
        metrics["predictions"] = predictions
    return metrics


class Classification(TaskKind):
    """--task classification: an encoder (or a decoder with a classification head) on labelled texts."""

    name = "classification"
    default_metric = "accuracy"
    refused_metrics: ClassVar[dict[str, str]] = {
        "exact_match": "--eval-metric exact_match scores generated answers, which needs --task sft"
    }

    def check_model_type(self, model_type: str) -> None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

        if model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
            raise UsageError(
                f"model type {model_type!r} has no sequence-classification head in transformers: use an encoder (BERT, "
                "RoBERTa, ...) or a decoder with a classification head, or --task sft for prompt/response data"
            )

    def columns(self, data: Any, rows: list[dict[str, Any]], sources: dict[str, str]) -> tuple[list, list]:
        columns = [data.text_column, data.label_column] + ([data.text_pair_column] if data.text_pair_column else [])
        return columns, ["--text-column", "--label-column", "--text-pair-column"]

    def labels(self, data: Any, model_config: Any, rows: list[dict[str, Any]]) -> LabelSpace:
        named = {
            k: v for k, v in (getattr(model_config, "label2id", None) or {}).items() if not k.startswith("LABEL_")
        }
        labels = label_space([r[data.label_column] for r in rows], num_labels=data.num_labels, model_label2id=named)
        _check_head(model_config, labels.num_labels, data.num_labels)
        return labels

    def encode(
        self,
        data: Any,
        tokenizer: Any,
        labels: Any,
        train_rows: list[dict[str, Any]],
        eval_rows: list[dict[str, Any]],
        sources: dict[str, str],
    ) -> Encoded:
        from transformers import DataCollatorWithPadding

        kw = {"text_column": data.text_column, "label_column": data.label_column}
        kw.update(text_pair_column=data.text_pair_column, max_length=data.max_length)
        train_set = encode_classification(train_rows, tokenizer, labels, **kw)
        eval_set = encode_classification(eval_rows, tokenizer, labels, **kw)
        return Encoded(train_set, eval_set, DataCollatorWithPadding(tokenizer))

    def load_model(self, path: str, kwargs: dict[str, Any], data: Any, model_config: Any, labels: Any) -> Any:
        from transformers import AutoModelForSequenceClassification

        archs = getattr(model_config, "architectures", None) or []
        replace = data.num_labels is not None and model_config.num_labels != labels.num_labels
        kwargs["num_labels"] = labels.num_labels
        if not any(a.endswith("ForSequenceClassification") for a in archs) or replace:
            kwargs["id2label"] = dict(enumerate(labels.names))
            kwargs["label2id"] = labels.label2id
        model = AutoModelForSequenceClassification.from_pretrained(path, ignore_mismatched_sizes=replace, **kwargs)
        if model.config.pad_token_id is None:
            from transformers import AutoTokenizer

            model.config.pad_token_id = AutoTokenizer.from_pretrained(path).pad_token_id or 0
        return model

    def adjust_trainer(self, trainer: Any) -> None:
        # transformers 5: sequence-classification models take **kwargs, so the Trainer hands them num_items_in_batch
        # and then expects a loss normalized by it: it skips its division by the gradient-accumulation steps and
        # multiplies by the number of processes. Their loss is a plain mean that ignores num_items_in_batch
        # (measured on BERT, transformers 5.24: --gradient-accumulation-steps 2 doubled the loss and gradients).
        # Off, the Trainer divides by the accumulation steps and DDP averages the ranks' means: the mean over the
        # global batch. (Causal LMs do use num_items_in_batch: the loss is then the mean over all learned tokens.)
        trainer.model_accepts_loss_kwargs = False

    def evaluate(self, model: nn.Module, task: TaskData, data: Any, train: Any) -> dict[str, Any]:
        """{"accuracy", "loss"}."""
        part = shard(task.eval_set)
        metrics = evaluate_classification(model, part, task.collator, train.eval_batch_size) if part else {}
        accuracy, loss = weighted_means(
            [metrics.get("accuracy", 0.0), metrics.get("loss", 0.0)], len(part), "the evaluation"
        )
        return {"accuracy": accuracy, "loss": loss}
