"""Peak memory of GoRA on a 4-bit base, measured against `gora.memory.estimate_peak_bytes`, plus projections.

    python -m benchmarks.studies.qgora_memory [--widths 512,1024,2048,4096] [--layers 4] [--batch 2] [--length 256]

Config-built Llama models of growing width (hidden 512 → 4096, intermediate 3.5x hidden, head size 128, 4 query
heads per KV head: Llama-3's proportions; 4 layers; vocabulary 32000), every linear layer of the decoder quantized
by bitsandbytes to NF4 with double quantization and bfloat16 compute (the QLoRA recipe), embeddings, norms and the
output layer in bfloat16. Each (width, configuration) runs in its own process, side by side on the same batches:

- `plain`: a forward+backward of the 4-bit model with its input requiring grad (the backprop floor);
- `qlora`: a forward+backward with PEFT LoRA adapters (r=8, all linear layers) on the 4-bit base: one QLoRA step
  without the optimizer;
- `sketch`, `full`: `gora.get_gora_model` (estimation on the 4-bit base through module hooks, N batches, then
  allocation, initialization and the PEFT wrap), `gradient_store="sketch"` / `"full"`.

Memory is the process's peak resident set size during the phase, read from the kernel's high-water mark (VmHWM,
reset through /proc/self/clear_refs just before the phase, so model building does not count), minus the resident
size just before the model was built (interpreter, libraries, kernels warmed up on a tiny model): the bytes the
phase's tensors needed, which is what the memory model predicts. glibc is told to serve every allocation above
128 KiB by mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set as they do a GPU allocator's
bookkeeping. The model is built one linear layer at a time (never the whole model in bfloat16). Each row also holds
`gora.memory`'s prediction for the same shapes and tokens; the end of the results file projects Llama-3-8B and
Llama-3-70B (bfloat16 compute, NF4 with double quantization, sketch vs plain). Results go to
benchmarks/results/qgora_memory.json, with machine, versions, date and commit.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[1] / "results" / "qgora_memory.json"
ROOT = Path(__file__).resolve().parents[2]
VOCAB = 32000
KINDS = ("plain", "qlora", "sketch", "full")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:  # "5": reset the peak RSS (VmHWM) to the current RSS
        handle.write("5")


def llama_config(width: int, layers: int, length: int):
    from transformers import LlamaConfig

    heads = max(1, width // 128)
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=int(3.5 * width),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        max_position_embeddings=max(length, 64),
        tie_word_embeddings=False,
    )


def build_4bit_llama(config, seed: int = 0, device: str = "cpu"):
    """A LlamaForCausalLM whose decoder linear layers are NF4 `Linear4bit` (double quantization, bfloat16 compute),
    built one layer at a time from random bfloat16 weights on `device`, as transformers loads a 4-bit checkpoint
    (never the whole model in bfloat16)."""
    import bitsandbytes as bnb
    import torch
    from torch import nn
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for child, linear in list(parent.named_children()):
                if not isinstance(linear, nn.Linear):
                    continue
                weight = torch.empty(linear.out_features, linear.in_features, dtype=torch.bfloat16, device=device)
                weight.normal_(0.0, 0.02, generator=generator)
                with torch.device("meta"):
                    q = bnb.nn.Linear4bit(
                        linear.in_features,
                        linear.out_features,
                        bias=False,
                        compute_dtype=torch.bfloat16,
                        compress_statistics=True,
                        quant_type="nf4",
                    )
                # Params4bit.to(device) runs bnb.functional.quantize_4bit, as transformers does when loading
                q.weight = bnb.nn.Params4bit(weight, requires_grad=False, **q.weight.__dict__).to(device)
                setattr(parent, child, q)
                del weight
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                value = torch.empty(param.shape, dtype=torch.bfloat16, device=device)
                if name == "weight" and param.dim() == 1:
                    value.fill_(1.0)  # norms
                else:
                    value.normal_(0.0, 0.02, generator=generator)
                module._parameters[name] = nn.Parameter(value, requires_grad=False)
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)
    model.is_loaded_in_4bit = True  # as transformers marks a model it loaded in 4-bit
    return model


def batches(n: int, batch: int, length: int, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def run_phase(kind: str, model, data: list, num_batches: int) -> dict[str, Any]:
    import gora

    if kind == "plain":
        model.train()
        model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
        for batch in data[:num_batches]:
            model(**batch).loss.backward()
        return {}
    if kind == "qlora":
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        peft_model.train()
        for batch in data[:num_batches]:
            peft_model(**batch).loss.backward()
        return {}
    config = gora.GoraConfig(target_modules="all-linear", num_batches=num_batches, gradient_store=kind)
    peft_model = gora.get_gora_model(model, config, data, show_progress=False)
    record = peft_model.gora_records["default"]
    estimation = record.extra["estimation"]
    return {"statistics_bytes": estimation["statistics_bytes"], "routes": estimation["gradient_routes"]}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    import peft  # noqa: F401

    import gora  # noqa: F401 - imported before the baseline is read

    # warm up every code path on a tiny model, so that lazily loaded kernels and libraries are in the baseline
    tiny = build_4bit_llama(llama_config(128, 1, 64))
    run_phase(args.kind, tiny, batches(2, 1, 32), 1)
    del tiny
    gc.collect()
    rss_before = _status_kb("VmRSS")
    config = llama_config(args.width, args.layers, args.length)
    model = build_4bit_llama(config)
    data = batches(args.batches, args.batch, args.length)
    gc.collect()
    rss_model = _status_kb("VmRSS")
    tensors = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    tensors += sum(
        sum(v.numel() * v.element_size() for v in m.weight.quant_state.as_dict(packed=True).values())
        for m in model.modules()
        if hasattr(getattr(m, "weight", None), "quant_state")
    )
    _reset_peak()
    start = time.perf_counter()
    extra = run_phase(args.kind, model, data, args.batches)
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    result = {
        "width": args.width,
        "kind": args.kind,
        "tokens": args.batch * args.length,
        "batch": args.batch,
        "length": args.length,
        "layers": args.layers,
        "batches": args.batches,
        "rss_before_model_mib": rss_before / 1024,
        "rss_model_mib": rss_model / 1024,
        "model_tensor_mib": tensors / 2**20,
        "peak_rss_mib": peak / 1024,
        "measured_mib": (peak - rss_before) / 1024,
        "seconds": seconds,
        **extra,
    }
    Path(args.out).write_text(json.dumps(result))


def predict(row: dict[str, Any]) -> dict[str, Any] | None:
    from gora.memory import DecoderShape, estimate_peak_bytes

    if row["kind"] == "qlora":
        return None
    shape = DecoderShape.from_config(llama_config(row["width"], row["layers"], row["length"]))
    estimate = estimate_peak_bytes(shape, row["tokens"], mode=row["kind"], bits=4, double_quant=True)
    return {**{k: v * 1024 for k, v in estimate.gib().items()}, "transient_source": estimate.transient_source}


def projections() -> list[dict[str, Any]]:
    from gora.memory import LLAMA_3_8B, LLAMA_3_70B, GiB, estimate_peak_bytes, max_tokens

    rows = []
    for name, shape in (("Llama-3-8B", LLAMA_3_8B), ("Llama-3-70B", LLAMA_3_70B)):
        for tokens in (512, 1024, 2048):
            row: dict[str, Any] = {"model": name, "tokens": tokens}
            for mode in ("plain", "sketch"):
                estimate = estimate_peak_bytes(shape, tokens, mode=mode, bits=4, double_quant=True)
                row[mode] = {k: round(v, 2) for k, v in estimate.gib().items()}
            row["sketch_over_plain"] = row["sketch"]["total"] / row["plain"]["total"]
            rows.append(row)
        rows.append(
            {
                "model": name,
                "max_tokens_in_80GB_sketch": max_tokens(shape, 80e9, mode="sketch", bits=4, double_quant=True),
                "max_tokens_in_80GB_plain": max_tokens(shape, 80e9, mode="plain", bits=4, double_quant=True),
                "params_billion": shape.params() / 1e9,
                "GiB_per_GB": 1e9 / GiB,
            }
        )
    return rows


def table(result: dict[str, Any]) -> str:
    """The results as the Markdown tables of docs/BENCHMARKS.md (measured beside predicted, ratios, projections)."""
    rows = result["rows"]
    by = {(r["width"], r["tokens"], r["kind"]): r for r in rows}
    lines = [
        "| hidden | tokens | configuration | measured MiB | predicted MiB | error | largest transient | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["predicted_mib"]
        predicted = f"{p['total']:.0f}" if p else "–"
        error = f"{100 * r['error']:+.1f}%" if p else "–"
        source = p["transient_source"] if p else "–"
        lines.append(
            f"| {r['width']} | {r['tokens']} | {r['kind']} | {r['measured_mib']:.0f} | {predicted} | {error} | "
            f"{source} | {r['seconds']:.0f} |"
        )
    lines += ["", "| hidden | tokens | sketch / plain | sketch / qlora | full / plain |", "|---|---|---|---|---|"]
    for width, tokens in sorted({(r["width"], r["tokens"]) for r in rows}):
        cells = []
        for a, b in (("sketch", "plain"), ("sketch", "qlora"), ("full", "plain")):
            x, y = by.get((width, tokens, a)), by.get((width, tokens, b))
            cells.append(f"{x['measured_mib'] / y['measured_mib']:.2f}" if x and y else "–")
        lines.append(f"| {width} | {tokens} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| model | tokens | plain GiB | sketch GiB (weights + activations + statistics + transient) | sketch / plain |",
        "|---|---|---|---|---|",
    ]
    for p in result["projections"]:
        if "tokens" in p:
            s = p["sketch"]
            parts = f"{s['weights']:.1f} + {s['activations']:.1f} + {s['statistics']:.2f} + {s['transient']:.2f}"
            lines.append(
                f"| {p['model']} | {p['tokens']} | {p['plain']['total']:.1f} | {s['total']:.1f} ({parts}) | "
                f"{p['sketch_over_plain']:.2f} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="512,1024,2048,4096")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--full-max-width", type=int, default=4096, help="largest width for the full store")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--token-sweep", default="1024:1,4,8", help="width:batch sizes measured at that width too")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--note", default="")
    parser.add_argument("--table", action="store_true", help="print the results file as Markdown tables")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return 0

    from benchmarks.harness.measure import stamp

    runs = [(w, args.batch, k) for w in map(int, args.widths.split(",")) for k in args.kinds.split(",")]
    runs = [(w, b, k) for w, b, k in runs if not (k == "full" and w > args.full_max_width)]
    if args.token_sweep:
        width, sizes = args.token_sweep.split(":")
        runs += [(int(width), int(b), k) for b in sizes.split(",") for k in ("plain", "sketch")]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    rows = []
    for width, batch, kind in runs:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
            out = Path(handle.name)
        command = [sys.executable, "-m", "benchmarks.studies.qgora_memory", "--worker", "--width", str(width)]
        command += ["--kind", kind, "--layers", str(args.layers), "--batch", str(batch), "--length", str(args.length)]
        command += ["--batches", str(args.batches), "--out", str(out)]
        loads = os.getloadavg()[0]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"worker {width}/{kind} failed")
        row = json.loads(out.read_text())
        out.unlink()
        row["load_avg_1m"] = loads
        row["predicted_mib"] = predict(row)
        if row["predicted_mib"]:
            row["error"] = row["predicted_mib"]["total"] / row["measured_mib"] - 1
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "benchmark": "qgora_memory",
        "setting": {
            "layers": args.layers,
            "length": args.length,
            "batches": args.batches,
            "vocab": VOCAB,
            "quantization": "bitsandbytes NF4, double quantization, bfloat16 compute (all decoder linear layers)",
            "gora": "GoraConfig(target_modules='all-linear', num_batches=batches) defaults otherwise",
            "threads": 1,
            "malloc": "MALLOC_MMAP_THRESHOLD_=131072",
        },
        "rows": rows,
        "projections": projections(),
        "note": args.note,
        **stamp(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
