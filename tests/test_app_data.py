"""gora.app.tasks.data: SFT formats (chat messages, prompt/completion, prompt/response) and their label masking, label
spaces, data files, seeded splits."""

from __future__ import annotations

import pytest

from _tiny_folders import CHAT_TEMPLATE, make_tokenizer
from gora.app.config.runconfig import DataConfig
from gora.app.errors import UsageError
from gora.app.tasks.classification import label_space
from gora.app.tasks.rows import read_rows, split_rows
from gora.app.tasks.sft import IGNORE_INDEX, encode_sft
from gora.app.tasks.sft_formats import resolve_sft_format, sft_examples


def _encode(rows: list[dict], tokenizer, fmt: str, **data) -> list[dict]:
    config = DataConfig(task="sft", **data)
    return encode_sft(sft_examples(rows, tokenizer, config, fmt, "the data"), tokenizer, max_length=64)


def _learned(example: dict, tokenizer) -> list[str]:
    return tokenizer.decode(
        [i for i, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    ).split()


def test_sft_labels_cover_only_the_response():
    """Protects "loss on the response only": labels are -100 on the prompt and equal the ids on the response."""
    tokenizer = make_tokenizer()
    rows = [{"prompt": "what is 2 + 3 ?", "response": "2 + 3 = 5 #### 5"}]
    (ex,) = _encode(rows, tokenizer, "prompt-response")
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
    encoded = _encode(rows, tokenizer, "prompt-response")
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
    (ex,) = _encode(rows, tokenizer, "prompt-response")
    assert _learned(ex, tokenizer) == ["1", "####", "1", "</s>"]


CHAT = CHAT_TEMPLATE
TALK = [
    {"role": "user", "content": "what is 1"},
    {"role": "assistant", "content": "1"},
    {"role": "user", "content": "what is 2 + 3"},
    {"role": "assistant", "content": "2 + 3 = 5 #### 5"},
]


def test_messages_loss_is_on_every_assistant_turn():
    """Protects chat data: through the tokenizer's chat template, the loss covers exactly the assistant turns (their
    text and end-of-turn marker) of a multi-turn conversation; the tokens are the whole rendered conversation; the
    evaluation prompt is the conversation up to the last assistant turn with the generation prompt."""
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT
    config = DataConfig(task="sft")
    (example,) = sft_examples([{"messages": TALK}], tokenizer, config, "messages", "the data")
    (ex,) = encode_sft([example], tokenizer, max_length=64)
    assert _learned(ex, tokenizer) == ["1", "</s>", "2", "+", "3", "=", "5", "####", "5", "</s>"]
    whole = tokenizer.apply_chat_template(TALK, tokenize=False)
    assert "".join(text for text, _ in example.segments) == whole
    assert tokenizer.decode(ex["input_ids"]).split() == tokenizer.decode(tokenizer(whole)["input_ids"]).split()
    assert example.head == tokenizer.apply_chat_template(TALK[:3], tokenize=False, add_generation_prompt=True)
    assert example.answer == "5"


def test_prompt_completion_as_trl_has_it():
    """Protects TRL's prompt-completion formats: strings are concatenated as they are with the loss on the completion
    and eos; lists of messages go through the chat template with the loss on the completion's assistant turns."""
    tokenizer = make_tokenizer()
    (plain,) = _encode([{"prompt": "what is 1 ?", "completion": " 1 #### 1"}], tokenizer, "prompt-completion")
    assert tokenizer.decode(plain["input_ids"]).split() == ["what", "is", "1", "?", "1", "####", "1", "</s>"]
    assert _learned(plain, tokenizer) == ["1", "####", "1", "</s>"]
    tokenizer.chat_template = CHAT
    row = {"prompt": TALK[:3], "completion": TALK[3:]}
    (chat,) = _encode([row], tokenizer, "prompt-completion")
    assert _learned(chat, tokenizer) == ["2", "+", "3", "=", "5", "####", "5", "</s>"]  # not the prompt's reply


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        ({"messages", "prompt", "completion"}, "messages"),
        ({"prompt", "completion", "response"}, "prompt-completion"),
        ({"prompt", "response"}, "prompt-response"),
    ],
)
def test_sft_format_is_the_first_whose_columns_are_there(columns, expected):
    """Protects --sft-format auto: messages, then prompt/completion, then prompt/response."""
    assert resolve_sft_format(DataConfig(task="sft"), columns, "the data") == expected


@pytest.mark.parametrize(
    ("rows", "fmt", "template", "message"),
    [
        ([{"messages": TALK[:1]}], "messages", CHAT, "row 1 of the data has no assistant turn in 'messages'"),
        ([{"messages": "hello"}], "messages", CHAT, "is text, not a list of messages"),
        ([{"messages": TALK}], "messages", None, "chat messages need a tokenizer with a chat template"),
        (
            [{"messages": TALK}],
            "messages",
            "{{ messages|length }} " + CHAT,
            "renders the conversation differently as it grows",
        ),
    ],
)
def test_bad_chat_rows_are_refused(rows, fmt, template, message):
    """Protects chat data from silent mis-masking: a conversation without an assistant turn, one that is not a list
    of messages, messages without a chat template, or a template whose rendering of earlier turns changes as the
    conversation grows (so assistant spans cannot be found) are refused, naming the row."""
    tokenizer = make_tokenizer()
    tokenizer.chat_template = template
    with pytest.raises(UsageError, match=message):
        sft_examples(rows, tokenizer, DataConfig(task="sft"), fmt, "the data")
    with pytest.raises(UsageError, match="none of the SFT formats' columns"):
        resolve_sft_format(DataConfig(task="sft"), {"question", "answer"}, "the data")


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
