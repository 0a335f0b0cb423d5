"""A whole fine-tune: model and data in, GoRA (or LoRA) adapter, evaluation and report out.

    DataConfig + TrainConfig + GoraConfig
        → load_task        (data.py: model folder + rows → tokenizer, model, encoded train/eval sets; input checked first)
        → evaluate         (before; evaluate.py: accuracy / exact match of the final answer, eval loss)
        → get_gora_model   (estimate → allocate → init; or a plain LoRA/rsLoRA adapter at the same r)
        → transformers.Trainer (optionally with a LoRA+ optimizer: make_optimizer)
        → evaluate         (after) → adapter + gora_record.json + report.json + plots
        → export_adapter   (adapter-serving/: the same adapter as plain LoRA for vLLM and llama.cpp)

The `gora` command (cli.py) builds these dataclasses from its options; the same functions serve Python callers.
Tasks: sequence classification (accuracy) and causal-LM supervised fine-tuning on prompt/response pairs (loss on the
response only; exact match of the final answer under greedy generation).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import GoraConfig
from ..export import DTYPES, export_adapter
from .data import TaskData, UsageError, load_task
from .evaluate import evaluate
from .runconfig import DEFAULT_PRESET, PRESETS, AllocateConfig, DataConfig, Method, TrainConfig

if TYPE_CHECKING:
    from ..estimate import GradientStats

logger = logging.getLogger(__name__)

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

    from ..targets import find_targets

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
    from .report import staged_folder

    output_dir = train.output_dir or default_output_dir(train, data)
    task, stats, timings = _start_run(data, train, gora, preset, output_dir)
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
        peft_model, params = _adapt(task, gora, train, timings, show_progress, stats)
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
        serving = export_adapter(tmp / "adapter", tmp / "adapter-serving")
        timings["save_s"] = time.perf_counter() - start
        report = _finetune_report(data, train, gora, preset, task, metrics, params, timings, log_history, peft_model)
        final = Path(output_dir)
        report["serving"] = dataclasses.replace(
            serving, adapter_dir=str(final / "adapter"), output_dir=str(final / "adapter-serving")
        ).to_dict()
        report["outputs"] = _write_report(report, tmp, output_dir, log_history)
    return report


def _start_run(
    data: DataConfig, run: TrainConfig | AllocateConfig, gora: GoraConfig, preset: str | None, output_dir: str
) -> tuple[TaskData, GradientStats | None, dict[str, float]]:
    """The first steps of `finetune` and `allocate_only`: the cheap checks (output folder, `run.load_stats` file),
    then the task and, with `run.load_stats`, the saved gradient statistics, timed ("load_s", "load_stats_s").

    Nothing is written, so a refusal here (a mismatched statistics file included) leaves no output folder.
    """
    from .report import check_output_folder

    check_output_folder(output_dir, run.overwrite)  # before any slow step
    if run.load_stats is not None and not Path(run.load_stats).is_file():
        raise UsageError(f"--load-stats {run.load_stats!r}: no such file (write one with gora allocate --save-stats)")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    task = load_task(data, run, PRESETS[preset] if preset else None)
    timings["load_s"] = time.perf_counter() - start
    if run.load_stats is None:
        return task, None, timings
    start = time.perf_counter()
    stats = load_saved_stats(run.load_stats, task.model, gora)
    timings["load_stats_s"] = time.perf_counter() - start
    return task, stats, timings


def load_saved_stats(path: str, model: nn.Module, gora: GoraConfig) -> GradientStats:
    """Gradient statistics written by `gora allocate --save-stats`, for allocating (and initializing) on `model`.

    Raises:
        UsageError: not a statistics file, statistics of another model (`gora.load_gradient_stats` checks the
            fingerprint), of other target modules than `gora` selects (allocation would silently follow the file),
            or a sketch drawn with another seed (found here, before any evaluation or training).
    """
    from ..stats_io import load_gradient_stats
    from ..targets import find_targets

    try:
        stats = load_gradient_stats(path, model)
        wanted = [t.name for t in find_targets(model, gora)]
    except ValueError as err:
        raise UsageError(f"--load-stats {path!r} cannot be used: {err}") from err
    saved = [t.name for t in stats.targets]
    if saved != wanted:
        raise UsageError(
            f"--load-stats {path!r} holds statistics of {len(saved)} target modules but --target-modules selects "
            f"{len(wanted)} ({', '.join(sorted(set(saved) ^ set(wanted))[:4]) or 'another order'} differ): pass the "
            "--target-modules the statistics were saved with, or re-estimate without --load-stats"
        )
    if stats.sketches and stats.seed != gora.seed:
        raise UsageError(
            f"--load-stats {path!r} holds a sketch drawn with --seed {stats.seed}, this run has --seed {gora.seed}: "
            f"A0 must be the sketch's random matrix, so pass --seed {stats.seed}"
        )
    return stats


def _adapt(
    task: TaskData,
    gora: GoraConfig,
    train: TrainConfig,
    timings: dict[str, float],
    show_progress: bool,
    stats: GradientStats | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The adapter and its parameter counts: GoRA (estimating, or from `stats`), or plain LoRA/rsLoRA."""
    from ..model import get_gora_model

    start = time.perf_counter()
    if train.method == "gora":
        loader = estimation_loader(task, train.batch_size, train.train_seed)
        peft_model = get_gora_model(task.model, gora, loader, show_progress=show_progress, stats=stats)
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

    # transformers 5 takes the warmup share as a float warmup_steps < 1 (warmup_ratio is gone); 4.x as warmup_ratio
    v5 = "warmup_ratio" not in {f.name for f in dataclasses.fields(TrainingArguments)}
    warmup = {"warmup_steps": train.warmup_ratio} if v5 else {"warmup_ratio": train.warmup_ratio}
    args = TrainingArguments(
        output_dir=str(folder),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.eval_batch_size,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        **warmup,
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
        "adapter_serving": os.path.join(final, "adapter-serving"),
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
    from ..allocate import allocate_ranks
    from ..estimate import estimate_gradients
    from ..importance import compute_importances
    from .report import rank_table, staged_folder

    output_dir = alloc.output_dir or os.path.join("outputs", f"allocate-{datetime.now():%Y%m%d-%H%M%S}")
    load_stats, save_stats = alloc.load_stats, alloc.save_stats
    task, stats, timings = _start_run(data, alloc, gora, preset, output_dir)
    if stats is None:
        start = time.perf_counter()
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
        from .. import save_gradient_stats

        save_gradient_stats(stats, save_stats, task.model)
    return report


def merge_adapter(
    adapter: str,
    output_dir: str,
    *,
    base: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> dict[str, str]:
    """Merge a saved adapter into its base model (`merge_and_unload`, in float32) and save a plain transformers
    folder (safetensors) that loads without PEFT.

    Args:
        adapter: Folder with adapter_config.json (as `gora finetune` writes under adapter/).
        output_dir: Where to write the merged model (and the tokenizer, if the adapter folder or base has one).
        base: Base model folder (default: `base_model_name_or_path` in adapter_config.json).
        dtype: dtype of the saved weights ("float32", "bfloat16", "float16").
        overwrite: Replace a non-empty `output_dir`.

    Raises:
        UsageError: no adapter there, no base model, or a base model whose modules do not match the adapter's
            (nothing is written).
    """
    import json

    from peft import PeftConfig, PeftModel, PeftType
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from .report import check_output_folder, staged_folder

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise UsageError(f"{adapter!r} has no adapter_config.json: give the adapter folder (e.g. <run>/adapter)")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
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
    if peft_config.peft_type == PeftType.LORA and (Path(adapter) / "adapter_model.safetensors").is_file():
        _check_base_fits(model, adapter, base)
    try:
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as err:  # what PEFT raises for a base it cannot load the adapter on
        raise UsageError(f"the adapter {adapter!r} cannot be loaded on base model {base!r}: {err}") from err
    merged = merged.to(DTYPES[dtype])
    with staged_folder(output_dir, overwrite) as tmp:
        merged.save_pretrained(tmp)
        for folder in (adapter, base):
            try:
                AutoTokenizer.from_pretrained(folder).save_pretrained(tmp)
                break
            except Exception:  # no tokenizer there; try the next folder
                continue
    return {"model": output_dir, "base": base, "adapter": adapter, "dtype": dtype}


def _check_base_fits(model: nn.Module, adapter: str, base: str) -> None:
    """Every module the LoRA adapter adapts exists in `model` with the weight shape its A and B imply.

    Raises:
        UsageError: naming the first modules that are missing or of another shape.
    """
    from ..export import read_adapter

    saved = read_adapter(adapter)
    problems = []
    for name, layer in saved.layers.items():
        A, B = saved.tensors[layer.a_key], saved.tensors[layer.b_key]
        out_in = (int(B.shape[0]), int(A.shape[1]))
        if layer.a_key.endswith("lora_embedding_A") or saved.config.fan_in_fan_out:  # weight stored [in, out]
            out_in = out_in[::-1]
        try:
            weight = model.get_submodule(name).weight
        except AttributeError:
            problems.append(f"{name} does not exist in the base model")
            continue
        if tuple(weight.shape[:2]) != out_in:
            problems.append(f"{name} has a weight of shape {tuple(weight.shape)}, the adapter's is {out_in}")
    if problems:
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise UsageError(
            f"base model {base!r} does not match the adapter {adapter!r}: {'; '.join(problems[:2])}{more}. Pass "
            "--base, the folder of the model the adapter was made on"
        )


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
