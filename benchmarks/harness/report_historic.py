"""The historic suites' part of docs/BENCHMARKS.md (`smoke`, `nlu`, `nlg`: one learning rate for every method;
called by `benchmarks.harness.report_doc`): per suite the main table, the cost of initialization, the ablations,
the LoRA+ check, the lr × data-size grid and the training-loss curves; the machine and versions they ran on.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from .plots import loss_plot
from .suites import (
    ABLATION_METHODS,
    BASE,
    GRID_LRS,
    GRID_METHODS,
    GRID_SIZES,
    LORAPLUS_METHODS,
    MAIN_METHODS,
)
from .tables import fmt, mean_std, median

Record = dict[str, Any]
NOTES = Path(__file__).resolve().parents[1] / "notes.md"


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
            if loss_plot(kept, png, f"{task}: training loss", MAIN_PANELS):
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
                if loss_plot(lp_kept, png, f"{task}: training loss, LoRA+ check", LORAPLUS_PANELS):
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


def historic_sections(
    historic: dict[str, list[Record]], after_evidence: bool, img_dir: Path, img_rel: str
) -> list[str]:
    """The historic suites' part of the report (`historic`: suite -> records), headed as historic when it follows
    the evidence suites; `benchmarks/notes.md` (its discussion) is included when the `nlu` suite has records."""
    lines = []
    if after_evidence and historic:
        lines += [
            "## Historic results",
            "",
            "Everything from here to the memory section is historic: one learning rate for every method, one epoch, "
            "3 seeds, 1,000 test reviews, no per-example predictions (the evidence suites above supersede it).",
            "",
        ]
    if NOTES.is_file() and "nlu" in historic:
        lines += [NOTES.read_text().strip(), ""]
    all_records = [r for rows in historic.values() for r in rows]
    if all_records:
        lines += ["## Machine and versions", "", *environment(all_records), ""]
    for suite in sorted(
        historic, key=lambda s: ("smoke", "nlu", "nlg").index(s) if s in ("smoke", "nlu", "nlg") else 9
    ):
        lines += suite_section(suite, historic[suite], img_dir, img_rel)
    return lines
