"""Library pieces behind `gora finetune`: LoRA+, SFT label masking, label spaces, presets, report, output folders."""

from __future__ import annotations

import pytest

from _tiny_folders import make_tokenizer
from conftest import make_bert
from gora.app.data import (
    IGNORE_INDEX,
    UsageError,
    encode_classification,
    encode_sft,
    label_space,
    read_rows,
    split_rows,
)
from gora.app.report import format_rank_table, rank_table, staged_folder
from gora.app.runconfig import resolve_configs
from gora.app.train import make_optimizer


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


def test_sft_labels_cover_only_the_response():
    """Protects "loss on the response only": labels are -100 on the prompt and equal the ids on the response."""
    tokenizer = make_tokenizer()
    rows = [{"prompt": "what is 2 + 3 ?", "response": "2 + 3 = 5 #### 5"}]
    (ex,) = encode_sft(rows, tokenizer, prompt_column="prompt", response_column="response", max_length=64)
    n_prompt = len(tokenizer("what is 2 + 3 ?\n")["input_ids"])
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ex["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex["input_ids"][n_prompt:-1]) == "2 + 3 = 5 #### 5"


def test_sft_padding_is_ignored_by_the_loss():
    """Protects padding: the collator pads labels with -100, so padded positions carry no loss."""
    from transformers import DataCollatorForSeq2Seq

    tokenizer = make_tokenizer()
    rows = [{"prompt": "what is 1 ?", "response": "1"}, {"prompt": "what is 2 + 3 ?", "response": "2 + 3 = 5"}]
    encoded = encode_sft(rows, tokenizer, prompt_column="prompt", response_column="response", max_length=64)
    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)(encoded)
    pad = batch["attention_mask"] == 0
    assert pad.any() and bool((batch["labels"][pad] == IGNORE_INDEX).all())


def test_sft_with_a_chat_template_masks_the_templated_prompt():
    """Protects chat-template use: the prompt part (system/user turns, generation prompt) carries no loss."""
    tokenizer = make_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}a {% endif %}"
    )
    rows = [{"prompt": "what is 1 ?", "response": "1 #### 1"}]
    (ex,) = encode_sft(rows, tokenizer, prompt_column="prompt", response_column="response", max_length=64)
    learned = [i for i, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned).split() == ["1", "####", "1", "</s>"]


def test_label_space_rules():
    """Protects label handling: integer ids stay ids (CSV strings too), names sort, bad labels say what to change."""
    assert label_space(["0", "1", 1]).names == ["0", "1"]
    assert label_space(["neg", "pos", "neg"]).label2id == {"neg": 0, "pos": 1}
    assert label_space([0, 2], num_labels=4).num_labels == 4
    with pytest.raises(UsageError, match="--num-labels"):
        label_space([0, 1, 2], num_labels=2)
    with pytest.raises(UsageError, match="negative"):
        label_space([-1, 0])
    with pytest.raises(UsageError, match="single class"):
        label_space(["pos", "pos"])


def test_read_rows_formats(tmp_path):
    """Protects the file readers: JSONL, JSON, CSV and Parquet give the same rows."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 0}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("text,label\na,1\nb,0\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.json", "d.parquet"):
        assert read_rows(tmp_path / name) == rows
    assert read_rows(tmp_path / "d.csv") == [{"text": "a", "label": "1"}, {"text": "b", "label": "0"}]


def test_read_rows_saved_dataset(tmp_path):
    """Protects `datasets.save_to_disk` folders (optional extra), both a Dataset and a DatasetDict's split."""
    datasets = pytest.importorskip("datasets")
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 0}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    assert read_rows(tmp_path / "ds") == rows
    assert read_rows(tmp_path / "dd", "train") == rows
    with pytest.raises(UsageError, match="splits"):
        read_rows(tmp_path / "dd", "test")


def test_split_rows_is_seeded_and_disjoint():
    """Protects the held-out split: deterministic given the seed, disjoint, at least one row each side."""
    rows = [{"i": i} for i in range(20)]
    train, held = split_rows(rows, 0.1, seed=3)
    assert split_rows(rows, 0.1, seed=3) == (train, held)
    assert len(held) == 2 and {r["i"] for r in train}.isdisjoint(r["i"] for r in held)


def test_presets_layer_under_user_options():
    """Protects option layering: user options beat the preset; the preset's targets apply only to its own model;
    the task decides the PEFT task type."""
    data, train, config = resolve_configs("minilm-rt", {}, {"batch_size": 4}, {"r": 4})
    assert data.task == "classification" and data.max_train_samples == 2000 and train.batch_size == 4
    assert config.r == 4 and config.num_batches == 16 and config.target_modules == ("query", "key", "value", "dense")
    assert config.lora_kwargs == {"task_type": "SEQ_CLS"}
    data, _, config = resolve_configs("minilm-rt", {"model": "/m", "task": "sft", "train_file": "f.jsonl"}, {}, {})
    assert config.target_modules is None and config.lora_kwargs == {"task_type": "CAUSAL_LM"}
    assert data.max_train_samples is None  # the preset's row limit is for its own data
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        resolve_configs("minilm-rt", {}, {"loraplus_lr_ratio": 0.5}, {})


def test_rank_table_layers_by_module_type():
    """Protects the report's table: rows are layers in numeric order, columns module types, '-' where absent."""
    ranks = {"m.layers.10.q": 3, "m.layers.2.q": 5, "m.layers.2.v": 9, "m.pooler.dense": 7}
    table = rank_table(ranks)
    assert table.layers == ["2", "10", "m.pooler"] and table.types == ["q", "v", "dense"]
    assert table.cells == [[5, 9, None], [3, None, None], [None, None, 7]]
    text = format_rank_table(table)
    assert text.splitlines()[-1].split() == ["mean", "4.0", "9.0", "7.0"]


def test_staged_folder_leaves_nothing_on_failure(tmp_path):
    """Protects "no half-written output": a failure inside removes the temporary folder and keeps the old one."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_folder(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (target / "old.txt").is_file()
    with staged_folder(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]


def test_gora_config_help_is_generated():
    """Protects the generated help: GoraConfig's own help texts show on `gora finetune --help`."""
    from gora.app.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["finetune"].format_help()
    for f in ("--min-rank", "--gamma", "--loraplus-lr-ratio", "--text-column", "--no-eval-before"):
        assert f in text
    assert "smallest rank of a layer" in text


def test_classification_predictions_come_back_in_input_order():
    """Protects per-example predictions: evaluate_classification batches shortest first, but the predictions it keeps
    are in the order of the dataset and equal the argmax of each example run alone."""
    import torch
    from transformers import DataCollatorWithPadding

    from gora.app.evaluate import evaluate_classification

    tokenizer = make_tokenizer()
    texts = ["a much longer text with many words in it", "short", "a text of middling length", "two words"]
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(texts)]
    dataset = encode_classification(
        rows, tokenizer, label_space([0, 1]), text_column="text", label_column="label", max_length=32
    )
    model = make_bert(seed=3)
    model.config.pad_token_id = tokenizer.pad_token_id
    collator = DataCollatorWithPadding(tokenizer)
    out = evaluate_classification(model, dataset, collator, batch_size=2, keep_predictions=True)
    model.eval()
    with torch.no_grad():
        alone = [int(model(**collator([ex])).logits.argmax(-1)) for ex in dataset]
    assert out["predictions"] == alone
    assert out["accuracy"] == sum(p == ex["labels"] for p, ex in zip(alone, dataset)) / len(dataset)
    assert "predictions" not in evaluate_classification(model, dataset, collator, batch_size=2)


@pytest.mark.parametrize(
    ("text", "reference", "answer", "hit"),
    [
        ("Son\nbecause ...", "son", "Son", True),  # a word: the first line, case ignored
        ("  wife.", "wife", "wife.", True),
        ("The answer is 12.", "12", "12", True),  # a number: the last number
        ("x = 3 #### 4", "4", "4", True),  # after ####
        ("mother", "mother-in-law", "mother", False),
        ("Tuesday", "1", None, False),  # a numeric reference reads numbers only
    ],
)
def test_answer_of_reads_words_and_numbers(text, reference, answer, hit):
    """Protects exact match on short answers: word references are matched on the first line, ignoring case;
    numeric ones on the last number (or what follows ####), numerically."""
    from gora.app.evaluate import _same_answer, answer_of

    assert answer_of(text, reference) == answer
    assert _same_answer(answer_of(text, reference), reference) is hit
