"""Run a benchmark suite: `python -m benchmarks.harness.run SUITE [--seeds ...] [--methods ...] [--out DIR] ...`.

Historic suites (`smoke`, `nlu`, `nlg`) are flat lists of runs. Evidence suites (`evidence-nlu`, `evidence-nlg`,
`evidence-smoke`) run block by block (see `benchmarks.harness.suites`): the tuning runs, then the learning rate of every
method chosen from them (`benchmarks.harness.paired_stats.select_lr`), then the main runs at that lr; one command runs it all.

Each run is a fresh subprocess (`benchmarks.harness.worker`) so its peak RSS is its own; `--in-process` runs them here
instead (what the smoke suites do by default, for speed). Results are appended one JSON line per run to
`OUT/<suite>.jsonl` as each run finishes; runs already there are skipped, so an interrupted suite resumes where it
stopped. Within a run, training saves a checkpoint every `--checkpoint-every` seconds (default 300) under
`OUT/<suite>.checkpoints/`, so a run cut short resumes after its last saved step with the same numbers
(`benchmarks.harness.training`); the checkpoint is deleted once the run's record is written. Failures go to
`OUT/<suite>.errors.jsonl` and are retried on the next invocation. The first invocation
writes `OUT/<suite>.lock.json` and `OUT/<suite>.freeze.txt` (commit, environment, threads); later ones refuse to add
runs under another commit, diff, environment or thread count (`benchmarks.harness.provenance`). A dirty working tree is
refused outside the smoke suites unless `--allow-dirty` (then the diff's hash is locked).
"""

from __future__ import annotations

import argparse
import hashlib
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

from . import capacity, provenance
from .capacity_suites import COMPARISONS, GATES
from .paired_stats import select_lr
from .specs import gate_specs, main_specs, suite_specs, tune_specs
from .suites import EVIDENCE, SUITES, Block
from .training import CHECKPOINT_EVERY_S
from .worker import run_id, run_spec

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
SMOKE_SUITES = ("smoke", "evidence-smoke", "capacity-gate-smoke", "evidence-capacity-smoke")

logger = logging.getLogger("benchmarks.harness.run")


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a results file (the first of any duplicated run_id)."""
    if not path.is_file():
        return []
    out, seen = [], set()
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if record["run_id"] not in seen:
                seen.add(record["run_id"])
                out.append(record)
    return out


def done_ids(path: Path) -> set[str]:
    """run_ids already in a results file."""
    return {r["run_id"] for r in read_records(path)}


def append(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def run_subprocess(
    spec: dict[str, Any], checkpoint: Path | None = None, every_s: float = CHECKPOINT_EVERY_S
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        resume = [str(checkpoint), str(every_s)] if checkpoint is not None else []
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.harness.worker", json.dumps(spec), str(out), *resume],
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"worker exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


class Runner:
    """Runs specs not yet in the results file, appending one record per run (with its provenance)."""

    def __init__(
        self,
        path: Path,
        in_process: bool,
        jobs: int,
        prov: dict[str, Any],
        checkpoint_every_s: float = CHECKPOINT_EVERY_S,
    ) -> None:
        self.path = path
        self.checkpoints = path.with_name(path.stem + ".checkpoints")
        self.checkpoint_every_s = checkpoint_every_s  # 0: no checkpoints
        self.errors = path.with_name(path.stem + ".errors.jsonl")
        self.in_process = in_process
        self.jobs = jobs
        self.prov = prov
        self.failed = 0
        self.lock = threading.Lock()

    def checkpoint(self, spec: dict[str, Any]) -> Path | None:
        """Where a run's training checkpoint lives (named by a hash of its run id), or None without checkpoints."""
        if self.checkpoint_every_s <= 0:
            return None
        return self.checkpoints / (hashlib.sha256(run_id(spec).encode()).hexdigest()[:24] + ".pt")

    def todo(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        done = done_ids(self.path)
        out, seen = [], set(done)
        for spec in specs:
            rid = run_id(spec)
            if rid not in seen:
                seen.add(rid)
                out.append(spec)
        return out

    def run(self, specs: list[dict[str, Any]], label: str) -> None:
        todo = self.todo(specs)
        logger.info("%s: %d runs, %d to run", label, len(specs), len(todo))
        counter = iter(range(1, len(todo) + 1))

        def one(spec: dict[str, Any]) -> bool:
            start = time.perf_counter()
            if run_id(spec) in done_ids(self.path):  # another runner on the same file got there first
                logger.info("%s: already done, skipped", run_id(spec))
                return True
            ckpt, every = self.checkpoint(spec), self.checkpoint_every_s
            try:
                record = run_spec(spec, ckpt, every) if self.in_process else run_subprocess(spec, ckpt, every)
            except Exception as err:  # keep going: one broken method must not stop the suite
                with self.lock:
                    logger.error("[%d/%d] %s FAILED: %s", next(counter), len(todo), run_id(spec), str(err)[-2000:])
                    append(
                        self.errors, {"run_id": run_id(spec), "spec": spec, "error": traceback.format_exc()[-4000:]}
                    )
                return False
            record["provenance"] = self.prov
            record["run_s"] = time.perf_counter() - start
            with self.lock:
                append(self.path, record)
                if ckpt is not None:
                    ckpt.unlink(missing_ok=True)
                metric = record["metric"]
                logger.info(
                    "[%d/%d] %-14s %-5s seed %3d lr %-6g %s=%s loss=%s init=%.1fs train=%.1fs (%.0fs)%s",
                    next(counter),
                    len(todo),
                    spec["method"],
                    spec.get("stage", ""),
                    spec["seed"],
                    spec["lr"],
                    record["metric_name"],
                    "–" if metric is None else f"{metric:.4f}",
                    "–" if record.get("eval_loss") is None else f"{record['eval_loss']:.4f}",
                    (record["estimate_s"] or 0) + (record["init_s"] or 0),
                    record["train_s"] or 0,
                    record["run_s"],
                    " DIVERGED" if record.get("diverged") else "",
                )
            return True

        if self.in_process or self.jobs <= 1:
            ok = [one(spec) for spec in todo]
        else:
            with ThreadPoolExecutor(max_workers=self.jobs) as pool:
                ok = list(pool.map(one, todo))
        self.failed += ok.count(False)


def _filter(specs: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.methods:
        specs = [s for s in specs if s["method"] in args.methods]
    for item in args.set:
        key, _, value = item.partition("=")
        specs = [{**s, key: json.loads(value)} for s in specs]
    if args.threads:
        specs = [{**s, "threads": args.threads} for s in specs]
    if getattr(args, "device", "cpu") != "cpu":  # in the run id only off the CPU (CPU records keep their ids)
        specs = [{**s, "device": args.device} for s in specs]
    return specs


def _block(block: Block, args: argparse.Namespace) -> Block:
    import dataclasses

    changes: dict[str, Any] = {}
    if args.seeds:
        changes["seeds"] = tuple(args.seeds)
    if args.tune_seeds and block.tune_seeds:
        changes["tune_seeds"] = tuple(args.tune_seeds)
    if args.lrs and block.tune_seeds:
        changes["lrs"] = tuple(args.lrs)
    return dataclasses.replace(block, **changes) if changes else block


def choose_lrs(records: list[dict[str, Any]], suite: str, block: Block, args: argparse.Namespace) -> dict[str, Any]:
    """method -> lr chosen from the block's tuning records (None where none is eligible), with a log of the table."""
    wanted = {run_id(s) for s in _filter(tune_specs(suite, block), args)}
    chosen: dict[str, Any] = {}
    for method in block.tuned:
        rows = [r for r in records if r["run_id"] in wanted and r["method"] == method]
        choice = select_lr(rows, block.lrs, block.tune_seeds)
        chosen[method] = choice.lr
        table = ", ".join(
            f"{lr:g}: {'–' if m is None else f'{m:.4f}'}" for lr, (m, _, _) in sorted(choice.table.items())
        )
        logger.info("%s %s: lr %s (%s) [%s]", block.name, method, choice.lr, choice.reason, table)
    return chosen


def run_evidence(suite: str, args: argparse.Namespace, runner: Runner | None, path: Path) -> None:
    blocks = [_block(b, args) for b in EVIDENCE[suite] if not args.blocks or b.name in args.blocks]
    for block in blocks:
        tune = _filter(tune_specs(suite, block), args)
        if runner is None:  # dry run
            todo = [s for s in tune if run_id(s) not in done_ids(path)]
            print(f"# {block.name}: {len(tune)} tuning runs, {len(todo)} to run")
            for spec in todo:
                print("tune", run_id(spec))
        else:
            runner.run(tune, f"{block.name} tune")
        lrs = choose_lrs(read_records(path), suite, block, args) if block.tune_seeds else {}
        main = _filter(main_specs(suite, block, lrs), args)
        if runner is None:
            pending = [m for m in block.methods if block.tune_seeds and lrs.get(block.source(m)) is None]
            total = len(block.methods) * len(block.seeds)
            print(f"# {block.name}: {len(main)} of {total} main runs listed; waiting for tuning: {pending or 'none'}")
            for spec in main:
                if run_id(spec) not in done_ids(path):
                    print("main", run_id(spec))
        else:
            runner.run(main, f"{block.name} main")


def _capacity_tune(
    suite: str, block: Block, method_lrs: dict[str, list[float]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Tuning specs of `block` at each method's lrs, the grid from its middle outwards, lr-major (so a tuning cut short
    has every method at the central lrs)."""
    order = capacity.center_out(tuple(sorted({lr for v in method_lrs.values() for lr in v})))
    specs = [
        capacity.tune_spec(suite, block, m, seed, lr)
        for lr in order
        for m in block.tuned
        if lr in method_lrs.get(m, [])
        for seed in block.tune_seeds
    ]
    return _filter(specs, args)


def _capacity_pick(
    path: Path, suite: str, block: Block, grids: dict[str, list[float]], args: argparse.Namespace
) -> dict[str, Any]:
    """method -> LrChoice (lowest mean validation NLL) from the block's tuning records, logged."""
    records = read_records(path)
    out = {}
    for method in block.tuned:
        wanted = {run_id(s) for s in _capacity_tune(suite, block, {method: grids[method]}, args)}
        rows = [r for r in records if r["run_id"] in wanted]
        choice = select_lr(rows, grids[method], block.tune_seeds, lower_is_better=True)
        out[method] = choice
        table = ", ".join(
            f"{lr:g}: {'–' if m is None else f'{m:.4f}'}" for lr, (m, _, _) in sorted(choice.table.items())
        )
        logger.info("%s %s: lr %s (%s) [%s]", block.name, method, choice.lr, choice.reason, table)
    return out


def run_gate(suite: str, args: argparse.Namespace, runner: Runner | None, path: Path) -> int:
    """The capacity gate: every candidate task at each rank's lrs, then, while a rank's best lr (lowest validation
    NLL) sits at an edge of the lrs it has run, the next lr out (`Gate.widen` per side; `capacity.gate_widen`)."""
    gate = GATES[suite]
    specs = _filter(gate_specs(suite), args)
    if args.gate_tasks:
        specs = [s for s in specs if s["gate_task"] in args.gate_tasks]
    if runner is None:
        for spec in [s for s in specs if run_id(s) not in done_ids(path)]:
            print("gate", run_id(spec))
        print("# (before any widening)")
        return 0
    runner.run(specs, suite)
    pairs = dict.fromkeys((s["gate_task"], s["r"]) for s in specs)  # (task, rank), in run order
    while not runner.failed:
        records = read_records(path)
        need = {key: lr for key in pairs if (lr := capacity.gate_widen(gate, *key, records)) is not None}
        if not need:
            break
        # every seed's spec at the new lr (the runner runs each run id once)
        extra = [{**s, "lr": need[key]} for s in specs if (key := (s["gate_task"], s["r"])) in need]
        runner.run(extra, f"{suite} widen " + ", ".join(f"{t} r = {r} lr {lr:g}" for (t, r), lr in need.items()))
    return 1 if runner.failed else 0


def run_capacity(suite: str, args: argparse.Namespace, runner: Runner | None, path: Path) -> int:
    """The capacity comparison (`benchmarks.harness.capacity`): blocks from the gate's records; per block the tuning runs
    (grid from its middle outwards, each lr for every method before the next lr), widened while a method's best lr
    (lowest validation NLL) sits at an edge, then the main runs at the chosen lrs. 3 when the gate stops it."""
    comp = COMPARISONS[suite]
    gate_path = args.gate_results or args.out / f"{comp.gate}.jsonl"
    try:
        blocks = capacity.comparison_blocks(suite, read_records(gate_path))
    except capacity.StopComparison as stop:
        print(f"{suite}: {stop} (gate records: {gate_path})", file=sys.stderr)
        return 3
    blocks = [_block(b, args) for b in blocks if not args.blocks or b.name in args.blocks]
    chosen: dict[str, dict[str, float | None]] = {}  # regime -> method -> lr
    for block in blocks:
        grids = {m: list(block.lrs_for(m)) for m in block.tuned}

        if runner is None:
            todo = [s for s in _capacity_tune(suite, block, grids, args) if run_id(s) not in done_ids(path)]
            print(f"# {block.name}: {len(todo)} tuning runs to run (before any widening)")
            for spec in todo:
                print("tune", run_id(spec))
        else:
            runner.run(_capacity_tune(suite, block, grids, args), f"{block.name} tune")
        choices = _capacity_pick(path, suite, block, grids, args) if block.tune_seeds else {}
        while runner is not None:  # widen while a best lr sits at an edge
            extra = {}
            for method, choice in choices.items():
                lr = capacity.widened(grids[method], choice.lr, block.lrs_for(method), comp.widen)
                if lr is not None:
                    grids[method].append(lr)
                    extra[method] = [lr]
            if not extra:
                break
            runner.run(
                _capacity_tune(suite, block, {m: extra.get(m, []) for m in block.tuned}, args),
                f"{block.name} widen {extra}",
            )
            choices = _capacity_pick(path, suite, block, grids, args)
        regime = chosen.setdefault(block.regime, {})
        regime.update({m: c.lr for m, c in choices.items()})
        main = _filter(main_specs(suite, block, regime), args)
        if runner is None:
            print(f"# {block.name}: {len(main)} main runs listed (methods waiting for tuning are left out)")
            for spec in main:
                if run_id(spec) not in done_ids(path):
                    print("main", run_id(spec))
        else:
            runner.run(main, f"{block.name} main")
    return 1 if runner is not None and runner.failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.harness.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=SUITES)
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (replaces every group's / block's main seeds)")
    parser.add_argument("--tune-seeds", type=int, nargs="+", help="evidence suites: replace the tuning seeds")
    parser.add_argument("--lrs", type=float, nargs="+", help="evidence suites: replace the learning-rate grid")
    parser.add_argument(
        "--blocks", nargs="+", help="evidence suites: only these blocks (see benchmarks.harness.suites)"
    )
    parser.add_argument("--methods", nargs="+", help="only these methods (see benchmarks.harness.methods.METHODS)")
    parser.add_argument(
        "--gate-results", type=Path, help="capacity comparison: the gate's records (default OUT/<gate suite>.jsonl)"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where runs train (cuda: bf16 autocast forwards)"
    )
    parser.add_argument("--gate-tasks", nargs="+", help="capacity gate: only these candidate tasks")
    parser.add_argument("--groups", nargs="+", help="historic suites: only these groups (main, cost, ablation, ...)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default benchmarks/results)")
    parser.add_argument("--in-process", action="store_true", help="run here, not one subprocess per run")
    parser.add_argument("--subprocess", action="store_true", help="force one subprocess per run (smoke too)")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: the suite's)")
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE", help="override spec fields, e.g. train_size=320"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (subprocesses; default 1)")
    parser.add_argument(
        "--checkpoint-every",
        type=float,
        default=CHECKPOINT_EVERY_S,
        metavar="SECONDS",
        help="save each run's training state this often, to resume a cut run (default %(default)g; 0: no checkpoints)",
    )
    parser.add_argument("--allow-dirty", action="store_true", help="run from a working tree with uncommitted changes")
    parser.add_argument("--dry-run", action="store_true", help="list the runs that would run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    path = args.out / f"{args.suite}.jsonl"
    in_process = (args.in_process or args.suite in SMOKE_SUITES) and not args.subprocess
    if args.dry_run:
        runner = None
    else:
        try:
            provenance.check_imports()
        except provenance.LockError as err:
            print(str(err), file=sys.stderr)
            return 2
        prov, freeze = provenance.current(argv, args.threads, args.out)
        if prov["not_counted"]["untracked"]:
            logger.info(
                "%d untracked files are not counted as code (%s): `git add` one to count it",
                prov["not_counted"]["untracked"],
                ", ".join(prov["not_counted"]["untracked_named"]),
            )
        if prov["dirty"] and not args.allow_dirty and args.suite not in SMOKE_SUITES:
            print(
                "the working tree has uncommitted changes: commit them (the records name the commit) or pass "
                "--allow-dirty (the diff's hash is locked with the results)",
                file=sys.stderr,
            )
            return 2
        try:
            provenance.check_lock(args.out, args.suite, prov, freeze)
        except provenance.LockError as err:
            print(str(err), file=sys.stderr)
            return 2
        runner = Runner(path, in_process, args.jobs, prov, args.checkpoint_every)
    if args.suite in EVIDENCE:
        run_evidence(args.suite, args, runner, path)
        return 1 if runner is not None and runner.failed else 0
    if args.suite in COMPARISONS:
        return run_capacity(args.suite, args, runner, path)
    if args.suite in GATES:
        return run_gate(args.suite, args, runner, path)

    specs = suite_specs(args.suite, args.seeds)
    if args.groups:
        specs = [s for s in specs if set(s["groups"]) & set(args.groups)]
    specs = _filter(specs, args)
    if runner is None:
        for spec in [s for s in specs if run_id(s) not in done_ids(path)]:
            print(run_id(spec), spec["groups"])
        return 0
    runner.run(specs, args.suite)
    return 1 if runner.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
