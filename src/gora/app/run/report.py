"""What a run shows and leaves behind: the rank table (layer x module type), the rank heatmap, the loss curve and
`report.json` (the fine-tune writes each of them whole into its run folder with `gora.fileio.atomic_write`)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...config import GoraConfig
from ...fileio import atomic_write
from ...record import GoraRecord
from ..config.runconfig import DataConfig, TrainConfig
from ..tasks.registry import headline_metric
from ..tasks.taskkind import TaskData
from .runfolder import SERVING, STATUS, RunFolder, config_dict

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class RankTable:
    """Ranks arranged as layers (rows) x module types (columns); None where a layer has no such module."""

    layers: list[str]
    types: list[str]
    cells: list[list[int | None]]

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "module_types": self.types, "ranks": self.cells}


def rank_table(ranks: Mapping[str, int]) -> RankTable:
    """Split each module name at its first numeric component: `encoder.layer.3.attention.self.query` is layer 3,
    type `attention.self.query`. Modules without a layer number (e.g. a pooler) form rows of their own."""
    layers: list[str] = []
    types: list[str] = []
    table: dict[tuple[str, str], int] = {}
    for name, rank in ranks.items():
        match = _LAYER.match(name)
        layer, kind = (match.group(2), match.group(3)) if match else (name.rsplit(".", 1)[0], name.rsplit(".", 1)[-1])
        if layer not in layers:
            layers.append(layer)
        if kind not in types:
            types.append(kind)
        table[(layer, kind)] = rank
    numbered = sorted((x for x in layers if x.isdigit()), key=int) + [x for x in layers if not x.isdigit()]
    return RankTable(numbered, types, [[table.get((layer, kind)) for kind in types] for layer in numbered])


def format_rank_table(table: RankTable) -> str:
    """The rank table as aligned text, with each module type's mean rank in the last row."""
    head = ["layer", *table.types]
    rows = [[layer, *("-" if r is None else str(r) for r in cells)] for layer, cells in zip(table.layers, table.cells)]
    means = []
    for j in range(len(table.types)):
        values = [cells[j] for cells in table.cells if cells[j] is not None]
        means.append(f"{sum(values) / len(values):.1f}" if values else "-")
    rows.append(["mean", *means])
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    line = lambda row: "  ".join(cell.rjust(w) for cell, w in zip(row, widths))  # noqa: E731
    return "\n".join([line(head), *(line(row) for row in rows)])


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ModuleNotFoundError("the report's plots need matplotlib: run `pip install matplotlib`") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_rank_heatmap(table: RankTable, path: str | os.PathLike[str], title: str = "GoRA ranks") -> Path:
    """A heatmap of ranks over layers (rows) and module types (columns), each cell labelled with its rank."""
    plt = _pyplot()
    values = [[math.nan if r is None else r for r in cells] for cells in table.cells]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(table.types), 1.0 + 0.38 * len(table.layers)))
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(table.types)), [t.replace(".", ".\n") for t in table.types], fontsize=7)
    ax.set_yticks(range(len(table.layers)), table.layers, fontsize=7)
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    finite = [v for row in values for v in row if not math.isnan(v)]
    middle = (max(finite) + min(finite)) / 2 if finite else 0
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=7, color="w" if v < middle else "k")
    fig.colorbar(image, ax=ax, label="rank")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def loss_curve(log_history: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
    """(steps, training losses) from a Trainer's `state.log_history`."""
    points = [(float(e["step"]), float(e["loss"])) for e in log_history if "loss" in e and "step" in e]
    return [p[0] for p in points], [p[1] for p in points]


def plot_loss_curve(log_history: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], title: str) -> Path | None:
    """The training loss over steps; None (no file) when the Trainer logged no loss."""
    steps, losses = loss_curve(log_history)
    if not steps:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_json(data: Any, path: str | os.PathLike[str]) -> Path:
    """JSON with a fallback to str() for anything json cannot write."""
    path = Path(path)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


# --- the fine-tune's report ----------------------------------------------------------------------------------------


def finetune_report(
    data: DataConfig,
    train: TrainConfig,
    gora: GoraConfig,
    preset: str | None,
    task: TaskData,
    metrics: dict[str, Any],
    progress: dict[str, Any],
    timings: dict[str, float],
    log_history: list[dict],
    record: GoraRecord | None,
) -> dict[str, Any]:
    metric = headline_metric(data, train)
    params = progress["params"]
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
        "config": config_dict(preset, data, train, gora),
        "gora": {"num_batches": record.num_batches, "gamma": record.gamma, "extra": record.extra} if record else None,
        "sessions": progress.get("sessions", 1),
        "start_check": progress.get("start_check"),
        "serving": progress.get("serving"),
        "log_history": log_history,
    }


def write_report(report: dict[str, Any], run: RunFolder, log_history: list[dict]) -> dict[str, str]:
    """ranks.png, loss.png, then report.json, each written whole (`atomic_write`) into the run folder."""
    table = RankTable(
        **{
            "layers": report["rank_table"]["layers"],
            "types": report["rank_table"]["module_types"],
            "cells": report["rank_table"]["ranks"],
        }
    )
    title = f"{report['method']} ranks (r={report['config']['gora']['r']})"
    final = str(run.path)
    outputs = {
        "folder": final,
        "adapter": str(run.adapter),
        **({"adapter_serving": os.path.join(final, SERVING)} if os.path.isdir(os.path.join(final, SERVING)) else {}),
        "report": os.path.join(final, "report.json"),
        "status": os.path.join(final, STATUS),
        "init": str(run.init),
    }
    atomic_write(run.path / "ranks.png", lambda tmp: plot_rank_heatmap(table, tmp, title=title))
    outputs["rank_heatmap"] = os.path.join(final, "ranks.png")
    if loss_curve(log_history)[0]:
        loss_title = f"{report['method']} training loss"
        atomic_write(run.path / "loss.png", lambda tmp: plot_loss_curve(log_history, tmp, title=loss_title))
        outputs["loss_curve"] = os.path.join(final, "loss.png")
    if run.checkpoint_steps():
        outputs["checkpoints"] = str(run.checkpoints)
    report["outputs"] = outputs
    atomic_write(run.path / "report.json", lambda tmp: write_json(report, tmp))
    return outputs
