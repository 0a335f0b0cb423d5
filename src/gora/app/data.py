"""Tabular data for the CLI: local JSONL/JSON/CSV/TSV/Parquet files or a `datasets.save_to_disk` folder, turned
into token batches for sequence classification or causal-LM supervised fine-tuning (loss on the response only).

Rows are plain dicts; no `datasets` needed except to read a `save_to_disk` folder (`pip install gora-peft[datasets]`).
`load_task` puts a run's inputs together: the model folder checked and loaded with its tokenizer, the rows read
(or the preset's) and encoded. Every problem with the user's model or data raises `UsageError` with a message that
says what to change; torch and transformers are imported only when a task is loaded.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from .runconfig import AllocateConfig, DataConfig, Preset, Task, TrainConfig

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt and padding)
FILE_KINDS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}


class UsageError(ValueError):
    """Bad input from the user (path, column, data, model type): the message says what to change."""


def read_rows(path: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a local data file or a `datasets.save_to_disk` folder.

    Args:
        path: A `.jsonl`/`.ndjson`, `.json` (a list of objects), `.csv`, `.tsv` or `.parquet` file, or a folder
            written by `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk`.
        split: Which split of a saved `DatasetDict` to read.

    Raises:
        UsageError: missing path, unknown format, unreadable or empty file.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"data file {str(path)!r} does not exist: check the path")
    if path.is_dir():
        rows = _read_saved_dataset(path, split)
    else:
        kind = FILE_KINDS.get(path.suffix.lower())
        if kind is None:
            raise UsageError(
                f"cannot read {path.name!r}: use a .jsonl, .json, .csv, .tsv or .parquet file, or a folder written by "
                "datasets' save_to_disk"
            )
        try:
            rows = _READERS[kind](path)
        except UsageError:
            raise
        except Exception as err:  # malformed file: say which and why
            raise UsageError(f"cannot read {str(path)!r} as {kind}: {err}") from err
    if not rows:
        raise UsageError(f"{str(path)!r} holds no rows: give a file with at least one example")
    return rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise UsageError(f"{str(path)!r} line {number} is not a JSON object: write one object per line")
                rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):  # column-oriented
        keys = list(data)
        return [dict(zip(keys, values)) for values in zip(*data.values())]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UsageError(f"{str(path)!r} must hold a list of objects (or use .jsonl with one object per line)")
    return data


def _read_csv(path: Path, delimiter: str = ",") -> list[dict[str, Any]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return [dict(row) for row in csv.DictReader(handle, delimiter=delimiter)]


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise UsageError("reading .parquet needs pyarrow: run `pip install pyarrow` (or use .jsonl/.csv)") from err
    return pq.read_table(path).to_pylist()


_READERS = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
    "tsv": lambda p: _read_csv(p, "\t"),
    "parquet": _read_parquet,
}


def _read_saved_dataset(path: Path, split: str) -> list[dict[str, Any]]:
    if not any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
        raise UsageError(
            f"{str(path)!r} is a folder but not one written by datasets' save_to_disk: give a .jsonl, .csv or "
            ".parquet file instead"
        )
    try:
        import datasets
    except ImportError as err:
        raise UsageError(
            f"{str(path)!r} is a datasets folder; reading it needs `pip install datasets` (or "
            "`pip install gora-peft[datasets]`), or export it to .jsonl/.parquet"
        ) from err
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UsageError(f"{str(path)!r} has splits {sorted(loaded)}, not {split!r}: name the file of that split")
        loaded = loaded[split]
    return loaded.to_list()


def check_columns(rows: Sequence[dict[str, Any]], columns: Sequence[str], source: str, what: Sequence[str]) -> None:
    """Raise UsageError unless every row of `rows` has every column (`what` names the option that sets each)."""
    present = set(rows[0])
    for column, option in zip(columns, what):
        if column not in present:
            raise UsageError(
                f"{source} has no column {column!r} (columns: {', '.join(sorted(map(str, present)))}): "
                f"name the right one with {option}"
            )
        missing = sum(1 for row in rows if row.get(column) is None)
        if missing:
            raise UsageError(f"{missing} row(s) of {source} have no value in column {column!r}: fill or drop them")


def split_rows(
    rows: list[dict[str, Any]], fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, eval): a seeded random `fraction` of `rows` held out for evaluation (at least one row each)."""
    if len(rows) < 2:
        raise UsageError("one row cannot be split into training and evaluation data: give more rows or --eval-file")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, math.ceil(len(rows) * fraction)), len(rows) - 1)
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


# --- classification -------------------------------------------------------------------------------------------------


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


# --- causal-LM supervised fine-tuning -------------------------------------------------------------------------------
#
# Three row formats (DataConfig.sft_format; "auto" takes the first whose columns the data has):
#   messages           a conversation [{role, content}, ...] rendered by the tokenizer's chat template; the loss is on
#                      every assistant turn (its content and the template's end-of-turn marker)
#   prompt-completion  TRL's: strings concatenated as they are (prompt + completion + eos, loss on the completion), or
#                      both lists of messages (chat template; loss on the completion's assistant turns)
#   prompt-response    gora's own: the prompt in the chat template's user turn (generation prompt included) if the
#                      tokenizer has a template, else followed by a newline; loss on the response (+ eos)
# Each row becomes an `SftExample`: text segments marked learned or not, the text a model generates from at
# evaluation, and the reference answer for exact match.

SFT_FORMATS = ("messages", "prompt-completion", "prompt-response")


@dataclass(frozen=True)
class SftExample:
    """One SFT example as text.

    Attributes:
        segments: (text, learned) in order; the tokens of learned segments carry the loss.
        head: What the model is given to generate from at evaluation (the prompt as the model sees it).
        answer: The reference final answer for exact match (the answer column, else parsed from the target text).
        special_tokens: Whether the first segment is tokenized with the tokenizer's special tokens (plain text; a
            chat template writes its own).
        eos: Whether the example ends with the eos token (appended when the text does not end with it).
    """

    segments: tuple[tuple[str, bool], ...]
    head: str
    answer: str | None
    special_tokens: bool = False
    eos: bool = False


def prompt_and_response_text(tokenizer: Any, prompt: str, response: str | None = None) -> tuple[str, str]:
    """The prompt as the model sees it (chat template with the generation prompt, if the tokenizer has one) and the
    response text that follows it (ending with the end-of-turn / end-of-sequence marker)."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        if response is None:
            return head, ""
        full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(head):
            return head, full[len(head) :]
        logger.debug("chat template does not extend the generation prompt; using a plain continuation")
        return head, response + (tokenizer.eos_token or "")
    head = prompt.rstrip() + "\n"
    return head, "" if response is None else response + (tokenizer.eos_token or "")


def resolve_sft_format(data: DataConfig, columns: set[str], source: str) -> str:
    """The row format of SFT data: `data.sft_format`, or with "auto" the first of messages, prompt-completion,
    prompt-response whose columns the data has.

    Raises:
        UsageError: the columns of no format (auto), or of the format asked for, are there.
    """
    needs = {
        "messages": [(data.messages_column, "--messages-column")],
        "prompt-completion": [
            (data.prompt_column, "--prompt-column"),
            (data.completion_column, "--completion-column"),
        ],
        "prompt-response": [(data.prompt_column, "--prompt-column"), (data.response_column, "--response-column")],
    }
    if data.sft_format != "auto":
        for column, option in needs[data.sft_format]:
            if column not in columns:
                raise UsageError(
                    f"{source} has no column {column!r} (columns: {', '.join(sorted(map(str, columns)))}): name the "
                    f"right one with {option}"
                )
        return data.sft_format
    for fmt in SFT_FORMATS:
        if all(column in columns for column, _ in needs[fmt]):
            return fmt
    raise UsageError(
        f"{source} has none of the SFT formats' columns (columns: {', '.join(sorted(map(str, columns)))}): give "
        f"{data.messages_column!r} (chat messages), {data.prompt_column!r} + {data.completion_column!r}, or "
        f"{data.prompt_column!r} + {data.response_column!r} columns, or name yours with --messages-column, "
        "--prompt-column, --completion-column, --response-column"
    )


def sft_examples(
    rows: Sequence[dict[str, Any]], tokenizer: Any, data: DataConfig, fmt: str, source: str
) -> list[SftExample]:
    """The rows of SFT data in format `fmt` as `SftExample`s.

    Raises:
        UsageError: a conversation that is not a list of {role, content} messages, one without an assistant turn,
            messages without a chat template, or a chat template under which the assistant turns cannot be found.
    """
    from . import assets

    def answer(row: dict[str, Any], target: str) -> str | None:
        return str(row[data.answer_column]) if data.answer_column else assets.final_answer(target)

    out = []
    for number, row in enumerate(rows, 1):
        where = f"row {number} of {source}"
        if fmt == "messages":
            messages = _messages(row[data.messages_column], f"{where}, column {data.messages_column!r}")
            learned = [m["role"] == "assistant" for m in messages]
            if not any(learned):
                raise UsageError(
                    f"{where} has no assistant turn in {data.messages_column!r}: every conversation needs at least "
                    "one assistant message to learn from (add the reply, or drop the row)"
                )
            last = max(i for i, flag in enumerate(learned) if flag)
            out.append(
                _chat_example(tokenizer, messages, learned, last, answer(row, messages[last]["content"]), where)
            )
            continue
        prompt, target_column = (
            row[data.prompt_column],
            (data.completion_column if fmt == "prompt-completion" else data.response_column),
        )
        target = row[target_column]
        if fmt == "prompt-completion" and not isinstance(prompt, str):  # conversational prompt-completion
            prompt_messages = _messages(prompt, f"{where}, column {data.prompt_column!r}")
            completion = _messages(target, f"{where}, column {target_column!r}")
            messages = prompt_messages + completion
            learned = [i >= len(prompt_messages) and m["role"] == "assistant" for i, m in enumerate(messages)]
            if not any(learned):
                raise UsageError(
                    f"{where} has no assistant turn in its completion {target_column!r}: nothing to learn"
                )
            last = max(i for i, flag in enumerate(learned) if flag)
            out.append(
                _chat_example(tokenizer, messages, learned, last, answer(row, messages[last]["content"]), where)
            )
        elif fmt == "prompt-completion":
            prompt, target = str(prompt), str(target)
            out.append(SftExample(((prompt, False), (target, True)), prompt, answer(row, target), True, True))
        else:
            chat = bool(getattr(tokenizer, "chat_template", None))
            head, tail = prompt_and_response_text(tokenizer, str(prompt), str(target))
            out.append(SftExample(((head, False), (tail, True)), head, answer(row, str(target)), not chat, not chat))
    return out


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    """A conversation as a list of {"role", "content"} with text content (a JSON string of one is read too)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise UsageError(f"{where} is text, not a list of messages: {err}") from err
    ok = isinstance(value, (list, tuple)) and len(value) > 0
    ok = ok and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )
    if not ok:
        raise UsageError(f"{where} must be a non-empty list of messages {{'role': ..., 'content': <text>}}")
    return [dict(m) for m in value]


def _chat_example(
    tokenizer: Any, messages: list[dict[str, str]], learned: list[bool], last: int, answer: str | None, where: str
) -> SftExample:
    """The segments of a conversation under the tokenizer's chat template, found by rendering prefixes: a learned
    turn i spans from the end of render(messages[:i], generation prompt) to the end of render(messages[:i+1])."""
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(
            f"{where}: chat messages need a tokenizer with a chat template, and this one has none: set "
            "tokenizer.chat_template and save it in the model folder, or use prompt/completion columns"
        )

    def render(prefix: list[dict[str, str]], generation: bool) -> str:
        try:
            return tokenizer.apply_chat_template(prefix, tokenize=False, add_generation_prompt=generation)
        except Exception as err:  # the template refuses this conversation (roles, order)
            raise UsageError(f"{where}: the chat template cannot render this conversation ({err})") from err

    segments: list[tuple[str, bool]] = []
    done = ""
    for i, flag in enumerate(learned):
        if not flag:
            continue
        head, full = render(messages[:i], True), render(messages[: i + 1], False)
        if not (head.startswith(done) and full.startswith(head)):
            raise UsageError(
                f"{where}: the chat template renders the conversation differently as it grows (a turn's text "
                "changes once later turns follow), so the assistant turns cannot be told apart: use prompt/completion "
                "columns instead"
            )
        segments += [(head[len(done) :], False), (full[len(head) :], True)]
        done = full
    whole = render(messages, False)
    if not whole.startswith(done):
        raise UsageError(f"{where}: the chat template renders the whole conversation differently from its turns")
    if whole[len(done) :]:
        segments.append((whole[len(done) :], False))
    return SftExample(tuple(s for s in segments if s[0]), render(messages[:last], True), answer)


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


# --- a whole task: model + rows -> tokenizer, model, encoded sets --------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass
class TaskData:
    """Everything loaded for a run: model, tokenizer, rows and encoded sets (`eval_examples`: the SFT evaluation
    examples as text, for generation)."""

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
    eval_examples: list[SftExample] = field(default_factory=list)


def check_model(path: str, task: Task) -> Any:
    """The model's `PretrainedConfig`, after checking that `path` (a local transformers folder, or a Hugging Face
    Hub id) is a model fit for `task`.

    Raises:
        UsageError: a missing folder, a hub id that is not in the local cache while the hub cannot be reached, no
            config.json, or a model type the task cannot use.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    folder = Path(path)
    if folder.exists():
        if not (folder / "config.json").is_file():
            raise UsageError(
                f"{path!r} has no config.json, so it is not a transformers model folder: save the model with "
                "save_pretrained() and pass that folder to --model"
            )
    elif not _HUB_ID.match(path):
        raise UsageError(f"model folder {path!r} does not exist: give --model a local transformers folder")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:
        if folder.exists():
            raise UsageError(f"cannot read the model config in {path!r}: {err}") from err
        raise UsageError(_hub_message(path, err)) from err
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


def _hub_message(model_id: str, err: BaseException) -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return (
            f"--model {model_id!r} is not a local folder, and as a Hugging Face Hub id it is not in the local cache: "
            "the hub cannot be reached, since gora runs offline (HF_HUB_OFFLINE=1) unless told otherwise: run with "
            f"HF_HUB_OFFLINE=0 to download it, or pass the local folder of the model"
        )
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"--model {model_id!r} is not a local folder, and the Hugging Face Hub cannot be reached or has no such "
        f"model ({first}): check the id and the connection, or pass the local folder of the model"
    )


def check_bitsandbytes(option: str = "--load-in-4bit") -> None:
    """Raise UsageError unless bitsandbytes (the backend of --load-in-4bit / --load-in-8bit) can be imported."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise UsageError(
            f"{option} needs bitsandbytes, which is not installed: pip install 'gora-peft[quant]' (or "
            "pip install bitsandbytes)"
        ) from err


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (x86: AVX512-BF16 or AMX; ARM: the BF16 extension).

    Without it torch still runs bfloat16 by converting to float32 and back, several times slower than float32; gora
    refuses --dtype bfloat16 there instead of running it that way.
    """
    import platform

    import torch

    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux (e.g. Apple silicon, whose recent chips have bf16): trust torch
        return True
    return "bf16" in flags


def check_precision(data: DataConfig, device: Any) -> None:
    """Refuse a --dtype this device cannot train in: bfloat16 without hardware support, float16 on a CPU (mixed
    precision with loss scaling needs a GPU).

    Raises:
        UsageError: with what to use instead.
    """
    import torch

    if data.dtype == "bfloat16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UsageError(
                f"--dtype bfloat16: this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16 support: use "
                "--dtype float16 or float32"
            )
        if device.type == "cpu" and not cpu_supports_bf16():
            raise UsageError(
                "--dtype bfloat16: this CPU has no native bfloat16 support (AVX512-BF16 or AMX on x86, BF16 on ARM), "
                "so torch would emulate it, slower than float32: use --dtype float32 (or a GPU)"
            )
    if data.dtype == "float16" and device.type == "cpu":
        raise UsageError(
            "--dtype float16 trains with mixed precision and loss scaling, which needs a GPU: on a CPU use --dtype "
            "bfloat16 (where the CPU supports it) or float32"
        )


def load_rows(
    data: DataConfig, preset: Preset | None, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, str]]:
    """(train rows, eval rows, where they came from), checked for the columns the task needs; for SFT, sources
    also holds the row format ("format")."""
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
        fmt = resolve_sft_format(data, set(train[0]), f"the training data ({sources['train']})")
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
    check_columns(train, columns, f"the training data ({sources['train']})", options)
    check_columns(evaluation, columns, f"the evaluation data ({sources['eval']})", options)
    return train, evaluation, sources


def load_task(
    data: DataConfig, train: TrainConfig | AllocateConfig, preset: Preset | None, device: Any = None
) -> TaskData:
    """Check the inputs (cheap checks first), then load tokenizer, model (on `device`, default: the CPU) and the
    encoded train/eval sets.

    Raises:
        UsageError: any problem with the model or the data, with what to change.
    """
    import torch
    from transformers import set_seed

    device = torch.device("cpu") if device is None else torch.device(device)
    if train.threads is not None:
        torch.set_num_threads(train.threads)
    model_path = data.model if data.model is not None else (preset.model() if preset else None)
    if model_path is None:
        raise UsageError("no model: pass --model (a local transformers folder) or a --preset")
    if data.load_in_4bit or data.load_in_8bit:
        check_bitsandbytes("--load-in-4bit" if data.load_in_4bit else "--load-in-8bit")
    check_precision(data, device)
    model_config = check_model(model_path, data.task)
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
    eval_examples: list[SftExample] = []
    if data.task == "classification":
        from transformers import DataCollatorWithPadding

        kw = {"text_column": data.text_column, "label_column": data.label_column}
        kw.update(text_pair_column=data.text_pair_column, max_length=data.max_length)
        train_set = encode_classification(train_rows, tokenizer, labels, **kw)
        eval_set = encode_classification(eval_rows, tokenizer, labels, **kw)
        collator = DataCollatorWithPadding(tokenizer)
    else:
        from transformers import DataCollatorForSeq2Seq

        fmt = sources["format"]
        train_examples = sft_examples(train_rows, tokenizer, data, fmt, f"the training data ({sources['train']})")
        eval_examples = sft_examples(eval_rows, tokenizer, data, fmt, f"the evaluation data ({sources['eval']})")
        train_set = encode_sft(train_examples, tokenizer, max_length=data.max_length)
        eval_set = encode_sft(eval_examples, tokenizer, max_length=data.max_length)
        collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
    model = _load_model(model_path, data, model_config, labels, device)
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
        eval_examples=eval_examples,
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


def _load_model(path: str, data: DataConfig, model_config: Any, labels: Any, device: Any) -> nn.Module:
    """The model in `data.dtype` on `device`; with `data.load_in_4bit` its linear layers in bitsandbytes NF4
    (compute dtype `data.dtype`), with `data.load_in_8bit` in LLM.int8, loaded straight onto `device` as
    bitsandbytes requires."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = getattr(torch, data.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if data.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": device}
    elif data.load_in_8bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}
    if data.task == "sft":
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        model.config.use_cache = False
    else:
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
    if data.load_in_4bit:
        _keep_4bit_trainable(model, device)
    elif not data.load_in_8bit:
        model.to(device)
    return model


def _keep_4bit_trainable(model: nn.Module, device: Any) -> None:
    """On a CPU, keep bitsandbytes' 4-bit weights in their trainable layout: on CPUs with AVX512-BF16 it repacks
    them for inference on the first eval-mode forward without gradients (gora's evaluation before training), and
    cannot backpropagate through the repacked layout afterwards."""
    if device.type != "cpu":
        return
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
