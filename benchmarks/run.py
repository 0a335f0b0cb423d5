"""Run a benchmark suite: `python -m benchmarks.run SUITE [--seeds ...] [--methods ...] [--groups ...] [--out DIR]`.

Every run uses the same data, steps, batch size, schedule and seeds (see `benchmarks.suites`). Each run is a fresh
subprocess (`benchmarks.worker`) so its peak RSS is its own; `--in-process` runs them here instead (what the
`smoke` suite does by default, for speed). Results are appended one JSON line per run to `OUT/<suite>.jsonl` as
each run finishes; runs already there are skipped, so an interrupted suite resumes where it stopped. Failures go
to `OUT/<suite>.errors.jsonl` and are retried on the next invocation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .suites import SUITES, suite_specs
from .worker import run_id, run_spec

RESULTS_DIR = Path(__file__).resolve().parent / "results"

logger = logging.getLogger("benchmarks.run")


def done_ids(path: Path) -> set[str]:
    """run_ids already in a results file."""
    if not path.is_file():
        return set()
    out = set()
    for line in path.read_text().splitlines():
        if line.strip():
            out.add(json.loads(line)["run_id"])
    return out


def append(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def run_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.worker", json.dumps(spec), str(out)],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"worker exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=SUITES)
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (replaces every group's default seeds)")
    parser.add_argument("--methods", nargs="+", help="only these methods (see benchmarks.methods.METHODS)")
    parser.add_argument("--groups", nargs="+", help="only these groups: main, cost, ablation, loraplus, grid")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default benchmarks/results)")
    parser.add_argument("--in-process", action="store_true", help="run here, not one subprocess per run")
    parser.add_argument("--subprocess", action="store_true", help="force one subprocess per run (smoke too)")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: the suite's)")
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE", help="override spec fields, e.g. train_size=320"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (subprocesses; default 1)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs that would run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    specs = suite_specs(args.suite, args.seeds)
    if args.methods:
        specs = [s for s in specs if s["method"] in args.methods]
    if args.groups:
        specs = [s for s in specs if set(s["groups"]) & set(args.groups)]
    for item in args.set:
        key, _, value = item.partition("=")
        specs = [{**s, key: json.loads(value)} for s in specs]
    if args.threads:
        specs = [{**s, "threads": args.threads} for s in specs]
    path = args.out / f"{args.suite}.jsonl"
    errors = args.out / f"{args.suite}.errors.jsonl"
    done = done_ids(path)
    todo, seen = [], set(done)
    for spec in specs:
        rid = run_id(spec)
        if rid not in seen:
            seen.add(rid)
            todo.append(spec)
    logger.info("%s: %d runs, %d already in %s, %d to run", args.suite, len(specs), len(done), path, len(todo))
    if args.dry_run:
        for spec in todo:
            print(run_id(spec), spec["groups"])
        return 0
    in_process = (args.in_process or args.suite == "smoke") and not args.subprocess
    lock = threading.Lock()
    counter = iter(range(1, len(todo) + 1))

    def one(spec: dict[str, Any]) -> bool:
        start = time.perf_counter()
        if run_id(spec) in done_ids(path):  # another runner on the same file got there first
            logger.info("%s: already done, skipped", run_id(spec))
            return True
        try:
            record = run_spec(spec) if in_process else run_subprocess(spec)
        except Exception as err:  # keep going: one broken method must not stop the suite
            with lock:
                logger.error("[%d/%d] %s FAILED: %s", next(counter), len(todo), run_id(spec), str(err)[-2000:])
                append(errors, {"run_id": run_id(spec), "spec": spec, "error": traceback.format_exc()[-4000:]})
            return False
        with lock:
            append(path, record)
            logger.info(
                "[%d/%d] %-22s seed %d lr %g n %d: %s=%.4f params=%s init=%.1fs train=%.1fs (%.0fs)",
                next(counter),
                len(todo),
                spec["method"],
                spec["seed"],
                spec["lr"],
                spec["train_size"],
                record["metric_name"],
                record["metric"],
                record["trainable_params"],
                (record["estimate_s"] or 0) + (record["init_s"] or 0),
                record["train_s"] or 0,
                time.perf_counter() - start,
            )
        return True

    if in_process or args.jobs <= 1:
        ok = [one(spec) for spec in todo]
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            ok = list(pool.map(one, todo))
    failed = ok.count(False)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
