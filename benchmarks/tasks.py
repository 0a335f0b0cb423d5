"""The tasks: data, model, batches and evaluation for each suite.

- `nlu`: all-MiniLM-L6-v2 (+ a new 2-way head) on Rotten Tomatoes sentiment; accuracy on the fixed 1,000-review
  held-out split of `gora.app.assets.rotten_tomatoes`.
- `nlg`: SmolLM2-135M-Instruct on reasoning-gym gsm_symbolic; exact match of the final answer (greedy decoding) on
  a fixed held-out set, and the eval loss (response tokens only) on the same set.
- `smoke-nlu` / `smoke-nlg`: the same code paths on tiny config-built BERT / Llama models with the MiniLM tokenizer,
  a few rows and steps (for CI).

Every batch list is built deterministically from the seed: the order of training rows, the head's initial
weights (torch.manual_seed before the model is built) and therefore every method's data are identical.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]

NLG_TEST_SEED = 10_000  # the held-out problems are generated with this seed, the training problems with 1 + seed
NLG_TEST_SIZE = 50


@dataclass
class TaskData:
    """Everything a run needs from a task."""

    model: torch.nn.Module
    tokenizer: Any
    train_batches: list[Batch]  # one epoch, in training order
    calib_batches: list[Batch]  # the N batches that data-driven methods (GoRA, LoRA-GA, EVA) all see
    evaluate: Callable[[torch.nn.Module], dict[str, float]]
    metric_name: str
    model_name: str
    target_modules: list[str]
    task_type: str


def _minilm_tokenizer():
    from transformers import AutoTokenizer

    from gora.app.assets import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def _chunks(rows: list[Any], size: int) -> list[list[Any]]:
    return [rows[i : i + size] for i in range(0, len(rows) - size + 1, size)]  # drop_last


# ----------------------------------------------------------------------------------------------------------- NLU


def _cls_batches(tokenizer, rows: list[dict], batch_size: int, max_length: int, drop_last: bool) -> list[Batch]:
    groups = (
        _chunks(rows, batch_size) if drop_last else [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    )
    out = []
    for group in groups:
        enc = tokenizer(
            [r["text"] for r in group], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        enc["labels"] = torch.tensor([r["label"] for r in group])
        out.append(enc)
    return out


def _cls_evaluator(test_batches: list[Batch]) -> Callable[[torch.nn.Module], dict[str, float]]:
    @torch.no_grad()
    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        correct = total = 0
        loss_sum = 0.0
        for batch in test_batches:
            out = model(**batch)
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
            loss_sum += float(out.loss) * len(batch["labels"])
        model.train(was_training)
        return {"accuracy": correct / total, "eval_loss": loss_sum / total}

    return evaluate


def load_nlu(spec: dict[str, Any]) -> TaskData:
    """MiniLM-L6 (or, for `smoke-nlu`, a tiny BERT) on Rotten Tomatoes."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    from gora.app.assets import minilm_path, rotten_tomatoes

    tokenizer = _minilm_tokenizer()
    train_rows, test_rows = rotten_tomatoes(spec["train_size"], spec.get("test_size"), seed=spec["seed"])
    torch.manual_seed(spec["seed"])  # the new classification head
    if spec["task"] == "smoke-nlu":
        config = BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            num_labels=2,
        )
        model, model_name = BertForSequenceClassification(config), "tiny-bert (config-built, random)"
    else:
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        model_name = "all-MiniLM-L6-v2"
    bs, ml = spec["batch_size"], spec["max_length"]
    train = _cls_batches(tokenizer, train_rows, bs, ml, drop_last=True)
    test = _cls_batches(tokenizer, test_rows, 64, ml, drop_last=False)
    return TaskData(
        model=model,
        tokenizer=tokenizer,
        train_batches=train,
        calib_batches=train[: spec["num_batches"]],
        evaluate=_cls_evaluator(test),
        metric_name="accuracy",
        model_name=model_name,
        target_modules=["query", "key", "value", "dense"],
        task_type="SEQ_CLS",
    )


# ----------------------------------------------------------------------------------------------------------- NLG


def _nlg_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer: "


def _lm_batches(tokenizer, rows: list[dict], batch_size: int, max_length: int, eos_id: int) -> list[Batch]:
    """Prompt + response + EOS, right-padded; labels are -100 on the prompt and the padding."""
    out = []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    for group in _chunks(rows, batch_size):
        seqs, labels = [], []
        for r in group:
            p = tokenizer(_nlg_prompt(r["prompt"]), add_special_tokens=False)["input_ids"]
            a = tokenizer(r["response"], add_special_tokens=False)["input_ids"] + [eos_id]
            ids = (p + a)[:max_length]
            seqs.append(ids)
            labels.append(([-100] * len(p) + a)[:max_length])
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), pad_id)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        lab = torch.full((len(seqs), width), -100)
        for i, (s, lb) in enumerate(zip(seqs, labels)):
            input_ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            lab[i, : len(lb)] = torch.tensor(lb)
        out.append({"input_ids": input_ids, "attention_mask": mask, "labels": lab})
    return out


def _nlg_evaluator(tokenizer, test_rows: list[dict], test_batches: list[Batch], eos_id: int, max_new_tokens: int):
    from gora.app.assets import final_answer

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id

    @torch.no_grad()
    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        tokens = loss_sum = 0.0
        for batch in test_batches:
            n = int((batch["labels"][:, 1:] != -100).sum())
            loss_sum += float(model(**batch).loss) * n
            tokens += n
        correct = 0
        for group in [test_rows[i : i + 25] for i in range(0, len(test_rows), 25)]:
            prompts = [tokenizer(_nlg_prompt(r["prompt"]), add_special_tokens=False)["input_ids"] for r in group]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), pad_id)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for i, p in enumerate(prompts):  # left padding for generation
                ids[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
            )
            for r, row in zip(group, gen[:, width:]):
                text = tokenizer.decode(row, skip_special_tokens=True)
                correct += int(final_answer(text) == r["answer"])
        model.train(was_training)
        return {"exact_match": correct / len(test_rows), "eval_loss": loss_sum / max(tokens, 1)}

    return evaluate


def load_nlg(spec: dict[str, Any]) -> TaskData:
    """SmolLM2-135M (or, for `smoke-nlg`, a tiny Llama) on gsm_symbolic."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from gora.app.assets import gsm_symbolic, smollm2_path

    test_size = spec.get("test_size") or NLG_TEST_SIZE
    test_rows = gsm_symbolic(test_size, seed=NLG_TEST_SEED)
    held_out = {r["prompt"] for r in test_rows}
    pool = gsm_symbolic(spec["train_size"] + test_size, seed=1 + spec["seed"])
    train_rows = [r for r in pool if r["prompt"] not in held_out][: spec["train_size"]]
    torch.manual_seed(spec["seed"])
    if spec["task"] == "smoke-nlg":
        tokenizer = _minilm_tokenizer()
        eos_id = tokenizer.sep_token_id
        config = LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            eos_token_id=eos_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model, model_name = LlamaForCausalLM(config), "tiny-llama (config-built, random)"
    else:
        path = smollm2_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        eos_id = tokenizer.eos_token_id
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model_name = "SmolLM2-135M-Instruct (fp32 from the Q4_1 GGUF)"
    model.config.use_cache = False
    bs, ml = spec["batch_size"], spec["max_length"]
    train = _lm_batches(tokenizer, train_rows, bs, ml, eos_id)
    test = _lm_batches(tokenizer, test_rows, 10, ml, eos_id)
    evaluate = _nlg_evaluator(tokenizer, test_rows, test, eos_id, spec.get("max_new_tokens", 160))

    def evaluate_with_cache(m: torch.nn.Module) -> dict[str, float]:
        base_config = getattr(m, "config", None) or model.config
        base_config.use_cache = True
        try:
            return evaluate(m)
        finally:
            base_config.use_cache = False

    return TaskData(
        model=model,
        tokenizer=tokenizer,
        train_batches=train,
        calib_batches=train[: spec["num_batches"]],
        evaluate=evaluate_with_cache,
        metric_name="exact_match",
        model_name=model_name,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )


def load_task(spec: dict[str, Any]) -> TaskData:
    """Build the task named by `spec["task"]`."""
    if spec["task"] in ("nlu", "smoke-nlu"):
        return load_nlu(spec)
    if spec["task"] in ("nlg", "smoke-nlg"):
        return load_nlg(spec)
    raise ValueError(f"unknown task {spec['task']!r}")


def steps_per_epoch(train_size: int, batch_size: int) -> int:
    return max(1, math.floor(train_size / batch_size))
