"""Results → `docs/BENCHMARKS.md` (+ loss-curve PNGs in `docs/img/`): `python -m benchmarks.harness.report_doc`.

Reads every `<suite>.jsonl` in the results folder (not `memory.*`, not `*.errors.jsonl`). Only the text between
the markers `<!-- BEGIN benchmarks.report -->` and `<!-- END benchmarks.report -->` is regenerated; everything
outside them (e.g. the memory-benchmark section) is kept verbatim. `benchmarks/notes.md`, if present, is included
as the discussion: it explains the numbers, it never introduces new ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .capacity import comparison_section, gate_section
from .methods import METHODS
from .report_evidence import discussion, evidence_section, headline_table, provenance_lines, when_to_use
from .suites import (
    ABLATION_METHODS,
    BASE,
    COMPARISONS,
    EVIDENCE,
    GATES,
    GRID_LRS,
    GRID_METHODS,
    GRID_SIZES,
    LORAPLUS_METHODS,
    MAIN_METHODS,
)
from .tasks import rescore_exact_match

ROOT = Path(__file__).resolve().parents[2]
TITLE = "# Benchmarks"
BEGIN = "<!-- BEGIN benchmarks.report -->"
END = "<!-- END benchmarks.report -->"
MEMORY_HINT = (
    "<!-- Text outside the benchmarks.report markers is kept verbatim when the report is regenerated: the memory "
    "benchmark section (benchmarks/results/memory.*) lives below. -->"
)

logger = logging.getLogger("benchmarks.harness.report_doc")

Record = dict[str, Any]


def load(results: Path) -> dict[str, list[Record]]:
    """suite -> records, from the results file of each suite (`<suite>.jsonl`; other benchmarks' files, e.g.
    init_overhead.jsonl or memory.json, have sections of their own)."""
    from .suites import SUITES

    out: dict[str, list[Record]] = {}
    for path in sorted(results.glob("*.jsonl")):
        if path.stem not in SUITES:
            continue
        rows, seen = [], set()
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if record["run_id"] not in seen:  # two runners on one file may both have run it: keep the first
                    seen.add(record["run_id"])
                    rows.append(record)
        if rows:
            out[path.stem] = rows
    return out


def mean_std(values: Iterable[float | None], scale: float = 1.0, digits: int = 1, show_n: bool = True) -> str:
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}" + (" (n=1)" if show_n else "")
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def table_cell(text: str) -> str:
    """Text as one Markdown table cell: a literal | (e.g. mean|W*G|) would otherwise start a new column."""
    return text.replace("|", "\\|")


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _base_key(task: str) -> str:
    return task


def select(records: list[Record], method: str, lr: float | None = None, train_size: int | None = None) -> list[Record]:
    out = []
    for r in records:
        if r["method"] != method:
            continue
        if lr is not None and r.get("lr_lora", r.get("lr")) != lr:
            continue
        if train_size is not None and r.get("train_size") != train_size:
            continue
        out.append(r)
    return out


def _metric_pct(rows: list[Record]) -> str:
    return mean_std((r["metric"] for r in rows), 100.0, 1)


def main_table(records: list[Record], methods: list[str], base: dict[str, Any]) -> tuple[str, dict[str, list]]:
    lines = [
        "| method | seeds | {metric} (%) | eval loss | trainable params | adapter / LoRA | estimate s | "
        "alloc+init s | train s | s/step | peak RSS init MB | peak RSS train MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    metric_name = None
    kept: dict[str, list[Record]] = {}
    for method in methods:
        rows = select(records, method, base["lr"], base["train_size"])
        if not rows:
            continue
        kept[method] = rows
        metric_name = rows[0]["metric_name"]
        params = sorted({r["trainable_params"] for r in rows})
        ratio = [r["adapter_params"] / r["lora_adapter_params_ref"] for r in rows if r.get("adapter_params")]
        lines.append(
            "| "
            + " | ".join(
                [
                    f"`{method}`",
                    ", ".join(str(r["seed"]) for r in sorted(rows, key=lambda r: r["seed"])),
                    _metric_pct(rows),
                    mean_std((r["metrics"].get("eval_loss") for r in rows), 1.0, 3),
                    " / ".join(f"{p:,}" for p in params) if len(params) <= 3 else f"{params[0]:,}..{params[-1]:,}",
                    fmt(median(ratio), 3) if ratio else "–",
                    fmt(median(r["estimate_s"] for r in rows), 1),
                    fmt(median(r["init_s"] for r in rows), 1),
                    fmt(median(r["train_s"] for r in rows), 1),
                    fmt(median(r["step_s"] for r in rows), 3),
                    fmt(median(r.get("peak_rss_init_mb") for r in rows), 0),
                    fmt(median(r.get("peak_rss_train_mb") for r in rows), 0),
                ]
            )
            + " |"
        )
    return "\n".join(lines).replace("{metric}", metric_name or "metric"), kept


def cost_section(records: list[Record]) -> list[str]:
    out: list[str] = []
    cost = [r for r in records if r["method"] == "init-cost"]
    for r in cost:
        c = r["cost"]
        med, ratio = c["median_s"], c["ratio_to_plain"]
        out += [
            f"Side by side in one process on the same N = {c['num_batches']} batches of {c['batch_size']} "
            f"(median of {c['repeats']} interleaved repeats; date {r['date']}):",
            "",
            "| what | median s | × N plain fwd+bwd | peak RSS MB |",
            "|---|---|---|---|",
            f"| N plain forward+backward (lower bound) | {fmt(med['plain'])} | 1.00 | "
            f"{fmt(c['peak_rss_mb'].get('plain'), 0)} |",
            f"| GoRA: gradient estimation only | {fmt(med['gora_estimate'])} | {fmt(ratio['gora_estimate'])} | – |",
            f"| GoRA: estimation + allocation + init + PEFT wrap | {fmt(med['gora'])} | {fmt(ratio['gora'])} | "
            f"{fmt(c['peak_rss_mb'].get('gora'), 0)} |",
            f"| PEFT LoRA-GA: `preprocess_loraga` + `get_peft_model` | {fmt(med['loraga'])} | {fmt(ratio['loraga'])} | "
            f"{fmt(c['peak_rss_mb'].get('loraga'), 0)} |",
            f"| PEFT EVA: `get_peft_model` + `initialize_lora_eva_weights` | {fmt(med['eva'])} | {fmt(ratio['eva'])} | "
            f"{fmt(c['peak_rss_mb'].get('eva'), 0)} |",
            "",
        ]
    per_run = defaultdict(list)
    for r in records:
        if r.get("init_over_plain") is not None:
            per_run[r["method"]].append(r["init_over_plain"])
    if per_run:
        out += [
            "In every training run of a data-driven method, its own (estimate + init) time divided by N plain "
            "forward+backward passes timed in the same process just before (median over runs):",
            "",
            "| method | runs | (estimate + init) / N plain fwd+bwd |",
            "|---|---|---|",
        ]
        for method, vals in sorted(per_run.items()):
            out.append(f"| `{method}` | {len(vals)} | {fmt(statistics.median(vals))} |")
        out.append("")
    return out


def ablation_tables(records: list[Record], base: dict[str, Any]) -> list[str]:
    groups = [
        (
            "Rank range (min_rank / max_rank)",
            [("gora-fixed", "8 / 8"), ("gora-rank6-15", "6 / 15"), ("gora", "4 / 32")],
        ),
        (
            "γ (initial gradient step)",
            [("gora-gamma0", "0"), ("gora-gamma3e-2", "3e-2"), ("gora", "5e-2"), ("gora-gamma8e-2", "8e-2")],
        ),
        (
            "Importance metric",
            [("gora", "mean\\|W⊙G\\|"), ("gora-imp-grad_nuclear", "‖G‖_*"), ("gora-imp-wg_nuclear", "‖W⊙G‖_*")],
        ),
    ]
    out: list[str] = []
    ref = {r["seed"]: r for r in select(records, "gora", base["lr"], base["train_size"])}
    for title, variants in groups:
        rows = []
        for method, label in variants:
            rs = select(records, method, base["lr"], base["train_size"])
            if not rs:
                continue
            ratio = [r["adapter_params"] / r["lora_adapter_params_ref"] for r in rs]
            ranks = rs[0].get("info", {})
            paired = [(r["metric"] - ref[r["seed"]]["metric"]) * 100 for r in rs if r["seed"] in ref]
            rows.append(
                f"| {label} | `{method}` | {len(rs)} | {_metric_pct(rs)} | "
                f"{(f'{statistics.mean(paired):+.1f} [{len(paired)}]') if paired and method != 'gora' else '–'} | "
                f"{mean_std((r['metrics'].get('eval_loss') for r in rs), 1.0, 3)} | {fmt(median(ratio), 3)} | "
                f"{ranks.get('ranks_min', '–')}..{ranks.get('ranks_max', '–')} |"
            )
        if rows:
            metric = select(records, variants[0][0]) or select(records, "gora")
            name = metric[0]["metric_name"] if metric else "metric"
            out += [
                f"**{title}**",
                "",
                f"| setting | method | seeds | {name} (%) | − `gora` (points, paired by seed) [seeds] | eval loss | "
                "adapter / LoRA | ranks min..max (first seed) |",
                "|---|---|---|---|---|---|---|---|",
                *rows,
                "",
            ]
    return out


def loraplus_table(records: list[Record], base: dict[str, Any], tail: int = 25) -> tuple[list[str], dict]:
    """GoRA + LoRA+ against the variants that change one of its parts (at the main lr and size)."""
    if not any(select(records, m) for m in LORAPLUS_METHODS):
        return [], {}
    lines = [
        f"| method | scaling | B0 | lr_B / lr_A | seeds | accuracy (%) | eval loss | train loss, last {tail} steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    kept: dict[str, list[Record]] = {}
    for method, scaling, b0, ratio in LORAPLUS_ROWS:
        rs = select(records, method, base["lr"], base["train_size"])
        if not rs:
            continue
        kept[method] = rs
        seeds = ", ".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
        last = [statistics.mean(v for _, v in r["loss_curve"][-tail:]) for r in rs if r.get("loss_curve")]
        lines.append(
            f"| `{method}` | {scaling} | {b0} | {ratio} | {seeds} | {_metric_pct(rs)} | "
            f"{mean_std((r['metrics'].get('eval_loss') for r in rs), 1.0, 3)} | {mean_std(last, 1.0, 3)} |"
        )
    return [*lines, ""], kept


def grid_table(records: list[Record]) -> list[str]:
    cells = [(lr, size) for size in GRID_SIZES for lr in GRID_LRS]
    header = "| method | " + " | ".join(f"lr {lr:g}, n={size}" for lr, size in cells) + " |"
    lines = [header, "|---|" + "---|" * len(cells)]
    any_row = False
    for method in GRID_METHODS:
        vals = []
        for lr, size in cells:
            rs = select(records, method, lr, size)
            any_row |= bool(rs)
            vals.append(f"{mean_std((r['metric'] for r in rs), 100.0, 1, False)} [{len(rs)}]" if rs else "–")
        lines.append(f"| `{method}` | " + " | ".join(vals) + " |")
    if not any_row:
        return []
    loss = [
        "",
        "Eval loss on the same 1,000 reviews, mean ± std [seeds] (moves even where accuracy sits at the "
        "majority class, 59.7%):",
        "",
        lines[0],
        lines[1],
    ]
    for method in GRID_METHODS:
        vals = []
        for lr, size in cells:
            rs = select(records, method, lr, size)
            vals.append(
                f"{mean_std((r['metrics']['eval_loss'] for r in rs), 1.0, 3, False)} [{len(rs)}]" if rs else "–"
            )
        loss.append(f"| `{method}` | " + " | ".join(vals) + " |")
    lines += loss
    # differences to the LoRA baselines, seed-paired
    diff = ["", "GoRA minus baseline, in accuracy points, paired by seed (mean over the seeds both have):", ""]
    diff += [lines[0].replace("| method |", "| difference |"), lines[1]]
    for a, b in [("gora", "lora"), ("gora", "rslora"), ("gora-matched", "lora"), ("gora-matched", "rslora")]:
        vals = []
        for lr, size in cells:
            ra = {r["seed"]: r["metric"] for r in select(records, a, lr, size)}
            rb = {r["seed"]: r["metric"] for r in select(records, b, lr, size)}
            common = sorted(set(ra) & set(rb))
            vals.append(
                f"{100 * statistics.mean(ra[s] - rb[s] for s in common):+.1f} [{len(common)}]" if common else "–"
            )
        diff.append(f"| `{a}` − `{b}` | " + " | ".join(vals) + " |")
    return [*lines, *diff, ""]


MAIN_PANELS = [
    ("LoRA family", ["full", "lora", "rslora", "pissa", "loraga", "adalora", "eva", "gora"]),
    (
        "GoRA variants",
        ["rslora", "gora", "gora-gamma0", "gora-fixed", "gora-matched", "lora+loraplus", "gora+loraplus"],
    ),
]
LORAPLUS_PANELS = [
    ("without LoRA+", ["lora", "rslora", "gora", "gora-gamma0"]),
    ("with LoRA+", ["lora+loraplus", "rslora+loraplus", "gora-gamma0+loraplus", "gora+loraplus4", "gora+loraplus"]),
]
# the LoRA+ check: (method, scaling, B0, lr_B / lr_A)
LORAPLUS_ROWS = [
    ("lora", "α/r", "0", "1"),
    ("lora+loraplus", "α/r", "0", "16"),
    ("rslora", "α/√r", "0", "1"),
    ("rslora+loraplus", "α/√r", "0", "16"),
    ("gora-gamma0", "α/√r_i", "0", "1"),
    ("gora-gamma0+loraplus", "α/√r_i", "0", "16"),
    ("gora", "α/√r_i", "γ-step", "1"),
    ("gora+loraplus4", "α/√r_i", "γ-step", "4"),
    ("gora+loraplus", "α/√r_i", "γ-step", "16"),
]


def loss_plot(
    kept: dict[str, list[Record]],
    path: Path,
    title: str,
    window: int = 10,
    panels: list[tuple[str, list[str]]] | None = None,
) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no loss curves")
        return False
    panels = panels or MAIN_PANELS
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), sharey=True, squeeze=False)
    axes = axes[0]
    drawn = False
    windows: set[int] = set()
    for ax, (name, methods) in zip(axes, panels):
        for method in methods:
            rows = kept.get(method)
            if not rows:
                continue
            length = min(len(r["loss_curve"]) for r in rows)
            if length == 0:
                continue
            mean = [statistics.mean(r["loss_curve"][i][1] for r in rows) for i in range(length)]
            w = max(1, min(window, length // 5 or 1))
            windows.add(w)
            smooth = [statistics.mean(mean[max(0, i - w + 1) : i + 1]) for i in range(length)]
            ax.plot(range(1, length + 1), smooth, label=f"{method} ({len(rows)})")
            drawn = True
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    shown = "/".join(str(w) for w in sorted(windows)) or str(window)
    axes[0].set_ylabel(f"training loss (mean over seeds, moving average {shown})")
    fig.suptitle(title)
    fig.tight_layout()
    if drawn:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
    plt.close(fig)
    return drawn


def environment(records: list[Record]) -> list[str]:
    machines = {
        json.dumps({k: v for k, v in r["machine"].items() if k != "load_avg_1m"}, sort_keys=True) for r in records
    }
    vers = {json.dumps(r["versions"], sort_keys=True) for r in records}
    loads = [r["machine"].get("load_avg_1m") for r in records if r["machine"].get("load_avg_1m") is not None]
    dates = sorted(r["date"] for r in records)
    out = [f"- runs: {len(records)}, from {dates[0]} to {dates[-1]}"]
    for m in sorted(machines):
        d = json.loads(m)
        out.append(
            f"- machine: {d.get('cpu')}, {d.get('cores')} cores ({d.get('torch_threads')} torch threads per run), "
            f"{d.get('memory_gb')} GB RAM, GPU: {d.get('gpu') or 'none'}; {d.get('platform')}"
        )
    for v in sorted(vers):
        out.append("- versions: " + ", ".join(f"{k} {val}" for k, val in json.loads(v).items()))
    if loads:
        out.append(
            f"- 1-minute load average at the end of each run: median {statistics.median(loads):.1f}, "
            f"max {max(loads):.1f} (the machine was shared: wall times are noisy; compare ratios from one process)"
        )
    return out


def command(suite: str, extra: str = "") -> str:
    return f"`python -m benchmarks.harness.run {suite}{extra} && python -m benchmarks.harness.report_doc`"


def suite_section(suite: str, records: list[Record], img_dir: Path, img_rel: str) -> list[str]:
    task = records[0]["task"]
    base = BASE.get(task, BASE.get("smoke-nlu" if "nlu" in task else "nlg"))
    by_task: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    out: list[str] = [f"## Suite `{suite}`", ""]
    for task, rows in by_task.items():
        base = dict(BASE[task])
        extra = ""
        if task != "nlu":  # reduced runs (--set ...): describe what actually ran
            ref = next((r for r in rows if r["method"] != "init-cost"), rows[0])
            changed = {}
            for key in ("train_size", "batch_size", "num_batches", "max_length", "test_size", "max_new_tokens"):
                if ref.get(key) is not None and ref.get(key) != base.get(key):
                    changed[key] = ref[key]
            if ref.get("lr_lora") is not None and ref["lr_lora"] != base["lr"]:
                changed["lr"] = ref["lr_lora"]
            base.update(changed)
            methods = sorted({r["method"] for r in rows})
            seeds = sorted({r["seed"] for r in rows})
            if changed:
                extra = " --set " + " ".join(f"{k}={v}" for k, v in changed.items())
            if suite != "smoke":
                extra = f" --methods {' '.join(methods)} --seeds {' '.join(map(str, seeds))}" + extra
        model = rows[0]["model"]
        out += [
            f"### {task}: {model}",
            "",
            f"Setting: {base['train_size']} training examples, 1 epoch = {base['train_size'] // base['batch_size']} "
            f"steps of batch {base['batch_size']}, max length {base['max_length']}, AdamW (weight decay 0), linear "
            f"schedule with {int(base['warmup_ratio'] * 100)}% warmup, gradient clipping 1.0; r = {base['r']}, α = 16 "
            f"for every LoRA-type method on the same modules; lr {base['lr']:g} for every LoRA-type method "
            f"(LoRA+: that lr for A, 16× for B), {base['lr_full']:g} for full fine-tuning; data-driven "
            f"initializations (GoRA, LoRA-GA, EVA) see the same N = {base['num_batches']} batches."
            + (
                f" Evaluation: exact match of the final answer on {base.get('test_size')} fixed held-out problems "
                f"(greedy decoding, at most {base.get('max_new_tokens')} new tokens) and the eval loss on their "
                "worked solutions."
                if "nlg" in task
                else " Evaluation: accuracy and loss on the fixed held-out reviews."
            ),
            "",
            f"Reproduce: {command(suite, extra)}" + (" (main table: `--groups main`)." if task == "nlu" else "."),
            "",
        ]
        table, kept = main_table(rows, MAIN_METHODS + ABLATION_METHODS if suite == "smoke" else MAIN_METHODS, base)
        out += [table, ""]
        if kept:
            png = img_dir / f"loss_{task}.png"
            if loss_plot(kept, png, f"{task}: training loss"):
                out += [f"![training loss, {task}]({img_rel}/{png.name})", ""]
        ada = [r for r in rows if r["method"] == "adalora" and r.get("info")]
        if ada:
            i = ada[0]["info"]
            out += [
                f"AdaLoRA check: `update_and_allocate` was called {i.get('adalora_update_calls')} times; the total "
                f"rank went from {i.get('adalora_rank_total_start')} (init_r) to {i.get('adalora_rank_total_end')} "
                f"non-zero singular values at the end (seed {ada[0]['seed']}).",
                "",
            ]
        cost = cost_section(rows)
        if cost:
            out += ["#### Initialization cost", "", *cost]
        if task == "nlu":
            abl = ablation_tables(rows, base)
            if abl:
                out += [
                    "#### Paper ablations",
                    "",
                    f"Reproduce: {command(suite, ' --groups main ablation')}",
                    "",
                    *abl,
                ]
            lp, lp_kept = loraplus_table(rows, base)
            if lp:
                out += [
                    "#### LoRA+ check (why does GoRA + LoRA+ collapse?)",
                    "",
                    f"lr {base['lr']:g} for A (and for B where lr_B / lr_A = 1), {base['train_size']} reviews; each "
                    "row changes one part of GoRA + LoRA+: the scaling (α/r, rsLoRA's α/√r, GoRA's α/√r_i with its "
                    "own ranks), B0 (0, or GoRA's γ-scaled gradient step) or B's learning-rate ratio.",
                    "",
                    f"Reproduce: {command(suite, ' --groups main loraplus')}",
                    "",
                    *lp,
                ]
                png = img_dir / f"loss_{task}_loraplus.png"
                if loss_plot(lp_kept, png, f"{task}: training loss, LoRA+ check", panels=LORAPLUS_PANELS):
                    out += [f"![training loss, {task}, LoRA+ check]({img_rel}/{png.name})", ""]
            grid = grid_table(rows)
            if grid:
                out += [
                    "#### When does GoRA help? (learning rate × training-set size)",
                    "",
                    "Accuracy (%) mean ± std [number of seeds]; each cell is 1 epoch at batch 16.",
                    "",
                    f"Reproduce: {command(suite, ' --groups grid')}",
                    "",
                    *grid,
                ]
    return out


def render(results: Path, img_dir: Path, doc: Path) -> str:
    data = load(results)
    for suite in [s for s in COMPARISONS if s in data]:  # exact match from the stored answers, not the runs' scorer
        rescore_exact_match(data[suite])
    img_rel = Path(*([".."] * 0), img_dir.relative_to(doc.parent)) if img_dir.is_relative_to(doc.parent) else img_dir
    lines = [
        BEGIN,
        "## Verdict: GoRA vs rsLoRA vs LoRA, per regime",
        "",
        *headline_table(data),
        "",
        *when_to_use(),
        "Generated by `python -m benchmarks.harness.report_doc` from `benchmarks/results/*.jsonl`; every number below was "
        "produced by `python -m benchmarks.harness.run`. Methods are built as transformers/PEFT ship them "
        "(`benchmarks/harness/methods.py`) and trained by one shared loop (`benchmarks/harness/training.py`).",
        "",
        "| method | what |",
        "|---|---|",
        *[f"| `{name}` | {table_cell(m.description)} |" for name, m in METHODS.items()],
        "",
    ]
    for suite in [s for s in GATES if s in data]:
        lines += [*gate_section(suite, data[suite]), *provenance_lines(data[suite]), ""]
    for suite in [s for s in COMPARISONS if s in data]:
        lines += comparison_section(suite, data[suite], img_dir, str(img_rel))
        lines += [*provenance_lines(data[suite]), ""]
    evidence = [s for s in EVIDENCE if s in data]
    for suite in evidence:
        lines += evidence_section(suite, data[suite])
    if evidence:
        lines += discussion()
    historic = {s: rows for s, rows in data.items() if s not in (*EVIDENCE, *GATES, *COMPARISONS)}
    if evidence and historic:
        lines += [
            "## Historic results",
            "",
            "Everything from here to the memory section is historic: one learning rate for every method, one epoch, "
            "3 seeds, 1,000 test reviews, no per-example predictions (the evidence suites above supersede it).",
            "",
        ]
    notes = Path(__file__).resolve().parents[1] / "notes.md"
    if notes.is_file() and "nlu" in data:
        lines += [notes.read_text().strip(), ""]
    all_records = [r for rows in historic.values() for r in rows]
    if all_records:
        lines += ["## Machine and versions", "", *environment(all_records), ""]
    for suite in sorted(
        historic, key=lambda s: ("smoke", "nlu", "nlg").index(s) if s in ("smoke", "nlu", "nlg") else 9
    ):
        lines += suite_section(suite, data[suite], img_dir, str(img_rel))
    errors = sorted(results.glob("*.errors.jsonl"))
    if errors:
        done = {r["run_id"] for rows in data.values() for r in rows}
        failed = {json.loads(line)["run_id"] for p in errors for line in p.read_text().splitlines() if line.strip()}
        failed -= done
        if failed:
            lines += ["## Runs that failed", "", *[f"- `{rid}`" for rid in sorted(failed)], ""]
    memory = sorted(p.name for p in results.glob("memory.*"))
    if memory:
        lines += [f"Memory benchmark results ({', '.join(memory)}) are reported in their own section below.", ""]
    lines.append(END)
    return "\n".join(lines)


def write(doc: Path, generated: str) -> None:
    """Replace the marked block of `doc` (or create the file), keeping everything outside the markers.

    In a file without the markers, the block goes right after its top-level `# ` title (or first, under a new
    title), and all the existing text is kept after it.
    """
    if doc.is_file():
        text = doc.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            doc.write_text(head + generated + tail)
            return
        first, _, rest = text.partition("\n")
        if first.startswith("# "):
            doc.write_text(f"{first}\n\n{generated}\n\n{rest.lstrip()}")
        else:
            doc.write_text(f"{TITLE}\n\n{generated}\n\n{text}")
        return
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(f"{TITLE}\n\n{generated}\n\n{MEMORY_HINT}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.harness.report_doc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    parser.add_argument("--img", type=Path, default=None, help="PNG folder (default: img/ next to --out)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    img = args.img or args.out.parent / "img"
    write(args.out, render(args.results, img, args.out))
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
