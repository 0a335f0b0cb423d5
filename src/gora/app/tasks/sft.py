"""Causal-LM supervised fine-tuning: `SftExample`s (sft_formats.py) tokenized with the loss on the learned segments
only, padded by a seq2seq collator, evaluated by the loss over the learned tokens and, with --eval-metric exact_match,
exact match of the final answer under greedy generation (after the last `####`; else, for a numeric reference, the
last number, and for a word reference, the first line; numerically where both are numbers, else ignoring case), on
at most `--max-eval-samples` examples (default `GENERATE_CAP`). `Sft` is the task kind (--task sft)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ...batches import eval_mode, model_device
from ..errors import UsageError
from ..parallel import shard, weighted_means
from .evaluate import evaluate_loss, learned_tokens
from .sft_formats import SftExample, resolve_sft_format, sft_examples
from .taskkind import Encoded, TaskData, TaskKind

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt and padding)


def encode_sft(examples: Sequence[SftExample], tokenizer: Any, *, max_length: int) -> list[dict[str, Any]]:
    """input_ids of the segments in order, labels = the ids on learned segments and -100 elsewhere (and later on
    padding), truncated to `max_length`.

    Examples left with no learned token after truncation (their prompt alone fills `max_length`) are dropped
    (logged).

    Raises:
        UsageError: when every example is dropped.
    """
    out, dropped = [], 0
    eos = tokenizer.eos_token_id
    for example in examples:
        ids: list[int] = []
        labels: list[int] = []
        for index, (text, learned) in enumerate(example.segments):
            piece = tokenizer(text, add_special_tokens=example.special_tokens and index == 0)["input_ids"]
            ids += piece
            labels += piece if learned else [IGNORE_INDEX] * len(piece)
        if example.eos and eos is not None and ids[-1:] != [eos]:
            ids.append(eos)
            labels.append(eos)
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    if dropped:
        logger.warning("%d example(s) dropped: the prompt alone fills max_length=%d", dropped, max_length)
    if not out:
        raise UsageError(f"every prompt is at least max_length={max_length} tokens long: raise --max-length")
    return out


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
                    hit = same_answer(predicted, example.answer)
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


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def answer_of(text: str, reference: str | None) -> str | None:
    """The answer a generation gives: what follows the last `####`, else, for a numeric (or missing) reference, the
    last number in the text (`assets.final_answer`), and for a word reference the first non-empty line."""
    from .. import assets

    if "####" in text or reference is None or _is_number(reference.strip().rstrip(".")):
        return assets.final_answer(text)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else None


def same_answer(predicted: str | None, reference: str | None) -> bool:
    """Whether a generation's answer is the reference: numerically where both are numbers (thousands separators
    ignored: "1,234" = 1234), else as text ignoring case, a final period and runs of whitespace ("a, b" is not "a b")."""
    if predicted is None or reference is None:
        return False
    a, b = predicted.strip().rstrip("."), reference.strip().rstrip(".")
    try:
        return math.isclose(float(a.replace(",", "")), float(b.replace(",", "")), rel_tol=0, abs_tol=1e-6)
    except ValueError:
        return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def generation_examples(task: TaskData, data: Any) -> list[SftExample]:
    """The evaluation examples exact match generates for: at most --max-eval-samples, default GENERATE_CAP."""
    from ..config.runconfig import GENERATE_CAP

    return task.eval_examples[: data.max_eval_samples or GENERATE_CAP]


class Sft(TaskKind):
    """--task sft: a decoder-only causal LM on conversations, prompt/completion or prompt/response rows."""

    name = "sft"
    default_metric = "loss"
    refused_metrics: ClassVar[dict[str, str]] = {
        "accuracy": "--eval-metric accuracy needs --task classification; sft has loss and exact_match"
    }

    def check_model_type(self, model_type: str) -> None:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        )

        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            raise UsageError(
                f"model type {model_type!r} is not a decoder-only causal LM, which --task sft needs: use a causal LM "
                "(Llama, GPT-2, SmolLM2, ...) or --task classification for labelled texts"
            )

    def columns(self, data: Any, rows: list[dict[str, Any]], sources: dict[str, str]) -> tuple[list, list]:
        """The columns of the row format (resolved from the training rows, kept as sources["format"])."""
        fmt = resolve_sft_format(data, set(rows[0]), f"the training data ({sources['train']})")
        sources["format"] = fmt
        columns, options = {
            "messages": ([data.messages_column], ["--messages-column"]),
            "prompt-completion": (
                [data.prompt_column, data.completion_column],
                ["--prompt-column", "--completion-column"],
            ),
            "prompt-response": ([data.prompt_column, data.response_column], ["--prompt-column", "--response-column"]),
        }[fmt]
        if data.answer_column:
            columns, options = [*columns, data.answer_column], [*options, "--answer-column"]
        return columns, options

    def prepare_tokenizer(self, tokenizer: Any) -> None:
        tokenizer.padding_side = "right"  # training; generation switches to left padding

    def encode(
        self,
        data: Any,
        tokenizer: Any,
        labels: Any,
        train_rows: list[dict[str, Any]],
        eval_rows: list[dict[str, Any]],
        sources: dict[str, str],
    ) -> Encoded:
        from transformers import DataCollatorForSeq2Seq

        fmt = sources["format"]
        train_examples = sft_examples(train_rows, tokenizer, data, fmt, f"the training data ({sources['train']})")
        eval_examples = sft_examples(eval_rows, tokenizer, data, fmt, f"the evaluation data ({sources['eval']})")
        train_set = encode_sft(train_examples, tokenizer, max_length=data.max_length)
        eval_set = encode_sft(eval_examples, tokenizer, max_length=data.max_length)
        collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
        return Encoded(train_set, eval_set, collator, eval_examples)

    def load_model(self, path: str, kwargs: dict[str, Any], data: Any, model_config: Any, labels: Any) -> Any:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        model.config.use_cache = False
        return model

    def evaluate(self, model: nn.Module, task: TaskData, data: Any, train: Any) -> dict[str, Any]:
        """{"loss"}; with --eval-metric exact_match also {"exact_match", "examples", "generated"}."""
        part = shard(task.eval_set)
        loss = evaluate_loss(model, part, task.collator, train.eval_batch_size) if part else 0.0
        (loss,) = weighted_means([loss], learned_tokens([ex["labels"] for ex in part]), "the evaluation")
        out: dict[str, Any] = {"loss": loss}
        if self.headline_metric(train) != "exact_match":
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
