"""Disk use of one `gora finetune` checkpoint (the README's "Resuming a run" figures).

    python -m benchmarks.studies.checkpoint_size [--out benchmarks/results/checkpoint_size.json]

Runs `gora finetune` for one step with a checkpoint after it (--max-steps 1 --save-strategy steps --save-steps 1),
GoRA at r=8 on all-linear targets of all-MiniLM-L6-v2 (the default preset's query/key/value/dense are the same
modules) and of SmolLM2-135M-Instruct, and records the size of every file of checkpoints/checkpoint-1 against the
trainable parameter count P: adapter (4 bytes/parameter, float32) + AdamW's two moments (8 bytes/parameter) +
a constant (scheduler, RNG states, trainer state, the tokenizer the Trainer saves alongside). Sizes do not depend
on the machine's load; the result records machine, versions, date and commit all the same.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness.measure import stamp

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["-q", "--r", "8", "--num-batches", "2", "--max-steps", "1", "--save-strategy", "steps", "--save-steps", "1"]
COMMON += ["--no-eval-before", "--threads", "1"]
CASES: dict[str, list[str]] = {
    # the default preset's targets (query, key, value, dense) select the same modules as all-linear here
    "minilm-l6 all-linear": [
        *["--preset", "minilm-rt", "--max-train-samples", "32", "--max-eval-samples", "8"],
        *["--target-modules", "all-linear"],
    ],
    "smollm2-135m all-linear": [
        *["--preset", "smollm2-gsm", "--max-train-samples", "8", "--max-eval-samples", "1", "--batch-size", "2"],
        *["--max-new-tokens", "1", "--target-modules", "all-linear"],
    ],
}


def measure(name: str, options: list[str], folder: Path) -> dict[str, Any]:
    from gora.app.commands.cli import main

    out = folder / name.replace(" ", "_").replace("/", "-")
    if main(["finetune", *COMMON, *options, "--output-dir", str(out)]) != 0:
        raise SystemExit(f"{name}: gora finetune failed")
    report = json.loads((out / "report.json").read_text())
    checkpoint = out / "checkpoints" / "checkpoint-1"
    files = {p.name: p.stat().st_size for p in sorted(checkpoint.iterdir()) if p.is_file()}
    trainable = report["params"]["trainable_total"]
    total = sum(files.values())
    tokenizer = sum(size for file, size in files.items() if file.startswith(("tokenizer", "special_tokens", "vocab")))
    return {
        "options": options,
        "adapter_params": report["params"]["adapter"],
        "trainable_params": trainable,  # adapter + a new classification head (modules_to_save), if any
        "files_bytes": files,
        "checkpoint_bytes": total,
        "tokenizer_bytes": tokenizer,
        "formula_bytes": 12 * trainable,
        "rest_bytes": total - 12 * trainable,
        "init_folder_bytes": sum(p.stat().st_size for p in (out / "init").rglob("*") if p.is_file()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "checkpoint_size.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: measure(name, options, Path(tmp)) for name, options in CASES.items()}
    result = {
        "benchmark": "checkpoint_size",
        **stamp(),
        "common_options": COMMON,
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, run in runs.items():
        print(
            f"{name}: {run['trainable_params']:,} trainable parameters -> checkpoint {run['checkpoint_bytes'] / 2**20:.2f} "
            f"MiB (12 bytes x P = {run['formula_bytes'] / 2**20:.2f} MiB; rest {run['rest_bytes'] / 2**20:.2f} MiB, "
            f"of which tokenizer {run['tokenizer_bytes'] / 2**20:.2f} MiB)"
        )


if __name__ == "__main__":
    main()
