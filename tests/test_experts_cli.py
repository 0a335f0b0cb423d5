"""The command line on a mixture-of-experts model (docs/moe.md): `gora finetune --target-parameters all-experts`
trains GoRA on attention and the fused experts of a tiny config-built Mixtral end to end; `--resume` after a
failure equals the uninterrupted run; `gora merge` computes what base + adapter computes; `gora export` refuses,
naming the engines."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import transformers

from _tiny_folders import save_mixtral, sum_rows, write_jsonl
from gora.app.commands.cli import main
from helpers import assert_close, needs_fused_experts

pytestmark = needs_fused_experts
STEPS = 4


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("moe")
    return {"model": save_mixtral(folder / "mixtral"), "data": write_jsonl(folder / "sums.jsonl", sum_rows(40))}


def _options(inputs: dict[str, Path], *, gamma: bool = True) -> list[str]:
    """The run's options; with `gamma`, GoRA's gamma='auto' (else the method's own options are added by the test)."""
    return [
        *["--model", str(inputs["model"]), "--task", "sft", "--train-file", str(inputs["data"])],
        *["--target-modules", "q_proj", "v_proj", "--target-parameters", "all-experts"],
        *["--r", "4", "--min-rank", "1", "--max-rank", "8", "--num-batches", "2", "--batch-size", "4"],
        *(["--gamma", "auto", "--gamma-batches", "2"] if gamma else []),
        *["--max-steps", str(STEPS), "--save-strategy", "steps", "--save-steps", "2", "--logging-steps", "1"],
        *["--threads", "1", "-q", "--no-eval-before"],
    ]


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(argv)
    return status, err.getvalue()


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter/adapter_model.safetensors"))


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    status, err = _run(["finetune", *_options(inputs), "--output-dir", str(out)])
    assert status == 0, err
    return out


def test_finetune_trains_attention_and_experts(finished, inputs):
    """Protects the CLI path: the adapter holds PEFT's target_parameters for the 4 expert stacks with GoRA's ranks
    (rank_pattern), gamma='auto' chose a γ, the record reports the budget over E matrices, and the report says
    where it can be served (PEFT; vLLM >= 0.32 on a GPU, not run here) and where not (llama.cpp; no adapter-serving/
    folder)."""
    config = json.loads((finished / "adapter/adapter_config.json").read_text())
    stacks = {f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")}
    assert set(config["target_parameters"]) == stacks
    assert stacks <= set(config["rank_pattern"])
    record = json.loads((finished / "adapter/gora_record.json").read_text())
    assert all(len(record["shapes"][s]) == 3 for s in stacks)
    assert isinstance(record["gamma"], float)
    report = json.loads((finished / "report.json").read_text())
    engines = {e["engine"]: e for e in report["serving"]["engines"]}
    assert engines["PEFT"]["servable"] and not engines["llama.cpp"]["servable"]
    assert engines["vLLM"]["servable"] and "vLLM >= 0.32.0 on a GPU" in engines["vLLM"]["note"]
    assert "Not run here" in engines["vLLM"]["note"]
    assert not (finished / "adapter-serving").exists() and "adapter_serving" not in report["outputs"]
    lora = _adapter(finished)
    assert any(".mlp.experts." in k for k in lora)


def test_resume_after_a_failure_equals_the_uninterrupted_run(finished, inputs, tmp_path, monkeypatch):
    """Protects resume with expert adapters: a run that fails at step 3 keeps checkpoint-2, and `--resume` then
    finishes with the adapter of the uninterrupted run, bit for bit (one thread, same order of computations)."""
    out = tmp_path / "run"
    original = transformers.Trainer.training_step
    failed = []

    def training_step(self, *args, **kwargs):
        if self.state.global_step == 2 and not failed:
            failed.append(True)
            raise RuntimeError("injected failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", training_step)
    status, err = _run(["finetune", *_options(inputs), "--output-dir", str(out)])
    assert status != 0 and "injected failure" in err and failed
    assert (out / "checkpoints/checkpoint-2").is_dir()
    status, err = _run(["finetune", "--resume", str(out), "-q"])
    assert status == 0, err
    got, want = _adapter(out), _adapter(finished)
    assert got.keys() == want.keys()
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key


def test_merge_computes_base_plus_adapter_and_export_refuses(finished, inputs, tmp_path, capsys):
    """Protects `gora merge` on expert adapters (the merged Mixtral gives the PeftModel's logits) and `gora export`
    (exit 2, naming vLLM and llama.cpp, nothing written)."""
    from peft import PeftModel

    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(finished / "adapter"), "--output-dir", str(out)]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(inputs["model"])
    peft_model = PeftModel.from_pretrained(base, finished / "adapter").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert_close(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=1e-5)
    capsys.readouterr()
    export = tmp_path / "export"
    assert main(["export", "--adapter", str(finished / "adapter"), "--output-dir", str(export)]) == 2
    assert "vLLM or llama.cpp" in capsys.readouterr().err
    assert not export.exists()


def test_rslora_baseline_adapts_the_same_expert_stacks(inputs, tmp_path):
    """Protects the baseline of the paired comparison: `--method rslora` adapts the same modules and expert stacks
    at rank r, and its LoRA parameter count r·Σ E_i·(m_i + n_i) is what PEFT trains."""
    out = tmp_path / "rslora"
    argv = ["finetune", *_options(inputs, gamma=False), "--method", "rslora", "--max-steps", "1"]
    status, err = _run([*argv, "--output-dir", str(out)])
    assert status == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["params"]["adapter"] == report["params"]["trainable_total"]
    config = json.loads((out / "adapter/adapter_config.json").read_text())
    assert len(config["target_parameters"]) == 4 and config["use_rslora"]


def test_allocate_reports_expert_stacks_at_loras_budget(inputs, tmp_path):
    """Protects `gora allocate` on a MoE model: the report's parameter counts are over E matrices per stack
    (LoRA at r on the same targets = r·Σ E_i·(m_i + n_i)), and every stack has a rank."""
    out = tmp_path / "allocate"
    argv = ["allocate", "--model", str(inputs["model"]), "--task", "sft", "--train-file", str(inputs["data"])]
    argv += ["--target-modules", "q_proj", "v_proj", "--target-parameters", "all-experts", "--r", "4"]
    argv += ["--min-rank", "1", "--num-batches", "2", "--threads", "1", "-q", "--output-dir", str(out)]
    status, err = _run(argv)
    assert status == 0, err
    report = json.loads((out / "report.json").read_text())
    # computed from the model: q_proj and v_proj of 2 layers, and 2 stacks of E matrices per layer
    model = transformers.AutoModelForCausalLM.from_pretrained(inputs["model"])
    q, v = model.model.layers[0].self_attn.q_proj.weight.shape, model.model.layers[0].self_attn.v_proj.weight.shape
    experts = model.model.layers[0].mlp.experts
    stacks = sum(p.shape[0] * (p.shape[1] + p.shape[2]) for p in (experts.gate_up_proj, experts.down_proj))
    assert report["params"]["lora_same_r"] == 4 * 2 * (sum(q) + sum(v) + stacks)
    assert sum("experts" in name for name in report["ranks"]) == 4
