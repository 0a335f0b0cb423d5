"""`gora allocate`: gradient estimation (or saved statistics) and rank allocation through the library, no training;
writes the rank heatmap, report.json and config.yaml (and, with --save-stats, the statistics)."""

from __future__ import annotations

import dataclasses
import logging
import os
from datetime import datetime
from typing import Any

from ...config import GoraConfig
from ...fileio import staged_folder
from ...model import RunOptions, estimate_and_allocate
from ...stats import save_gradient_stats
from ..config.runconfig import DEFAULT_PRESET, AllocateConfig, DataConfig
from ..parallel import on_main, same_on_all_ranks
from ..run.adapters import estimation_loader
from ..run.report import (
    plot_rank_heatmap,
    rank_table,
    write_json,
)
from ..run.runfolder import (
    CONFIG,
    config_yaml,
)
from ..run.startup import start_processes, start_run

logger = logging.getLogger(__name__)


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
    device = start_processes(data, alloc, show_progress)
    output_dir = alloc.output_dir or os.path.join("outputs", f"allocate-{datetime.now():%Y%m%d-%H%M%S}")
    output_dir = same_on_all_ranks(output_dir)
    load_stats, save_stats = alloc.load_stats, alloc.save_stats
    task, stats, timings = start_run(data, alloc, gora, preset, output_dir, device)
    loader = estimation_loader(task, alloc.batch_size, alloc.train_seed)
    options = RunOptions(show_progress=show_progress, stats=stats)
    estimated = estimate_and_allocate(task.model, gora, loader, options, held_out=False)  # stages 1 and 2
    stats, allocation = estimated.stats, estimated.allocation
    timings.update(estimated.timings)  # estimate_s (unless the statistics were loaded), allocate_s
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
    report["outputs"] = {
        "folder": output_dir,
        "rank_heatmap": os.path.join(output_dir, "ranks.png"),
        "report": os.path.join(output_dir, "report.json"),
        "config": os.path.join(output_dir, CONFIG),
    }

    def write() -> None:
        with staged_folder(output_dir, alloc.overwrite) as tmp:
            plot_rank_heatmap(rank_table(allocation.ranks), tmp / "ranks.png", title=f"GoRA ranks (r={gora.r})")
            write_json(report, tmp / "report.json")
            (tmp / CONFIG).write_text(config_yaml("allocate", preset, data, alloc, gora))
        if save_stats is not None:
            save_gradient_stats(stats, save_stats, task.model)

    on_main(write, "writing the output folder")
    return report
