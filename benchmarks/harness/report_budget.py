"""The budget curve (issue #34) in docs/BENCHMARKS.md: when does GoRA pay, and which half of GoRA costs at peak lr?

Reads the main runs of `evidence-budget` (lora / rslora / gora at 32, 64 and 128 steps, each method's lr tuned per
budget; at 256 steps GoRA at half its lr, the γ = 0 and fixed-rank controls each at its own tuned lr, GoRA γ = auto)
and of `evidence-capacity-long` (the same task, model, r and schedule shape at 256 steps: the curve's last point and
the controls' reference). Every comparison is paired on the seeds both sides ran (`report_capacity.paired_nll`: bootstrap
over seeds and test problems, problems weighted by their answer tokens).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .paired_stats import paired_bootstrap
from .plots import pyplot_offscreen, save_figure
from .report_capacity import interim, paired_nll
from .tables import fmt

Record = dict[str, Any]

BUDGET_SUITE = "evidence-budget"
REFERENCE_SUITE = "evidence-capacity-long"  # the 256-step point and the controls' reference
CORE = ("lora", "rslora", "gora")
# (block of BUDGET_SUITE, method, label): the 256-step variants, each against GoRA and rsLoRA of REFERENCE_SUITE
VARIANTS = (
    ("cap-stall", "gora", "GoRA at half its lr (2e-3), labelled variant"),
    ("cap-controls-256", "gora-gamma0", "allocation only (γ = 0), own tuned lr"),
    ("cap-controls-256", "gora-fixed", "initialization only (fixed ranks), own tuned lr"),
    ("cap-auto-256", "gora-auto", "GoRA γ = auto at GoRA's lr"),
)


def steps_of(record: Record) -> int:
    return record["train_size"] // record["batch_size"] * record.get("epochs", 1)


def budget_runs(data: dict[str, list[Record]]) -> dict[int, dict[str, dict[int, Record]]]:
    """steps -> method -> seed -> main run (not diverged) of the core methods at r = 4."""
    out: dict[int, dict[str, dict[int, Record]]] = defaultdict(lambda: defaultdict(dict))
    for suite, blocks in ((BUDGET_SUITE, None), (REFERENCE_SUITE, ("cap-core",))):
        for r in data.get(suite, []):
            if r.get("stage") != "main" or r.get("diverged") or r["method"] not in CORE:
                continue
            if blocks and r.get("block") not in blocks:
                continue
            if suite == BUDGET_SUITE and not str(r.get("block", "")).startswith("cap-budget-"):
                continue
            out[steps_of(r)][r["method"]][r["seed"]] = r
    return out


def _mean_ci(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    mean, low, high = paired_bootstrap(np.asarray(values, dtype=np.float64))
    return mean, low, high


def _ci_cell(st: dict[str, Any] | None) -> str:
    if not st:
        return "–"
    n = len(st["seeds"])
    return f"{st['mean']:+.3f} [{st['low']:+.3f}, {st['high']:+.3f}] ({n} seed{'' if n == 1 else 's'})"


def _verdict(st: dict[str, Any] | None, planned: int) -> str:
    if not st:
        return "–"
    so_far = interim(BUDGET_SUITE, st) if len(st["seeds"]) < planned else None
    return f"no verdict yet ({so_far})" if so_far else st["verdict"]


def verdict_rows(data: dict[str, list[Record]], planned: int = 8) -> list[str]:
    """One row per budget: GoRA − rsLoRA and GoRA − LoRA in test answer-token NLL (− = GoRA better)."""
    rows = []
    for steps, methods in sorted(budget_runs(data).items()):
        if "gora" not in methods:
            continue
        rs = paired_nll(methods["gora"], methods["rslora"]) if "rslora" in methods else None
        lo = paired_nll(methods["gora"], methods["lora"]) if "lora" in methods else None
        rows.append(
            f"| {steps} steps | {_ci_cell(rs)} | {_ci_cell(lo)} | GoRA − rsLoRA: {_verdict(rs, planned)}; "
            f"GoRA − LoRA: {_verdict(lo, planned)} |"
        )
    return rows


def plot_budget_curve(data: dict[str, list[Record]], path: Path) -> bool:
    """Two panels against the budget (log2 steps): each method's test NLL (mean over seeds, 95% bootstrap interval),
    and the verdict's paired differences GoRA − rsLoRA and GoRA − LoRA with their 95% intervals (below 0: GoRA
    better). The per-method intervals include the seed-to-seed spread that pairing removes: read the right panel."""
    runs = budget_runs(data)
    plt = pyplot_offscreen() if len(runs) >= 2 else None
    if plt is None:
        return False
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, method in enumerate(CORE):
        points = []  # (x, mean, low, high, n)
        for steps, methods in sorted(runs.items()):
            values = [r["metric"] for r in methods.get(method, {}).values()]
            if values:
                # side by side, so the intervals do not hide each other
                points.append((steps * (1 + 0.03 * (i - 1)), *_mean_ci(values), len(values)))
        _errorbar(ax, points, method, f"C{i}")
    ax.set_ylabel("test answer-token NLL (nats, lower is better)")
    ax.set_title("each method at its tuned lr")
    for i, other in enumerate(("rslora", "lora")):
        points = []
        for steps, methods in sorted(runs.items()):
            st = paired_nll(methods["gora"], methods[other]) if {"gora", other} <= methods.keys() else None
            if st:
                points.append((steps * (1 + 0.03 * (2 * i - 1)), st["mean"], st["low"], st["high"], len(st["seeds"])))
        label = f"GoRA − {'rsLoRA' if other == 'rslora' else 'LoRA'}"
        _errorbar(dx, points, label, f"C{CORE.index(other)}")  # the baseline's colour on the left
    dx.axhline(0.0, color="black", linewidth=0.8)
    dx.set_ylabel("paired Δ test NLL (nats, below 0: GoRA better)")
    dx.set_title("GoRA against each baseline, paired by seed")
    for a in (ax, dx):
        a.set_xscale("log", base=2)
        a.set_xlabel("training budget (steps of 8 problems)")
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle("SmolLM2-135M, word_sorting, r = 4 (95% intervals; n = seeds)")
    fig.tight_layout()
    save_figure(plt, fig, path, dpi=110)
    return True


def _errorbar(ax: Any, points: list[tuple[float, float, float, float, int]], label: str, color: str) -> None:
    if not points:
        return
    xs, ys, lows, highs, ns = zip(*points)
    yerr = [[y - lo for y, lo in zip(ys, lows)], [hi - y for y, hi in zip(ys, highs)]]
    ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=3, label=label, color=color)
    for x, y, n in zip(xs, ys, ns):
        ax.annotate(f"n={n}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)


def _lrs(methods: dict[str, dict[int, Record]], method: str) -> str:
    return "/".join(f"{lr:g}" for lr in sorted({r["lr"] for r in methods.get(method, {}).values()})) or "–"


def mean_train_loss(runs: dict[int, Record], first: int, last: int) -> float | None:
    """Mean training loss over steps `first`..`last` (mean over the seeds that logged a curve; None without any)."""
    values = [
        statistics.mean(loss for step, loss in r["loss_curve"] if first <= step <= last)
        for r in runs.values()
        if r.get("loss_curve")
    ]
    return statistics.mean(values) if values else None


def early_loss(runs: dict[int, Record], last: int = 32) -> str:
    """Mean training loss over the first `last` steps (mean over seeds)."""
    value = mean_train_loss(runs, 1, last)
    return "–" if value is None else fmt(value, 3)


def budget_section(data: dict[str, list[Record]], img_dir: Path, img_rel: str) -> list[str]:
    """The suite's section: the curve (table and plot), then the 256-step variants against GoRA and rsLoRA."""
    runs = budget_runs(data)
    out = [
        f"## Suite `{BUDGET_SUITE}`: when does GoRA pay? The budget curve and the stall at peak lr",
        "",
        "The capacity task of `evidence-capacity-long` (SmolLM2-135M, reasoning-gym word_sorting, r = 4, N = 32 "
        "calibration batches, linear schedule with 10% warm-up) at shorter budgets: 32, 64 and 128 steps of 8 "
        "problems (the first 256, 512, 1024 training problems of each seed); each method's lr tuned per budget on "
        "the validation split (seed 100; its grid from half its 256-step optimum to 4x, widened at an edge), then "
        "paired main seeds with test answer-token NLL (400 problems) and exact match. The 256-step point is "
        f"`{REFERENCE_SUITE}`. Reproduce: `python -m benchmarks.harness.run {BUDGET_SUITE} --jobs 2` "
        "(one torch thread a run).",
        "",
        "| budget | lr lora / rslora / gora | test NLL lora | rslora | gora | train loss, first 32 steps "
        "(lora / rslora / gora) | GoRA − rsLoRA [95% CI] | GoRA − LoRA [95% CI] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for steps, methods in sorted(runs.items()):
        cells = []
        for method in CORE:
            values = [r["metric"] for r in methods.get(method, {}).values()]
            cells.append(f"{fmt(statistics.mean(values), 3)} (n = {len(values)})" if values else "–")
        rs = paired_nll(methods["gora"], methods["rslora"]) if {"gora", "rslora"} <= set(methods) else None
        lo = paired_nll(methods["gora"], methods["lora"]) if {"gora", "lora"} <= set(methods) else None
        early = " / ".join(early_loss(methods.get(m, {}), min(32, steps)) for m in CORE)
        out.append(
            f"| {steps} | {' / '.join(_lrs(methods, m) for m in CORE)} | {' | '.join(cells)} | {early} | "
            f"{_ci_cell(rs)} | {_ci_cell(lo)} |"
        )
    out += ["", *tuning_lines(data)]
    path = img_dir / f"{BUDGET_SUITE}-curve.png"
    if plot_budget_curve(data, path):
        out += ["", f"![test NLL against budget]({img_rel}/{path.name})"]
    out += ["", *variant_table(data)]
    return out


def tuning_lines(data: dict[str, list[Record]]) -> list[str]:
    """Per tuned block and method, the validation NLL of every lr run so far (the lowest in bold)."""
    tuned: dict[str, dict[str, dict[float, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in data.get(BUDGET_SUITE, []):
        if r.get("stage") == "tune":
            tuned[r["block"]][r["method"]][r["lr"]] = math.inf if r.get("diverged") else r["metric"]
    out = []
    for block, methods in sorted(tuned.items(), key=lambda kv: (len(kv[0]), kv[0])):
        cells = []
        for method in sorted(methods, key=lambda m: (*CORE, m).index(m)):
            curve = methods[method]
            best = min(curve, key=curve.get)
            cells.append(
                f"{method} "
                + ", ".join(
                    (f"**{lr:g}: {fmt(v, 3)}**" if lr == best else f"{lr:g}: {fmt(v, 3)}")
                    for lr, v in sorted(curve.items())
                )
            )
        out.append(f"- `{block}` tuning (validation NLL by lr, seed 100): {'; '.join(cells)}")
    return out


def variant_table(data: dict[str, list[Record]]) -> list[str]:
    """The 256-step variants, each paired with GoRA (4e-3) and rsLoRA of the reference suite on the seeds both ran."""
    ref: dict[str, dict[int, Record]] = defaultdict(dict)
    for r in data.get(REFERENCE_SUITE, []):
        if r.get("stage") == "main" and r.get("block") == "cap-core" and not r.get("diverged"):
            ref[r["method"]][r["seed"]] = r
    out = [
        "At 256 steps, which half of GoRA costs at peak lr? Each variant against GoRA (γ = 5e-2, lr 4e-3) and "
        f"rsLoRA of `{REFERENCE_SUITE}`, paired on the seeds both ran (− = the variant better):",
        "",
        "| variant | lr | seeds | test NLL | train loss, steps 33–128 | − GoRA [95% CI] | − rsLoRA [95% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for block, method, label in VARIANTS:
        runs = {
            r["seed"]: r
            for r in data.get(BUDGET_SUITE, [])
            if r.get("stage") == "main" and r.get("block") == block and r["method"] == method and not r.get("diverged")
        }
        if not runs:
            out.append(f"| {label} | – | 0 | not run yet | | | |")
            continue
        mid = mean_train_loss(runs, 33, 128)
        nll = [r["metric"] for r in runs.values()]
        out.append(
            f"| {label} | {'/'.join(f'{lr:g}' for lr in sorted({r['lr'] for r in runs.values()}))} | {len(runs)} | "
            f"{fmt(statistics.mean(nll), 3)} | {'–' if mid is None else fmt(mid, 3)} | "
            f"{_ci_cell(paired_nll(runs, ref['gora']) if ref.get('gora') else None)} | "
            f"{_ci_cell(paired_nll(runs, ref['rslora']) if ref.get('rslora') else None)} |"
        )
    gora_mid = mean_train_loss(ref.get("gora", {}), 33, 128)
    if gora_mid is not None:
        out += ["", f"GoRA at 4e-3 itself: training loss over steps 33–128 {fmt(gora_mid, 3)}."]
    return [*out, ""]
