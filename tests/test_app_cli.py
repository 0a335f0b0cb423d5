"""The `gora` command end to end on tiny config-built models saved to folders, with data files written here.

Runs `gora.app.commands.cli.main(argv)` in-process (seconds). Bad input must exit with status 2, one message that says what to
change, and no output folder (nor a half-written temporary one) left behind.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from _tiny_folders import (
    CHAT_TEMPLATE,
    chat_rows,
    save_bert,
    save_llama,
    sentiment_rows,
    sum_rows,
    write_csv,
    write_jsonl,
)
from gora.app.commands.cli import main
from helpers import assert_close

FAST = ["--num-batches", "2", "--batch-size", "8", "--eval-batch-size", "16", "--logging-steps", "1", "-q"]
BERT_GORA = ["--target-modules", "query", "value", "--r", "4", "--min-rank", "2", "--max-rank", "8"]


FAST_ALLOCATE = ["--num-batches", "2", "--batch-size", "8", "-q"]


def _run(argv: list[str]) -> int:
    fast = {"finetune": FAST, "allocate": FAST_ALLOCATE}.get(argv[0], [])
    return main([argv[0], *fast, *argv[1:]])


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return save_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def cls_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", sentiment_rows(48))


@pytest.fixture(scope="module")
def gora_run(bert_dir, cls_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "gora"
    argv = ["finetune", "--model", str(bert_dir), "--train-file", str(cls_file), "--output-dir", str(out)]
    assert _run([*argv, *BERT_GORA, "--max-steps", "4"]) == 0
    return out


def test_finetune_classification_writes_a_complete_run(gora_run):
    """Protects the output contract: adapter + gora_record.json + tokenizer, report.json with every printed figure,
    the rank heatmap, the loss curve and a Trainer checkpoint."""
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/gora_record.json",
        "adapter/tokenizer.json",
        "adapter-serving/adapter_config.json",
        "adapter-serving/adapter_model.safetensors",
        "report.json",
        "ranks.png",
        "loss.png",
    ):
        assert (gora_run / name).is_file(), name
    assert list((gora_run / "checkpoints").glob("checkpoint-*"))
    report = json.loads((gora_run / "report.json").read_text())
    assert report["method"] == "gora" and report["metric"] == "accuracy"
    assert set(report["metrics"]) == {"before", "init", "after"}
    assert 0 <= report["metrics"]["after"]["accuracy"] <= 1
    params = report["params"]
    assert params["lora_same_r"] == 4 * 2 * 2 * (32 + 32)  # r · layers · (q, v) · (m + n)
    assert params["ratio_to_lora"] == pytest.approx(params["adapter"] / params["lora_same_r"])
    assert set(report["rank_table"]["module_types"]) == {"attention.self.query", "attention.self.value"}
    assert {"load_s", "gora_estimate_s", "train_s", "eval_after_s"} <= set(report["timings_s"])
    assert [e["loss"] for e in report["log_history"] if "loss" in e]  # the loss curve's data
    assert not list(gora_run.parent.glob(".*partial*"))
    serving = report["serving"]
    assert serving["output_dir"] == str(gora_run / "adapter-serving") and report["outputs"]["adapter_serving"]
    assert serving["ranks"] == {k: v for k, v in params["ranks"].items() if v > 0}
    assert serving["rank"] == max(serving["ranks"].values())
    exported = json.loads((gora_run / "adapter-serving/adapter_config.json").read_text())
    assert exported["r"] == exported["lora_alpha"] == serving["rank"] and exported["use_rslora"] is False


def test_finetune_prints_the_summary(bert_dir, cls_file, tmp_path, capsys):
    """Protects the end-of-run summary: metric before/after, parameters against LoRA, stage times, outputs."""
    out = tmp_path / "run"
    argv = ["finetune", "--model", str(bert_dir), "--train-file", str(cls_file), "--output-dir", str(out)]
    assert _run([*argv, *BERT_GORA, "--max-steps", "1", "--save-strategy", "no"]) == 0
    text = capsys.readouterr().out
    assert "accuracy: before training" in text and "after training" in text
    assert "vs LoRA at r" in text and "time: load" in text and f"folder {out}" in text
    assert "attention.self.query" in text  # the rank table
    assert "'loss'" not in text  # -q: the Trainer's log lines are in report.json, not printed
    deploy = text[text.index("deploy:") :]
    assert f"PEFT -> {out / 'adapter'}" in deploy  # not "PEFT and vLLM": vLLM refuses the classification head
    assert f"vLLM < 0.32, SGLang and llama.cpp -> {out / 'adapter-serving'}" in deploy
    assert "vLLM: NOT servable: modules_to_save" in deploy


def test_method_lora_uses_the_same_targets_and_rank(gora_run, bert_dir, cls_file, tmp_path):
    """Protects the side-by-side comparison: --method lora adapts the very modules GoRA adapted, at rank r with
    PEFT's default α/r scaling, and reports the same LoRA parameter count."""
    out = tmp_path / "lora"
    argv = ["finetune", "--model", str(bert_dir), "--train-file", str(cls_file), "--output-dir", str(out)]
    assert _run([*argv, *BERT_GORA, "--max-steps", "1", "--method", "lora", "--save-strategy", "no"]) == 0
    lora = json.loads((out / "adapter/adapter_config.json").read_text())
    gora = json.loads((gora_run / "adapter/adapter_config.json").read_text())
    assert sorted(lora["target_modules"]) == sorted(gora["target_modules"])
    assert lora["r"] == 4 and lora["use_rslora"] is False and not lora["rank_pattern"]
    assert gora["use_rslora"] is True
    report = json.loads((out / "report.json").read_text())
    assert report["params"]["adapter"] == report["params"]["lora_same_r"]
    assert "init" not in report["metrics"]


def test_finetune_sft_on_csv(llama_dir, tmp_path):
    """Protects the causal-LM path: prompt/response CSV, loss on the response only; the eval loss is the metric on
    one's own data (no generation), exact match on request, generating for at most --max-eval-samples examples."""
    data = write_csv(tmp_path / "sums.csv", sum_rows(24))
    out = tmp_path / "sft"
    argv = ["finetune", "--model", str(llama_dir), "--task", "sft", "--train-file", str(data)]
    argv += ["--target-modules", "q_proj", "v_proj", "--r", "4", "--max-steps", "2", "--save-strategy", "no"]
    assert _run([*argv, "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "sft" and report["metric"] == "loss" and report["sources"]["format"] == "prompt-response"
    assert set(report["metrics"]["after"]) == {"loss"}
    assert report["sizes"] == {"train": 21, "eval": 3}  # 10% held out, rounded up
    assert json.loads((out / "adapter/adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    engines = {e["engine"]: e for e in report["serving"]["engines"]}
    assert engines["vLLM"]["servable"] and engines["llama.cpp"]["servable"]
    assert f"--max-lora-rank {report['serving']['vllm_max_lora_rank']}" in engines["vLLM"]["note"]

    em = tmp_path / "em"
    extra = [
        "--eval-metric",
        "exact_match",
        "--max-new-tokens",
        "4",
        "--eval-file",
        str(data),
        "--max-eval-samples",
        "5",
    ]
    assert _run([*argv, *extra, "--output-dir", str(em)]) == 0
    after = json.loads((em / "report.json").read_text())["metrics"]["after"]
    assert after["generated"] == 5 and 0 <= after["exact_match"] <= 1 and "loss" in after


def test_export_command_prints_each_engines_command(llama_dir, tmp_path, capsys):
    """Protects `gora export`: it writes the export at the asked rank and prints the --max-lora-rank vLLM needs (the
    smallest allowed value >= R) and the llama.cpp conversion command for the adapter's base model."""
    data = write_jsonl(tmp_path / "sums.jsonl", sum_rows(16))
    run = tmp_path / "run"
    argv = [
        "finetune",
        "--model",
        str(llama_dir),
        "--task",
        "sft",
        "--train-file",
        str(data),
        "--output-dir",
        str(run),
    ]
    argv += ["--target-modules", "q_proj", "v_proj", "--r", "4", "--max-steps", "1", "--no-eval-before"]
    assert _run([*argv, "--max-new-tokens", "2", "--save-strategy", "no"]) == 0
    capsys.readouterr()
    out = tmp_path / "served"
    assert main(["export", "--adapter", str(run / "adapter"), "--output-dir", str(out), "--rank", "17"]) == 0
    text = capsys.readouterr().out
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 17
    assert "zero-padded to R = 17" in text and "--max-lora-rank 32" in text
    assert f"convert_lora_to_gguf.py {out} --base {llama_dir}" in text


def test_finetune_on_chat_messages(tmp_path):
    """Protects SFT on chat data as TRL users have it: a `messages` column is found by itself, trained with the loss
    on the assistant turns through the model's chat template, and scored by exact match of the last assistant
    answer when asked."""
    chat = save_llama(tmp_path / "chat", chat_template=CHAT_TEMPLATE)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(24))
    out = tmp_path / "run"
    argv = ["finetune", "--model", str(chat), "--task", "sft", "--train-file", str(data), "--output-dir", str(out)]
    argv += ["--target-modules", "q_proj", "v_proj", "--max-steps", "2", "--save-strategy", "no"]
    assert _run([*argv, "--eval-metric", "exact_match", "--max-new-tokens", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sources"]["format"] == "messages" and report["metric"] == "exact_match"
    assert report["metrics"]["after"]["generated"] == 3 and report["metrics"]["after"]["examples"][0]["answer"]


def test_allocate_reuses_saved_statistics(bert_dir, cls_file, tmp_path, capsys):
    """Protects --save-stats/--load-stats: a second allocation at another r reads the statistics instead of
    estimating, and matches an allocation estimated from scratch at that r."""
    stats = tmp_path / "stats.safetensors"
    base = ["allocate", "--model", str(bert_dir), "--train-file", str(cls_file), "--target-modules", "query", "value"]
    assert _run([*base, "--output-dir", str(tmp_path / "a1"), "--save-stats", str(stats)]) == 0
    assert stats.is_file() and (tmp_path / "a1/ranks.png").is_file() and (tmp_path / "a1/config.yaml").is_file()
    assert _run([*base, "--output-dir", str(tmp_path / "a2"), "--load-stats", str(stats), "--r", "2"]) == 0
    assert _run([*base, "--output-dir", str(tmp_path / "a3"), "--r", "2"]) == 0
    reused, fresh = (json.loads((tmp_path / f"{n}/report.json").read_text()) for n in ("a2", "a3"))
    assert "estimate_s" not in reused["timings_s"] and "load_stats_s" in reused["timings_s"]
    assert reused["ranks"] == fresh["ranks"]
    assert "attention.self.value" in capsys.readouterr().out


def _adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter/adapter_model.safetensors"))


def test_finetune_reuses_saved_statistics(bert_dir, cls_file, tmp_path, capsys):
    """Protects `gora finetune --load-stats`: statistics saved by `gora allocate --save-stats` (same batches) give
    the same ranks, gamma='auto' choice and adapter weights as a fine-tune that estimated them itself, without
    estimating again."""
    stats = tmp_path / "stats.safetensors"
    data = ["--model", str(bert_dir), "--train-file", str(cls_file), *BERT_GORA, "--gamma", "auto"]
    data += ["--gamma-batches", "2"]
    assert _run(["allocate", *data, "--output-dir", str(tmp_path / "alloc"), "--save-stats", str(stats)]) == 0
    runs = {"fresh": [], "reused": ["--load-stats", str(stats)]}
    for name, extra in runs.items():
        argv = ["finetune", *data, "--max-steps", "2", "--no-eval-before", "--output-dir", str(tmp_path / name)]
        assert _run([*argv, *extra]) == 0
    fresh, reused = (json.loads((tmp_path / f"{n}/report.json").read_text()) for n in runs)
    assert "gora_estimate_s" in fresh["timings_s"]
    assert "gora_estimate_s" not in reused["timings_s"] and "load_stats_s" in reused["timings_s"]
    assert reused["params"]["ranks"] == fresh["params"]["ranks"]
    assert reused["gora"]["gamma"] == fresh["gora"]["gamma"]
    weights = {n: _adapter_tensors(tmp_path / n) for n in runs}
    assert weights["reused"].keys() == weights["fresh"].keys()
    for key, tensor in weights["fresh"].items():
        # the same statistics (bit for bit through safetensors) and the same code; the solve may take other BLAS kernels
        # for tensors at other memory addresses, so equal up to float rounding
        assert_close(weights["reused"][key], tensor, rtol=1e-5, msg=key)
    assert f"reused from {stats}" in capsys.readouterr().out


def test_finetune_refuses_statistics_of_another_model(bert_dir, cls_file, tmp_path, capsys):
    """Protects the fingerprint check on `gora finetune --load-stats`: statistics estimated on another model (same
    architecture, other weights), for other target modules, or a sketch drawn with another seed are refused with
    status 2, a message saying what differs, and no output folder."""
    other = save_bert(tmp_path / "other", seed=1)
    stats, sketch = tmp_path / "other.safetensors", tmp_path / "sketch.safetensors"
    base = ["--train-file", str(cls_file), *BERT_GORA]
    sketched = ["--gradient-store", "sketch", "--sketch-samples", "16", "--seed", "3", "--save-stats", str(sketch)]
    assert _run(["allocate", "--model", str(other), *base, "--output-dir", str(tmp_path / "s"), *sketched]) == 0
    saved = ["--output-dir", str(tmp_path / "a"), "--save-stats", str(stats)]
    assert _run(["allocate", "--model", str(other), *base, *saved]) == 0
    capsys.readouterr()
    cases = {  # name: (model, extra options, what the message must say)
        "another model": (bert_dir, [], "different model"),
        "other targets": (other, ["--target-modules", "query"], "--target-modules"),
        "sketch of another seed": (other, ["--gradient-store", "sketch", "--load-stats", str(sketch)], "--seed 3"),
    }
    for name, (model, extra, expected) in cases.items():
        out = tmp_path / name.replace(" ", "-")
        argv = ["finetune", "--model", str(model), *base, "--output-dir", str(out), "--load-stats", str(stats)]
        assert _run([*argv, *extra]) == 2, name
        err = capsys.readouterr().err
        assert "--load-stats" in err and expected in err, err
        assert not out.exists() and not list(tmp_path.glob(".*partial*")), name


def test_config_yaml_repeats_the_run(gora_run, tmp_path):
    """Protects config.yaml: the run folder's effective configuration, given back with --config (and only a new
    --output-dir), repeats the run: the same configuration in report.json, the same ranks and the same adapter
    (the same computation on the same machine; equal up to float rounding, as BLAS may pick other kernels)."""
    again = tmp_path / "again"
    assert main(["finetune", "-q", "--config", str(gora_run / "config.yaml"), "--output-dir", str(again)]) == 0
    first, second = (json.loads((run / "report.json").read_text()) for run in (gora_run, again))
    assert {**second["config"], "train": {**second["config"]["train"], "output_dir": None}} == {
        **first["config"],
        "train": {**first["config"]["train"], "output_dir": None},
    }
    assert second["params"]["ranks"] == first["params"]["ranks"]
    weights = {run: _adapter_tensors(run) for run in (gora_run, again)}
    assert weights[again].keys() == weights[gora_run].keys()
    for key, tensor in weights[gora_run].items():
        assert_close(weights[again][key], tensor, rtol=1e-5, msg=key)
    assert (again / "config.yaml").read_text() == (gora_run / "config.yaml").read_text()


def test_config_file_with_options_over_it(bert_dir, cls_file, tmp_path):
    """Protects `--config run.yaml` written by hand: its values apply, options on the line override them, and the
    preset stays under both."""
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {bert_dir}\ntrain_file: {cls_file}\ntarget_modules: [query, value]\nr: 2\nmax_steps: 1\n"
        "save_strategy: 'no'\nlearning_rate: 1.0e-3\n"
    )
    out = tmp_path / "run"
    assert _run(["finetune", "--config", str(config), "--r", "4", "--output-dir", str(out), "--no-eval-before"]) == 0
    train = json.loads((out / "report.json").read_text())["config"]
    assert train["gora"]["r"] == 4 and train["train"]["learning_rate"] == 1e-3  # the line over the file
    assert train["gora"]["target_modules"] == ["query", "value"] and train["train"]["max_steps"] == 1
    assert train["train"]["threads"] == 1 and train["preset"] == "minilm-rt"  # the preset under both


def _adapted_logits(run: Path, texts: list[str]) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base_path = json.loads((run / "adapter/adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2)
    adapted = PeftModel.from_pretrained(base, run / "adapter").eval()
    batch = AutoTokenizer.from_pretrained(run / "adapter")(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return adapted(**batch).logits


TEXTS = ["the movie was good fun", "the film was dull"]


def test_merge_gives_the_same_logits(gora_run, cls_file, tmp_path):
    """Protects `gora merge`: the standalone merged model computes what base + adapter computes."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(gora_run / "adapter"), "--output-dir", str(out)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    want = _adapted_logits(gora_run, TEXTS)
    with torch.no_grad():
        assert_close(merged(**batch).logits, want, rtol=1e-5)


def test_merge_dtype_writes_a_plain_transformers_folder(gora_run, tmp_path):
    """Protects `gora merge --dtype`: a safetensors folder in that dtype, with no adapter files, that transformers
    loads in a process where PEFT cannot be imported, and that computes base + adapter's logits to bfloat16's
    precision."""
    import subprocess
    import sys
    import textwrap

    out = tmp_path / "merged-bf16"
    argv = ["merge", "--adapter", str(gora_run / "adapter"), "--output-dir", str(out), "--dtype", "bfloat16"]
    assert main(argv) == 0
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and "config.json" in names
    assert not {"adapter_config.json", "adapter_model.safetensors", "pytorch_model.bin"} & names
    script = textwrap.dedent(
        f"""
        import sys, json, torch
        sys.modules["peft"] = None  # any import of peft fails
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        # dtype="auto": the folder's own dtype (transformers 5's default; 4.x would load float32)
        model = AutoModelForSequenceClassification.from_pretrained({str(out)!r}, dtype="auto").eval()
        assert {{p.dtype for p in model.parameters()}} == {{torch.bfloat16}}
        batch = AutoTokenizer.from_pretrained({str(out)!r})({TEXTS!r}, return_tensors="pt", padding=True)
        with torch.no_grad():
            print(json.dumps(model(**batch).logits.float().tolist()))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    got = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    want = _adapted_logits(gora_run, TEXTS)
    assert_close(got, want, rtol=3e-2)  # bfloat16 weights: 8 bits of mantissa


# --- bad input: exit 2, one message, nothing written ------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, bert_dir, llama_dir):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "empty.jsonl").write_text("")
    write_jsonl(folder / "three.jsonl", [{"text": "the movie was good", "label": i % 3} for i in range(12)])
    write_jsonl(folder / "frac.jsonl", [{"text": "the movie was good", "label": 0.5} for _ in range(12)])
    (folder / "data.txt").write_text("hello")
    (folder / "not_a_model").mkdir()
    (folder / "full").mkdir()
    (folder / "full" / "keep.txt").write_text("keep")
    (folder / "typo.yaml").write_text("r: 4\nmin_rnak: 2\n")
    rows = chat_rows(4)
    rows[1]["messages"] = rows[1]["messages"][:1]  # a user turn and no reply
    write_jsonl(folder / "no_reply.jsonl", rows)
    return {
        "dir": folder,
        "head2": save_bert(folder / "head2", num_labels=2),
        "chat": save_llama(folder / "chat", chat_template=CHAT_TEMPLATE),
    }


BAD = {
    "missing train file": (["--train-file", "{dir}/nope.jsonl"], "does not exist"),
    "unknown format": (["--train-file", "{dir}/data.txt"], ".jsonl"),
    "empty dataset": (["--train-file", "{dir}/empty.jsonl"], "no rows"),
    "unknown column": (["--text-column", "review"], "--text-column"),
    "fractional labels": (["--train-file", "{dir}/frac.jsonl"], "fractional"),
    "labels exceed --num-labels": (["--train-file", "{dir}/three.jsonl", "--num-labels", "2"], "--num-labels"),
    "labels exceed the model's head": (["--train-file", "{dir}/three.jsonl", "--model", "{head2}"], "--num-labels 3"),
    "missing model": (["--model", "{dir}/no_model"], "does not exist"),
    "folder without config.json": (["--model", "{dir}/not_a_model"], "config.json"),
    "encoder for sft": (["--task", "sft", "--prompt-column", "text", "--response-column", "text"], "causal LM"),
    "bad config value": (["--min-rank", "9", "--max-rank", "4"], "--min-rank (9) > --max-rank (4)"),
    "config error names the option": (["--sketch-samples", "0"], "--sketch-samples must be"),
    "--load-stats with plain LoRA": (["--method", "lora", "--load-stats", "{dir}/empty.jsonl"], "--method gora"),
    "missing --load-stats file": (["--load-stats", "{dir}/nope.safetensors"], "--save-stats"),
    "non-empty output folder": (["--output-dir", "{dir}/full"], "--overwrite"),
    "unknown key in --config": (
        ["--config", "{dir}/typo.yaml"],
        "'min_rnak' is not an option of gora finetune; the nearest is 'min_rank'",
    ),
    "hub id while offline": (
        ["--model", "someorg/no-such-model"],
        "the hub cannot be reached, since gora runs offline",
    ),
    "--dtype float16 on a CPU": (["--dtype", "float16"], "needs a GPU"),
    "--dtype bfloat16 on a CPU without bf16": (["--dtype", "bfloat16"], "this CPU has no native bfloat16 support"),
    "--load-in-4bit without bitsandbytes": (["--load-in-4bit"], "pip install 'gora-peft[quant]'"),
    "messages row without an assistant turn": (
        ["--model", "{chat}", "--task", "sft", "--train-file", "{dir}/no_reply.jsonl"],
        "row 2 of the training data",
    ),
    "--eval-metric exact_match for classification": (["--eval-metric", "exact_match"], "needs --task sft"),
    "--report-to an unknown integration": (["--report-to", "tensorbord"], "not a Trainer integration"),
}
PATCHES = {  # what a case changes in the environment: a CPU without bf16, an install without bitsandbytes
    "--dtype bfloat16 on a CPU without bf16": lambda mp: mp.setattr(
        "gora.app.tasks.models.cpu_supports_bf16", lambda: False
    ),
    "--load-in-4bit without bitsandbytes": lambda mp: mp.setitem(sys.modules, "bitsandbytes", None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_a_message_and_no_output(case, bad_inputs, bert_dir, cls_file, capsys, monkeypatch):
    """Protects the bad-input contract: status 2, one message naming what to change, no (partial) output folder."""
    extra, expected = BAD[case]
    if case == "--dtype float16 on a CPU" and torch.cuda.is_available():
        pytest.skip("a GPU trains in float16")
    if case in PATCHES:
        PATCHES[case](monkeypatch)
    folder = bad_inputs["dir"]
    fill = {"dir": folder, **{k: v for k, v in bad_inputs.items() if k != "dir"}}
    out = folder / f"out-{case.replace(' ', '-')}"
    argv = ["finetune", "--model", str(bert_dir), "--train-file", str(cls_file), "--output-dir", str(out), *BERT_GORA]
    argv += [a.format(**fill) for a in extra]
    before = sorted(p.name for p in folder.iterdir())
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and expected in err, err
    assert len(err.strip().splitlines()) == 1, err  # one message
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing created, no .partial folder
    if case == "non-empty output folder":
        assert (folder / "full" / "keep.txt").read_text() == "keep"


def test_the_command_is_offline_unless_told_otherwise(tmp_path):
    """Protects gora's offline default in the real command (a fresh process without HF_HUB_OFFLINE in its
    environment): a hub id that is not in the local cache is refused at once with one message naming the id and
    saying how to allow downloads, without trying the network."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty cache
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gora",
            "finetune",
            "--model",
            "someorg/no-such-model",
            "--output-dir",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--model 'someorg/no-such-model' is not a local folder" in result.stderr
    assert "HF_HUB_OFFLINE=0" in result.stderr and not (tmp_path / "o").exists()


def test_llama_classification_head_is_usable(llama_dir, cls_file, tmp_path):
    """Protects decoder classification: a causal LM folder gets a new sequence-classification head (pad id set)."""
    out = tmp_path / "llama-cls"
    argv = ["finetune", "--model", str(llama_dir), "--train-file", str(cls_file), "--output-dir", str(out)]
    assert _run([*argv, "--target-modules", "q_proj", "v_proj", "--max-steps", "1", "--save-strategy", "no"]) == 0
    assert json.loads((out / "adapter/adapter_config.json").read_text())["task_type"] == "SEQ_CLS"


# --- gora export / gora merge: bad input exits 2, one message, nothing written -------------------------------------


@pytest.fixture(scope="module")
def bad_serving_inputs(tmp_path_factory, llama_dir):
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from helpers import bert_config

    folder = tmp_path_factory.mktemp("bad-serving")
    (folder / "not_an_adapter").mkdir()
    (folder / "full").mkdir()
    (folder / "full" / "keep.txt").write_text("keep")
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    get_peft_model(model, IA3Config(target_modules=["k_proj"], feedforward_modules=[])).save_pretrained(folder / "ia3")
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)).save_pretrained(folder / "dora")
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    BertForSequenceClassification(bert_config(2, hidden_size=48, intermediate_size=96)).save_pretrained(
        folder / "wide"
    )
    save_bert(folder / "other-weights", seed=1)  # the gora_run base's architecture and shapes, other weights
    return folder


BAD_SERVING = {  # name: (argv with {dir}, {run}, {llama}, expected text in the message)
    "export: not an adapter folder": (["export", "--adapter", "{dir}/not_an_adapter"], "adapter_config.json"),
    "export: not a LoRA adapter": (["export", "--adapter", "{dir}/ia3"], "not LoRA"),
    "export: DoRA": (["export", "--adapter", "{dir}/dora"], "DoRA"),
    "export: rank below the largest": (["export", "--adapter", "{run}/adapter", "--rank", "1"], "--rank"),
    "export: non-positive rank": (["export", "--adapter", "{run}/adapter", "--rank", "0"], "--rank must be"),
    "export: non-empty output folder": (
        ["export", "--adapter", "{run}/adapter", "--out", "{dir}/full"],
        "--overwrite",
    ),
    "merge: not an adapter folder": (["merge", "--adapter", "{dir}/not_an_adapter"], "adapter_config.json"),
    "merge: base of another architecture": (
        ["merge", "--adapter", "{run}/adapter", "--base", "{llama}"],
        "does not match",
    ),
    "merge: base of other sizes": (["merge", "--adapter", "{run}/adapter", "--base", "{dir}/wide"], "does not match"),
    "merge: base of other weights": (
        ["merge", "--adapter", "{run}/adapter", "--base", "{dir}/other-weights"],
        "not the base model the adapter was made on",
    ),
    "merge: non-empty output folder": (["merge", "--adapter", "{run}/adapter", "--out", "{dir}/full"], "--overwrite"),
}


@pytest.mark.parametrize("case", list(BAD_SERVING))
def test_bad_export_or_merge_input_exits_2_and_writes_nothing(case, bad_serving_inputs, gora_run, llama_dir, capsys):
    """Protects the bad-input contract of `gora export` and `gora merge`: status 2, one message naming what to
    change, no output folder or temporary folder, and an existing folder left as it was."""
    argv, expected = BAD_SERVING[case]
    folder = bad_serving_inputs
    argv = [a.format(dir=folder, run=gora_run, llama=llama_dir) for a in argv]
    if "--out" in argv:
        argv[argv.index("--out")] = "--output-dir"
    else:
        argv += ["--output-dir", str(folder / f"out-{case.replace(' ', '-').replace(':', '')}")]
    before = sorted(p.name for p in folder.iterdir())
    runs_before = sorted(p.name for p in gora_run.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and expected in err, err
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing created, no .partial folder
    assert sorted(p.name for p in gora_run.iterdir()) == runs_before
    assert (folder / "full" / "keep.txt").read_text() == "keep" and len(list((folder / "full").iterdir())) == 1
