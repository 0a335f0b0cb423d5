"""The evidence suites' part of docs/BENCHMARKS.md (called by `benchmarks.harness.report_doc`).

Per suite: the setting and protocol, provenance, and per regime (records paired across blocks by seed):
- the main table (each method at its chosen lr: mean ± std over seeds, eval loss, budget, convergence);
- the verdicts: GoRA against rsLoRA and LoRA, the mechanism controls against GoRA, the baselines against rsLoRA —
  each a paired bootstrap 95% interval of the difference (seeds and test examples resampled together), a verdict
  (better / tied / worse), and McNemar's exact test on the discordant examples pooled over the paired seeds;
- the tuning table (mean validation metric per lr, the chosen one marked);
then the compute each block cost and what was cut to fit the machine; after the last suite, once, the discussion
(`notes_evidence.md`, `discussion`).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .paired_stats import discordant, mcnemar_exact, paired_bootstrap, select_lr, unbits, verdict
from .suites import BASE, EVIDENCE, Block
from .tables import fmt, mean_std

Record = dict[str, Any]
NOTES = Path(__file__).resolve().parents[1] / "notes_evidence.md"
# (method, reference) pairs tested in each regime, in order, when both have records
COMPARISONS = [
    ("gora", "rslora", "GoRA vs its scaling baseline"),
    ("gora", "lora", "GoRA vs LoRA"),
    ("rslora", "lora", "scaling alone (rsLoRA vs LoRA)"),
    ("gora-gamma0", "gora", "control: allocation only (γ = 0) vs GoRA"),
    ("gora-fixed", "gora", "control: initialization only (fixed rank) vs GoRA"),
    ("gora-random", "gora", "control: GoRA's ranks on random layers vs GoRA"),
    ("gora-gamma0", "rslora", "allocation only vs rsLoRA"),
    ("gora-fixed", "rslora", "initialization only vs rsLoRA"),
    ("pissa-rs", "rslora", "baseline vs rsLoRA"),
    ("loraga-rs", "rslora", "baseline vs rsLoRA"),
    ("eva-rs", "rslora", "baseline vs rsLoRA"),
    ("adalora", "rslora", "baseline vs rsLoRA"),
    ("gora", "pissa-rs", "GoRA vs baseline"),
    ("gora", "loraga-rs", "GoRA vs baseline"),
    ("gora", "eva-rs", "GoRA vs baseline"),
    ("gora", "adalora", "GoRA vs baseline"),
]
# cuts made to fit the whole protocol into ~6 hours of one CPU thread (besides each block's own note and setting)
PROTOCOL_CUTS = [
    "Small models (MiniLM-L6, 22.7M parameters; SmolLM2-135M) instead of the paper's T5-base / Llama-3.1-8B; budgets "
    "r = 8 and r = 2 only; a few hundred training examples per seed, so each run takes minutes on one CPU thread.",
    "4 learning rates (about 3x apart) and 2 tuning seeds; the controls (γ = 0, fixed rank, random layers) run at "
    "GoRA's chosen lr instead of their own.",
    "No full fine-tuning, DoRA, LoRA+ or γ / importance ablations here (the historic tables below have them at one "
    "lr).",
]


def _blocks(suite: str) -> dict[str, Block]:
    return {b.name: b for b in EVIDENCE.get(suite, [])}


def main_runs(records: list[Record]) -> dict[tuple[str, str], dict[str, dict[int, Record]]]:
    """(task, regime) -> method -> seed -> main record."""
    out: dict[tuple[str, str], dict[str, dict[int, Record]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if r.get("stage") == "main":
            out[(r["task"], r["regime"])][r["method"]][r["seed"]] = r
    return out


def paired(a: dict[int, Record], b: dict[int, Record]) -> dict[str, Any] | None:
    """Paired statistics of method A − method B over the seeds both ran without diverging."""
    seeds = sorted(s for s in set(a) & set(b) if not a[s].get("diverged") and not b[s].get("diverged"))
    seeds = [s for s in seeds if a[s].get("correct") and b[s].get("correct")]
    if not seeds:
        return None
    ca = np.array([unbits(a[s]["correct"]) for s in seeds], dtype=np.int8)
    cb = np.array([unbits(b[s]["correct"]) for s in seeds], dtype=np.int8)
    if ca.shape != cb.shape:
        return None
    mean, low, high = paired_bootstrap(ca - cb)
    n_b, n_c = discordant(ca, cb)
    if all(cross_entropy(a[s]) and cross_entropy(b[s]) for s in seeds):
        loss = [a[s]["eval_loss"] - b[s]["eval_loss"] for s in seeds]
        loss_mean, loss_low, loss_high = paired_bootstrap(np.array(loss))
    else:  # an AdaLoRA record whose eval loss includes its orthogonality regulariser: not comparable
        loss_mean = loss_low = loss_high = float("nan")
    per_seed = (ca.mean(axis=1) - cb.mean(axis=1)).tolist()
    return {
        "seeds": seeds,
        "mean": mean,
        "low": low,
        "high": high,
        "verdict": verdict(low, high),
        "b": n_b,
        "c": n_c,
        "p": mcnemar_exact(n_b, n_c),
        "loss": (loss_mean, loss_low, loss_high),
        "wins": sum(d > 0 for d in per_seed),
        "losses": sum(d < 0 for d in per_seed),
    }


def cross_entropy(record: Record) -> bool:
    """Whether the record's eval loss is the plain cross-entropy. AdaLoRA records made before the fix
    (`benchmarks.harness.worker.cross_entropy_only`) include PEFT's orthogonality regulariser (orth_reg_weight 0.5 × Σ‖PᵀP −
    I‖²), so their loss is not comparable with the other methods' and their lr tie-break was made on it."""
    return record.get("method") != "adalora" or bool(record.get("info", {}).get("eval_loss_excludes_orth_reg"))


def pooled(per_regime: list[tuple[dict[int, Record], dict[int, Record]]]) -> dict[str, Any] | None:
    """A − B pooled over budgets (regimes) on the same test examples: each regime's paired seeds become rows of one
    [regime × seed, examples] difference matrix, bootstrapped as one (seeds resampled within their budget, the test
    examples together across budgets)."""
    rows, strata = [], []
    for k, (a, b) in enumerate(per_regime):
        seeds = sorted(s for s in set(a) & set(b) if not a[s].get("diverged") and not b[s].get("diverged"))
        seeds = [s for s in seeds if a[s].get("correct") and b[s].get("correct")]
        rows += [np.array(unbits(a[s]["correct"]), dtype=np.int8) - np.array(unbits(b[s]["correct"])) for s in seeds]
        strata += [k] * len(seeds)
    if not rows or len({r.shape for r in rows}) != 1:
        return None
    mean, low, high = paired_bootstrap(np.vstack(rows), strata=strata)
    return {"mean": mean, "low": low, "high": high, "verdict": verdict(low, high), "rows": len(rows)}


POOLED_PAIRS = [("gora", "rslora"), ("gora", "lora"), ("rslora", "lora")]


def pooled_table(by_regime: dict[tuple[str, str], dict[str, dict[int, Record]]]) -> list[str]:
    """Per task with more than one budget: GoRA vs rsLoRA / LoRA and rsLoRA vs LoRA pooled over the budgets (the
    metric's difference in points: accuracy or exact match, both 0/1 per example)."""
    scale = 100.0
    lines = []
    for task in sorted({t for t, _ in by_regime}):
        regimes = sorted(r for t, r in by_regime if t == task)
        if len(regimes) < 2:
            continue
        for a, b in POOLED_PAIRS:
            pairs = [
                (by_regime[(task, r)][a], by_regime[(task, r)][b])
                for r in regimes
                if a in by_regime[(task, r)] and b in by_regime[(task, r)]
            ]
            if len(pairs) < 2:
                continue
            st = pooled(pairs)
            if st is None:
                continue
            if not lines:
                lines = [
                    "Pooled over budgets (each budget's paired seeds as rows of one bootstrap, resampled within their "
                    "budget; the per-budget verdicts above stay the primary ones):",
                    "",
                    "| task | A − B | budgets | paired runs | Δ metric (points) [95% CI] | verdict |",
                    "|---|---|---|---|---|---|",
                ]
            lines.append(
                f"| {task} | `{a}` − `{b}` | {', '.join(regimes)} | {st['rows']} | "
                f"{fmt(st['mean'], 2, scale, True)} [{fmt(st['low'], 2, scale, True)}, "
                f"{fmt(st['high'], 2, scale, True)}] | **{st['verdict']}** |"
            )
    return [*lines, ""] if lines else []


def _epoch_losses(record: Record) -> tuple[float | None, float | None]:
    """(mean training loss of the last epoch, minus that of the epoch before) — a flat curve has a difference ≈ 0."""
    curve = [v for _, v in record.get("loss_curve", []) if v is not None]
    per = record.get("steps_per_epoch") or 0
    if not per or len(curve) < 2 * per:
        return (statistics.mean(curve[-max(1, len(curve) // 5) :]) if curve else None), None
    last, before = curve[-per:], curve[-2 * per : -per]
    return statistics.mean(last), statistics.mean(last) - statistics.mean(before)


def main_table(methods: dict[str, dict[int, Record]], order: list[str], pct: bool) -> list[str]:
    scale, unit = (100.0, " (%)") if pct else (1.0, "")
    first = next(iter(next(iter(methods.values())).values()))
    metric = first["metric_name"]
    lines = [
        f"| method | lr | seeds | {metric}{unit} | eval loss | adapter / LoRA | last-epoch train loss | Δ vs "
        "epoch before | s / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in order:
        rows = methods.get(method)
        if not rows:
            continue
        rs = [rows[s] for s in sorted(rows)]
        ok = [r for r in rs if not r.get("diverged")]
        lrs = sorted({r["lr"] for r in rs})
        source = rs[0].get("lr_from")
        borrowed = source not in (None, method, "fixed")
        lr_text = "/".join(f"{lr:g}" for lr in lrs) + (f" (= {source}'s)" if borrowed else "")
        ratio = [r["adapter_params"] / r["lora_adapter_params_ref"] for r in ok if r.get("adapter_params")]
        ends = [_epoch_losses(r) for r in ok]
        diverged = len(rs) - len(ok)
        lines.append(
            "| "
            + " | ".join(
                [
                    f"`{method}`",
                    lr_text,
                    f"{len(rs)}" + (f" ({diverged} diverged)" if diverged else ""),
                    mean_std([r["metric"] for r in ok], scale, 1 if pct else 3, show_n=False),
                    mean_std([r["eval_loss"] for r in ok], 1.0, 3, show_n=False),
                    fmt(statistics.median(ratio), 3) if ratio else "–",
                    mean_std([e[0] for e in ends if e[0] is not None], 1.0, 3, show_n=False),
                    mean_std([e[1] for e in ends if e[1] is not None], 1.0, 3, show_n=False),
                    fmt(statistics.median(r.get("run_s") or r["wall_s"] for r in rs), 0),
                ]
            )
            + " |"
        )
    return lines


def verdict_table(methods: dict[str, dict[int, Record]], pct: bool) -> list[str]:
    scale, unit = (100.0, "points") if pct else (100.0, "points of exact match")
    lines = [
        f"| comparison | A − B | paired seeds | Δ metric ({unit}) [95% CI] | verdict | seeds A > B / A < B | "
        "McNemar b / c, p | Δ eval loss [95% CI] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    any_row = False
    for a, b, what in COMPARISONS:
        if a not in methods or b not in methods:
            continue
        st = paired(methods[a], methods[b])
        if st is None:
            continue
        any_row = True
        lm, ll, lh = st["loss"]
        lines.append(
            f"| {what} | `{a}` − `{b}` | {len(st['seeds'])} | {fmt(st['mean'], 2, scale, True)} "
            f"[{fmt(st['low'], 2, scale, True)}, {fmt(st['high'], 2, scale, True)}] | **{st['verdict']}** | "
            f"{st['wins']} / {st['losses']} | {st['b']} / {st['c']}, p = {st['p']:.3g} | "
            f"{fmt(lm, 4, 1.0, True)} [{fmt(ll, 4, 1.0, True)}, {fmt(lh, 4, 1.0, True)}] |"
        )
    return lines if any_row else []


def tuning_table(records: list[Record], blocks: list[Block], task: str, regime: str, pct: bool) -> list[str]:
    scale = 100.0 if pct else 1.0
    rows, lrs_all = [], set()
    for block in blocks:
        if block.regime != regime or BASE[block.base]["task"] != task or not block.tune_seeds:
            continue
        for method in block.tuned:
            runs = [
                r
                for r in records
                if r.get("stage") == "tune" and r.get("block") == block.name and r["method"] == method
            ]
            if not runs:
                continue
            lrs = sorted({float(r["lr"]) for r in runs} | set(block.lrs))
            lrs_all.update(lrs)
            choice = select_lr(runs, lrs, sorted({r["seed"] for r in runs}))
            rows.append((method, choice, len({r["seed"] for r in runs})))
    if not rows:
        return []
    grid = sorted(lrs_all)
    lines = [
        "| method | tuning seeds | " + " | ".join(f"lr {lr:g}" for lr in grid) + " |",
        "|---|---|" + "---|" * len(grid),
    ]
    for method, choice, n in rows:
        cells = []
        for lr in grid:
            mean, loss, _ = choice.table.get(lr, (None, None, 0))
            text = "–" if mean is None else f"{mean * scale:.1f}" + (f" / {loss:.3f}" if loss is not None else "")
            cells.append(f"**{text}**" if lr == choice.lr else text)
        lines.append(f"| `{method}` | {n} | " + " | ".join(cells) + " |")
    return lines


def compute_table(records: list[Record], blocks: list[Block]) -> list[str]:
    lines = ["| block | stage | runs | hours (sum of run wall times) | median min / run |", "|---|---|---|---|---|"]
    for block in blocks:
        for stage in ("tune", "main"):
            rs = [r for r in records if r.get("block") == block.name and r.get("stage") == stage]
            if not rs:
                continue
            times = [r.get("run_s") or r.get("wall_s") or 0.0 for r in rs]
            lines.append(
                f"| {block.name} | {stage} | {len(rs)} | {sum(times) / 3600:.2f} | "
                f"{statistics.median(times) / 60:.1f} |"
            )
    return lines


def _setting(block: Block) -> str:
    b = {**BASE[block.base], **block.overrides}
    steps = (b["train_size"] // b["batch_size"]) * b.get("epochs", 1)
    gora_ranks = f"GoRA ranks {b.get('gora_min_rank', 4)}..32"
    tune = (
        f"lr tuned over {', '.join(f'{lr:g}' for lr in block.lrs)} on seeds {', '.join(map(str, block.tune_seeds))}"
        if block.tune_seeds
        else "lr fixed per method: " + ", ".join(f"{m} {lr:g}" for m, lr in block.fixed_lr.items())
    )
    return (
        f"`{block.name}` (regime {block.regime}): {', '.join(block.methods)}; r = {b['r']} ({gora_ranks}); "
        f"{b['train_size']} training examples × {b.get('epochs', 1)} epochs = {steps} steps of {b['batch_size']}; "
        f"{tune}; main seeds {', '.join(map(str, block.seeds))}" + (f"; cut: {block.note}" if block.note else "") + "."
    )


def provenance_lines(records: list[Record]) -> list[str]:
    provs = {
        (
            r.get("provenance", {}).get("commit"),
            r.get("provenance", {}).get("dirty"),
            r.get("provenance", {}).get("command"),
        )
        for r in records
    }
    vers = {", ".join(f"{k} {v}" for k, v in r["versions"].items()) for r in records}
    threads = sorted({r.get("threads") for r in records if r.get("threads") is not None})
    loads = [r["machine"].get("load_avg_1m") for r in records if r["machine"].get("load_avg_1m") is not None]
    dates = sorted(r["date"] for r in records)
    out = [f"- runs: {len(records)}, from {dates[0]} to {dates[-1]}; torch threads per run: {threads}"]
    for commit, dirty, command in sorted(provs, key=str):
        out.append(f"- code: commit `{commit}`{' (dirty tree)' if dirty else ''}; command `{command}`")
    out += [f"- versions: {v}" for v in sorted(vers)]
    if loads:
        jobs = max(_jobs(command) for _, _, command in provs)
        own = jobs * max(threads or [1])  # the suite's own runnable threads
        shared = (
            "other work shared the machine; times are indicative"
            if max(loads) > own + 0.5
            else "about the suite's own load: no other work of note"
        )
        out.append(
            f"- 1-minute load average at the end of each run: median {statistics.median(loads):.1f}, max "
            f"{max(loads):.1f}; the suite ran {jobs} at a time ({shared})"
        )
    return out


def _jobs(command: str | None) -> int:
    """Runs at a time from the suite's command line (`--jobs N`; 1 when absent)."""
    words = (command or "").split()
    for i, word in enumerate(words[:-1]):
        if word == "--jobs" and words[i + 1].isdigit():
            return int(words[i + 1])
    return 1


def evidence_section(suite: str, records: list[Record]) -> list[str]:
    """The markdown lines of one evidence suite."""
    blocks = list(_blocks(suite).values())
    tests = sorted({r["eval_size"] for r in records if r.get("stage") == "main" and r.get("eval_size")})
    tuned = any(b.tune_seeds for b in blocks)
    lr_rule = (
        "Protocol: per method, the lr with the best mean validation metric over the tuning seeds (ties: lower "
        "validation loss, then the smaller lr; diverged runs make an lr ineligible) — on a validation split carved "
        "from the training pool — then that lr on the main seeds, evaluated on the test split"
        if tuned
        else "Protocol: no learning-rate tuning — one fixed lr per method, set before the runs (the lr of each "
        "block is listed below; no validation split was used) — on the main seeds, evaluated on the test split"
    )
    out = [
        f"## Suite `{suite}`: "
        + ("learning rate tuned per method" if tuned else "one fixed lr per method (not tuned)")
        + ", paired seeds",
        "",
        f"Model: {', '.join(sorted({r['model'] for r in records}))}. Reproduce: `python -m benchmarks.harness.run {suite} && python -m benchmarks.harness.report_doc` "
        "(resumable; one command runs "
        + ("tuning, lr selection and the main runs" if tuned else "the main runs")
        + ").",
        "",
        lr_rule
        + (f" ({'/'.join(map(str, tests))} examples)" if tests else "")
        + ". A seed fixes the training rows, their order in every epoch, the head and dropout for every method; A0 "
        "is drawn from seed + 1000. Verdicts: paired bootstrap 95% interval of A − B (4,000 replicates resampling "
        "seeds and test examples), **better** / **worse** when the interval excludes 0, else **tied**; McNemar: "
        "exact binomial test on the examples exactly one of A, B gets right, pooled over the paired seeds (it treats the "
        "seed × example pairs as independent, though each test example recurs once per seed: the interval, which "
        "resamples examples across seeds together, is the verdict).",
        "",
        *[f"- {_setting(b)}" for b in blocks],
        "",
        *provenance_lines(records),
        "",
    ]
    by_regime = main_runs(records)
    for task, regime in sorted(by_regime):
        methods = by_regime[(task, regime)]
        pct = next(iter(next(iter(methods.values())).values()))["metric_name"] == "accuracy"
        order = [m for b in blocks if b.regime == regime and BASE[b.base]["task"] == task for m in b.methods]
        order += [m for m in sorted(methods) if m not in order]
        out += [f"### {task}, regime {regime}", "", *main_table(methods, order, pct), ""]
        verdicts = verdict_table(methods, pct)
        if verdicts:
            out += [*verdicts, ""]
        tuning = tuning_table(records, blocks, task, regime, pct)
        if tuning:
            out += [
                "Tuning (mean validation metric"
                + (" in %" if pct else "")
                + " / mean validation loss over the tuning seeds; the chosen lr in bold):",
                "",
                *tuning,
                "",
            ]
        ada = [r for r in methods.get("adalora", {}).values() if r.get("info")]
        if ada:
            i = ada[0]["info"]
            single = sum(1 for r in ada if isinstance(r.get("predictions"), str) and len(set(r["predictions"])) == 1)
            out += [
                f"AdaLoRA check (seed {ada[0]['seed']}): `update_and_allocate` ran {i.get('adalora_update_calls')} "
                f"times; total rank {i.get('adalora_rank_total_start')} (init_r) → "
                f"{i.get('adalora_rank_total_end')} non-zero singular values at the end; runs that predict one class "
                f"for every test example: {single} of {len(ada)}."
                + (
                    ""
                    if all(cross_entropy(r) for r in ada)
                    else " These AdaLoRA records predate the cross-entropy fix: their eval loss includes PEFT's "
                    "orthogonality regulariser (AdaLoraModel.forward adds it in evaluation too), so their Δ eval "
                    "loss is not shown and their lr tie-break (every lr at the same accuracy) was made on it; the "
                    "harness now evaluates AdaLoRA on cross-entropy only (`benchmarks.harness.worker.cross_entropy_only`), "
                    "which takes a re-run of this block to show."
                ),
                "",
            ]
    pooled_lines = pooled_table(by_regime)
    if pooled_lines:
        out += ["### Pooled over budgets", "", *pooled_lines]
    out += ["### Compute", "", *compute_table(records, blocks), ""]
    cuts = [b.note for b in blocks if b.note]
    out += ["### What was cut to fit this machine", "", *[f"- {c}" for c in PROTOCOL_CUTS + cuts], ""]
    return out
