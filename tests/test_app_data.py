"""gora.app.data: SFT label masking, label spaces, data files, seeded splits."""

from __future__ import annotations

import pytest

from _tiny_folders import make_tokenizer
from gora.app.data import IGNORE_INDEX, UsageError, encode_sft, label_space, read_rows, split_rows


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
