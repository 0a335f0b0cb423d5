"""The budget suite of issue #34 (`evidence-budget`): what it runs, and how its report pairs the runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmarks.harness import capacity, capacity_suites, report_budget, report_capacity, suites
from benchmarks.harness.run import read_records
from benchmarks.harness.specs import main_specs

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.fixture(scope="module")
def blocks() -> dict[str, suites.Block]:
    gate = read_records(RESULTS / "capacity-gate-long.jsonl")
    return {b.name: b for b in capacity.comparison_blocks("evidence-budget", gate)}


def test_budget_blocks_train_for_their_steps_with_each_methods_grid(blocks):
    """Protects the curve's design: each budget block trains lora / rslora / gora for exactly its steps (train size =
    steps x batch, one epoch, the 256-step suite's schedule shape and task), each method's starting lr grid is its
    own (half to 4x its 256-step optimum), tuning seeds are not main seeds, and the blocks run in the issue's order
    (32 and 64 steps first, 128 last)."""
    comp = capacity_suites.COMPARISONS["evidence-budget"]
    names = list(blocks)
    assert names == [
        "cap-budget-32",
        "cap-budget-64",
        "cap-stall",
        "cap-controls-256",
        "cap-auto-256",
        "cap-budget-128",
    ]
    long = suites.BASE["rg-capacity-long"]
    for steps in comp.budgets:
        block = blocks[f"cap-budget-{steps}"]
        assert block.tuned == ("lora", "rslora", "gora") and not set(block.tune_seeds) & set(block.seeds)
        (spec,) = [s for s in capacity_tune(block) if s["method"] == "gora" and s["lr"] == 4e-3]
        assert spec["train_size"] // spec["batch_size"] * spec["epochs"] == steps
        assert (spec["warmup_ratio"], spec["scheduler"], spec["gate_task"], spec["r"]) == (
            long["warmup_ratio"],
            long["scheduler"],
            "word_sorting",
            4,
        )
        for method, optimum in (("lora", 4e-3), ("rslora", 1e-3), ("gora", 4e-3)):
            assert block.lrs_for(method) == (optimum / 2, optimum, 2 * optimum, 4 * optimum)


def capacity_tune(block: suites.Block) -> list[dict]:
    return [
        capacity.tune_spec("evidence-budget", block, m, s, lr)
        for m in block.tuned
        for lr in block.lrs_for(m)
        for s in block.tune_seeds
    ]


def test_the_stall_variants_run_at_256_steps_on_the_main_seeds(blocks):
    """Protects part 2 of the issue: GoRA at half its 256-step lr runs untuned on the 8 main seeds (a labelled
    variant, in a block of its own), the controls are tuned themselves, and gamma = auto runs at GoRA's lr."""
    stall = blocks["cap-stall"]
    specs = main_specs("evidence-budget", stall, {})
    assert {(s["method"], s["lr"]) for s in specs} == {("gora", 2e-3)}
    assert sorted(s["seed"] for s in specs) == list(range(8))
    assert all(s["train_size"] == suites.BASE["rg-capacity-long"]["train_size"] for s in specs)
    assert blocks["cap-controls-256"].tuned == ("gora-gamma0", "gora-fixed")
    auto = main_specs("evidence-budget", blocks["cap-auto-256"], {})
    assert {(s["method"], s["lr"]) for s in auto} == {("gora-auto", 4e-3)} and len(auto) == 4


def test_a_fixed_lr_block_without_its_lr_is_refused():
    """Protects against a silent lr 0 (or a block quietly left out): a comparison that lists the "stall" or
    "auto-256" block without the fixed lr that block runs at is refused on construction, naming the field to set."""
    with pytest.raises(ValueError, match=r"block 'stall' runs gora .* set fixed_lr=\{'gora'"):
        capacity_suites.Comparison("capacity-gate-long", "rg-capacity-long", blocks=("stall",))
    with pytest.raises(ValueError, match=r"block 'auto-256' runs gora-auto"):
        capacity_suites.Comparison(
            "capacity-gate-long", "rg-capacity-long", blocks=("auto-256",), fixed_lr={"gora-auto": 0.0}
        )
    capacity_suites.Comparison("capacity-gate-long", "rg-capacity-long", blocks=("core",))  # no fixed-lr block


def _runs(steps: int, nll: dict[str, float], seeds: int, suite_block: str = "") -> list[dict]:
    tokens = [1, 3] * 20
    out = []
    for method, value in nll.items():
        for s in range(seeds):
            out.append(
                {
                    "seed": s,
                    "nll_sum": [value + 0.01 * s, 2.0] * 20,
                    "nll_tokens": tokens,
                    "metric": value,
                    "stage": "main",
                    "method": method,
                    "lr": 1e-3,
                    "train_size": 8 * steps,
                    "batch_size": 8,
                    "epochs": 1,
                    "block": suite_block or f"cap-budget-{steps}",
                    "loss_curve": [[i, 1.0] for i in range(1, steps + 1)],
                }
            )
    return out


def test_the_report_gives_one_paired_row_per_budget(tmp_path):
    """Protects the verdict rows: one per budget (the 256-step point from evidence-capacity-long's core block),
    GoRA − rsLoRA being capacity.paired_nll of the runs at that budget only; a budget with fewer paired seeds than
    planned says so instead of a verdict. The section links the curve's figure, drawn once two budgets have runs."""
    data = {
        "evidence-budget": _runs(32, {"lora": 2.0, "rslora": 2.0, "gora": 1.0}, 8)
        + _runs(64, {"lora": 2.0, "rslora": 2.0, "gora": 2.5}, 3),
        "evidence-capacity-long": _runs(256, {"lora": 2.0, "rslora": 2.0, "gora": 2.0}, 8, "cap-core"),
    }
    rows = report_budget.verdict_rows(data)
    assert [r.split(" |")[0] for r in rows] == ["| 32 steps", "| 64 steps", "| 256 steps"]
    runs = report_budget.budget_runs(data)
    st = report_capacity.paired_nll(runs[32]["gora"], runs[32]["rslora"])
    assert st["mean"] < 0 and f"{st['mean']:+.3f} [{st['low']:+.3f}, {st['high']:+.3f}] (8 seeds)" in rows[0]
    assert "GoRA − rsLoRA: better; GoRA − LoRA: better" in rows[0]
    assert "no verdict yet (3 of 8 paired seeds)" in rows[1]
    section = report_budget.budget_section(data, tmp_path, "img")
    assert sum(line.startswith(("| 32 |", "| 64 |", "| 256 |")) for line in section) == 3
    figure = tmp_path / "evidence-budget-curve.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "](img/evidence-budget-curve.png)" in "\n".join(section)
    assert not report_budget.plot_budget_curve({"evidence-budget": data["evidence-budget"][:3]}, tmp_path / "one.png")
    assert not (tmp_path / "one.png").exists()  # one budget: no curve to draw


def test_the_variants_pair_with_gora_and_rslora_of_the_256_step_suite():
    """Protects the controls table: a variant is compared with GoRA and rsLoRA of evidence-capacity-long on the seeds
    both ran, and a variant with no runs is shown as not run."""
    data = {
        "evidence-budget": _runs(256, {"gora": 1.0}, 4, "cap-stall"),
        "evidence-capacity-long": _runs(256, {"rslora": 2.0, "gora": 1.5}, 8, "cap-core"),
    }
    table = report_budget.variant_table(data)
    (stall,) = [line for line in table if line.startswith("| GoRA at half its lr")]
    assert "| 4 |" in stall and "(4 seeds)" in stall
    ref = report_budget.budget_runs({"evidence-capacity-long": data["evidence-capacity-long"]})[256]
    variant = {r["seed"]: r for r in data["evidence-budget"]}
    st = report_capacity.paired_nll(variant, ref["gora"])
    assert f"{st['mean']:+.3f}" in stall and st["mean"] < 0
    assert any(line.startswith("| allocation only") and "not run yet" in line for line in table)
