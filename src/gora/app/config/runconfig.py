"""What a whole run is configured by: the dataclasses behind `gora finetune / allocate / merge`, and the presets.

    DataConfig     model folder + data files + columns (task: classification or SFT)
    TrainConfig    the fine-tune (Trainer settings, method gora/lora/rslora, LoRA+, --load-stats)
    AllocateConfig estimation + allocation only (`gora allocate`)
    MergeConfig    merging an adapter into its base (`gora merge`)
    ExportConfig   exporting an adapter for serving engines (`gora export`)
    PRESETS        built-in model + data + settings (the embedded default: minilm-rt)

The CLI is generated from these dataclasses (cliconfig.py); `resolve_configs` layers the user's settings over a
preset's over the defaults. Validation happens on construction, with messages that say what to change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ...config import GoraConfig
from .. import assets

Task = Literal["classification", "sft"]
Dtype = Literal["float32", "bfloat16", "float16"]
Method = Literal["gora", "lora", "rslora"]
Dtype = Literal["float32", "bfloat16", "float16"]
SftFormat = Literal["auto", "messages", "prompt-completion", "prompt-response"]
EvalMetric = Literal["accuracy", "loss", "exact_match"]
GENERATE_CAP = 100  # exact match: answers generated when --max-eval-samples is not set
TASK_TYPES = {"classification": "SEQ_CLS", "sft": "CAUSAL_LM"}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class DataConfig:
    """Model and data: a local transformers folder and local data files (default: the preset's)."""

    model: str | None = field(
        default=None,
        metadata={
            "help": "local transformers model folder, or a Hugging Face Hub id (downloads need HF_HUB_OFFLINE=0: "
            "gora runs offline by default; an id already in the local cache works offline) (default: preset's)"
        },
    )
    dtype: Dtype = field(
        default="float32",
        metadata={
            "help": "dtype of the model's weights, and mixed precision for training with bfloat16/float16; GoRA's "
            "statistics and solves and the adapter stay float32"
        },
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "load the model's linear layers in 4-bit NF4 with bitsandbytes (QGoRA; compute dtype: --dtype; "
            "pip install 'gora-peft[quant]')"
        },
    )
    load_in_8bit: bool = field(
        default=False,
        metadata={
            "help": "load the model's linear layers in 8-bit (LLM.int8) with bitsandbytes "
            "(pip install 'gora-peft[quant]')"
        },
    )
    task: Task = field(
        default="classification",
        metadata={
            "help": "sequence classification (encoders) or causal-LM SFT (chat messages, prompt/completion or "
            "prompt/response columns)"
        },
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
    sft_format: SftFormat = field(
        default="auto",
        metadata={
            "help": "sft: messages (chat conversations; loss on the assistant turns, through the chat template), "
            "prompt-completion (TRL's: the prompt and the completion concatenated as they are, loss on the "
            "completion; or both as lists of messages), prompt-response (the prompt in the chat template's user turn "
            "if the tokenizer has one, else followed by a newline; loss on the response); auto: the first whose "
            "columns the data has"
        },
    )
    messages_column: str = field(
        default="messages", metadata={"help": "sft: column with conversations: lists of {role, content}"}
    )
    prompt_column: str = field(default="prompt", metadata={"help": "sft: column with the prompt"})
    completion_column: str = field(
        default="completion", metadata={"help": "sft: column with the completion to learn (prompt-completion)"}
    )
    response_column: str = field(
        default="response", metadata={"help": "sft: column with the response to learn (prompt-response)"}
    )
    answer_column: str | None = field(
        default=None,
        metadata={"help": "sft: column with the final answer for exact match (default: parsed from the response)"},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "use at most this many training rows"})
    max_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": "use at most this many evaluation rows (default: all; exact match generates answers for at most "
            f"{GENERATE_CAP} of them unless this is set)"
        },
    )
    max_length: int = field(default=128, metadata={"help": "truncate examples to this many tokens"})

    def __post_init__(self) -> None:
        _check(self.task in ("classification", "sft"), f"task={self.task!r} is not one of classification, sft")
        for name, kind in (("dtype", Dtype), ("sft_format", SftFormat)):
            choices = kind.__args__  # type: ignore[attr-defined]
            _check(
                getattr(self, name) in choices, f"{name}={getattr(self, name)!r} is not one of {', '.join(choices)}"
            )
        _check(
            isinstance(self.eval_fraction, (int, float)) and 0 < self.eval_fraction < 1,
            f"eval_fraction must be in (0, 1), got {self.eval_fraction!r}",
        )
        _check(self.max_length > 0, f"max_length must be a positive number of tokens, got {self.max_length}")
        for name in ("num_labels", "max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"{name} must be a positive integer (or unset), got {value}")
        _check(self.num_labels is None or self.num_labels >= 2, "num_labels must be >= 2 for classification")
        _check(
            not (self.load_in_4bit and self.load_in_8bit),
            "load_in_4bit and load_in_8bit both set: choose one quantization of the base model",
        )


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
    batch_size: int = field(
        default=16,
        metadata={"help": "batch size of training and of gradient estimation, per process (torchrun: per rank)"},
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "batches per optimizer step (the Trainer's; GoRA's G is the mean over batches either way)"},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute activations in the backward pass of training: less memory, ~30% more time"},
    )
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
    report_to: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "also log training to these Trainer integrations, e.g. tensorboard (logs in <output>/logs; "
            "pip install tensorboard) (default: none)"
        },
    )
    save_strategy: Literal["auto", "no", "steps", "epoch"] = field(
        default="auto",
        metadata={
            "help": "when to write Trainer checkpoints (under checkpoints/): auto = every --save-steps steps and at "
            "the end of every epoch; Ctrl-C / SIGTERM writes one in any case"
        },
    )
    save_steps: int = field(default=500, metadata={"help": "checkpoint every N steps (--save-strategy auto or steps)"})
    save_total_limit: int | None = field(
        default=2,
        metadata={
            "help": "keep the last N checkpoints (none: all); each holds the adapter with its AdamW state, "
            "~12 bytes per adapter parameter (README: resuming)"
        },
    )
    train_seed: int = field(default=0, metadata={"help": "seed of the data order, new heads and dropout"})
    eval_before: bool = field(default=True, metadata={"help": "also evaluate before training"})
    eval_metric: EvalMetric | None = field(
        default=None,
        metadata={
            "help": "the headline metric: accuracy (classification), loss (the eval loss; sft's default), "
            "exact_match (sft: greedy generation, the final answer compared; for short answers; --max-eval-samples "
            "caps the generation)"
        },
    )
    max_new_tokens: int = field(default=256, metadata={"help": "sft: tokens generated per evaluation problem"})
    threads: int | None = field(
        default=None,
        metadata={"help": "CPU threads for torch (default: torch's choice; 1 is faster on a busy machine)"},
    )
    load_stats: str | None = field(
        default=None,
        metadata={
            "help": "gradient statistics from `gora allocate --save-stats` (same model and targets): skip estimation"
        },
    )
    keep_stats: bool = field(
        default=True,
        metadata={
            "help": "keep GoRA's gradient statistics in <output>/init/ for --load-stats (with --gradient-store full "
            "as large as the adapted weights in float32; a resume does not need them)"
        },
    )

    def __post_init__(self) -> None:
        _check(self.method in ("gora", "lora", "rslora"), f"method={self.method!r} is not one of gora, lora, rslora")
        _check(
            self.load_stats is None or self.method == "gora",
            f"load_stats only applies to method='gora' ({self.method} does not estimate gradients): drop it",
        )
        _check(
            self.eval_metric is None or self.eval_metric in EvalMetric.__args__,  # type: ignore[attr-defined]
            f"eval_metric={self.eval_metric!r} is not one of accuracy, loss, exact_match",
        )
        _check(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        _check(self.max_steps is None or self.max_steps > 0, f"max_steps must be > 0 (or unset), got {self.max_steps}")
        _check(self.threads is None or self.threads > 0, f"threads must be a positive integer, got {self.threads}")
        _check(
            self.save_total_limit is None or self.save_total_limit > 0,
            f"save_total_limit must be a positive integer (or none: keep every checkpoint), got {self.save_total_limit}",
        )
        if self.report_to is not None:
            _check(
                all(isinstance(r, str) and r for r in self.report_to),
                f"report_to must be integration names (e.g. tensorboard), got {self.report_to!r}",
            )
            object.__setattr__(self, "report_to", tuple(self.report_to) or None)
        for name in (
            "batch_size",
            "gradient_accumulation_steps",
            "eval_batch_size",
            "logging_steps",
            "save_steps",
            "max_new_tokens",
        ):
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
    dtype: Dtype = field(
        default="float32",
        metadata={"help": "dtype of the saved merged weights (the merge itself is computed in float32)"},
    )
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty --output-dir"})


@dataclass(frozen=True)
class ExportConfig:
    """Export a saved LoRA adapter that llama.cpp, SGLang, any vLLM and PEFT compute alike.

    Each layer's scaling is folded into lora_B and every layer is zero-padded to one rank (gora.export_adapter)."""

    adapter: str = field(metadata={"help": "adapter folder (with adapter_config.json), e.g. <run>/adapter"})
    output_dir: str = field(metadata={"help": "folder for the exported adapter"})
    rank: int | None = field(
        default=None,
        metadata={"help": "rank R every layer is zero-padded to (default: the largest rank; a smaller R is refused)"},
    )
    dtype: Dtype | None = field(
        default=None, metadata={"help": "dtype of the written LoRA tensors (default: the adapter's own)"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty --output-dir"})

    def __post_init__(self) -> None:
        _check(self.rank is None or self.rank > 0, f"rank must be a positive integer (or unset), got {self.rank}")


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
        train={
            "batch_size": 8,
            "eval_batch_size": 10,
            "epochs": 1.0,
            "learning_rate": 2e-4,
            "max_new_tokens": 200,
            "eval_metric": "exact_match",
        },
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
    own_model, own_data = data.get("model") is not None, data.get("train_file") is not None
    data_kw = {**(p.data if p else {}), **data}
    if p and (own_data or own_model) and "task" not in data:
        data_kw["task"] = p.data["task"] if not own_model else DataConfig.task
    if p and own_data:  # the preset's row limits and scoring are for its own data
        for key in ("max_train_samples", "max_eval_samples", "answer_column"):
            if key not in data:
                data_kw.pop(key, None)
    gora_kw = {**(p.gora if p else {}), **gora}
    if p and own_model and "target_modules" not in gora:
        gora_kw.pop("target_modules", None)
    data_config = DataConfig(**data_kw)
    lora_kwargs = dict(gora_kw.pop("lora_kwargs", None) or {})
    lora_kwargs.setdefault("task_type", TASK_TYPES[data_config.task])
    names = {f.name for f in dataclasses.fields(train_cls)}
    preset_train = {k: v for k, v in (p.train if p else {}).items() if k in names}
    if own_data:
        preset_train.pop("eval_metric", None)
    train_config = train_cls(**{**preset_train, **train})
    return data_config, train_config, GoraConfig(**gora_kw, lora_kwargs=lora_kwargs)
