"""Evaluation of a fine-tune, before and after training: the metrics `gora finetune` reports.

- sequence classification: accuracy (argmax of the logits against the label) and the mean eval loss;
- causal-LM SFT: the eval loss (mean over the learned tokens, whatever the batching) and, with
  `--eval-metric exact_match`, exact match of the final answer under greedy generation (after the last `####`; else,
  for a numeric reference, the last number, and for a word reference, the first line; numerically where both are
  numbers, else ignoring case), on at most `--max-eval-samples` examples (default `GENERATE_CAP`).

Evaluation runs in eval mode with gradients off (under autocast in the model's dtype when it is bfloat16/float16, as
training runs) and restores the model's training mode (and the tokenizer's padding side) afterwards; examples are
batched shortest first, which changes padding, not the per-example results. Under torch.distributed every rank
evaluates its share of the examples and the figures are combined over ranks (parallel.py), each example counted once.
With `keep_predictions=True` the per-example predictions come back too, in the order of the input (for paired tests).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..batches import eval_mode, model_device, to_device
from .parallel import shard, weighted_means

if TYPE_CHECKING:
    from .data import SftExample, TaskData
    from .runconfig import DataConfig, TrainConfig


@torch.no_grad()
def evaluate_classification(
    model: nn.Module, dataset: Sequence[dict], collator: Any, batch_size: int, *, keep_predictions: bool = False
) -> dict:
    """{"accuracy", "loss"} of `model` on an encoded classification set, in eval mode; with `keep_predictions`
    also "predictions", the predicted class id of every example in the order of `dataset`."""
    correct, loss_sum, count = 0, 0.0, 0
    device = model_device(model)
    order = _by_length(dataset)
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


@torch.no_grad()
def evaluate_sft(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[SftExample],
    *,
    batch_size: int,
    max_new_tokens: int,
    keep_predictions: bool = False,
) -> dict[str, Any]:
    """{"exact_match", "examples"}: greedy generation from each example's head; a hit when the answer of the
    generation (`answer_of`) equals the example's reference answer (numerically where both are numbers, else ignoring
    case). With `keep_predictions` also "predictions" (the answer read from each generation, or None) and "correct"
    (bools), in the order of `examples`."""
    device = model_device(model)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    hits, shown, predictions, correct = 0, [], [], []
    with eval_mode(model):
        try:
            for start in range(0, len(examples), batch_size):
                chunk = examples[start : start + batch_size]
                heads = [e.head for e in chunk]
                special = chunk[0].special_tokens
                inputs = tokenizer(heads, return_tensors="pt", padding=True, add_special_tokens=special).to(device)
                output = model.generate(
                    input_ids=inputs[
                        "input_ids"
                    ],  # not token_type_ids (BERT-style tokenizers): causal LMs refuse them
                    attention_mask=inputs["attention_mask"],
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
                texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                for example, text in zip(chunk, texts):
                    predicted = answer_of(text, example.answer)
                    hit = _same_answer(predicted, example.answer)
                    hits += hit
                    predictions.append(predicted)
                    correct.append(hit)
                    if len(shown) < 3:
                        shown.append(
                            {
                                "prompt": example.head[:200],
                                "output": text[-300:],
                                "predicted": predicted,
                                "answer": example.answer,
                                "correct": hit,
                            }
                        )
        finally:
            tokenizer.padding_side = side
    metrics: dict[str, Any] = {"exact_match": hits / len(examples), "examples": shown}
    if keep_predictions:
        metrics.update(predictions=predictions, correct=correct)
    return metrics


@torch.no_grad()
def evaluate_loss(model: nn.Module, dataset: Sequence[dict], collator: Any, batch_size: int) -> float:
    """Mean loss over the learned tokens (labels != -100, after the causal shift) of `model` on an encoded set, in
    eval mode: the same whatever the batching (each batch's mean weighted by its learned tokens)."""
    device = model_device(model)
    loss_sum, tokens = 0.0, 0
    order = _by_length(dataset)
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
    from . import assets

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


def headline_metric(data: DataConfig, train: TrainConfig) -> str:
    """The metric a run reports first: --eval-metric, else accuracy (classification) or the eval loss (SFT)."""
    return train.eval_metric or ("accuracy" if data.task == "classification" else "loss")


def generation_examples(task: TaskData, data: DataConfig) -> list[SftExample]:
    """The evaluation examples exact match generates for: at most --max-eval-samples, default GENERATE_CAP."""
    from .runconfig import GENERATE_CAP

    return task.eval_examples[: data.max_eval_samples or GENERATE_CAP]


def evaluate(model: nn.Module, task: TaskData, data: DataConfig, train: TrainConfig) -> dict[str, Any]:
    """The task's metrics: classification {"accuracy", "loss"}; sft {"loss"}, with --eval-metric exact_match also
    {"exact_match", "examples", "generated"}. Under torch.distributed: this rank's share, combined over ranks."""
    with _autocast(model, data):
        if data.task == "classification":
            part = shard(task.eval_set)
            metrics = evaluate_classification(model, part, task.collator, train.eval_batch_size) if part else {}
            accuracy, loss = weighted_means(
                [metrics.get("accuracy", 0.0), metrics.get("loss", 0.0)], len(part), "the evaluation"
            )
            return {"accuracy": accuracy, "loss": loss}
        part = shard(task.eval_set)
        loss = evaluate_loss(model, part, task.collator, train.eval_batch_size) if part else 0.0
        (loss,) = weighted_means([loss], learned_tokens([ex["labels"] for ex in part]), "the evaluation")
        out: dict[str, Any] = {"loss": loss}
        if headline_metric(data, train) != "exact_match":
            return out
        examples = generation_examples(task, data)
        mine = shard(examples)
        metrics = {"exact_match": 0.0, "examples": []}
        if mine:
            metrics = evaluate_sft(
                model, task.tokenizer, mine, batch_size=train.eval_batch_size, max_new_tokens=train.max_new_tokens
            )
        (exact_match,) = weighted_means([metrics["exact_match"]], len(mine), "the evaluation")
        return {**out, "exact_match": exact_match, "examples": metrics["examples"], "generated": len(examples)}


def _autocast(model: nn.Module, data: DataConfig) -> Any:
    """Autocast in the model's dtype when it is bfloat16/float16 (as the Trainer trains it), else nothing."""
    import contextlib

    if data.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(model_device(model).type, dtype=getattr(torch, data.dtype))
