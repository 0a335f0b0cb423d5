"""Memory of gradient estimation: gora "full" vs "sketch" vs PEFT's LoRA-GA preprocessing, and scaling with width.

    python -m benchmarks.studies.gora_memory [--batches 8] [--out benchmarks/results/memory.json]

Part 1 runs each configuration in its own subprocess on SmolLM2-135M-Instruct (all linear layers, float32), so
each peak resident set size (ru_maxrss) is clean:
- `model`: load the model and run the same forward/backward passes with target gradients freed at once (floor);
- `full`, `sketch`: `gora.estimate_gradients` with `gradient_store="full"` / `"sketch"`;
- `loraga`: `peft.tuners.lora.loraga.preprocess_loraga` (keeps every target gradient, weight dtype, on the device).
It also compares sketch with full: ranks, trainable parameters, and A0/B0 where the ranks agree, and sweeps
sketch_samples x seeds (statistics bytes against rank agreement).
Part 2 measures the bytes of the statistics for config-built Llama models of growing width (estimation only).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness.measure import maxrss_mb

ROOT = Path(__file__).resolve().parents[2]

TOKENS, BATCH = 64, 4


def _smollm2() -> str:
    from gora.app.assets import smollm2_path

    return smollm2_path()


def _batches(tokenizer, n: int) -> list[dict[str, torch.Tensor]]:
    from gora.app.assets import rotten_tomatoes

    train, _ = rotten_tomatoes(train_size=n * BATCH, seed=0)
    texts = [row["text"] for row in train]
    out = []
    for i in range(n):
        enc = tokenizer(
            texts[i * BATCH : (i + 1) * BATCH],
            padding="max_length",
            truncation=True,
            max_length=TOKENS,
            return_tensors="pt",
        )
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out


def worker(kind: str, n: int, out: Path) -> None:
    """One configuration in a fresh process; writes a JSON line (and, for full/sketch, the adapters) to `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import gora

    torch.manual_seed(0)
    torch.set_num_threads(1)  # the same single-threaded compute for every configuration
    path = _smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    batches = _batches(tokenizer, n)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rss_loaded = maxrss_mb()
    config = gora.GoraConfig(
        target_modules="all-linear", num_batches=n, gradient_store="sketch" if kind == "sketch" else "full"
    )
    result: dict = {"kind": kind, "rss_after_load_mb": rss_loaded}
    start = time.perf_counter()
    if kind == "model":
        targets = gora.targets.find_targets(model, config)
        weights = [model.get_submodule(t.name).weight for t in targets]
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
            w.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        model.train()
        for batch in batches:
            model(**batch).loss.backward()
    elif kind in ("full", "sketch"):
        stats = gora.estimate_gradients(model, config, batches, show_progress=False)
        result["estimate_s"] = time.perf_counter() - start
        result["statistics_bytes"] = stats.info["statistics_bytes"]
        importances = gora.compute_importances(model, stats, config.importance)
        allocation = gora.allocate_ranks(importances, stats.shapes, config)
        weights = gora.init_gora_weights(stats, allocation, config)
        result["ranks"] = allocation.ranks
        result["trainable_params"] = allocation.trainable_params
        torch.save(weights, out.with_suffix(f".{kind}.pt"))
    elif kind == "loraga":
        from peft import LoraConfig, LoraGAConfig
        from peft.tuners.lora.loraga import preprocess_loraga

        names = sorted({t.name.rsplit(".", 1)[-1] for t in gora.targets.find_targets(model, config)})
        lora_config = LoraConfig(  # LoRA-GA does not expand "all-linear": the same layers, by name
            r=8, target_modules=names, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig()
        )

        def train_step() -> None:
            for batch in batches:
                model(**batch).loss.backward()

        preprocess_loraga(model, lora_config, train_step)
        result["statistics_bytes"] = sum(
            m._peft_loraga_grad.numel() * m._peft_loraga_grad.element_size()
            for m in model.modules()
            if hasattr(m, "_peft_loraga_grad")
        )
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = maxrss_mb()
    with open(out, "a") as handle:
        handle.write(json.dumps(result) + "\n")


def compare(full: dict, sketch: dict, out: Path) -> dict:
    """Sketch against full: ranks, parameters, A0 exactly and B0 to float32 precision where the ranks agree."""
    rf, rs = full["ranks"], sketch["ranks"]
    diffs = [abs(rf[k] - rs[k]) for k in rf]
    wf, ws = torch.load(out.with_suffix(".full.pt")), torch.load(out.with_suffix(".sketch.pt"))
    same = [k for k in rf if rf[k] == rs[k]]
    a_equal = all(torch.equal(wf[k][0], ws[k][0]) for k in same)
    b_err = max(float((wf[k][1] - ws[k][1]).norm() / wf[k][1].norm().clamp_min(1e-30)) for k in same)
    return {
        "layers": len(rf),
        "max_rank_difference": max(diffs),
        "same_rank_fraction": len(same) / len(rf),
        "trainable_params_ratio": sketch["trainable_params"] / full["trainable_params"],
        "A0_identical_where_same_rank": a_equal,
        "B0_max_relative_error_where_same_rank": b_err,
        "statistics_ratio": sketch["statistics_bytes"] / full["statistics_bytes"],
    }


def sample_sweep(n: int, samples: list[int], seeds: list[int]) -> list[dict]:
    """Sketch against full over sketch_samples x seeds (one process: only statistics bytes and ranks matter here).

    The seed draws A_max and the sampled entries; SmolLM2 has no dropout, so the full ranks do not depend on it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import gora

    torch.set_num_threads(1)
    path = _smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    batches = _batches(tokenizer, n)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    def allocate(store: str, **kwargs) -> tuple[int, gora.Allocation]:
        config = gora.GoraConfig(target_modules="all-linear", num_batches=n, gradient_store=store, **kwargs)
        stats = gora.estimate_gradients(model, config, batches, show_progress=False)
        importances = gora.compute_importances(model, stats, config.importance)
        return stats.info["statistics_bytes"], gora.allocate_ranks(importances, stats.shapes, config)

    full_bytes, full = allocate("full")
    rows = []
    for s in samples:
        for seed in seeds:
            nbytes, sketch = allocate("sketch", sketch_samples=s, seed=seed)
            diffs = [abs(full.ranks[k] - sketch.ranks[k]) for k in full.ranks]
            rows.append(
                {
                    "sketch_samples": s,
                    "seed": seed,
                    "statistics_ratio": nbytes / full_bytes,
                    "max_rank_difference": max(diffs),
                    "same_rank_fraction": diffs.count(0) / len(diffs),
                    "trainable_params_ratio": sketch.trainable_params / full.trainable_params,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def width_table(widths: list[int]) -> list[dict]:
    """Statistics bytes of full and sketch for config-built Llama models (2 layers, intermediate = 8/3 width)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import gora

    rows = []
    for width in widths:
        torch.manual_seed(0)
        heads = max(1, width // 64)
        cfg = LlamaConfig(
            vocab_size=256,
            hidden_size=width,
            intermediate_size=(8 * width // 3 + 63) // 64 * 64,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 4),
            max_position_embeddings=64,
        )
        model = LlamaForCausalLM(cfg)
        g = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(2):
            ids = torch.randint(0, 256, (2, 32), generator=g)
            batches.append({"input_ids": ids, "labels": ids})
        row = {"hidden_size": width, "intermediate_size": cfg.intermediate_size}
        for store in ("full", "sketch"):
            config = gora.GoraConfig(target_modules="all-linear", num_batches=2, gradient_store=store)
            stats = gora.estimate_gradients(model, config, batches, show_progress=False)
            row[f"{store}_bytes"] = stats.info["statistics_bytes"]
        row["ratio"] = row["sketch_bytes"] / row["full_bytes"]
        rows.append(row)
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--widths", type=int, nargs="*", default=[256, 512, 1024, 2048])
    parser.add_argument("--samples", type=int, nargs="*", default=[512, 768, 1024, 2048], help="sweep: sketch_samples")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="sweep: seeds")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "memory.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.batches, args.worker_out)
        return
    import gora
    from gora.record import versions

    widths = width_table(args.widths)  # first: cheap, and a failure here costs no subprocess run
    with tempfile.TemporaryDirectory() as tmp:
        lines = Path(tmp) / "runs.jsonl"  # one JSON line per configuration, appended by each subprocess
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        for kind in ("model", "full", "sketch", "loraga"):
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.studies.gora_memory",
                "--worker",
                kind,
                "--worker-out",
                str(lines),
                "--batches",
                str(args.batches),
            ]
            subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        runs = {r["kind"]: r for r in map(json.loads, lines.read_text().splitlines())}
        comparison = compare(runs["full"], runs["sketch"], lines)
    sweep = sample_sweep(args.batches, args.samples, args.seeds)
    for r in runs.values():
        r.pop("ranks", None)
    result = {
        "benchmark": "memory",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "versions": versions(),
        "model": "SmolLM2-135M-Instruct (float32), target_modules=all-linear",
        "batches": args.batches,
        "batch_shape": [BATCH, TOKENS],
        "defaults": {k: gora.GoraConfig().to_dict()[k] for k in ("r", "min_rank", "max_rank", "sketch_samples")},
        "runs": runs,
        "sketch_vs_full": comparison,
        "sketch_samples_sweep": sweep,
        "width_table": widths,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
