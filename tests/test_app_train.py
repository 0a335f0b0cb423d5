"""gora.app.run.train: the LoRA+ optimizer (lora_B at ratio x the learning rate of lora_A); the command with bfloat16
models, 4-bit bases, gradient accumulation and checkpointing, and the Trainer's logging integrations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from _tiny_folders import save_bert, save_llama, sentiment_rows, sum_rows, write_jsonl
from gora.app.commands.cli import main, print_finetune
from gora.app.run.adapters import make_optimizer
from gora.app.tasks.models import cpu_supports_bf16
from gora.gamma import StartCheck
from helpers import assert_close, make_bert


def _lora_bert():
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    return get_peft_model(make_bert(), config)


@pytest.mark.parametrize("ratio", [2.0, 16.0])
def test_loraplus_groups_give_B_ratio_times_As_lr(ratio):
    """Protects LoRA+: every lora_B weight sits in a group at ratio x lr, every lora_A weight at lr, and every
    trainable parameter is in exactly one group."""
    model = _lora_bert()
    optimizer = make_optimizer(model, learning_rate=1e-3, loraplus_lr_ratio=ratio)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(lr_of) == len(named) == sum(len(g["params"]) for g in optimizer.param_groups)
    a = [lr_of[id(p)] for n, p in named.items() if "lora_A" in n]
    b = [lr_of[id(p)] for n, p in named.items() if "lora_B" in n]
    assert a and b
    assert a == [pytest.approx(1e-3)] * len(a) and b == [pytest.approx(1e-3 * ratio)] * len(b)


def test_no_loraplus_ratio_means_trainer_default():
    """Protects "off by default": without a ratio no optimizer is built and the Trainer makes its own."""
    assert make_optimizer(_lora_bert(), learning_rate=1e-3) is None


# --- the command on the stacks people train with: precision, 4-bit bases, accumulation, checkpointing, logging -----
# (CPU here; benchmarks/studies/gpu_check.py runs the bf16 and 4-bit paths on a GPU)

FAST = ["-q", "--threads", "1", "--no-eval-before", "--save-strategy", "no", "--logging-steps", "1"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("stacks")
    return {
        "bert": save_bert(folder / "bert"),
        "llama": save_llama(folder / "llama"),
        # bitsandbytes quantizes 4-bit in blocks of 64 inputs
        "llama64": save_llama(folder / "llama64", hidden_size=64, intermediate_size=128),
        "cls": write_jsonl(folder / "cls.jsonl", sentiment_rows(48)),
        "sums": write_jsonl(folder / "sums.jsonl", sum_rows(40)),
    }


def _sft(folders: dict[str, Path], model: str = "llama") -> list[str]:
    return ["--model", str(folders[model]), "--task", "sft", "--train-file", str(folders["sums"])]


def _adapter(run: Path, folder: str = "adapter") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / folder / "adapter_model.safetensors"))


def _assert_same_adapter(a: Path, b: Path, folder: str = "adapter") -> None:
    got, want = _adapter(a, folder), _adapter(b, folder)
    assert got.keys() == want.keys()
    for key, tensor in want.items():
        assert_close(got[key], tensor, rtol=1e-4, msg=key)


def test_gradient_accumulation_equals_the_larger_batch(folders, tmp_path):
    """Protects --gradient-accumulation-steps: batches of 4 accumulated twice train the adapter that batches of 8
    train (with the same 8 examples per step: GoRA at twice the batches of half the size gives the same G), for a
    causal LM (loss over the learned tokens) and for sequence classification (a mean over examples, which the
    Trainer of transformers 5 would otherwise leave unscaled by the accumulation steps)."""
    runs = {
        "cls": [
            "--model",
            str(folders["bert"]),
            "--train-file",
            str(folders["cls"]),
            "--target-modules",
            "query",
            "value",
        ],
        "sft": [*_sft(folders), "--target-modules", "q_proj", "v_proj"],
    }
    for name, data in runs.items():
        argv = ["finetune", *FAST, *data, "--max-steps", "3"]
        assert (
            main([*argv, "--batch-size", "8", "--num-batches", "2", "--output-dir", str(tmp_path / f"{name}8")]) == 0
        )
        accumulated = ["--batch-size", "4", "--num-batches", "4", "--gradient-accumulation-steps", "2"]
        assert main([*argv, *accumulated, "--output-dir", str(tmp_path / f"{name}4x2")]) == 0
        _assert_same_adapter(tmp_path / f"{name}4x2", tmp_path / f"{name}8")
        losses = [
            [e["loss"] for e in json.loads((tmp_path / run / "report.json").read_text())["log_history"] if "loss" in e]
            for run in (f"{name}8", f"{name}4x2")
        ]
        assert losses[1] == pytest.approx(losses[0], rel=1e-4)  # the logged loss too, not k times it


def test_gradient_checkpointing_is_active_and_changes_nothing_but_memory(folders, tmp_path, monkeypatch):
    """Protects --gradient-checkpointing: the Trainer trains with checkpointing on (seen in every training step) and
    the adapter is the one trained without it (the same computation, recomputed)."""
    import transformers

    seen, step = [], transformers.Trainer.training_step

    def training_step(self, *args, **kwargs):
        seen.append(self.model.get_base_model().is_gradient_checkpointing)
        return step(self, *args, **kwargs)

    argv = ["finetune", *FAST, *_sft(folders), "--target-modules", "q_proj", "v_proj", "--max-steps", "2"]
    assert main([*argv, "--output-dir", str(tmp_path / "plain")]) == 0
    monkeypatch.setattr(transformers.Trainer, "training_step", training_step)
    assert main([*argv, "--gradient-checkpointing", "--output-dir", str(tmp_path / "ckpt")]) == 0
    assert seen == [True, True]
    _assert_same_adapter(tmp_path / "ckpt", tmp_path / "plain")


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bfloat16")
def test_bfloat16_model_with_a_float32_adapter(folders, tmp_path):
    """Protects --dtype bfloat16: the base is loaded in bfloat16 and trained under bf16 autocast, GoRA's statistics
    and the adapter are float32 (step 0 and trained), and the saved adapter loads in plain PEFT onto the bfloat16
    base: float32 LoRA layers over bfloat16 weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    argv = ["finetune", *FAST, *_sft(folders), "--target-modules", "q_proj", "v_proj", "--max-steps", "2"]
    assert main([*argv, "--dtype", "bfloat16", "--eval-batch-size", "64", "--output-dir", str(out)]) == 0
    for folder in ("init", "adapter"):
        assert {t.dtype for t in _adapter(out, folder).values()} == {torch.float32}, folder
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(out / "init/gradient_stats.safetensors")).values()} == {torch.float32}
    base = AutoModelForCausalLM.from_pretrained(folders["llama"], dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    assert model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert model.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["data"]["dtype"] == "bfloat16" and report["metrics"]["after"]["loss"] > 0


def test_4bit_base_is_qgora(folders, tmp_path):
    """Protects --load-in-4bit: the model's linear layers are loaded in bitsandbytes NF4, the step-0 adapter is the
    one `gora.get_qgora_model` builds on that 4-bit model from the same batches, training works on the 4-bit base,
    and the adapter loads in plain PEFT onto a base that transformers quantized the same way (LoRA over Linear4bit)."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import gora
    from gora.app.run.adapters import estimation_loader
    from gora.app.run.runfolder import load_run_config
    from gora.app.tasks.data import load_task

    out = tmp_path / "q"
    argv = ["finetune", *FAST, *_sft(folders, "llama64"), "--target-modules", "q_proj", "v_proj", "--max-steps", "2"]
    assert main([*argv, "--load-in-4bit", "--output-dir", str(out)]) == 0
    _, data, train, config = load_run_config(out / "config.yaml")
    task = load_task(data, train, None)
    assert isinstance(task.model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    expected = gora.get_qgora_model(
        task.model, config, estimation_loader(task, train.batch_size, train.train_seed), show_progress=False
    )
    init = _adapter(out, "init")
    state = {k.replace(".default", ""): v for k, v in expected.state_dict().items() if "lora_" in k}
    assert init.keys() == state.keys()
    for key, tensor in state.items():
        assert_close(init[key], tensor, rtol=1e-5, msg=key)
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(folders["llama64"], quantization_config=nf4)
    reloaded = PeftModel.from_pretrained(base, out / "adapter")
    assert isinstance(reloaded.get_base_model().model.layers[0].self_attn.q_proj, LoraLinear4bit)
    losses = [e["loss"] for e in json.loads((out / "report.json").read_text())["log_history"] if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_8bit_base_trains_lora_over_linear8bitlt(folders, tmp_path):
    """Protects --load-in-8bit: the linear layers are loaded in bitsandbytes LLM.int8, GoRA estimates through the
    module hooks, training works, and the adapter loads in plain PEFT onto a base transformers quantized the same way
    (PEFT's 8-bit LoRA layers), computing what the run's final evaluation saw (its eval loss)."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from peft.tuners.lora.bnb import Linear8bitLt as LoraLinear8bitLt
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from gora.app.run.runfolder import load_run_config
    from gora.app.tasks.data import load_task
    from gora.app.tasks.evaluate import evaluate_loss

    out = tmp_path / "q8"
    argv = ["finetune", *FAST, *_sft(folders, "llama64"), "--target-modules", "q_proj", "v_proj", "--max-steps", "2"]
    assert main([*argv, "--load-in-8bit", "--output-dir", str(out)]) == 0
    _, data, train, _ = load_run_config(out / "config.yaml")
    task = load_task(data, train, None)
    assert isinstance(task.model.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    base = AutoModelForCausalLM.from_pretrained(
        folders["llama64"], quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    )
    reloaded = PeftModel.from_pretrained(base, out / "adapter")
    assert isinstance(reloaded.get_base_model().model.layers[0].self_attn.q_proj, LoraLinear8bitLt)
    report = json.loads((out / "report.json").read_text())
    loss = evaluate_loss(reloaded, task.eval_set, task.collator, train.eval_batch_size)
    assert loss == pytest.approx(report["metrics"]["after"]["loss"], rel=1e-5)
    assert main([*argv, "--load-in-8bit", "--load-in-4bit", "--output-dir", str(tmp_path / "both")]) == 2
    assert not (tmp_path / "both").exists()


def test_report_to_tensorboard(folders, tmp_path):
    """Protects --report-to: the Trainer's TensorBoard integration writes its event file into <output>/logs."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    argv = ["finetune", *FAST, *_sft(folders), "--target-modules", "q_proj", "v_proj", "--max-steps", "2"]
    assert main([*argv, "--report-to", "tensorboard", "--output-dir", str(out)]) == 0
    assert list((out / "logs").glob("events.out.tfevents.*"))


def test_start_check_in_report_and_summary(folders, tmp_path, capsys):
    """Protects the start check of `gora finetune`: report.json keeps the eval loss before training and after GoRA's
    initialization (the same numbers as its metrics) and whether the start raised it; a start that raised it is the
    summary's warning line, with the fix."""
    out = tmp_path / "run"
    argv = ["finetune", "-q", "--threads", "1", "--save-strategy", "no", *_sft(folders), "--max-steps", "1"]
    assert main([*argv, "--num-batches", "2", "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    check, metrics = report["start_check"], report["metrics"]
    assert check["base_loss"] == metrics["before"]["loss"] and check["init_loss"] == metrics["init"]["loss"]
    assert check["gamma"] == 5e-2 and check["source"] == "eval set"
    assert check["raised"] == (check["init_loss"] > check["base_loss"] * (1 + 1e-3))
    assert ("WARNING:" in capsys.readouterr().out) == check["raised"]
    raised = StartCheck(3.96, 5.14, 5e-2, "eval set")
    print_finetune({**report, "start_check": raised.to_dict()}, 1.0)
    text = capsys.readouterr().out
    assert f"WARNING: {raised.message()}" in text
    assert "from 3.9600 to 5.1400 (+1.1800, +29.8%)" in text and "--gamma auto" in text and "e.g. 0.0125" in text
