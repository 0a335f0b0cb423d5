"""A whole fine-tune: model and data in, GoRA (or LoRA) adapter, evaluation and report out.

    DataConfig + TrainConfig + GoraConfig
        → load_task        (model folder + rows → tokenizer, model, encoded train/eval sets; all input checked first)
        → evaluate         (before)
        → get_gora_model   (estimate → allocate → init; or a plain LoRA/rsLoRA adapter at the same r)
        → transformers.Trainer (optionally with a LoRA+ optimizer: make_optimizer)
        → evaluate         (after) → adapter + gora_record.json + report.json + plots

The `gora` command (cli.py) builds these dataclasses from its options; the same functions serve Python callers.
Tasks: sequence classification (accuracy) and causal-LM supervised fine-tuning on prompt/response pairs (loss on the
response only; exact match of the final answer under greedy generation).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from . import assets
from .config import GoraConfig
from .data import (
    UsageError,
    check_columns,
    encode_classification,
    encode_sft,
    label_space,
    prompt_and_response_text,
    read_rows,
    split_rows,
)

logger = logging.getLogger(__name__)

Task = Literal["classification", "sft"]
Method = Literal["gora", "lora", "rslora"]
TASK_TYPES = {"classification": "SEQ_CLS", "sft": "CAUSAL_LM"}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class DataConfig:
    """Model and data: a local transformers folder and local data files (default: the preset's)."""

    model: str | None = field(default=None, metadata={"help": "local transformers model folder (default: preset's)"})
    task: Task = field(
        default="classification",
        metadata={"help": "sequence classification (encoders) or causal-LM SFT on prompt/response pairs"},
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": ".jsonl/.json/.csv/.tsv/.parquet file or datasets save_to_disk folder (default: preset's)"},
    )
    eval_file: str | None = field(
        default=None, metadata={"help": "evaluation data (default: a held-out share of --train-file)"}
    )
    eval_fraction: float = field(
        default=0.1, metadata={"help": "share of --train-file held out for evaluation when there is no --eval-file"}
    )
    text_column: str = field(default="text", metadata={"help": "classification: column with the text"})
    text_pair_column: str | None = field(
        default=None, metadata={"help": "classification: optional second text column (sentence pairs)"}
    )
    label_column: str = field(default="label", metadata={"help": "classification: column with the class"})
    num_labels: int | None = field(
        default=None, metadata={"help": "classification: number of classes (default: from the labels)"}
    )
    prompt_column: str = field(default="prompt", metadata={"help": "sft: column with the prompt"})
    response_column: str = field(default="response", metadata={"help": "sft: column with the response to learn"})
    answer_column: str | None = field(
        default=None,
        metadata={"help": "sft: column with the final answer for exact match (default: parsed from the response)"},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "use at most this many training rows"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use at most this many evaluation rows"})
    max_length: int = field(default=128, metadata={"help": "truncate examples to this many tokens"})

    def __post_init__(self) -> None:
        _check(self.task in ("classification", "sft"), f"task={self.task!r} is not one of classification, sft")
        _check(
            isinstance(self.eval_fraction, (int, float)) and 0 < self.eval_fraction < 1,
            f"eval_fraction must be in (0, 1), got {self.eval_fraction!r}",
        )
        _check(self.max_length > 0, f"max_length must be a positive number of tokens, got {self.max_length}")
        for name in ("num_labels", "max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"{name} must be a positive integer (or unset), got {value}")
        _check(self.num_labels is None or self.num_labels >= 2, "num_labels must be >= 2 for classification")


@dataclass(frozen=True)
class TrainConfig:
    """Training, evaluation and output."""

    method: Method = field(
        default="gora",
        metadata={"help": "gora; or plain lora (alpha/r) or rslora (alpha/sqrt(r)) at the same r, for comparison"},
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "where to write the run (default: outputs/<method>-<task>-<timestamp>)"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty --output-dir"})
    epochs: float = field(default=1.0, metadata={"help": "training epochs"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many steps (overrides epochs)"})
    batch_size: int = field(default=16, metadata={"help": "batch size of training and of gradient estimation"})
    eval_batch_size: int = field(default=64, metadata={"help": "batch size of evaluation"})
    learning_rate: float = field(default=5e-4, metadata={"help": "peak learning rate (of lora_A under LoRA+)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "share of the steps spent warming up"})
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = field(
        default="linear", metadata={"help": "learning-rate schedule"}
    )
    loraplus_lr_ratio: float | None = field(
        default=None, metadata={"help": "LoRA+: lr of lora_B = ratio x lr of lora_A (e.g. 16; default: off)"}
    )
    logging_steps: int = field(default=10, metadata={"help": "log the training loss every N steps"})
    save_strategy: Literal["no", "steps", "epoch"] = field(
        default="epoch", metadata={"help": "when to write Trainer checkpoints (under checkpoints/)"}
    )
    save_steps: int = field(default=500, metadata={"help": "checkpoint every N steps with --save-strategy steps"})
    train_seed: int = field(default=0, metadata={"help": "seed of the data order, new heads and dropout"})
    eval_before: bool = field(default=True, metadata={"help": "also evaluate before training"})
    max_new_tokens: int = field(default=256, metadata={"help": "sft: tokens generated per evaluation problem"})
    threads: int | None = field(
        default=None,
        metadata={"help": "CPU threads for torch (default: torch's choice; 1 is faster on a busy machine)"},
    )

    def __post_init__(self) -> None:
        _check(self.method in ("gora", "lora", "rslora"), f"method={self.method!r} is not one of gora, lora, rslora")
        _check(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        _check(self.max_steps is None or self.max_steps > 0, f"max_steps must be > 0 (or unset), got {self.max_steps}")
        _check(self.threads is None or self.threads > 0, f"threads must be a positive integer, got {self.threads}")
        for name in ("batch_size", "eval_batch_size", "logging_steps", "save_steps", "max_new_tokens"):
            _check(getattr(self, name) > 0, f"{name} must be a positive integer, got {getattr(self, name)}")
        _check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _check(
            self.loraplus_lr_ratio is None or self.loraplus_lr_ratio >= 1,
            f"loraplus_lr_ratio must be >= 1 (B learns faster than A; 16 in the LoRA+ paper), got {self.loraplus_lr_ratio}",
        )


@dataclass(frozen=True)
class AllocateConfig:
    """Gradient estimation and allocation only (no training)."""

    output_dir: str | None = field(
        default=None, metadata={"help": "where to write ranks.png and report.json (default: outputs/allocate-<time>)"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty --output-dir"})
    batch_size: int = field(default=16, metadata={"help": "batch size of gradient estimation"})
    train_seed: int = field(default=0, metadata={"help": "seed of the data order and of new heads"})
    threads: int | None = field(
        default=None,
        metadata={"help": "CPU threads for torch (default: torch's choice; 1 is faster on a busy machine)"},
    )
    save_stats: str | None = field(
        default=None, metadata={"help": "write the gradient statistics to this .safetensors file"}
    )
    load_stats: str | None = field(
        default=None,
        metadata={"help": "reuse statistics from --save-stats (same model) instead of estimating: try other r, ranks"},
    )

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, f"batch_size must be a positive integer, got {self.batch_size}")
        _check(self.threads is None or self.threads > 0, f"threads must be a positive integer, got {self.threads}")


@dataclass(frozen=True)
class MergeConfig:
    """Merge a saved adapter into its base model and save a standalone model."""

    adapter: str = field(metadata={"help": "adapter folder (with adapter_config.json), e.g. <run>/adapter"})
    output_dir: str = field(metadata={"help": "folder for the merged model"})
    base: str | None = field(
        default=None, metadata={"help": "base model folder (default: base_model_name_or_path of the adapter)"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty --output-dir"})


@dataclass(frozen=True)
class Preset:
    """A built-in model + data + settings; options the user gives override it."""

    name: str
    summary: str
    model: Callable[[], str]
    rows: Callable[[DataConfig, int], tuple[list[dict[str, Any]], list[dict[str, Any]]]]
    data: Mapping[str, Any]
    train: Mapping[str, Any]
    gora: Mapping[str, Any]


def _rotten_tomatoes(data: DataConfig, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return assets.rotten_tomatoes(data.max_train_samples, data.max_eval_samples, seed=seed)


def _gsm(data: DataConfig, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    n_train, n_eval = data.max_train_samples or 64, data.max_eval_samples or 10
    rows = assets.gsm_symbolic(n_train + n_eval, seed=seed)
    return rows[:n_train], rows[n_train:]


PRESETS: dict[str, Preset] = {
    "minilm-rt": Preset(
        name="minilm-rt",
        summary="all-MiniLM-L6-v2, binary sentiment on Rotten Tomatoes (2,000 training reviews, 1 epoch; accuracy on "
        "the fixed 1,000-review test split; ~2 minutes on 2 CPU cores)",
        model=assets.minilm_path,
        rows=_rotten_tomatoes,
        data={"task": "classification", "max_train_samples": 2000, "max_length": 64},
        # one thread: on a shared 2-core machine torch's default of 2 threads ran 4-5x slower per step
        train={"batch_size": 16, "epochs": 1.0, "learning_rate": 5e-4, "threads": 1},
        gora={"target_modules": ("query", "key", "value", "dense"), "num_batches": 16},
    ),
    "smollm2-gsm": Preset(
        name="smollm2-gsm",
        summary="SmolLM2-135M-Instruct, SFT on GSM8K-style problems from reasoning-gym (64 training problems; exact "
        "match of the final answer, greedy, on 10 held-out problems, 200 new tokens; several minutes on CPU, more on a busy machine)",
        model=assets.smollm2_path,
        rows=_gsm,
        data={
            "task": "sft",
            "answer_column": "answer",
            "max_length": 384,
            "max_train_samples": 64,
            "max_eval_samples": 10,
        },
        train={"batch_size": 8, "eval_batch_size": 10, "epochs": 1.0, "learning_rate": 2e-4, "max_new_tokens": 200},
        gora={
            "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            "num_batches": 4,
        },
    ),
}
DEFAULT_PRESET = "minilm-rt"


def resolve_configs(
    preset: str | None,
    data: Mapping[str, Any],
    train: Mapping[str, Any],
    gora: Mapping[str, Any],
    train_cls: type = TrainConfig,
) -> tuple[DataConfig, Any, GoraConfig]:
    """Layer the user's settings over the preset's over the dataclass defaults, and validate.

    `train_cls` is `TrainConfig` (finetune) or `AllocateConfig` (allocate); the preset's settings that it has no
    field for are left out.

    The preset's GoRA targets only apply to the preset's own model: with `model` given they default to PEFT's
    targets for that model type. The task type (`lora_kwargs["task_type"]`) follows the task.
    """
    p = PRESETS[preset] if preset else None
    data_kw = {**(p.data if p else {}), **data}
    if p and ("train_file" in data or "model" in data) and "task" not in data:
        data_kw["task"] = p.data["task"] if "model" not in data else DataConfig.task
    if p and "train_file" in data:  # the preset's row limits are for its own data
        for key in ("max_train_samples", "max_eval_samples", "answer_column"):
            if key not in data:
                data_kw.pop(key, None)
    gora_kw = {**(p.gora if p else {}), **gora}
    if p and "model" in data and "target_modules" not in gora:
        gora_kw.pop("target_modules", None)
    data_config = DataConfig(**data_kw)
    lora_kwargs = dict(gora_kw.pop("lora_kwargs", {}))
    lora_kwargs.setdefault("task_type", TASK_TYPES[data_config.task])
    names = {f.name for f in dataclasses.fields(train_cls)}
    train_config = train_cls(**{**{k: v for k, v in (p.train if p else {}).items() if k in names}, **train})
    return data_config, train_config, GoraConfig(**gora_kw, lora_kwargs=lora_kwargs)


# --- loading and checking ------------------------------------------------------------------------------------------


@dataclass
class TaskData:
    """Everything loaded for a run: model, tokenizer, rows and encoded sets."""

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


def check_model_folder(path: str, task: Task) -> Any:
    """The model's `PretrainedConfig`, after checking that `path` is a transformers folder fit for `task`.

    Raises:
        UsageError: missing folder, no config.json, or a model type the task cannot use.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    folder = Path(path)
    if not folder.exists():
        raise UsageError(f"model folder {path!r} does not exist: give --model a local transformers folder")
    if not (folder / "config.json").is_file():
        raise UsageError(
            f"{path!r} has no config.json, so it is not a transformers model folder: save the model with "
            "save_pretrained() and pass that folder to --model"
        )
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:
        raise UsageError(f"cannot read the model config in {path!r}: {err}") from err
    kind = config.model_type
    if task == "classification" and kind not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise UsageError(
            f"model type {kind!r} has no sequence-classification head in transformers: use an encoder (BERT, "
            "RoBERTa, ...) or a decoder with a classification head, or --task sft for prompt/response data"
        )
    if task == "sft" and (kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES):
        raise UsageError(
            f"model type {kind!r} is not a decoder-only causal LM, which --task sft needs: use a causal LM (Llama, "
            "GPT-2, SmolLM2, ...) or --task classification for labelled texts"
        )
    return config


def load_rows(
    data: DataConfig, preset: Preset | None, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, str]]:
    """(train rows, eval rows, where they came from), checked for the columns the task needs."""
    if data.train_file is None:
        if preset is None:
            raise UsageError("no training data: pass --train-file (a .jsonl/.csv/.parquet file) or a --preset")
        train, evaluation = preset.rows(data, seed)
        sources = {"train": f"preset {preset.name}", "eval": f"preset {preset.name}"}
    else:
        train = read_rows(data.train_file, "train")
        sources = {"train": data.train_file}
        if data.eval_file is not None:
            evaluation = read_rows(data.eval_file, "test")
            sources["eval"] = data.eval_file
        else:
            train, evaluation = split_rows(train, data.eval_fraction, seed)
            sources["eval"] = f"{data.eval_fraction:.0%} of {data.train_file} (seed {seed})"
        train = train[: data.max_train_samples]
        evaluation = evaluation[: data.max_eval_samples]
    if data.task == "classification":
        columns = [data.text_column, data.label_column] + ([data.text_pair_column] if data.text_pair_column else [])
        options = ["--text-column", "--label-column", "--text-pair-column"]
    else:
        columns = [data.prompt_column, data.response_column] + ([data.answer_column] if data.answer_column else [])
        options = ["--prompt-column", "--response-column", "--answer-column"]
    check_columns(train, columns, f"the training data ({sources['train']})", options)
    check_columns(evaluation, columns, f"the evaluation data ({sources['eval']})", options)
    return train, evaluation, sources


def load_task(data: DataConfig, train: TrainConfig | AllocateConfig, preset: Preset | None) -> TaskData:
    """Check the inputs (cheap checks first), then load tokenizer, model and the encoded train/eval sets.

    Raises:
        UsageError: any problem with the model folder or the data, with what to change.
    """
    from transformers import set_seed

    if train.threads is not None:
        torch.set_num_threads(train.threads)
    model_path = data.model if data.model is not None else (preset.model() if preset else None)
    if model_path is None:
        raise UsageError("no model: pass --model (a local transformers folder) or a --preset")
    model_config = check_model_folder(model_path, data.task)
    train_rows, eval_rows, sources = load_rows(data, preset, train.train_seed)
    sources["model"] = model_path
    labels = None
    if data.task == "classification":
        named = {
            k: v for k, v in (getattr(model_config, "label2id", None) or {}).items() if not k.startswith("LABEL_")
        }
        labels = label_space(
            [r[data.label_column] for r in train_rows + eval_rows], num_labels=data.num_labels, model_label2id=named
        )
        _check_head(model_config, labels.num_labels, data.num_labels)
    set_seed(train.train_seed)
    tokenizer = _load_tokenizer(model_path, data.task)
    model = _load_model(model_path, data, model_config, labels)
    if data.task == "classification":
        from transformers import DataCollatorWithPadding

        kw = {"text_column": data.text_column, "label_column": data.label_column}
        kw.update(text_pair_column=data.text_pair_column, max_length=data.max_length)
        train_set = encode_classification(train_rows, tokenizer, labels, **kw)
        eval_set = encode_classification(eval_rows, tokenizer, labels, **kw)
        collator = DataCollatorWithPadding(tokenizer)
    else:
        from transformers import DataCollatorForSeq2Seq

        kw = {"prompt_column": data.prompt_column, "response_column": data.response_column}
        train_set = encode_sft(train_rows, tokenizer, max_length=data.max_length, **kw)
        eval_set = encode_sft(eval_rows, tokenizer, max_length=data.max_length, **kw)
        collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    return TaskData(
        model=model,
        tokenizer=tokenizer,
        model_path=model_path,
        train_rows=train_rows,
        eval_rows=eval_rows,
        train_set=train_set,
        eval_set=eval_set,
        collator=collator,
        label_names=labels.names if labels else None,
        sources=sources,
    )


def _check_head(model_config: Any, needed: int, requested: int | None) -> None:
    archs = getattr(model_config, "architectures", None) or []
    has_head = any(a.endswith("ForSequenceClassification") for a in archs)
    if has_head and requested is None and model_config.num_labels != needed:
        raise UsageError(
            f"the model's classification head has {model_config.num_labels} classes but the labels need {needed}: "
            f"fix the label column, or pass --num-labels {needed} to replace the head with a new one"
        )


def _load_tokenizer(path: str, task: Task) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise UsageError(
            f"no usable tokenizer in {path!r} ({err}): save one there with tokenizer.save_pretrained"
        ) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UsageError(f"the tokenizer in {path!r} has neither a pad nor an eos token: add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    if task == "sft":
        tokenizer.padding_side = "right"  # training; generation switches to left padding
    return tokenizer


def _load_model(path: str, data: DataConfig, model_config: Any, labels: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if data.task == "sft":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.config.use_cache = False
        return model
    archs = getattr(model_config, "architectures", None) or []
    replace = data.num_labels is not None and model_config.num_labels != labels.num_labels
    kwargs: dict[str, Any] = {"num_labels": labels.num_labels, "dtype": torch.float32}
    if not any(a.endswith("ForSequenceClassification") for a in archs) or replace:
        kwargs["id2label"] = dict(enumerate(labels.names))
        kwargs["label2id"] = labels.label2id
    model = AutoModelForSequenceClassification.from_pretrained(path, ignore_mismatched_sizes=replace, **kwargs)
    if model.config.pad_token_id is None:
        from transformers import AutoTokenizer

        model.config.pad_token_id = AutoTokenizer.from_pretrained(path).pad_token_id or 0
    return model


# --- adapters and the optimizer ------------------------------------------------------------------------------------


def make_optimizer(
    model: nn.Module,
    *,
    learning_rate: float,
    weight_decay: float = 0.0,
    loraplus_lr_ratio: float | None = None,
) -> torch.optim.Optimizer | None:
    """The LoRA+ optimizer (AdamW; lora_B and other 1-D parameters at `loraplus_lr_ratio` x `learning_rate`), built
    with PEFT's `create_loraplus_optimizer`; None without a ratio (the Trainer then builds its default AdamW).

    Pass it as `Trainer(..., optimizers=(make_optimizer(...), None))`.
    """
    if loraplus_lr_ratio is None:
        return None
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model,
        torch.optim.AdamW,
        lr=learning_rate,
        loraplus_lr_ratio=loraplus_lr_ratio,
        loraplus_weight_decay=weight_decay,
    )


def lora_model(model: nn.Module, config: GoraConfig, method: Method) -> Any:
    """Plain LoRA at GoRA's settings: the same targets, r = config.r everywhere, α = config.lora_alpha, scaling α/r
    (`lora`, PEFT's default) or α/√r (`rslora`), PEFT's default init (B = 0)."""
    from peft import LoraConfig, get_peft_model

    from .targets import find_targets

    targets = find_targets(model, config)
    kwargs = dict(config.lora_kwargs)
    kwargs.setdefault("fan_in_fan_out", all(t.transposed for t in targets))
    lora_config = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=[t.name for t in targets],
        use_rslora=method == "rslora",
        **kwargs,
    )
    peft_model = get_peft_model(model, lora_config)
    peft_model.__dict__["lora_shapes"] = {t.name: (t.m, t.n) for t in targets}
    return peft_model


# --- evaluation ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_classification(model: nn.Module, dataset: Sequence[dict], collator: Any, batch_size: int) -> dict:
    """{"accuracy", "loss"} of `model` on an encoded classification set, in eval mode."""
    correct, loss_sum, count = 0, 0.0, 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    dataset = _by_length(dataset)
    try:
        for start in range(0, len(dataset), batch_size):
            batch = {k: v.to(device) for k, v in collator(list(dataset[start : start + batch_size])).items()}
            out = model(**batch)
            n = batch["labels"].shape[0]
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            loss_sum += float(out.loss) * n
            count += n
    finally:
        model.train(was_training)
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
    device = next(model.parameters()).device
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    hits, examples = 0, []
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
        model.train(was_training)
        tokenizer.padding_side = side
    return {"exact_match": hits / len(rows), "examples": examples}


@torch.no_grad()
def evaluate_loss(model: nn.Module, dataset: Sequence[dict], collator: Any, batch_size: int) -> float:
    """Mean loss per batch of `model` on an encoded set, in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = []
    dataset = _by_length(dataset)
    try:
        for start in range(0, len(dataset), batch_size):
            batch = {k: v.to(device) for k, v in collator(list(dataset[start : start + batch_size])).items()}
            losses.append(float(model(**batch).loss))
    finally:
        model.train(was_training)
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


# --- the whole run -------------------------------------------------------------------------------------------------


def default_output_dir(train: TrainConfig, data: DataConfig) -> str:
    """outputs/<method>-<task>-<timestamp>."""
    return os.path.join("outputs", f"{train.method}-{data.task}-{datetime.now():%Y%m%d-%H%M%S}")


def estimation_loader(task: TaskData, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    """Batches for gradient estimation: the training set in a seeded random order that is the same on every pass
    (so the batches after the first N, which gamma='auto' takes as held-out batches, never repeat gradient ones)."""
    order = torch.randperm(len(task.train_set), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = [task.train_set[i] for i in order]
    return torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=task.collator)


def finetune(
    data: DataConfig,
    train: TrainConfig,
    gora: GoraConfig,
    *,
    preset: str | None = DEFAULT_PRESET,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run a whole fine-tune and write its output folder; returns the report (also written as report.json).

    The output folder is written under a temporary name beside the target and renamed at the end, so a failed run
    leaves nothing behind.

    Raises:
        UsageError / ValueError: bad input, with what to change (nothing is written).
    """
    from .report import check_output_folder, staged_folder

    p = PRESETS[preset] if preset else None
    output_dir = train.output_dir or default_output_dir(train, data)
    check_output_folder(output_dir, train.overwrite)  # before any slow step
    timings: dict[str, float] = {}
    start = time.perf_counter()
    task = load_task(data, train, p)
    timings["load_s"] = time.perf_counter() - start
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task.model.to(device)
    logger.info(
        "%s: %d training / %d evaluation examples from %s",
        data.task,
        len(task.train_set),
        len(task.eval_set),
        task.sources["train"],
    )
    metrics: dict[str, Any] = {}
    if train.eval_before:
        start = time.perf_counter()
        metrics["before"] = evaluate(task.model, task, data, train)
        timings["eval_before_s"] = time.perf_counter() - start
    with staged_folder(output_dir, train.overwrite) as tmp:
        peft_model, params = _adapt(task, gora, train, timings, show_progress)
        if train.method == "gora" and train.eval_before:
            start = time.perf_counter()
            metrics["init"] = evaluate(peft_model, task, data, train)
            timings["eval_init_s"] = time.perf_counter() - start
        start = time.perf_counter()
        log_history = _train(peft_model, task, train, tmp / "checkpoints", show_progress)
        timings["train_s"] = time.perf_counter() - start
        start = time.perf_counter()
        metrics["after"] = evaluate(peft_model, task, data, train)
        timings["eval_after_s"] = time.perf_counter() - start
        start = time.perf_counter()
        peft_model.save_pretrained(tmp / "adapter")
        task.tokenizer.save_pretrained(tmp / "adapter")
        timings["save_s"] = time.perf_counter() - start
        report = _finetune_report(data, train, gora, preset, task, metrics, params, timings, log_history, peft_model)
        report["outputs"] = _write_report(report, tmp, output_dir, log_history)
    return report


def _adapt(
    task: TaskData, gora: GoraConfig, train: TrainConfig, timings: dict[str, float], show_progress: bool
) -> tuple[Any, dict[str, Any]]:
    from .model import get_gora_model

    start = time.perf_counter()
    if train.method == "gora":
        loader = estimation_loader(task, train.batch_size, train.train_seed)
        peft_model = get_gora_model(task.model, gora, loader, show_progress=show_progress)
        record = peft_model.gora_records["default"]
        for key, value in record.timings_s.items():
            timings[f"gora_{key}"] = value
        timings["gora_s"] = time.perf_counter() - start
        ranks = dict(record.ranks)
        adapter, lora = record.trainable_params, record.lora_params
        shapes = {k: tuple(v) for k, v in record.shapes.items()}
    else:
        peft_model = lora_model(task.model, gora, train.method)
        shapes = peft_model.lora_shapes
        ranks = dict.fromkeys(shapes, gora.r)
        adapter = lora = gora.r * sum(m + n for m, n in shapes.values())
        timings[f"{train.method}_init_s"] = time.perf_counter() - start
    trainable, total = peft_model.get_nb_trainable_parameters()
    params = {
        "adapter": adapter,
        "lora_same_r": lora,
        "ratio_to_lora": adapter / lora,
        "trainable_total": trainable,
        "model_total": total,
        "ranks": ranks,
        "shapes": {k: list(v) for k, v in shapes.items()},
    }
    return peft_model, params


def _train(peft_model: Any, task: TaskData, train: TrainConfig, folder: Path, show_progress: bool) -> list[dict]:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(folder),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.eval_batch_size,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        warmup_steps=train.warmup_ratio,
        lr_scheduler_type=train.lr_scheduler,
        logging_steps=train.logging_steps,
        save_strategy=train.save_strategy,
        save_steps=train.save_steps,
        save_total_limit=1,
        seed=train.train_seed,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        disable_tqdm=not show_progress,
        dataloader_num_workers=0,
    )
    optimizer = make_optimizer(
        peft_model,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        loraplus_lr_ratio=train.loraplus_lr_ratio,
    )
    trainer = Trainer(
        model=peft_model,
        args=args,
        train_dataset=task.train_set,
        data_collator=task.collator,
        optimizers=(optimizer, None),
    )
    trainer.train()
    return list(trainer.state.log_history)


def _finetune_report(
    data: DataConfig,
    train: TrainConfig,
    gora: GoraConfig,
    preset: str | None,
    task: TaskData,
    metrics: dict[str, Any],
    params: dict[str, Any],
    timings: dict[str, float],
    log_history: list[dict],
    peft_model: Any,
) -> dict[str, Any]:
    from .report import rank_table

    metric = "accuracy" if data.task == "classification" else "exact_match"
    record = getattr(peft_model, "gora_records", {}).get("default")
    return {
        "task": data.task,
        "method": train.method,
        "preset": preset if data.train_file is None or data.model is None else None,
        "metric": metric,
        "metrics": metrics,
        "params": params,
        "rank_table": rank_table(params["ranks"]).to_dict(),
        "timings_s": timings,
        "sources": task.sources,
        "sizes": {"train": len(task.train_set), "eval": len(task.eval_set)},
        "labels": task.label_names,
        "config": {
            "data": dataclasses.asdict(data),
            "train": dataclasses.asdict(train),
            "gora": gora.to_dict(),
        },
        "gora": {"num_batches": record.num_batches, "gamma": record.gamma, "extra": record.extra} if record else None,
        "log_history": log_history,
    }


def _write_report(report: dict[str, Any], tmp: Path, final: str, log_history: list[dict]) -> dict[str, str]:
    from .report import RankTable, plot_loss_curve, plot_rank_heatmap, write_json

    table = RankTable(
        **{
            "layers": report["rank_table"]["layers"],
            "types": report["rank_table"]["module_types"],
            "cells": report["rank_table"]["ranks"],
        }
    )
    title = f"{report['method']} ranks (r={report['config']['gora']['r']})"
    outputs = {
        "folder": final,
        "adapter": os.path.join(final, "adapter"),
        "report": os.path.join(final, "report.json"),
    }
    plot_rank_heatmap(table, tmp / "ranks.png", title=title)
    outputs["rank_heatmap"] = os.path.join(final, "ranks.png")
    if plot_loss_curve(log_history, tmp / "loss.png", title=f"{report['method']} training loss") is not None:
        outputs["loss_curve"] = os.path.join(final, "loss.png")
    if any((tmp / "checkpoints").glob("checkpoint-*")):
        outputs["checkpoints"] = os.path.join(final, "checkpoints")
    report["outputs"] = outputs
    write_json(report, tmp / "report.json")
    return outputs


# --- allocation only, and merging ----------------------------------------------------------------------------------


def allocate_only(
    data: DataConfig,
    alloc: AllocateConfig,
    gora: GoraConfig,
    *,
    preset: str | None = DEFAULT_PRESET,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Gradient estimation (or `alloc.load_stats`) and allocation, no training.

    Writes the output folder (ranks.png, report.json) and, with `alloc.save_stats`, the gradient statistics
    (safetensors, `gora.save_gradient_stats`). Returns the report.
    """
    from .allocate import allocate_ranks
    from .estimate import estimate_gradients
    from .importance import compute_importances
    from .report import check_output_folder, rank_table, staged_folder

    p = PRESETS[preset] if preset else None
    output_dir = alloc.output_dir or os.path.join("outputs", f"allocate-{datetime.now():%Y%m%d-%H%M%S}")
    check_output_folder(output_dir, alloc.overwrite)
    load_stats, save_stats = alloc.load_stats, alloc.save_stats
    if load_stats is not None and not Path(load_stats).is_file():
        raise UsageError(f"--load-stats {load_stats!r}: no such file (write one with --save-stats)")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    task = load_task(data, alloc, p)
    timings["load_s"] = time.perf_counter() - start
    start = time.perf_counter()
    if load_stats is not None:
        from . import load_gradient_stats

        stats = load_gradient_stats(load_stats, task.model)
        timings["load_stats_s"] = time.perf_counter() - start
    else:
        loader = estimation_loader(task, alloc.batch_size, alloc.train_seed)
        stats = estimate_gradients(task.model, gora, loader, show_progress=show_progress)
        timings["estimate_s"] = time.perf_counter() - start
    start = time.perf_counter()
    importances = compute_importances(task.model, stats, gora.importance)
    allocation = allocate_ranks(importances, stats.shapes, gora)
    timings["allocate_s"] = time.perf_counter() - start
    report = {
        "ranks": allocation.ranks,
        "importances": allocation.importances,
        "rank_table": rank_table(allocation.ranks).to_dict(),
        "params": {
            "adapter": allocation.trainable_params,
            "lora_same_r": allocation.lora_params,
            "ratio_to_lora": allocation.param_ratio,
        },
        "budget": allocation.budget,
        "num_batches": stats.num_batches,
        "stats": {"loaded_from": load_stats, "saved_to": save_stats},
        "timings_s": timings,
        "sources": task.sources,
        "config": {"data": dataclasses.asdict(data), "gora": gora.to_dict()},
    }
    with staged_folder(output_dir, alloc.overwrite) as tmp:
        from .report import plot_rank_heatmap, write_json

        plot_rank_heatmap(rank_table(allocation.ranks), tmp / "ranks.png", title=f"GoRA ranks (r={gora.r})")
        report["outputs"] = {
            "folder": output_dir,
            "rank_heatmap": os.path.join(output_dir, "ranks.png"),
            "report": os.path.join(output_dir, "report.json"),
        }
        write_json(report, tmp / "report.json")
    if save_stats is not None:
        from . import save_gradient_stats

        save_gradient_stats(stats, save_stats, task.model)
    return report


def merge_adapter(
    adapter: str, output_dir: str, *, base: str | None = None, overwrite: bool = False
) -> dict[str, str]:
    """Merge a saved LoRA adapter into its base model (`merge_and_unload`) and save a standalone model folder.

    Args:
        adapter: Folder with adapter_config.json (as `gora finetune` writes under adapter/).
        output_dir: Where to write the merged model (and the tokenizer, if the adapter folder or base has one).
        base: Base model folder (default: `base_model_name_or_path` in adapter_config.json).
        overwrite: Replace a non-empty `output_dir`.
    """
    import json

    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from .report import check_output_folder, staged_folder

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise UsageError(f"{adapter!r} has no adapter_config.json: give the adapter folder (e.g. <run>/adapter)")
    check_output_folder(output_dir, overwrite)
    peft_config = PeftConfig.from_pretrained(adapter)
    base = base or peft_config.base_model_name_or_path
    if not base or not (Path(base) / "config.json").is_file():
        raise UsageError(
            f"base model {base!r} not found: pass --base, the folder of the model the adapter was made on"
        )
    task_type = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("task_type")
    loader = AutoModelForSequenceClassification if task_type == "SEQ_CLS" else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if task_type == "SEQ_CLS":
        kwargs.update(_head_kwargs(adapter))
    model = loader.from_pretrained(base, **kwargs)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    with staged_folder(output_dir, overwrite) as tmp:
        merged.save_pretrained(tmp)
        for folder in (adapter, base):
            try:
                AutoTokenizer.from_pretrained(folder).save_pretrained(tmp)
                break
            except Exception:  # no tokenizer there; try the next folder
                continue
    return {"model": output_dir, "base": base, "adapter": adapter}


def _head_kwargs(adapter: str) -> dict[str, Any]:
    """num_labels of a classification adapter, read from the saved head's weight shape."""
    from safetensors import safe_open

    path = Path(adapter) / "adapter_model.safetensors"
    if not path.is_file():
        return {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            if "modules_to_save" not in key and key.endswith(("classifier.weight", "score.weight", "out_proj.weight")):
                return {"num_labels": handle.get_slice(key).get_shape()[0]}
    return {}
