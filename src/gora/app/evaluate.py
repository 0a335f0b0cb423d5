"""Evaluation of a fine-tune, before and after training: the metrics `gora finetune` reports.

- sequence classification: accuracy (argmax of the logits against the label) and the mean eval loss;
- causal-LM SFT: exact match of the final answer under greedy generation (after the last `####`; else, for a numeric
  reference, the last number, and for a word reference, the first line; numerically where both are numbers, else
  ignoring case), and the eval loss (mean per batch, on the response tokens only).

Evaluation runs in eval mode with gradients off and restores the model's training mode (and the tokenizer's padding
side) afterwards; examples are batched shortest first, which changes padding, not the per-example results. With
`keep_predictions=True` the per-example predictions come back too, in the order of the input (for paired tests).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import assets
from .data import prompt_and_response_text

if TYPE_CHECKING:
    from .data import TaskData
    from .runconfig import DataConfig, TrainConfig


@torch.no_grad()
def evaluate_classification(
    model: nn.Module, dataset: Sequence[dict], collator: Any, batch_size: int, *, keep_predictions: bool = False
) -> dict:
    """{"accuracy", "loss"} of `model` on an encoded classification set, in eval mode; with `keep_predictions`
    also "predictions", the predicted class id of every example in the order of `dataset`."""
    correct, loss_sum, count = 0, 0.0, 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = _by_length(dataset)
    predictions: list[int] = [0] * len(dataset)
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collator([dataset[i] for i in chunk]).items()}
            out = model(**batch)
            n = batch["labels"].shape[0]
            predicted = out.logits.argmax(-1)
            correct += int((predicted == batch["labels"]).sum())
            loss_sum += float(out.loss) * n
            count += n
            for i, label in zip(chunk, predicted.tolist()):
                predictions[i] = label
    finally:
        model.train(was_training)
    metrics: dict[str, Any] = {"accuracy": correct / count, "loss": loss_sum / count}
    if keep_predictions:
        metrics["predictions"] = predictions
    return metrics


@torch.no_grad()
def evaluate_sft(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    data: DataConfig,
    *,
    batch_size: int,
    max_new_tokens: int,
    keep_predictions: bool = False,
) -> dict[str, Any]:
    """{"exact_match", "examples"}: greedy generation on each prompt; a hit when the answer of the generation
    (`answer_of`) equals the reference answer (numerically where both are numbers, else ignoring case). With
    `keep_predictions` also "predictions" (the answer read from each generation, or None) and "correct" (bools), in
    the order of `rows`."""
    device = next(model.parameters()).device
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    hits, examples, predictions, correct = 0, [], [], []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            heads = [prompt_and_response_text(tokenizer, str(r[data.prompt_column]))[0] for r in chunk]
            special = not getattr(tokenizer, "chat_template", None)
            inputs = tokenizer(heads, return_tensors="pt", padding=True, add_special_tokens=special).to(device)
            output = model.generate(
                input_ids=inputs["input_ids"],  # not token_type_ids (BERT-style tokenizers): causal LMs refuse them
                attention_mask=inputs["attention_mask"],
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
                predicted = answer_of(text, reference)
                hit = _same_answer(predicted, reference)
                hits += hit
                predictions.append(predicted)
                correct.append(hit)
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
        model.train(was_training)
        tokenizer.padding_side = side
    metrics: dict[str, Any] = {"exact_match": hits / len(rows), "examples": examples}
    if keep_predictions:
        metrics.update(predictions=predictions, correct=correct)
    return metrics


@torch.no_grad()
def evaluate_loss(model: nn.Module, dataset: Sequence[dict], collator: Any, batch_size: int) -> float:
    """Mean loss per batch of `model` on an encoded set, in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = []
    order = _by_length(dataset)
    try:
        for start in range(0, len(order), batch_size):
            chunk = [dataset[i] for i in order[start : start + batch_size]]
            batch = {k: v.to(device) for k, v in collator(chunk).items()}
            losses.append(float(model(**batch).loss))
    finally:
        model.train(was_training)
    return sum(losses) / len(losses)


def _by_length(dataset: Sequence[dict]) -> list[int]:
    """Indices of the examples, shortest first, so evaluation batches carry little padding (per-example results are
    unchanged)."""
    return sorted(range(len(dataset)), key=lambda i: len(dataset[i]["input_ids"]))


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def answer_of(text: str, reference: str | None) -> str | None:
    """The answer a generation gives: what follows the last `####`, else, for a numeric (or missing) reference, the
    last number in the text (`assets.final_answer`), and for a word reference the first non-empty line."""
    if "####" in text or reference is None or _is_number(reference.strip().rstrip(".")):
        return assets.final_answer(text)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else None


def _same_answer(predicted: str | None, reference: str | None) -> bool:
    if predicted is None or reference is None:
        return False
    a, b = predicted.strip().rstrip("."), reference.strip().rstrip(".").replace(",", "")
    try:
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-6)
    except ValueError:
        return a.casefold() == b.casefold()


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
