"""The benchmark harness end to end on the `smoke` suite (tiny config-built models, a few steps), and the report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import report, run  # noqa: E402
from benchmarks.suites import ABLATION_METHODS, MAIN_METHODS  # noqa: E402
from benchmarks.worker import REQUIRED_FIELDS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    assert run.main(["smoke", "--out", str(out)]) == 0, (out / "smoke.errors.jsonl").read_text()
    return out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "smoke.jsonl").read_text().splitlines()]


def test_smoke_suite_gives_every_method_a_complete_line(smoke_results: Path) -> None:
    records = _records(smoke_results)
    nlu = {r["method"]: r for r in records if r["task"] == "smoke-nlu"}
    assert set(nlu) == {*MAIN_METHODS, *ABLATION_METHODS, "init-cost"}
    assert {r["method"] for r in records if r["task"] == "smoke-nlg"} == {"lora", "gora"}
    for r in records:
        missing = [f for f in REQUIRED_FIELDS if f not in r]
        assert not missing, (r["method"], missing)
        if r["method"] != "init-cost":
            assert 0.0 <= r["metric"] <= 1.0
            assert r["trainable_params"] > 0 and r["train_s"] > 0 and r["step_s"] > 0
            assert r["peak_rss_mb"] > 0 and r["loss_curve"]
    # budgets: the LoRA family at the same count, GoRA's matched variant closest to it, full FT far above
    assert nlu["lora"]["trainable_params"] == nlu["rslora"]["trainable_params"] == nlu["pissa"]["trainable_params"]
    assert nlu["full"]["trainable_params"] > 10 * nlu["lora"]["trainable_params"]
    ref = nlu["lora"]["adapter_params"]
    assert abs(nlu["gora-matched"]["adapter_params"] - ref) <= abs(nlu["gora"]["adapter_params"] - ref)
    assert nlu["gora-fixed"]["adapter_params"] == ref
    # AdaLoRA really reallocates: update_and_allocate runs every step and prunes toward target_r
    info = nlu["adalora"]["info"]
    assert info["adalora_update_calls"] == nlu["adalora"]["steps"]
    assert info["adalora_rank_total_end"] < info["adalora_rank_total_start"]
    assert set(nlu["init-cost"]["cost"]["ratio_to_plain"]) == {"gora", "gora_estimate", "loraga", "eva"}


def test_rerun_skips_finished_runs(smoke_results: Path) -> None:
    before = len(_records(smoke_results))
    assert run.main(["smoke", "--out", str(smoke_results), "--methods", "lora"]) == 0
    assert len(_records(smoke_results)) == before


def test_report_renders_and_keeps_text_outside_its_markers(smoke_results: Path, tmp_path: Path) -> None:
    doc = tmp_path / "docs" / "BENCHMARKS.md"
    doc.parent.mkdir()
    doc.write_text("# Benchmarks\n\n## Memory\n\nhand-written memory section\n")
    assert report.main(["--results", str(smoke_results), "--out", str(doc)]) == 0
    first = doc.read_text()
    assert report.BEGIN in first and report.END in first and "hand-written memory section" in first
    assert first.count("# Benchmarks\n") == 1 and first.index(report.END) < first.index("## Memory")
    assert "| `gora` |" in first and "| `adalora` |" in first and "Initialization cost" in first
    assert report.main(["--results", str(smoke_results), "--out", str(doc)]) == 0
    assert doc.read_text() == first  # idempotent, memory section untouched
    assert (doc.parent / "img" / "loss_smoke-nlu.png").is_file()
