"""The top of docs/BENCHMARKS.md (called by `benchmarks.harness.report_doc`): the verdict table (GoRA against rsLoRA
and LoRA in each regime of the evidence and capacity suites, `headline_table`), and the hand-written parts of
`benchmarks/notes_evidence.md` placed around the generated ones (`when_to_use`, `discussion`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import capacity, report_capacity
from .capacity_suites import COMPARISONS as CAPACITY_SUITES
from .capacity_suites import GATES
from .report_evidence import main_runs, paired, pooled
from .suites import BASE, EVIDENCE

Record = dict[str, Any]
NOTES = Path(__file__).resolve().parents[1] / "notes_evidence.md"

WHEN = ("<!-- when-to-use -->", "<!-- /when-to-use -->")


def _notes() -> tuple[str, str]:
    """(the "when to use GoRA" paragraph, the rest) of `notes_evidence.md`."""
    if not NOTES.is_file():
        return "", ""
    text = NOTES.read_text()
    if WHEN[0] in text and WHEN[1] in text:
        head, rest = text.split(WHEN[0], 1)
        when, tail = rest.split(WHEN[1], 1)
        return when.strip(), (head + tail).strip()
    return "", text.strip()


def when_to_use() -> list[str]:
    """The hand-written paragraph under the verdict table (between the when-to-use markers of notes_evidence.md)."""
    when, _ = _notes()
    return [when, ""] if when else []


def discussion() -> list[str]:
    """The hand-written discussion of all evidence suites (`notes_evidence.md` without the when-to-use paragraph),
    once after the last of them."""
    _, rest = _notes()
    return [rest, ""] if rest else []


# ------------------------------------------------------------------------------------- the verdict at the top


def _ci(st: dict[str, Any] | None, scale: float, digits: int, verdict: bool = True) -> str:
    if not st:
        return "–"
    return f"{st['mean'] * scale:+.{digits}f} [{st['low'] * scale:+.{digits}f}, {st['high'] * scale:+.{digits}f}]" + (
        f" **{st['verdict']}**" if verdict else ""
    )


def _overall(vs_rs: dict[str, Any] | None, vs_lora: dict[str, Any] | None) -> str:
    verdicts = {v["verdict"] for v in (vs_rs, vs_lora) if v}
    if not verdicts:
        return "–"
    if verdicts == {"tied"}:
        return "GoRA ties both"
    parts = []
    for name, st in (("rsLoRA", vs_rs), ("LoRA", vs_lora)):
        if st:
            parts.append(f"{st['verdict']} than {name}" if st["verdict"] != "tied" else f"tied with {name}")
    return "GoRA " + ", ".join(parts)


def _regime_label(regime: str) -> str:
    """ "r4" -> "4"; a budget regime "r4-32steps" -> "4, 32 steps" (evidence-budget)."""
    rank, _, rest = regime.lstrip("r").partition("-")
    return f"{rank}, {rest.removesuffix('steps')} steps" if rest.endswith("steps") else regime.lstrip("r")


def _regime_order(regime: str) -> tuple[str, int]:
    """Regimes in order, budgets by their steps (32 before 128)."""
    rank, _, rest = regime.partition("-")
    return (rank, int(rest.removesuffix("steps")) if rest.endswith("steps") and rest[:-5].isdigit() else 0)


def headline_table(data: dict[str, list[Record]]) -> list[str]:
    """The one table BENCHMARKS.md opens with: per regime GoRA − rsLoRA and GoRA − LoRA (paired 95% intervals), from
    the evidence suites' main runs; the capacity gate's finding in its own row."""
    lines = [
        "| regime (suite) | metric (A − B; + = GoRA better unless noted) | GoRA − rsLoRA [95% CI] | GoRA − LoRA [95% CI] "
        "| verdict |",
        "|---|---|---|---|---|",
    ]
    for suite in EVIDENCE:
        records = data.get(suite)
        if not records:
            continue
        by_regime = main_runs(records)
        tuned = any(b.tune_seeds for b in EVIDENCE[suite])
        for (task, regime), methods in sorted(by_regime.items()):
            if "gora" not in methods:
                continue
            metric = next(iter(methods["gora"].values()))["metric_name"]
            rs = paired(methods["gora"], methods["rslora"]) if "rslora" in methods else None
            lo = paired(methods["gora"], methods["lora"]) if "lora" in methods else None
            seeds = len(methods["gora"])
            note = "" if tuned else ", lr not tuned"
            lines.append(
                f"| {task}, r = {regime.lstrip('r')} (`{suite}`, {seeds} seeds{note}) | {metric}, points | "
                f"{_ci(rs, 100, 2)} | {_ci(lo, 100, 2)} | {_overall(rs, lo)} |"
            )
        regimes = sorted({r for t, r in by_regime})
        if len(regimes) > 1:
            tasks = sorted({t for t, _ in by_regime})
            for task in tasks:
                get = [by_regime[(task, r)] for r in regimes if (task, r) in by_regime]
                rs = pooled([(m["gora"], m["rslora"]) for m in get if "gora" in m and "rslora" in m])
                lo = pooled([(m["gora"], m["lora"]) for m in get if "gora" in m and "lora" in m])
                lines.append(
                    f"| {task}, pooled over r = {', '.join(r.lstrip('r') for r in regimes)} (`{suite}`) | "
                    f"accuracy, points | {_ci(rs, 100, 2)} | {_ci(lo, 100, 2)} | {_overall(rs, lo)} |"
                )
    for gate_suite in GATES:
        records = data.get(gate_suite)
        if not records:
            continue
        rows = capacity.gate_rows(records, gate_suite, capacity.gate_ratio(gate_suite))
        done = [r for r in rows if r.complete and r.ratio is not None]
        chosen = capacity.qualifying(done)
        if chosen:
            at = ", ".join(f"r = {r} at {lr:g}" for r, lr in sorted(chosen.lr.items()) if lr is not None)
            at = f"; best lr {at}" if len(GATES[gate_suite].all_lrs) > 1 else ""
            found = f"qualifies: {chosen.task} (NLL r = 32 / r = 4 = {chosen.ratio:.3f}{at})"
            if chosen.edge:
                ranks = " and ".join(f"r = {r}" for r in chosen.edge)
                found += f", with the best lr of {ranks} at an edge of the lrs run (optimum not located)"
        else:
            found = "not finished" if len(done) < len(rows) else "no candidate qualifies"
        ratios = ", ".join(
            f"{r.task} {r.ratio:.3f}" + ("" if r.complete else " (so far)") for r in rows if r.ratio is not None
        )
        gate = GATES[gate_suite]
        base = BASE[gate.base]
        steps = base["train_size"] // base["batch_size"] * base.get("epochs", 1)
        where = "GPU" if any(r.get("spec", {}).get("device", "cpu") != "cpu" for r in records) else "CPU"
        lines.append(
            f"| capacity gate (`{gate_suite}`, {steps} steps, {where}, {report_capacity.gate_lrs(gate, records)}):"
            f" does rank bind on SmolLM2-135M? | NLL(r = 32) / NLL(r = 4), validation | {ratios or '–'} | | {found} "
            f"({len(done)} of {len(rows)} candidates measured) |"
        )
    for suite in CAPACITY_SUITES:
        records = data.get(suite)
        if not records:
            continue
        verdicts = report_capacity.comparison_verdicts(records)
        for (task, regime), pairs in sorted(verdicts.items(), key=lambda kv: (kv[0][0], _regime_order(kv[0][1]))):
            rs, lo = pairs.get(("gora", "rslora")), pairs.get(("gora", "lora"))
            if not rs and not lo:
                continue
            seeds = len((rs or lo)["seeds"])
            so_far = report_capacity.interim(suite, rs or lo)
            one_seed = "; the interval spans test problems, not seeds" if seeds == 1 else ""
            overall = f"no verdict yet ({so_far}{one_seed})" if so_far else None
            lines.append(
                f"| {task}, r = {_regime_label(regime)} (`{suite}`, {seeds} seeds) | test answer-token NLL, nats "
                f"(− = GoRA better) | {_ci(rs, 1, 4, not so_far)} | {_ci(lo, 1, 4, not so_far)} | "
                f"{overall or _overall(rs, lo)} |"
            )
    return lines
