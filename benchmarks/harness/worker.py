"""One run: load the task, build the method, train, evaluate, and return (or write) one JSON record.

`python -m benchmarks.harness.worker SPEC_JSON OUT_JSON [CHECKPOINT EVERY_S]` runs a spec in a fresh process (clean
peak-RSS numbers) and writes its record to OUT_JSON; with CHECKPOINT, training saves its state there every EVERY_S
seconds and resumes from it (`benchmarks.harness.training`). `benchmarks.harness.run` calls it once per run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from . import methods as M
from .measure import RssSampler, Timer, machine, maxrss_mb, now, versions
from .tasks import TaskData, autocast, load_task
from .training import CHECKPOINT_EVERY_S, train

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = (
    "suite",
    "task",
    "model",
    "method",
    "seed",
    "metric_name",
    "metric",
    "trainable_params",
    "estimate_s",
    "init_s",
    "train_s",
    "step_s",
    "peak_rss_mb",
    "versions",
    "machine",
    "date",
)


# spec keys that say where a run is listed, not what it computes: every other key is part of the run's id
NOT_IN_RUN_ID = ("groups", "suite", "block", "lr_from")


def run_id(spec: dict[str, Any]) -> str:
    """What identifies a run: every spec key that can change its numbers (task, method, seeds, lr, sizes, epochs,
    evaluation split, max_new_tokens, torch threads — they change float summation order — ...), sorted; the same id
    in any suite group means the same numbers (reused, not re-run). The code version and the environment are not in
    it: one results file holds one of each (`benchmarks.harness.provenance`)."""
    keys = sorted(k for k in spec if k not in NOT_IN_RUN_ID)
    return "|".join(f"{k}={json.dumps(spec[k], sort_keys=True)}" for k in keys)


def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    for name in ("transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def cross_entropy_only(model: torch.nn.Module, kind: str) -> Iterator[None]:
    """AdaLoRA: PEFT's AdaLoraModel.forward adds orth_reg_weight × its orthogonality regulariser to `.loss` in
    evaluation too; inside this block the weight is 0, so the evaluation loss (and the lr tie-break on it) is the
    cross-entropy every other method reports. Training keeps AdaLoRA's objective. Other methods: nothing changes."""
    if kind != "adalora":
        yield
        return
    configs = list(model.peft_config.values())
    weights = [c.orth_reg_weight for c in configs]
    for c in configs:
        c.orth_reg_weight = 0.0
    try:
        yield
    finally:
        for c, w in zip(configs, weights):
            c.orth_reg_weight = w


def on_device(task: TaskData, spec: dict[str, Any]) -> None:
    """Move the model and every batch to `spec["device"]` (default the CPU: nothing moves)."""
    device = spec.get("device", "cpu")
    if device == "cpu":
        return
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA device: run on a GPU machine or drop --device")
    from gora.batches import to_device

    task.model.to(device)
    moved = {id(b): to_device(b, torch.device(device)) for b in task.train_batches}
    task.train_batches = [moved[id(b)] for b in task.train_batches]
    task.calib_batches = [
        moved[id(b)] if id(b) in moved else to_device(b, torch.device(device)) for b in task.calib_batches
    ]


def run_spec(
    spec: dict[str, Any], checkpoint: Path | None = None, checkpoint_every_s: float = CHECKPOINT_EVERY_S
) -> dict[str, Any]:
    """Run one spec (see `benchmarks.harness.suites`) and return its record. With `checkpoint`, training saves its
    state there and resumes from it (the record's `resumed_at` lists the steps it resumed after); the caller deletes
    it once the record is written."""
    if spec.get("method") == "init-cost":
        return run_init_cost(spec)
    started, cpu_started = time.perf_counter(), time.process_time()
    _quiet()
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    method = M.METHODS[spec["method"]]
    sampler = RssSampler()
    try:
        with sampler.phase("load"):
            task = load_task(spec)
            on_device(task, spec)
        model = task.model
        build_spec = {**spec, "steps": len(task.train_batches)}  # AdaLoRA's schedule needs the step count
        # one untimed forward+backward so that every method's timings start from a warm allocator
        model.train()
        with autocast(spec):
            loss = model(**task.calib_batches[0]).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        # the cost ratio of data-driven inits (historic suites; the evidence suites skip it to save time)
        measure = method.kind in M.DATA_DRIVEN and "stage" not in spec
        plain_s = M.plain_fwd_bwd(model, task.calib_batches) if measure else None
        lora_ref = M.lora_reference_params(model, task.target_modules, spec["r"])
        total_params = sum(p.numel() for p in model.parameters())
        rss_before_init = maxrss_mb()
        torch.manual_seed(spec.get("init_seed", spec["seed"]))  # PEFT's A0 draws (GoRA: GoraConfig.seed)
        with sampler.phase("init"):
            model, info = M.build(spec["method"], task, build_spec)
        rss_after_init = maxrss_mb()
        trainable = M.count_trainable(model)
        info["scalings"] = M.scalings(model) if method.kind != "full" else {}
        adapter = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
        extra: dict[str, Any] = {}
        if method.kind == "adalora":
            extra["adalora_rank_total_start"] = M.adalora_rank_total(model, capacity=True)
        lr = spec["lr_full"] if method.kind == "full" else spec["lr"]
        torch.manual_seed(spec["seed"])
        with sampler.phase("train"):
            result = train(
                model,
                task.train_batches,
                lr=lr,
                warmup_ratio=spec["warmup_ratio"],
                scheduler=spec["scheduler"],
                loraplus_ratio=method.loraplus,
                adalora=method.kind == "adalora",
                autocast=lambda: autocast(spec),
                checkpoint=checkpoint,
                checkpoint_every_s=checkpoint_every_s,
                checkpoint_key=run_id(spec),
            )
        if method.kind == "adalora":
            extra["adalora_rank_total_end"] = M.adalora_rank_total(model)
            extra["adalora_update_calls"] = result.adalora_calls
        with sampler.phase("eval"), Timer() as t_eval, cross_entropy_only(model, method.kind):
            metrics = task.evaluate(model) if not result.diverged else {task.metric_name: None, "eval_loss": None}
        if method.kind == "adalora":
            extra["eval_loss_excludes_orth_reg"] = True
    finally:
        sampler.close()
    estimate_s = float(info.pop("estimate_s"))
    init_s = float(info.pop("init_s"))
    per_example = {k: metrics.pop(k) for k in ("predictions", "correct", "nll_sum", "nll_tokens") if k in metrics}
    record: dict[str, Any] = {
        "suite": spec["suite"],
        "task": spec["task"],
        "model": task.model_name,
        "method": spec["method"],
        "method_description": method.description,
        "seed": spec["seed"],
        "metric_name": task.metric_name,
        "metric": metrics[task.metric_name],
        "eval_loss": metrics.get("eval_loss"),
        "metrics": metrics,
        "diverged": result.diverged,
        "trainable_params": trainable,
        "adapter_params": adapter,
        "lora_adapter_params_ref": lora_ref,
        "total_params": total_params,
        "estimate_s": estimate_s,
        "init_s": init_s,
        "plain_fwd_bwd_s": plain_s,
        "init_over_plain": (estimate_s + init_s) / plain_s if plain_s else None,
        "train_s": result.train_s,
        "step_s": result.step_s,
        "eval_s": t_eval.s,
        "steps": result.steps,
        "peak_rss_mb": max(sampler.peaks.values()),
        "peak_rss_init_mb": sampler.peaks.get("init"),
        "peak_rss_train_mb": sampler.peaks.get("train"),
        "maxrss_before_init_mb": rss_before_init,
        "maxrss_after_init_mb": rss_after_init,
        "lr": lr,
        "lr_lora": spec["lr"],
        "loraplus_ratio": method.loraplus,
        "train_size": spec["train_size"],
        "batch_size": spec["batch_size"],
        "num_batches": spec["num_batches"],
        "r": spec["r"],
        "max_length": spec["max_length"],
        "test_size": spec.get("test_size"),
        "max_new_tokens": spec.get("max_new_tokens"),
        "scheduler": spec["scheduler"],
        "warmup_ratio": spec["warmup_ratio"],
        "loss_curve": result.loss_curve,
        "resumed_at": result.resumed_at,
        "info": {**info, **extra},
        "groups": spec.get("groups", []),
        "spec": spec,
        "run_id": run_id(spec),
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "machine": machine(),
        "date": now(),
    }
    for key in ("stage", "block", "regime", "eval_split", "epochs", "val_size", "init_seed", "lr_from", "gate_task"):
        if key in spec:
            record[key] = spec[key]
    if "epochs" in spec:
        record["steps_per_epoch"] = task.steps_per_epoch
    record["eval_size"] = task.eval_size
    record.update(per_example)
    record["wall_s"] = time.perf_counter() - started
    record["cpu_s"] = time.process_time() - cpu_started  # with 1 thread: the wall time on an otherwise idle core
    record["train_cpu_s"] = result.train_cpu_s
    return record


def run_init_cost(spec: dict[str, Any]) -> dict[str, Any]:
    """Side by side in one process, on the same N batches: N plain forward+backward passes, GoRA (estimate,
    allocate, initialize), PEFT's LoRA-GA (preprocess_loraga + get_peft_model) and EVA (get_peft_model +
    initialize_lora_eva_weights). Interleaved `repeats` times; medians, with per-phase peak RSS."""
    import copy

    repeats = spec.get("cost_repeats", 3)
    _quiet()
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    sampler = RssSampler()
    times: dict[str, list[float]] = {"plain": [], "gora": [], "gora_estimate": [], "loraga": [], "eva": []}
    try:
        task = load_task(spec)
        base = task.model
        base.train()
        base(**task.calib_batches[0]).loss.backward()
        base.zero_grad(set_to_none=True)
        for _ in range(repeats):
            with sampler.phase("plain"):
                times["plain"].append(M.plain_fwd_bwd(base, task.calib_batches))
            for name in ("gora", "loraga", "eva"):
                task.model = copy.deepcopy(base)
                with sampler.phase(name), Timer() as t:
                    _, info = M.build(name, task, spec)
                times[name].append(t.s)
                if name == "gora":
                    times["gora_estimate"].append(info["estimate_s"])
                task.model = None
    finally:
        sampler.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "suite": spec["suite"],
        "task": spec["task"],
        "model": task.model_name,
        "method": "init-cost",
        "seed": spec["seed"],
        "metric_name": "gora_init_over_plain",
        "metric": med["gora"] / med["plain"],
        "trainable_params": None,
        "estimate_s": med["gora_estimate"],
        "init_s": med["gora"] - med["gora_estimate"],
        "train_s": None,
        "step_s": None,
        "peak_rss_mb": max(sampler.peaks.values()),
        "cost": {
            "repeats": repeats,
            "num_batches": spec["num_batches"],
            "batch_size": spec["batch_size"],
            "times_s": times,
            "median_s": med,
            "ratio_to_plain": {k: med[k] / med["plain"] for k in ("gora", "gora_estimate", "loraga", "eva")},
            "peak_rss_mb": sampler.peaks,
        },
        "groups": spec.get("groups", []),
        "run_id": run_id(spec),
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "machine": machine(),
        "date": now(),
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 4):
        print("usage: python -m benchmarks.harness.worker SPEC_JSON OUT_JSON [CHECKPOINT EVERY_S]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    checkpoint = (Path(args[2]), float(args[3])) if len(args) == 4 else (None, CHECKPOINT_EVERY_S)
    record = run_spec(json.loads(args[0]), *checkpoint)
    with open(args[1], "w") as handle:
        json.dump(record, handle)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
