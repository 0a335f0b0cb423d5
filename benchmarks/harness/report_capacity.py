"""The capacity suites' part of docs/BENCHMARKS.md (called by `benchmarks.harness.report_doc`): the gate table
(`gate_section`); per comparison and regime each method's test NLL and exact match, the per-seed and loss-phase
tables, the paired verdicts on NLL (bootstrap over seeds × test examples of the per-example NLL, weighted by answer
tokens) and on exact match (+ McNemar), the fraction of the r → 32 gap each method closes, the lr curves (PNG) and
each method's lr window (the lrs within WINDOW_NATS of its best validation NLL) (`comparison_section`).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .capacity import (
    CAPACITY_REFERENCE,
    Record,
    gate_grid,
    gate_ratio,
    gate_rows,
    gate_runs,
    qualifying,
    stop_message,
)
from .capacity_suites import COMPARISONS, GATES, WINDOW_NATS, Gate
from .paired_stats import discordant, mcnemar_exact, paired_bootstrap, select_lr, unbits, verdict
from .plots import plot_lr_curves
from .suites import BASE
from .tables import fmt


def gate_lrs(gate: Gate, records: list[Record] | None = None) -> str:
    """The gate's lr grid in words: "lr 1e-3", or each rank's own grid when they differ. Given the gate's `records`,
    each rank's grid includes the lrs that widening ran (over all candidates), not only the grid it started from."""
    if not gate.rank_lrs and len(gate.lrs) == 1:
        return f"lr {gate.lrs[0]:g}"
    grids = []
    for r in gate.ranks:
        lrs = set(map(float, gate.lrs_for(r)))
        for task in gate.tasks if records else ():
            lrs.update(gate_grid(gate, r, gate_runs(records, task, r)))
        grids.append(f"r = {r}: {', '.join(f'{lr:g}' for lr in sorted(lrs))}")
    return f"each rank at its best lr of {'; '.join(grids)}"


def gate_section(suite: str, records: list[Record]) -> list[str]:
    gate = GATES[suite]
    ratio = gate_ratio(suite)
    rows = gate_rows(records, suite, ratio)
    low, high = min(gate.ranks), max(gate.ranks)
    b = BASE[gate.base]
    steps = b["train_size"] // b["batch_size"] * b.get("epochs", 1)
    widen = (
        ", widened by factors of 2 while a rank's best sits at an edge" if len(gate.all_lrs) > 1 and gate.widen else ""
    )
    out = [
        f"## Suite `{suite}`: does rank bind? (the gate before the capacity comparison)",
        "",
        f"rsLoRA at r = {low} and r = {high} ({gate_lrs(gate)}{widen}; seed "
        f"{', '.join(map(str, gate.seeds))}) on each candidate reasoning-gym task, {b['train_size']} training "
        f"problems × {b.get('epochs', 1)} epoch = {steps} steps of {b['batch_size']}, N = {b['num_batches']} "
        f"calibration batches, {b['val_size']} validation problems. Metric: validation answer-token NLL (nats per "
        "answer token: the answer and its end-of-turn marker). A task qualifies when NLL(r = "
        f"{high}) ≤ {ratio:g} · NLL(r = {low}). Reproduce: `python -m benchmarks.harness.run {suite}`.",
        "",
        f"| task | NLL r = {low} | NLL r = {high} | ratio | qualifies | first-step training loss | s / run |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        runs = [r for r in records if r.get("gate_task") == row.task]
        first = [r["loss_curve"][0][1] for r in runs if r.get("loss_curve")]
        times = [t for r in runs if (t := r.get("run_s") or r.get("wall_s")) is not None]
        out.append(
            f"| {row.task} | {fmt(row.nll.get(low), 3)} | {fmt(row.nll.get(high), 3)} | {fmt(row.ratio, 3)} | "
            + ("**yes**" if row.qualifies else ("no" if row.complete else "not finished"))
            + f" | {fmt(statistics.mean(first), 2) if first else '–'} | "
            f"{fmt(statistics.median(times), 0) if times else '–'} |"
        )
    if len(gate.all_lrs) > 1:  # each rank at its best lr: say which, and what every lr gave
        out.append("")
        for row in rows:
            cells = []
            for r in gate.ranks:
                runs = gate_runs(records, row.task, r)
                grid = gate_grid(gate, r, runs)
                table = select_lr(runs, grid, gate.seeds, lower_is_better=True).table
                at = ", ".join(f"{lr:g}: {fmt(table[lr][0], 3) if lr in table else '–'}" for lr in grid)
                edge = " — at the edge of the lrs run: its optimum is not located" if r in row.edge else ""
                cells.append(f"r = {r} best at {row.lr.get(r) or '–'} ({at}){edge}")
            out.append(f"- {row.task}, NLL by lr: {'; '.join(cells)}")
    chosen = qualifying(rows)
    comparisons = [f"`{n}`" for n, c in COMPARISONS.items() if c.gate == suite]
    if chosen:
        then = (
            f"the comparison ({', '.join(comparisons)}) runs on it" if comparisons else "no comparison reads this gate"
        )
        verdict = f"Qualifying task with the largest gap: **{chosen.task}** (ratio {chosen.ratio:.3f}); {then}."
    else:
        verdict = stop_message(rows, ratio)
    out += ["", verdict, ""]
    return out


def _nll_matrix(runs: dict[int, Record], seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    sums = np.array([runs[s]["nll_sum"] for s in seeds], dtype=np.float64)
    tokens = np.array(runs[seeds[0]]["nll_tokens"], dtype=np.float64)
    return sums, tokens


def paired_nll(a: dict[int, Record], b: dict[int, Record]) -> dict[str, Any] | None:
    """A − B in test answer-token NLL over the seeds both ran: the mean over seeds of Σ ΔNLL / Σ tokens, with a
    bootstrap interval (seeds and test examples resampled together; each example weighted by its answer tokens)."""
    seeds = sorted(s for s in set(a) & set(b) if a[s].get("nll_sum") and b[s].get("nll_sum"))
    if not seeds:
        return None
    sa, tokens = _nll_matrix(a, seeds)
    sb, _ = _nll_matrix(b, seeds)
    # per-example ΔNLL scaled so that the plain mean over examples is the token-weighted mean
    diff = (sa - sb) * len(tokens) / tokens.sum()
    mean, low, high = paired_bootstrap(diff)
    per_seed = diff.mean(axis=1)
    return {
        "seeds": seeds,
        "mean": mean,
        "low": low,
        "high": high,
        "verdict": verdict(-high, -low),  # lower NLL is better
        "wins": int((per_seed < 0).sum()),
        "losses": int((per_seed > 0).sum()),
    }


def interim(suite: str, st: dict[str, Any]) -> str | None:
    """'k of n paired seeds' while a comparison has fewer paired seeds than its suite plans, else None. Its interval
    then rests on too few seeds to measure the seed-to-seed variation (A0, data order) that the planned seeds measure
    (with one seed it resamples test problems only), so it is no verdict yet."""
    planned = len(COMPARISONS[suite].main_seeds)
    return f"{len(st['seeds'])} of {planned} paired seeds" if len(st["seeds"]) < planned else None


def paired_em(a: dict[int, Record], b: dict[int, Record]) -> dict[str, Any] | None:
    seeds = sorted(s for s in set(a) & set(b) if a[s].get("correct") and b[s].get("correct"))
    if not seeds:
        return None
    ca = np.array([unbits(a[s]["correct"]) for s in seeds], dtype=np.int8)
    cb = np.array([unbits(b[s]["correct"]) for s in seeds], dtype=np.int8)
    mean, low, high = paired_bootstrap(ca - cb)
    n_b, n_c = discordant(ca, cb)
    return {"mean": mean, "low": low, "high": high, "verdict": verdict(low, high), "p": mcnemar_exact(n_b, n_c)}


def gap_closed(method: dict[int, Record], ref: dict[int, Record], top: dict[int, Record]) -> dict[str, Any] | None:
    """The fraction of the gap from `ref` (rsLoRA at the low rank) to `top` (rsLoRA at r = 32) that `method`
    closes: (NLL_ref − NLL_method) / (NLL_ref − NLL_top), with a bootstrap interval over seeds and examples, on the
    seeds all three have run (`seeds`: the reference may have fewer than the method)."""
    seeds = sorted(
        s for s in set(method) & set(ref) & set(top) if all(x[s].get("nll_sum") for x in (method, ref, top))
    )
    if not seeds:
        return None
    m, tokens = _nll_matrix(method, seeds)
    r, _ = _nll_matrix(ref, seeds)
    t, _ = _nll_matrix(top, seeds)
    num, den = r - m, r - t
    value = num.sum() / den.sum() if den.sum() else math.nan
    rng = np.random.default_rng(0)
    reps = []
    for _ in range(2000):
        s = rng.integers(0, len(seeds), len(seeds))
        e = rng.integers(0, num.shape[1], num.shape[1])
        d = den[s][:, e].sum()
        if d:
            reps.append(num[s][:, e].sum() / d)
    low, high = (np.quantile(reps, [0.025, 0.975]).tolist()) if reps else (math.nan, math.nan)
    return {
        "value": value,
        "low": low,
        "high": high,
        "gap": float(den.sum() / tokens.sum() / len(seeds)),
        "seeds": seeds,
    }


def gap_cell(gap: dict[str, Any] | None, seeds: int) -> str:
    """The 'gap closed' cell of a method run on `seeds` seeds: '–' without a reference, and the seeds it was measured
    on when the reference has run fewer (so a 4-seed fraction is not read as the row's 8-seed one)."""
    if gap is None:
        return "–"
    cell = f"{gap['value']:.2f} [{gap['low']:.2f}, {gap['high']:.2f}]"
    if len(gap["seeds"]) < seeds:
        cell += f" (seeds {', '.join(map(str, gap['seeds']))})"
    return cell


def allocation_line(runs: dict[int, Record]) -> str | None:
    """What GoRA allocated in one regime, from its main runs' records: the configured smallest rank (the spec's
    `gora_min_rank`, else GoraConfig's default), the ranks given (range and mean over the target layers, per seed) and
    the adapter's size against LoRA's at r_ref (the budget the allocation keeps within ±10%). None without GoRA runs."""
    rs = [runs[s] for s in sorted(runs) if (runs[s].get("info") or {}).get("ranks_min") is not None]
    if not rs:
        return None
    infos = [r["info"] for r in rs]
    r_min = {(r.get("spec") or {}).get("gora_min_rank") for r in rs}
    configured = f"r_min = {'/'.join(map(str, sorted(r_min)))}, " if None not in r_min else "GoraConfig's r_min, "
    means = [i["ranks_mean"] for i in infos]
    sizes = [
        i["adapter_params"] / i["lora_adapter_params_at_r_ref"] for i in infos if i.get("lora_adapter_params_at_r_ref")
    ]

    def span(values: list) -> str:
        return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"

    return (
        f"GoRA's allocation ({configured}r_ref = {rs[0]['r']}; {len(rs)} main runs): smallest rank "
        f"{span([i['ranks_min'] for i in infos])}, largest {span([i['ranks_max'] for i in infos])}, mean rank over the "
        "target layers "
        f"{min(means):.2f}-{max(means):.2f}; adapter parameters "
        + (f"{min(sizes):.3f}-{max(sizes):.3f}x LoRA's at r_ref." if sizes else "not recorded.")
    )


def _ordered(methods: dict[str, Any]) -> list[str]:
    return sorted(methods, key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 99)


def seed_table(methods: dict[str, dict[int, Record]]) -> list[str]:
    """One row per main seed: each method's test NLL / exact match (%), the seed's lowest NLL at the budget in bold
    (the capacity reference, at a larger rank, is shown but not ranked). The paired interval summarises these rows;
    the table shows whether a mean difference comes from every seed or from a few."""
    names = _ordered(methods)
    seeds = sorted({s for runs in methods.values() for s in runs})
    out = [
        "| seed | " + " | ".join(f"`{m}`" for m in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for seed in seeds:
        runs = {m: methods[m].get(seed) for m in names}
        nll = {m: r["metric"] for m, r in runs.items() if r and not r.get("diverged") and r.get("metric") is not None}
        ranked = {m: v for m, v in nll.items() if m != CAPACITY_REFERENCE}
        best = min(ranked.values()) if len(ranked) > 1 else None
        cells = []
        for m in names:
            r = runs[m]
            if r is None:
                cells.append("–")
            elif m not in nll:
                cells.append("diverged")
            else:
                em = (r.get("metrics") or {}).get("exact_match")
                text = f"{nll[m]:.3f} / " + (f"{100 * em:.1f}" if em is not None else "–")
                cells.append(f"**{text}**" if m in ranked and ranked[m] == best else text)
        out.append(f"| {seed} | " + " | ".join(cells) + " |")
    return out


def loss_phase_table(methods: dict[str, dict[int, Record]], parts: int = 8) -> list[str]:
    """Mean training loss over each of `parts` equal spans of the steps, per method: the mean over its main seeds and,
    in brackets, the lowest and highest seed. It shows where a method's training loss falls behind or catches up
    (a gradient start shows in the first span, an lr at the edge of stability as a stall at the peak lr)."""
    curves = {
        m: [[v for _, v in r["loss_curve"]] for r in runs.values() if r.get("loss_curve") and not r.get("diverged")]
        for m, runs in methods.items()
    }
    curves = {m: c for m, c in curves.items() if c}
    if not curves:
        return []
    steps = min(len(c) for cs in curves.values() for c in cs)
    if steps < parts:
        return []
    edges = [round(i * steps / parts) for i in range(parts + 1)]
    out = [
        "| method | seeds | " + " | ".join(f"steps {edges[i] + 1}–{edges[i + 1]}" for i in range(parts)) + " |",
        "|---|---|" + "---|" * parts,
    ]
    for m in _ordered(curves):
        cells = []
        for i in range(parts):
            per_seed = [statistics.mean(c[edges[i] : edges[i + 1]]) for c in curves[m]]
            spread = f" ({min(per_seed):.2f}–{max(per_seed):.2f})" if len(per_seed) > 1 else ""
            cells.append(f"{statistics.mean(per_seed):.2f}{spread}")
        out.append(f"| `{m}` | {len(curves[m])} | " + " | ".join(cells) + " |")
    return out


def lr_curves(records: list[Record]) -> dict[tuple[str, str], dict[str, dict[float, float]]]:
    """(task, regime) -> method -> lr -> mean validation NLL over the tuning seeds (non-diverged runs)."""
    acc: dict[tuple[str, str], dict[str, dict[float, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for r in records:
        if r.get("stage") == "tune" and not r.get("diverged") and r.get("metric") is not None:
            acc[(r.get("gate_task", r["task"]), r["regime"])][r["method"]][float(r["lr"])].append(r["metric"])
    return {
        key: {m: {lr: statistics.mean(v) for lr, v in sorted(by_lr.items())} for m, by_lr in methods.items()}
        for key, methods in acc.items()
    }


def lr_window(curve: dict[float, float], nats: float = WINDOW_NATS) -> tuple[float, float, float] | None:
    """(smallest lr, largest lr, width in factors of 2) of the contiguous run of grid lrs around the best whose
    validation NLL is within `nats` of the best."""
    if not curve:
        return None
    lrs = sorted(curve)
    best = min(lrs, key=lambda lr: curve[lr])
    i = j = lrs.index(best)
    while i > 0 and curve[lrs[i - 1]] <= curve[best] + nats:
        i -= 1
    while j < len(lrs) - 1 and curve[lrs[j + 1]] <= curve[best] + nats:
        j += 1
    return lrs[i], lrs[j], math.log2(lrs[j] / lrs[i])


METHOD_ORDER = [
    "lora",
    "rslora",
    "gora",
    "gora-auto",
    "gora-gamma0",
    "gora-fixed",
    "gora-random",
    "pissa-rs",
    "loraga-rs",
    "eva-rs",
    CAPACITY_REFERENCE,
]

CAPACITY_PAIRS = [
    ("gora", "rslora", "GoRA vs its scaling baseline"),
    ("gora", "lora", "GoRA vs LoRA"),
    ("rslora", "lora", "scaling alone (rsLoRA vs LoRA)"),
    ("gora-auto", "gora", "GoRA γ = auto vs γ = 5e-2"),
    ("gora-gamma0", "gora", "control: allocation only (γ = 0) vs GoRA"),
    ("gora-fixed", "gora", "control: initialization only (fixed rank) vs GoRA"),
    ("gora-random", "gora", "control: GoRA's ranks on random layers vs GoRA"),
    ("pissa-rs", "rslora", "baseline vs rsLoRA"),
    ("loraga-rs", "rslora", "baseline vs rsLoRA"),
    ("eva-rs", "rslora", "baseline vs rsLoRA"),
    ("gora", "pissa-rs", "GoRA vs baseline"),
    ("gora", "loraga-rs", "GoRA vs baseline"),
    ("gora", "eva-rs", "GoRA vs baseline"),
    (CAPACITY_REFERENCE, "rslora", "capacity reference: rsLoRA r = 32 vs the budget"),
]


def comparison_verdicts(records: list[Record]) -> dict[tuple[str, str], dict[tuple[str, str], dict[str, Any]]]:
    """(task, regime) -> (A, B) -> paired NLL statistics, for the verdict table at the top of BENCHMARKS.md."""
    main: dict[tuple[str, str], dict[str, dict[int, Record]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if r.get("stage") == "main" and not r.get("diverged"):
            main[(r.get("gate_task", r["task"]), r["regime"])][r["method"]][r["seed"]] = r
    out: dict[tuple[str, str], dict[tuple[str, str], dict[str, Any]]] = {}
    for key, methods in main.items():
        out[key] = {}
        for a, b, _ in CAPACITY_PAIRS:
            if a in methods and b in methods:
                st = paired_nll(methods[a], methods[b])
                if st:
                    out[key][(a, b)] = st
    return out


def comparison_section(suite: str, records: list[Record], img_dir: Path, img_rel: str) -> list[str]:
    """The comparison's tables, lr curves and windows."""
    main: dict[tuple[str, str], dict[str, dict[int, Record]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if r.get("stage") == "main":
            main[(r.get("gate_task", r["task"]), r["regime"])][r["method"]][r["seed"]] = r
    tests = sorted({r["eval_size"] for r in records if r.get("stage") == "main" and r.get("eval_size")})
    out = [
        f"## Suite `{suite}`: GoRA where rank binds (the gate's qualifying task)",
        "",
        "Protocol: evidence-nlu's (per-method lr on a validation split, then paired main seeds; a seed fixes the "
        "training rows and their order for every method, A0 is drawn from seed + 1000) with an lr grid in factors "
        f"of 2 ({', '.join(f'{lr:g}' for lr in COMPARISONS[suite].lrs)}, widened by up to "
        f"{COMPARISONS[suite].widen} values while a method's best "
        "sits at an edge), N = 32 calibration batches, primary endpoint the test answer-token NLL (lower is better), "
        "secondary the exact match of the greedy answer"
        + (f" on {'/'.join(map(str, tests))} test problems" if tests else "")
        + " (scored by this report from each run's stored answers with reasoning-gym's own scorer, full credit only, "
        "`tasks.rescore_exact_match`: the runs' own scorer before 2026-12-07 dropped the reference's commas and "
        "matched no comma-separated answer, and it ignores case). Intervals: "
        "paired bootstrap 95% (seeds and test examples resampled together, examples weighted by their answer "
        "tokens). The capacity reference is rsLoRA at r = 32 at rsLoRA's lr on the same seeds; "
        "'gap closed' = (NLL_rsLoRA − NLL_method) / (NLL_rsLoRA − NLL_r32).",
        "",
    ]
    for key in sorted(main):
        methods = main[key]
        out += [
            f"### {key[0]}, regime {key[1]}",
            "",
            "| method | lr | seeds | test NLL | exact match (%) | gap closed [95% CI] |",
            "|---|---|---|---|---|---|",
        ]
        for method in _ordered(methods):
            rs = [methods[method][s] for s in sorted(methods[method])]
            ok = [r for r in rs if not r.get("diverged")]
            em = [r["metrics"].get("exact_match") for r in ok if r["metrics"].get("exact_match") is not None]
            gap = None
            if "rslora" in methods and CAPACITY_REFERENCE in methods and method not in ("rslora", CAPACITY_REFERENCE):
                gap = gap_closed(methods[method], methods["rslora"], methods[CAPACITY_REFERENCE])
            nll = [r["metric"] for r in ok]
            out.append(
                f"| `{method}` | {'/'.join(f'{x:g}' for x in sorted({r['lr'] for r in rs}))} | {len(rs)} | "
                f"{fmt(statistics.mean(nll), 3) if nll else '–'}"
                + (f" ± {statistics.stdev(nll):.3f}" if len(nll) > 1 else "")
                + f" | {fmt(100 * statistics.mean(em), 1) if em else '–'} | "
                + gap_cell(gap, len(rs))
                + " |"
            )
        line = allocation_line(methods.get("gora", {}))
        phases = loss_phase_table(methods)
        out += [
            *(["", line] if line else []),
            "",
            "Per seed (test NLL / exact match %; the seed's lowest NLL at the budget in bold, the r = 32 reference not ranked):",
            "",
            *seed_table(methods),
            *(
                [
                    "",
                    "Training loss over each eighth of the steps (mean over the main seeds; lowest–highest seed):",
                    "",
                    *phases,
                ]
                if phases
                else []
            ),
            "",
            "| comparison | A − B | paired seeds | Δ test NLL [95% CI] | verdict | seeds A better / worse | "
            "Δ exact match (points) [95% CI], McNemar p |",
            "|---|---|---|---|---|---|---|",
        ]
        for a, b, what in CAPACITY_PAIRS:
            if a not in methods or b not in methods:
                continue
            st = paired_nll(methods[a], methods[b])
            if st is None:
                continue
            em = paired_em(methods[a], methods[b])
            em_text = (
                f"{100 * em['mean']:+.2f} [{100 * em['low']:+.2f}, {100 * em['high']:+.2f}], p = {em['p']:.3g}"
                if em
                else "–"
            )
            so_far = interim(suite, st)
            called = f"interim ({so_far})" if so_far else f"**{st['verdict']}**"
            out.append(
                f"| {what} | `{a}` − `{b}` | {len(st['seeds'])} | {st['mean']:+.4f} [{st['low']:+.4f}, "
                f"{st['high']:+.4f}] | {called} | {st['wins']} / {st['losses']} | {em_text} |"
            )
        out.append("")
    curves = lr_curves(records)
    if curves:
        name = f"{suite}-lr-curves.png"
        if plot_lr_curves(curves, img_dir / name):
            out += [f"![learning-rate curves]({img_rel}/{name})", ""]
        out += [
            f"Learning-rate windows (contiguous grid lrs within {WINDOW_NATS} nats of each method's best "
            "validation NLL; width in factors of 2):",
            "",
            "| task, regime | method | best lr | best validation NLL | window | width (×2 steps) | lrs run |",
            "|---|---|---|---|---|---|---|",
        ]
        for key in sorted(curves):
            for method, curve in sorted(curves[key].items()):
                window = lr_window(curve)
                best = min(curve, key=lambda lr: curve[lr])
                edge = window[0] == min(curve) or window[1] == max(curve)
                out.append(
                    f"| {key[0]}, {key[1]} | `{method}` | {best:g} | {curve[best]:.4f} | "
                    f"{window[0]:g} – {window[1]:g}{' (reaches the edge of the lrs run)' if edge else ''} | "
                    f"{window[2]:.0f} | {len(curve)} |"
                )
        out.append("")
    return out
