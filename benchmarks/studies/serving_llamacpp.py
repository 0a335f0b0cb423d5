"""llama.cpp end to end: a trained GoRA adapter and its serving export (`gora export`), run by llama.cpp, against PEFT.

Run by hand (not in CI: it needs llama.cpp compiled from source). Once, outside the repository (or `--install`):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /work/llamacpp-src
    tar xzf /work/llamacpp-src/llama_cpp_python-0.3.36.tar.gz -C /work/llamacpp-src
    python3 -m venv /work/llamacpp-venv
    /work/llamacpp-venv/bin/pip install /work/llamacpp-src/llama_cpp_python-0.3.36.tar.gz    # compiles llama.cpp
    /work/llamacpp-venv/bin/pip install "torch>=2.4,<2.14" transformers sentencepiece safetensors  # its converters

then, from the repository root:

    .venv/bin/python -m benchmarks.studies.serving_llamacpp [--steps 12] [--work-dir /tmp/gora-serving-llamacpp]

What it does (every command it runs is recorded in the results):
1. `gora finetune --preset smollm2-gsm` for a few steps: SmolLM2-135M-Instruct (float32), GoRA on all 7 projections
   of its 30 layers, GSM8K-style problems. The run writes adapter/ (rank_pattern, rsLoRA) and adapter-serving/.
2. llama.cpp's own converters (vendor/llama.cpp of the sdist): the base to a float32 GGUF (convert_hf_to_gguf.py),
   adapter/ and adapter-serving/ to float32 GGUF LoRA adapters (convert_lora_to_gguf.py).
3. Next-token logits at every position of held-out prompts, from llama.cpp (base alone, base + each adapter; float32
   KV cache, the same token ids as PEFT) and from transformers/PEFT (base alone, base + adapter/): max |Δlogit| and
   top-1 agreement per prompt, and how far the adapter moves PEFT's logits (so a match is not that of two bases).

Results: benchmarks/results/serving_llamacpp.json (machine, versions, date, git commit, commands).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
LLAMA_CPP_PYTHON = "0.3.36"
INSTALL = [
    f"pip download --no-deps --no-binary :all: llama-cpp-python=={LLAMA_CPP_PYTHON} -d {{src}}",
    f"tar xzf {{src}}/llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz -C {{src}}",
    "{python} -m venv {venv}",
    f"{{venv}}/bin/pip install {{src}}/llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz",
    '{venv}/bin/pip install "torch>=2.4,<2.14" transformers sentencepiece safetensors',
]
GENERIC_PROMPTS = ["The capital of France is", "Write one sentence about the sea."]


def run(command: list[str], log: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """Run `command`, record it (as a shell line) in `log`, fail loudly with its output."""
    log.append(shlex.join(command))
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return done


def install(src: Path, venv: Path, log: list[str]) -> None:
    """Download the sdist and build llama-cpp-python in `venv` (several minutes on 2 cores), plus the converters'
    dependencies."""
    src.mkdir(parents=True, exist_ok=True)
    for line in INSTALL:
        command = line.format(src=src, venv=venv, python=sys.executable)
        if "pip download" in command:
            command = f"{sys.executable} -m {command}"
        log.append(command)
        subprocess.run(command, shell=True, check=True)


def prompt_settings(args: argparse.Namespace, token_ids: list[list[int]], start: int) -> dict[str, Any]:
    """The settings a serving study records about its model, fine-tune and prompts (llama.cpp's and vLLM's alike)."""
    return {
        "model": "SmolLM2-135M-Instruct float32 (gora.app.assets.smollm2_path)",
        "steps": args.steps,
        "threads": args.threads,
        "prompts": len(token_ids),
        "gsm_prompts": args.gsm_prompts,
        "response_tokens": args.response_tokens,
        "tokens_per_prompt": [len(t) for t in token_ids],
        "shared_prefix_tokens": start + 1,
        "positions_compared": "per prompt: from the position predicting its first own token to its end",
    }


def finetune(work: Path, steps: int, threads: int, log: list[str]) -> Path:
    """A short real GoRA fine-tune with the `gora` command; returns its output folder."""
    run_dir = work / "run"
    argv = [
        "finetune",
        "--preset", "smollm2-gsm",
        "--output-dir", str(run_dir),
        "--overwrite",
        "--max-steps", str(steps),
        "--batch-size", "4",
        "--max-length", "256",
        "--max-train-samples", str(4 * steps),
        "--learning-rate", "1e-3",
        "--max-eval-samples", "1",
        "--max-new-tokens", "1",
        "--no-eval-before",
        "--save-strategy", "no",
        "--logging-steps", "1",
        "--threads", str(threads),
        "-q",
    ]  # fmt: skip
    run([sys.executable, "-m", "gora", *argv], log, cwd=ROOT)
    return run_dir


def prompts(tokenizer: Any, n_gsm: int, response_tokens: int) -> list[list[int]]:
    """Token ids: held-out GSM-style problems in the chat format the adapter was trained on, each followed by the
    first `response_tokens` tokens of its worked solution (the adapter's effect is largest there), plus plain text."""
    from gora.app.assets import gsm_symbolic
    from gora.app.tasks.sft_formats import prompt_and_response_text

    out = []
    for row in gsm_symbolic(n_gsm, seed=1000):  # training problems are drawn with seed 0
        head, tail = prompt_and_response_text(tokenizer, row["prompt"], row["response"])
        ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        out.append(ids + tokenizer(tail, add_special_tokens=False)["input_ids"][:response_tokens])
    for text in GENERIC_PROMPTS:
        head, _ = prompt_and_response_text(tokenizer, text)
        out.append(tokenizer(head, add_special_tokens=False)["input_ids"])
    return out


@torch.no_grad()
def peft_logits(base: str, adapter: Path | None, token_ids: list[list[int]]) -> list[torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    return [model(torch.tensor([ids])).logits[0].float() for ids in token_ids]


def shared_prefix(token_ids: list[list[int]]) -> int:
    """Length of the token prefix that every prompt starts with (the chat template's system turn)."""
    n = 0
    while all(len(ids) > n and ids[n] == token_ids[0][n] for ids in token_ids):
        n += 1
    return n


def compare(got: torch.Tensor, want: torch.Tensor, start: int = 0) -> dict[str, float]:
    """max |Δlogit| and top-1 agreement over positions `start`.. (and at the last position), and the scale."""
    got, want = got[start:], want[start:]
    diff = (got - want).abs()
    agree = got.argmax(-1) == want.argmax(-1)
    return {
        "max_abs_diff": float(diff.max()),
        "max_abs_diff_last": float(diff[-1].max()),
        "top1_agreement": float(agree.float().mean()),
        "top1_agree_last": bool(agree[-1]),
        "max_abs_logit": float(want.abs().max()),
    }


def summarize(rows: list[dict[str, float]]) -> dict[str, float]:
    return {
        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
        "max_abs_diff_last": max(r["max_abs_diff_last"] for r in rows),
        "top1_agreement": sum(r["top1_agreement"] for r in rows) / len(rows),
        "top1_agree_last": sum(r["top1_agree_last"] for r in rows) / len(rows),
        "max_abs_logit": max(r["max_abs_logit"] for r in rows),
    }


def git_commit() -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return head + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/gora-serving-llamacpp"))
    parser.add_argument("--llamacpp-venv", type=Path, default=Path("/work/llamacpp-venv"))
    parser.add_argument("--llamacpp-src", type=Path, default=Path("/work/llamacpp-src"))
    parser.add_argument("--install", action="store_true", help="download and build llama-cpp-python first")
    parser.add_argument("--steps", type=int, default=12, help="training steps of the GoRA fine-tune")
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    parser.add_argument("--gsm-prompts", type=int, default=4)
    parser.add_argument("--response-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serving_llamacpp.json")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    import gora
    from benchmarks.harness.measure import machine, now, versions
    from gora.app.assets import smollm2_path

    torch.set_num_threads(args.threads)
    commands: list[str] = []
    started, load_before, commit = now(), os.getloadavg()[0], git_commit()  # the code that runs
    if args.install:
        install(args.llamacpp_src, args.llamacpp_venv, commands)
    python = str(args.llamacpp_venv / "bin/python")
    vendor = args.llamacpp_src / f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp"
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    base = smollm2_path()

    t0 = time.perf_counter()
    run_dir = finetune(work, args.steps, args.threads, commands)
    train_s = time.perf_counter() - t0
    report = json.loads((run_dir / "report.json").read_text())
    adapters = {"original": run_dir / "adapter", "export": run_dir / "adapter-serving"}

    ggufs = {"base": work / "base-f32.gguf", **{k: work / f"{k}-f32.gguf" for k in adapters}}
    run(
        [python, str(vendor / "convert_hf_to_gguf.py"), base, "--outtype", "f32", "--outfile", str(ggufs["base"])],
        commands,
    )
    for name, folder in adapters.items():
        convert = [python, str(vendor / "convert_lora_to_gguf.py"), str(folder), "--base", base, "--outtype", "f32"]
        run([*convert, "--outfile", str(ggufs[name])], commands)

    tokenizer = AutoTokenizer.from_pretrained(base)
    token_ids = prompts(tokenizer, args.gsm_prompts, args.response_tokens)
    spec = {
        "base": str(ggufs["base"]),
        "variants": {"base": None, "original": str(ggufs["original"]), "export": str(ggufs["export"])},
        "prompts": token_ids,
        "threads": args.threads,
    }
    (work / "spec.json").write_text(json.dumps(spec))
    done = run(
        [
            python,
            str(ROOT / "benchmarks/studies/llamacpp_logits.py"),
            str(work / "spec.json"),
            str(work / "llamacpp.npz"),
        ],
        commands,
    )
    system_info = json.loads(done.stdout.strip().splitlines()[-1])["system_info"]

    import numpy as np

    cpp = np.load(work / "llamacpp.npz")
    hf = {
        "base": peft_logits(base, None, token_ids),
        "original": peft_logits(base, adapters["original"], token_ids),
        "export": peft_logits(base, adapters["export"], token_ids),
    }
    # llama.cpp's variant -> what it must equal: the base model, and for both adapters PEFT with the original adapter
    reference = {"base": hf["base"], "original": hf["original"], "export": hf["original"]}
    # from the position that predicts each prompt's first own token: the shared chat-template prefix counts once
    start = max(shared_prefix(token_ids) - 1, 0)
    n = range(len(token_ids))
    per_prompt = {
        variant: [compare(torch.from_numpy(cpp[f"{variant}/{i}"]), want[i], start) for i in n]
        for variant, want in reference.items()
    }
    adapter_effect = [compare(hf["original"][i], hf["base"][i], start) for i in n]
    peft_export = [compare(hf["export"][i], hf["original"][i], start) for i in n]
    prefix = {  # the shared prefix itself, once (prompt 0)
        variant: compare(torch.from_numpy(cpp[f"{variant}/0"])[: start + 1], want[0][: start + 1])
        for variant, want in reference.items()
    }

    serving = report["serving"]
    ranks = sorted(serving["ranks"].values())
    versions_ = versions()
    llama_cpp_version = run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"], []).stdout.strip()
    vendor_commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=vendor
    ).stdout.strip()
    results = {
        "benchmark": "serving_llamacpp",
        "date": started,
        "finished": now(),
        "git_commit": commit,
        "machine": {**machine(), "load_avg_1m_before": round(load_before, 2)},
        "versions": {
            **versions_,
            "gora": gora.__version__,
            "llama-cpp-python": llama_cpp_version,
            "llama.cpp (vendored commit)": vendor_commit,
        },
        "llamacpp_system_info": system_info,
        "commands": commands,
        "settings": {
            **prompt_settings(args, token_ids, start),
            "llamacpp": "float32 GGUFs, float32 KV cache, logits_all, the same token ids as PEFT",
        },
        "adapter": {
            "layers": len(ranks),
            "rank_min": ranks[0],
            "rank_max": ranks[-1],
            "distinct_ranks": len(set(ranks)),
            "export_rank": serving["rank"],
            "vllm_max_lora_rank": serving["vllm_max_lora_rank"],
            "scaling_min": min(serving["scalings"].values()),
            "scaling_max": max(serving["scalings"].values()),
            "train_s": round(train_s, 1),
            "train_loss": [e["loss"] for e in report["log_history"] if "loss" in e],
        },
        "summary": {
            **{f"llamacpp_{k}_vs_peft": summarize(v) for k, v in per_prompt.items()},
            "adapter_effect_peft": summarize(adapter_effect),
            "peft_export_vs_peft_original": summarize(peft_export),
        },
        "shared_prefix": {f"llamacpp_{k}_vs_peft": v for k, v in prefix.items()},
        "per_prompt": {
            **{f"llamacpp_{k}_vs_peft": v for k, v in per_prompt.items()},
            "adapter_effect_peft": adapter_effect,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"], indent=2))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
