"""Evaluation of a fine-tune, before and after training: the metrics `gora finetune` reports.

- sequence classification: accuracy (argmax of the logits against the label) and the mean eval loss;
- causal-LM SFT: exact match of the final answer (after the last `####`, else the last number; numerically where
  both are numbers) under greedy generation, and the eval loss (mean per batch, on the response tokens only).

Evaluation runs in eval mode with gradients off and restores the model's training mode (and the tokenizer's padding
side) afterwards; examples are batched shortest first, which changes padding, not the per-example results.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..batches import eval_mode, model_device, to_device
from . import assets
from .data import prompt_and_response_text

if TYPE_CHECKING:
    from .data import TaskData
    from .runconfig import DataConfig, TrainConfig


@torch.no_grad()
def evaluate_classification(model: nn.Module, dataset: Sequence[dict], collator: Any, batch_size: int) -> dict:
    """{"accuracy", "loss"} of `model` on an encoded classification set, in eval mode."""
    correct, loss_sum, count = 0, 0.0, 0
    device = model_device(model)
    dataset = _by_length(dataset)
    with eval_mode(model):
        for start in range(0, len(dataset), batch_size):
            batch = to_device(collator(list(dataset[start : start + batch_size])), device)
            out = model(**batch)
            n = batch["labels"].shape[0]
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            loss_sum += float(out.loss) * n
            count += n
    return {"accuracy": correct / count, "loss": loss_sum / count}


@torch.no_grad()
def evaluate_sft(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    data: DataConfig,
    *,
    batch_size: int,
    max_new_tokens: int,
) -> dict[str, Any]:
    """{"exact_match", "examples"}: greedy generation on each prompt; a hit when the final answer (after the last
    `####`, else the last number) equals the reference answer (numerically where both are numbers)."""
    device = model_device(model)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    hits, examples = 0, []
    with eval_mode(model):
        try:
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                heads = [prompt_and_response_text(tokenizer, str(r[data.prompt_column]))[0] for r in chunk]
                special = not getattr(tokenizer, "chat_template", None)
                inputs = tokenizer(heads, return_tensors="pt", padding=True, add_special_tokens=special).to(device)
                output = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
                texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                for row, text in zip(chunk, texts):
                    reference = (
                        str(row[data.answer_column])
                        if data.answer_column
                        else assets.final_answer(str(row[data.response_column]))
                    )
                    predicted = assets.final_answer(text)
                    hit = _same_answer(predicted, reference)
                    hits += hit
                    if len(examples) < 3:
                        examples.append(
                            {
                                "prompt": str(row[data.prompt_column])[:200],
                                "output": text[-300:],
                                "predicted": predicted,
                                "answer": reference,
                                "correct": hit,
                            }
                        )
        finally:
            tokenizer.padding_side = side
    return {"exact_match": hits / len(rows), "examples": examples}


@torch.no_grad()
def evaluate_loss(model: nn.Module, dataset: Sequence[dict], collator: Any, batch_size: int) -> float:
    """Mean loss per batch of `model` on an encoded set, in eval mode."""
    device = model_device(model)
    losses = []
    dataset = _by_length(dataset)
    with eval_mode(model):
        for start in range(0, len(dataset), batch_size):
            batch = to_device(collator(list(dataset[start : start + batch_size])), device)
            losses.append(float(model(**batch).loss))
    return sum(losses) / len(losses)


def _by_length(dataset: Sequence[dict]) -> list[dict]:
    """The examples shortest first, so evaluation batches carry little padding (per-example results are unchanged)."""
    return sorted(dataset, key=lambda ex: len(ex["input_ids"]))


def _same_answer(predicted: str | None, reference: str | None) -> bool:
    if predicted is None or reference is None:
        return False
    a, b = predicted.strip().rstrip("."), reference.strip().rstrip(".").replace(",", "")
    try:
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-6)
    except ValueError:
        return a == b


def evaluate(model: nn.Module, task: TaskData, data: DataConfig, train: TrainConfig) -> dict[str, Any]:
    """The task's metrics: classification {"accuracy", "loss"}; sft {"exact_match", "loss", "examples"}."""
    if data.task == "classification":
        return evaluate_classification(model, task.eval_set, task.collator, train.eval_batch_size)
    loss = evaluate_loss(model, task.eval_set, task.collator, train.eval_batch_size)
    metrics = evaluate_sft(
        model,
        task.tokenizer,
        task.eval_rows,
        data,
        batch_size=train.eval_batch_size,
        max_new_tokens=train.max_new_tokens,
    )
    return {**metrics, "loss": loss}
