"""Where the generative evidence suite starts: the untouched base model's exact match and eval loss.

    python -m benchmarks.studies.base_floor [--threads 2] [--out benchmarks/results/base_floor.json]

Evaluates SmolLM2-135M-Instruct without any adapter through the suite's own task (`benchmarks.harness.tasks.load_task` on the
`evidence-nlg` / `nlg-core` spec: the same 300 fixed test problems, chat prompt, greedy generation of at most
`max_new_tokens`, answer parsing and response-token loss), so the methods' exact match in docs/BENCHMARKS.md reads
against the model's own starting point. Per task and per example (as a bit string) too. The record carries machine,
versions, date and commit (`benchmarks.harness.measure.stamp`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.harness.measure import stamp
from benchmarks.harness.specs import main_specs
from benchmarks.harness.suites import EVIDENCE
from benchmarks.harness.tasks import load_task

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.studies.base_floor", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--suite", default="evidence-nlg")
    parser.add_argument("--block", default="nlg-core")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "base_floor.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    block = next(b for b in EVIDENCE[args.suite] if b.name == args.block)
    spec = main_specs(args.suite, block, {})[0]  # the test split and the evaluation do not depend on method or seed
    task = load_task(spec)
    start = time.perf_counter()
    with torch.no_grad():
        metrics = task.evaluate(task.model.eval())
    metrics.pop("predictions", None)
    record = {
        "suite": args.suite,
        "block": args.block,
        "task": spec["task"],
        "model": task.model_name,
        "eval_size": task.eval_size,
        "max_new_tokens": spec.get("max_new_tokens"),
        "metric_name": task.metric_name,
        **metrics,
        "eval_s": time.perf_counter() - start,
        "threads": args.threads,
        **stamp(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("exact_match", "eval_loss", "exact_match_by_task")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
