"""GoRA on a 4-bit base on one GPU: time and peak GPU memory against a plain QLoRA step, and the memory model.

    python -m benchmarks.studies.gpu_qgora                                  # Llama-3-8B shapes, random 4-bit weights
    python -m benchmarks.studies.gpu_qgora --shape llama-3-70b --batch 1 --length 1024
    python -m benchmarks.studies.gpu_qgora --model /path/to/a/llama/checkpoint  # a real model, quantized at load

Prepared for issue #14 item 4; **not yet run** (no GPU was available where it was written). Needs torch with CUDA,
bitsandbytes, transformers, peft and this checkout (`pip install -e .`); nothing is downloaded: without `--model`
the model is config-built with Llama-3's shapes and random weights, quantized one layer at a time on the GPU (the
shapes, not the values, set memory and time). Each configuration runs in its own process, side by side on the same
random token batches, NF4 with double quantization and bfloat16 compute (the QLoRA recipe):

- `plain`: forward+backward with the input requiring grad (the backprop floor);
- `qlora`: forward+backward with PEFT LoRA adapters (r=8, all linear layers): one QLoRA step without the optimizer;
- `sketch`: `gora.get_gora_model(model, GoraConfig(target_modules="all-linear", gradient_store="sketch"))` with
  `--batches` batches (estimation through module hooks, allocation, initialization, the PEFT wrap).

Per configuration: seconds (CUDA-synchronized) and `torch.cuda.max_memory_allocated` / `max_memory_reserved`
after the model is built (model building not counted), next to `gora.memory.estimate_peak_bytes` for the same
shapes and tokens. Results (machine, versions, date, commit) go to benchmarks/results/gpu_qgora.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parents[1] / "results" / "gpu_qgora.json"
KINDS = ("plain", "qlora", "sketch")


def _model(args: argparse.Namespace):
    import torch
    from transformers import BitsAndBytesConfig, LlamaConfig

    from gora.memory import LLAMA_3_8B, LLAMA_3_70B, DecoderShape

    if args.model:
        from transformers import AutoModelForCausalLM

        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        return AutoModelForCausalLM.from_pretrained(
            args.model, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": 0}
        )
    from .qgora_memory import build_4bit_llama

    tiny = DecoderShape(hidden=256, intermediate=896, layers=2, heads=2, kv_heads=1, vocab=1024)
    shape = {"llama-3-8b": LLAMA_3_8B, "llama-3-70b": LLAMA_3_70B, "tiny": tiny}[args.shape]
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=args.layers or shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(args.length, 8192),
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    return build_4bit_llama(config, device=args.device)


def worker(args: argparse.Namespace) -> None:
    import torch

    import gora

    cuda = args.device == "cuda"
    model = _model(args)
    vocab = model.config.vocab_size
    g = torch.Generator(device=args.device).manual_seed(1)
    data = []
    for _ in range(args.batches):
        ids = torch.randint(0, vocab, (args.batch, args.length), generator=g, device=args.device)
        data.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    if cuda:
        torch.cuda.synchronize()
        model_bytes = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    extra: dict[str, Any] = {}
    if args.kind == "plain":
        model.train()
        model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
        for batch in data:
            model(**batch).loss.backward()
    elif args.kind == "qlora":
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        peft_model.train()
        for batch in data:
            peft_model(**batch).loss.backward()
    else:
        config = gora.GoraConfig(target_modules="all-linear", num_batches=args.batches, gradient_store="sketch")
        peft_model = gora.get_gora_model(model, config, data, show_progress=False)
        record = peft_model.gora_records["default"]
        extra = {"timings_s": record.timings_s, "estimation": record.extra["estimation"]}
    if cuda:
        torch.cuda.synchronize()
    result = {
        "kind": args.kind,
        "seconds": time.perf_counter() - start,
        "model_allocated_gib": model_bytes / 2**30 if cuda else None,
        "max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "config": model.config.to_dict(),
        **extra,
    }
    Path(args.out).write_text(json.dumps(result, default=str))


def predict(config: dict[str, Any], tokens: int, kind: str) -> dict[str, float] | None:
    from types import SimpleNamespace

    from gora.memory import DecoderShape, estimate_peak_bytes

    if kind == "qlora":
        return None
    shape = DecoderShape.from_config(SimpleNamespace(**config))
    return estimate_peak_bytes(shape, tokens, mode=kind, bits=4, double_quant=True).gib()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("llama-3-8b", "llama-3-70b", "tiny"), default="llama-3-8b")
    parser.add_argument("--model", help="a local checkpoint folder to load in 4-bit instead of a config-built one")
    parser.add_argument("--layers", type=int, default=0, help="fewer decoder layers than the shape's (0: all)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--note", default="")
    parser.add_argument(
        "--dry-run", action="store_true", help="run the code paths on the CPU with --shape tiny (no memory figures)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    import torch

    from benchmarks.harness.measure import stamp

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark measures GPU memory (--dry-run checks the code on a CPU)")
    rows = []
    for kind in args.kinds.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
            out = Path(handle.name)
        command = [sys.executable, "-m", "benchmarks.studies.gpu_qgora", "--worker", "--kind", kind, "--out", str(out)]
        command += ["--device", device]
        for flag in ("shape", "model", "layers", "batch", "length", "batches"):
            value = getattr(args, flag)
            if value:
                command += [f"--{flag}", str(value)]
        done = subprocess.run(command, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
            rows.append({"kind": kind, "error": done.stderr[-2000:]})
            continue
        row = json.loads(out.read_text())
        out.unlink()
        row["tokens"] = args.batch * args.length
        row["predicted_gib"] = predict(row.pop("config"), row["tokens"], kind)
        if row["predicted_gib"] and row["max_allocated_gib"]:
            row["error_vs_allocated"] = row["predicted_gib"]["total"] / row["max_allocated_gib"] - 1
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
    by_kind = {row["kind"]: row for row in rows if "error" not in row and row["max_allocated_gib"]}
    ratios = {
        f"{kind}_over_{base}": by_kind[kind]["max_allocated_gib"] / by_kind[base]["max_allocated_gib"]
        for kind in ("sketch",)
        for base in ("plain", "qlora")
        if kind in by_kind and base in by_kind
    }
    result = {
        "benchmark": "gpu_qgora",
        "setting": {k: getattr(args, k) for k in ("shape", "model", "layers", "batch", "length", "batches")},
        "rows": rows,
        "peak_ratios": ratios,
        "note": args.note,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if device == "cuda" else None,
        **stamp(),
        "cuda": torch.version.cuda,
    }
    if args.dry_run:
        print("dry run on the CPU: every configuration ran; nothing written")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
