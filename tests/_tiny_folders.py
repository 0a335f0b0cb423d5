"""Tiny transformers model folders with an offline word-level tokenizer, and small data files, for CLI tests."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from helpers import VOCAB, bert_config, llama_config, mixtral_config

WORDS = [
    "good",
    "great",
    "fun",
    "fine",
    "nice",
    "bad",
    "awful",
    "boring",
    "dull",
    "poor",
    "the",
    "movie",
    "film",
    "was",
    "a",
    "is",
    "what",
    "plus",
    "equals",
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
    "+",
    "=",
    "?",
    "####",
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        eos_token="</s>",
    )


def save_bert(folder: Path, *, num_labels: int | None = None, seed: int = 0) -> Path:
    """A 2-layer BERT encoder (no head: BertModel) or, with `num_labels`, a classifier with that head."""
    from transformers import BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    config = bert_config(num_labels or 2, pad_token_id=0)
    model = BertForSequenceClassification(config) if num_labels else BertModel(config)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


# a chat template in the tiny vocabulary: "? <user text> </s>" and "= <assistant text> </s>"; generation prompt "= "
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}= {% else %}? {% endif %}{{ m['content'] }} </s> "
    "{% endfor %}{% if add_generation_prompt %}= {% endif %}"
)


def save_llama(folder: Path, seed: int = 0, *, chat_template: str | None = None, **overrides) -> Path:
    """A 2-layer Llama causal LM whose eos/pad ids match the tokenizer (optionally with a chat template; `overrides`
    change the config, e.g. hidden_size=64 for bitsandbytes' 4-bit blocks)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    fields = dict(max_position_embeddings=128, pad_token_id=0, eos_token_id=4, bos_token_id=2)
    LlamaForCausalLM(llama_config(**{**fields, **overrides})).save_pretrained(folder)
    tokenizer = make_tokenizer()
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    return folder


def save_mixtral(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Mixtral causal LM (4 experts as fused 3-D parameters) with the tiny tokenizer."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    fields = dict(max_position_embeddings=128, pad_token_id=0, eos_token_id=4, bos_token_id=2)
    MixtralForCausalLM(mixtral_config(**fields)).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def sentiment_rows(n: int = 48, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    pos, neg = ["good", "great", "fun", "fine", "nice"], ["bad", "awful", "boring", "dull", "poor"]
    rows = []
    for i in range(n):
        label = i % 2
        words = pos if label else neg
        picks = [words[int(j)] for j in torch.randint(0, 5, (3,), generator=g)]
        rows.append({"text": f"the movie was {' '.join(picks)}", "label": label})
    return rows


def sum_rows(n: int = 24) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i % 5, (i * 3) % 5
        rows.append({"prompt": f"what is {a} + {b} ?", "response": f"{a} + {b} = {a + b} #### {a + b}"})
    return rows


def chat_rows(n: int = 24) -> list[dict]:
    """Two-turn conversations about sums (the second answer in the "#### <answer>" form)."""
    rows = []
    for i in range(n):
        a, b = i % 5, (i * 3) % 5
        messages = [
            {"role": "user", "content": f"what is {a} ?"},
            {"role": "assistant", "content": f"{a}"},
            {"role": "user", "content": f"what is {a} + {b} ?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b} #### {a + b}"},
        ]
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
