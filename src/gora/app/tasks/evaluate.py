"""Evaluation of a fine-tune, before and after training: what every task kind's metrics share.

Each task kind computes its own metrics (`TaskKind.evaluate`: classification.py accuracy and loss, sft.py the loss
over the learned tokens and exact match); `tasks.evaluate` runs the run's kind. Evaluation runs in eval mode with
gradients off (under autocast in the model's dtype when it is bfloat16/float16, as training runs) and restores the
model's training mode (and the tokenizer's padding side) afterwards; examples are batched shortest first
(`by_length`), which changes padding, not the per-example results. Under torch.distributed every rank evaluates its
share of the examples and the figures are combined over ranks (parallel.py), each example counted once. With
`keep_predictions=True` the per-example predictions come back too, in the order of the input (for paired tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...batches import eval_mode, model_device, to_device


@torch.no_grad()
def evaluate_loss(model: nn.Module, dataset: Sequence[dict], collator: Any, batch_size: int) -> float:
    """Mean loss over the learned tokens (labels != -100, after the causal shift) of `model` on an encoded set, in
    eval mode: the same whatever the batching (each batch's mean weighted by its learned tokens)."""
    device = model_device(model)
    loss_sum, tokens = 0.0, 0
    order = by_length(dataset)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            batch = to_device(collator([dataset[i] for i in order[start : start + batch_size]]), device)
            n = learned_tokens(batch["labels"].tolist())
            loss_sum += float(model(**batch).loss) * n
            tokens += n
    return loss_sum / tokens


def learned_tokens(labels: Sequence[Sequence[int]]) -> int:
    """The tokens a causal LM's loss averages over: labels != -100 after the shift (the first position predicts
    nothing)."""
    return sum(sum(1 for label in row[1:] if label != -100) for row in labels)


def by_length(dataset: Sequence[dict]) -> list[int]:
    """Indices of the examples, shortest first, so evaluation batches carry little padding (per-example results are
    unchanged)."""
    return sorted(range(len(dataset)), key=lambda i: len(dataset[i]["input_ids"]))
