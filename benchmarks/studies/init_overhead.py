"""GoRA's initialization overhead against the floor of any gradient-based initializer, and against PEFT's LoRA-GA.

    python -m benchmarks.studies.init_overhead [--repeats 3] [--batches 16] [--batch-size 32] [--length 64] [--threads 1]

Side by side in one process, on the same batches (all-MiniLM-L6-v2, Rotten Tomatoes reviews padded to `length`
tokens, targets query/key/value/dense as the embedded default):

- floor: N forward+backward passes with only the target weights requiring grad (what any method that reads the
  target weights' gradients must at least do), gradients dropped after each batch;
- gora: `gora.get_gora_model` (estimation, allocation, initialization, PEFT wrapping), `gradient_store="full"`;
- loraga: PEFT's `preprocess_loraga` (the same N passes) + `get_peft_model(init_lora_weights="lora_ga")`.

Each method runs on its own deep copy of the model, in alternating order, `repeats` times; the table gives the
median seconds and each median's ratio to the floor's, for wall time and for this process's CPU time (with one
thread, CPU time is the work done; on a shared machine it is far less disturbed by other processes than wall time). The result (with machine, versions, date, commit and the
load average, since the machine is shared) is appended to benchmarks/results/init_overhead.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness.measure import stamp

RESULTS = Path(__file__).resolve().parents[1] / "results" / "init_overhead.jsonl"
TARGETS = ["query", "key", "value", "dense"]


def batches(n: int, batch_size: int, length: int) -> tuple[Any, list[dict[str, torch.Tensor]]]:
    """The model and n classification batches of batch_size x length tokens (every sequence padded to length)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from gora.app.assets import minilm_path, rotten_tomatoes

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
    rows, _ = rotten_tomatoes(n * batch_size, 0, seed=0)
    out = []
    for start in range(0, n * batch_size, batch_size):
        chunk = rows[start : start + batch_size]
        enc = tokenizer(
            [r["text"] for r in chunk], padding="max_length", truncation=True, max_length=length, return_tensors="pt"
        )
        out.append({**enc, "labels": torch.tensor([r["label"] for r in chunk])})
    return model, out


def floor(model: torch.nn.Module, data: list[dict[str, torch.Tensor]]) -> None:
    """N forward+backward passes with only the target weights requiring grad."""
    from gora import GoraConfig
    from gora.targets import find_targets

    targets = find_targets(model, GoraConfig(target_modules=TARGETS))
    for p in model.parameters():
        p.requires_grad_(False)
    for t in targets:
        model.get_submodule(t.name).weight.requires_grad_(True)
    model.train()
    for batch in data:
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)


def gora_init(model: torch.nn.Module, data: list[dict[str, torch.Tensor]]) -> None:
    import gora

    config = gora.GoraConfig(target_modules=TARGETS, num_batches=len(data), lora_kwargs={"task_type": "SEQ_CLS"})
    gora.get_gora_model(model, config, data, show_progress=False)


def loraga_init(model: torch.nn.Module, data: list[dict[str, torch.Tensor]]) -> None:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    config = LoraConfig(
        r=8, target_modules=TARGETS, task_type="SEQ_CLS", init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig()
    )

    def train_step() -> None:
        for batch in data:
            model(**batch).loss.backward()

    preprocess_loraga(model, config, train_step)
    get_peft_model(model, config)


METHODS = {"floor": floor, "gora": gora_init, "loraga": loraga_init}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.studies.init_overhead", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    base, data = batches(args.batches, args.batch_size, args.length)
    base.train()
    base(**data[0]).loss.backward()  # warm up kernels and allocator once, outside the timings
    base.zero_grad(set_to_none=True)
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    cpu: dict[str, list[float]] = {name: [] for name in METHODS}
    loads = []
    order = list(METHODS)
    for repeat in range(args.repeats):
        for name in order if repeat % 2 == 0 else order[::-1]:  # alternate the order: drift hits every method
            model = copy.deepcopy(base)
            start, start_cpu = time.perf_counter(), time.process_time()
            METHODS[name](model, data)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            loads.append(os.getloadavg()[0])
            del model
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratios = {name: medians[name] / medians["floor"] for name in METHODS}
    cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
    cpu_ratios = {name: cpu_medians[name] / cpu_medians["floor"] for name in METHODS}
    # each repeat runs every method back to back: the median of the per-repeat ratios cancels slow drifts of the load
    paired = {name: statistics.median(c / f for c, f in zip(cpu[name], cpu["floor"], strict=True)) for name in METHODS}
    record = {
        "benchmark": "init_overhead",
        "setting": {
            "model": "all-MiniLM-L6-v2",
            "targets": TARGETS,
            "batches": args.batches,
            "batch_size": args.batch_size,
            "length": args.length,
            "threads": args.threads,
            "repeats": args.repeats,
        },
        "times_s": times,
        "median_s": medians,
        "ratio_to_floor": ratios,
        "cpu_s": cpu,
        "cpu_median_s": cpu_medians,
        "cpu_ratio_to_floor": cpu_ratios,
        "cpu_paired_ratio_median": paired,
        "load_avg_1m": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)},
        "note": args.note,
        **stamp(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(f"{'method':8} {'wall s':>8} {'x floor':>8} {'cpu s':>8} {'x floor':>8} {'paired':>8}   cpu runs")
    for name in METHODS:
        runs = " ".join(f"{t:.2f}" for t in cpu[name])
        print(
            f"{name:8} {medians[name]:8.2f} {ratios[name]:8.3f} {cpu_medians[name]:8.2f} {cpu_ratios[name]:8.3f}"
            f" {paired[name]:8.3f}   {runs}"
        )
    print(f"load average during the runs: {record['load_avg_1m']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
