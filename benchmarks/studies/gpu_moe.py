"""GoRA on fused expert parameters (docs/moe.md) on one GPU: the adapter CUDA builds equals the CPU's, and bf16 trains.

    python -m benchmarks.studies.gpu_moe                 # a config-built Mixtral (8 experts), CUDA vs CPU
    python -m benchmarks.studies.gpu_moe --device cpu    # a dry run on a CPU (both sides on the CPU)

Checks (PASS/FAIL each, with its figures):
- `same_adapter`: `gora.get_gora_model` with `target_parameters="all-experts"` on the same float32 model and batches,
  once on the CPU and once on `--device`: the same ranks, and every lora_A / lora_B (expert stacks and attention)
  equal within 1e-3 of its own magnitude (CUDA and CPU kernels sum in other orders);
- `bf16_step`: the model in bfloat16 on `--device`, GoRA's statistics and adapter float32: ten AdamW steps on the
  calibration batches lower the loss.
Results (machine, versions, date, commit) go to benchmarks/results/gpu_moe.json; exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness.measure import stamp

RESULTS = Path(__file__).resolve().parents[1] / "results" / "gpu_moe.json"


def _mixtral(seed: int = 0) -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return MixtralForCausalLM(config).eval()


def _batches(device: str, n: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (4, 24), generator=g)
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)})
    return out


def _adapter(device: str, dtype: torch.dtype = torch.float32) -> tuple[Any, dict[str, torch.Tensor]]:
    import gora

    model = _mixtral().to(device=device, dtype=dtype)
    config = gora.GoraConfig(target_modules=["q_proj", "v_proj"], target_parameters="all-experts", r=4, num_batches=4)
    peft_model = gora.get_gora_model(model, config, _batches(device))
    tensors = {k: v.detach().float().cpu() for k, v in peft_model.state_dict().items() if "lora_" in k}
    return peft_model, tensors


def same_adapter(device: str) -> dict[str, Any]:
    _, cpu = _adapter("cpu")
    _, dev = _adapter(device)
    worst = 0.0
    for key, ref in cpu.items():
        worst = max(worst, float((dev[key] - ref).norm() / ref.norm().clamp_min(1e-30)))
    ranks = {k: tuple(v.shape) for k, v in cpu.items()} == {k: tuple(v.shape) for k, v in dev.items()}
    return {"ok": ranks and worst < 1e-3, "same_shapes": ranks, "max_rel_diff": worst, "tensors": len(cpu)}


def bf16_step(device: str) -> dict[str, Any]:
    peft_model, _ = _adapter(device, torch.bfloat16)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    dtypes = sorted({str(p.dtype) for p in trainable})
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    batches = _batches(device)
    peft_model.train()
    losses = []
    start = time.perf_counter()
    for step in range(10):
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = peft_model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    ok = all(map(lambda x: x == x, losses)) and last < first and dtypes == ["torch.float32"]
    return {"ok": ok, "trainable_dtypes": dtypes, "loss_first4": first, "loss_last4": last, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu for a dry run")
    checks = {}
    for name, check in (("same_adapter", same_adapter), ("bf16_step", bf16_step)):
        try:
            checks[name] = check(args.device)
        except Exception as err:  # a failed check is a result: the other checks still run
            checks[name] = {"ok": False, "error": repr(err)}
        print(f"{name}: {'PASS' if checks[name]['ok'] else 'FAIL'} {json.dumps(checks[name])}", flush=True)
    result = {"device": args.device, "checks": checks, **stamp()}
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    raise SystemExit(0 if all(c["ok"] for c in checks.values()) else 1)


if __name__ == "__main__":
    main()
