"""Rows of local data files: JSONL/JSON/CSV/TSV/Parquet files or a `datasets.save_to_disk` folder read as plain
dicts (no `datasets` needed except to read such a folder: `pip install gora-peft[datasets]`), split into training and
evaluation rows, and checked for the columns a task needs (`load_rows`)."""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError

if TYPE_CHECKING:
    from ..config.runconfig import DataConfig, Preset
    from .taskkind import TaskKind


FILE_KINDS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}


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


def load_rows(
    data: DataConfig, preset: Preset | None, seed: int, task: TaskKind
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, str]]:
    """(train rows, eval rows, where they came from), checked for the columns `task` needs (`TaskKind.columns`,
    which may add to the sources, e.g. the SFT row format under "format")."""
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
    columns, options = task.columns(data, train, sources)
    check_columns(train, columns, f"the training data ({sources['train']})", options)
    check_columns(evaluation, columns, f"the evaluation data ({sources['eval']})", options)
    return train, evaluation, sources
