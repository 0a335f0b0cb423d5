"""The capacity suite (issue #19): a gate that looks for a task where rank binds, the comparison on the task it
finds (their part of docs/BENCHMARKS.md is `benchmarks.harness.report_capacity`).

1. Gate (`capacity-gate`; candidates, ranks and lr in `benchmarks.harness.capacity_suites.GATES`): rsLoRA at r = 4 and r = 32 on each
   candidate task, validation answer-token NLL. A task qualifies when NLL(r = 32) <= QUALIFY_RATIO · NLL(r = 4)
   (`gate_rows`); the comparison runs on the qualifying task with the largest gap (`qualifying`), at the gate's
   low rank (where the gap was measured) and with the gate's training budget. No qualifying task: the comparison
   stops there with a message that gives the numbers (`StopComparison`).
2. Comparison (`evidence-capacity`; `comparison_blocks`): the evidence protocol of `benchmarks.harness.suites` (paired
   seeds, A0 seeded apart, lr tuned per method on a validation split, per-example outputs, provenance lock) with an
   lr grid in factors of 2 that is widened while a method's best lr sits at an edge (`widened`), N = 32
   calibration batches, answer-token NLL on the test split as the primary endpoint (lower is better; exact match of
   the greedy answer secondary), and the capacity reference: rsLoRA at r = 32 on the same seeds at rsLoRA's lr. Runs
   go in priority order: lr tuning and main seeds of lora / rslora / gora (+ the r = 32 reference) first, then GoRA
   with γ = "auto" and the controls, then the rsLoRA-scaled baselines at r_ref = 8.
3. Report: `benchmarks.harness.report_capacity`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .capacity_suites import COMPARISONS, GATE_TASKS, GATES, QUALIFY_RATIO, WIDEN, Gate
from .paired_stats import select_lr
from .suites import BASE, CONTROLS, INIT_SEED_OFFSET, Block

Record = dict[str, Any]

CAPACITY_REFERENCE = "rslora-r32"  # rsLoRA at r = 32 on the same seeds: the top of the r -> 32 gap, not a competitor


class StopComparison(RuntimeError):
    """No gate task qualifies (or the gate has not finished): the comparison does not run."""


# ----------------------------------------------------------------------------------------------------------- gate


@dataclasses.dataclass(frozen=True)
class GateRow:
    """One candidate of the gate: its best validation NLL per rank (over the gate's lrs; mean over its seeds)."""

    task: str
    nll: dict[int, float | None]  # rank -> NLL
    lr: dict[int, float | None]  # rank -> the lr of that NLL
    ratio: float | None  # NLL(high rank) / NLL(low rank)
    qualifies: bool
    complete: bool
    edge: tuple[int, ...] = ()  # ranks whose best lr sits at an edge of a multi-lr grid (optimum not located)


def gate_grid(gate: Gate, r: int, runs: list[Record]) -> list[float]:
    """Rank `r`'s lrs: its grid in `gate`, and the lrs of `runs` that continue it outwards by factors of 2 (at most
    `gate.widen` on each side: what widening ran; a single-lr grid never widens). An lr elsewhere is not the gate's."""
    grid = sorted(map(float, gate.lrs_for(r)))
    if len(grid) < 2:  # one lr has no edge to widen from (`widened`)
        return grid
    have = {float(x["lr"]) for x in runs}
    for _ in range(gate.widen):
        if grid[-1] * 2 in have:
            grid.append(grid[-1] * 2)
    for _ in range(gate.widen):
        if grid[0] / 2 in have:
            grid.insert(0, grid[0] / 2)
    return grid


def gate_runs(records: list[Record], task: str, r: int) -> list[Record]:
    """The gate's runs of candidate `task` at rank `r`."""
    return [x for x in records if x.get("gate_task") == task and x["r"] == r and x.get("stage") == "gate"]


def gate_widen(gate: Gate, task: str, r: int, records: list[Record]) -> float | None:
    """The next lr rank `r` of `task` needs (its best so far sits at an edge of the lrs it has run), or None."""
    runs = gate_runs(records, task, r)
    grid = gate_grid(gate, r, runs)
    best = select_lr(runs, grid, gate.seeds, lower_is_better=True).lr
    return widened(grid, best, gate.lrs_for(r), gate.widen)


def gate_rows(records: list[Record], gate_suite: str, ratio: float = QUALIFY_RATIO) -> list[GateRow]:
    """The gate's verdict per candidate task (in the gate's order)."""
    gate = GATES[gate_suite]
    low, high = min(gate.ranks), max(gate.ranks)
    rows = []
    for name in gate.tasks:
        nll: dict[int, float | None] = {}
        best_lr: dict[int, float | None] = {}
        complete = True
        edge: list[int] = []
        for r in gate.ranks:
            runs = gate_runs(records, name, r)
            grid = gate_grid(gate, r, runs)
            choice = select_lr(runs, grid, gate.seeds, lower_is_better=True)
            nll[r] = choice.table[choice.lr][0] if choice.lr is not None else None
            best_lr[r] = choice.lr
            base = gate.lrs_for(r)
            complete &= all(choice.table.get(float(lr), (None, None, 0))[2] == len(gate.seeds) for lr in base)
            if len(grid) > 1 and choice.lr in (grid[0], grid[-1]):
                edge.append(r)
        value = nll[high] / nll[low] if nll[low] and nll[high] is not None else None
        rows.append(GateRow(name, nll, best_lr, value, value is not None and value <= ratio, complete, tuple(edge)))
    return rows


def gate_ratio(gate_suite: str) -> float:
    """The qualifying ratio the comparison built on `gate_suite` uses (QUALIFY_RATIO unless a smoke suite lets any
    finished candidate through)."""
    return next((c.qualify_ratio for c in COMPARISONS.values() if c.gate == gate_suite), QUALIFY_RATIO)


def qualifying(rows: list[GateRow]) -> GateRow | None:
    """The qualifying candidate with the largest relative gap (smallest NLL ratio), or None."""
    ok = [row for row in rows if row.qualifies]
    return min(ok, key=lambda row: row.ratio) if ok else None


def stop_message(rows: list[GateRow], ratio: float) -> str:
    """Why the comparison does not run: every candidate's numbers, and whether the gate is finished."""
    parts = [
        f"{row.task}: "
        + ", ".join(f"r={r} {'–' if v is None else f'{v:.3f}'}" for r, v in row.nll.items())
        + (f" (ratio {row.ratio:.3f})" if row.ratio is not None else "")
        + ("" if row.complete else " [gate not finished]")
        for row in rows
    ]
    unfinished = sum(not row.complete for row in rows)
    verdict = (
        f"The gate has not finished ({len(rows) - unfinished} of {len(rows)} candidates measured): the comparison "
        "does not start until a candidate qualifies."
        if unfinished
        else "The comparison stops here: on this model and budget rank does not bind on any candidate."
    )
    return f"no gate task qualifies (NLL(r=32) <= {ratio:g} x NLL(r=4) on validation): {'; '.join(parts)}. {verdict}"


# ----------------------------------------------------------------------------------------------------- comparison


def comparison_blocks(suite: str, gate_records: list[Record]) -> list[Block]:
    """The comparison's blocks on the gate's qualifying task.

    Raises:
        StopComparison: when no candidate qualifies (the message gives every candidate's numbers).
    """
    comp = COMPARISONS[suite]
    gate = GATES[comp.gate]
    rows = gate_rows(gate_records, comp.gate, comp.qualify_ratio)
    chosen = qualifying(rows)
    if chosen is None:
        raise StopComparison(stop_message(rows, comp.qualify_ratio))
    task = {**GATE_TASKS[chosen.task], "gate_task": chosen.task}
    low = min(gate.ranks)
    r_low = {"r": low, "gora_min_rank": max(1, low // 2)}  # the paper's r_min = r_ref / 2

    def fixed_lr(method: str) -> dict[str, float]:  # Comparison checks it is set where a listed block needs it
        return {m: lr for m, lr in comp.fixed_lr.items() if m == method}

    blocks = {
        "core": Block(
            "cap-core",
            comp.base,
            f"r{low}",
            ("lora", "rslora", "gora"),
            ((CAPACITY_REFERENCE, "rslora"),),
            seeds=comp.main_seeds,
            tune_seeds=comp.tune_seeds,
            lrs=comp.lrs,
            overrides={**task, **r_low},
        ),
        "controls": Block(
            "cap-controls",
            comp.base,
            f"r{low}",
            ("gora-auto",),
            CONTROLS,
            seeds=comp.control_seeds,
            tune_seeds=comp.tune_seeds,
            lrs=comp.lrs,
            overrides={**task, **r_low},
            note="GoRA γ = auto and the controls on the first "
            f"{len(comp.control_seeds)} seeds; the controls at GoRA's lr",
        ),
        "r8": Block(
            "cap-r8",
            comp.base,
            "r8",
            ("rslora", "gora", "pissa-rs", "loraga-rs", "eva-rs"),
            seeds=comp.control_seeds,
            tune_seeds=comp.tune_seeds,
            lrs=comp.lrs,
            overrides={**task, "r": 8},
            note=f"r_ref = 8 (baselines) on the first {len(comp.control_seeds)} seeds",
        ),
        # issue #34 (suites with budgets): the core methods at each shorter budget, tuned per budget
        **{
            f"budget-{steps}": Block(
                f"cap-budget-{steps}",
                comp.base,
                f"r{low}-{steps}steps",
                ("lora", "rslora", "gora"),
                seeds=comp.main_seeds,
                tune_seeds=comp.tune_seeds,
                lrs=comp.lrs,
                method_lrs=comp.method_lrs,
                overrides={**task, **r_low, "train_size": steps * BASE[comp.base]["batch_size"]},
            )
            for steps in comp.budgets
        },
        # GoRA at half its 256-step lr: a labelled variant (is the tie an lr-selection artefact?), not the verdict
        "stall": Block(
            "cap-stall",
            comp.base,
            f"r{low}-gora-lr-half",
            (),
            (("gora", "gora"),),
            seeds=comp.main_seeds,
            tune_seeds=(),
            fixed_lr=fixed_lr("gora"),
            overrides={**task, **r_low},
            note="GoRA at half its 256-step lr, a labelled variant",
        ),
        # which half of GoRA costs at peak lr: allocation only (gamma = 0) and initialization only (fixed ranks),
        # each tuned itself
        "controls-256": Block(
            "cap-controls-256",
            comp.base,
            f"r{low}-controls",
            ("gora-gamma0", "gora-fixed"),
            seeds=comp.control_seeds,
            tune_seeds=comp.tune_seeds,
            lrs=comp.lrs,
            method_lrs=comp.method_lrs,
            overrides={**task, **r_low},
            note=f"the controls each at its own tuned lr, on the first {len(comp.control_seeds)} seeds",
        ),
        "auto-256": Block(
            "cap-auto-256",
            comp.base,
            f"r{low}-gora-auto",
            (),
            (("gora-auto", "gora-auto"),),
            seeds=comp.control_seeds,
            tune_seeds=(),
            fixed_lr=fixed_lr("gora-auto"),
            overrides={**task, **r_low},
            note=f"GoRA with gamma = auto at GoRA's 256-step lr, on the first {len(comp.control_seeds)} seeds",
        ),
    }
    unknown = [name for name in comp.blocks if name not in blocks]
    if unknown:
        raise ValueError(f"unknown comparison block(s) {unknown}: choose from {sorted(blocks)}")
    return [blocks[name] for name in comp.blocks]


def center_out(lrs: tuple[float, ...]) -> list[float]:
    """The grid from its middle outwards (1e-3, 5e-4, 2e-3, ...): a tuning cut short still has every method at the
    central lrs."""
    mid = (len(lrs) - 1) / 2
    return sorted(lrs, key=lambda lr: (abs(lrs.index(lr) - mid), lr))


def widened(lrs: list[float], best: float | None, base: tuple[float, ...], limit: int = WIDEN) -> float | None:
    """The next lr to try when `best` sits at an edge of the lrs run so far (`lrs`): twice the largest or half the
    smallest, at most `limit` beyond the starting grid `base` on each side; None when `best` is inside (or no lr
    qualified, or the limit is reached)."""
    if best is None or len(lrs) < 2:
        return None
    lo, hi = min(lrs), max(lrs)
    if best == hi and sum(lr > max(base) for lr in lrs) < limit:
        return hi * 2
    if best == lo and sum(lr < min(base) for lr in lrs) < limit:
        return lo / 2
    return None


def tune_spec(suite: str, block: Block, method: str, seed: int, lr: float) -> dict[str, Any]:
    return {
        **BASE[block.base],
        **block.overrides,
        "suite": suite,
        "block": block.name,
        "regime": block.regime,
        "stage": "tune",
        "method": method,
        "seed": seed,
        "init_seed": seed + INIT_SEED_OFFSET,
        "lr": lr,
        "eval_split": "val",
        "groups": [block.name],
    }
