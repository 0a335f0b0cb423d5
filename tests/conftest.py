"""Tiny config-built models and batches shared by the tests (no downloads; CPU; seconds).

All models are dropout-free, so train-mode gradients are deterministic and comparable across runs/processes.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 96


def llama_config(layers: int = 2, **overrides):
    """The tiny Llama's config (hidden 32, 4 heads, 2 KV heads); `overrides` replace any field."""
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaConfig(**{**fields, **overrides})


def make_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(layers)).eval()


def make_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


def bert_config(num_labels: int = 2, **overrides):
    """The tiny dropout-free BERT's config (hidden 32, 2 layers); `overrides` replace any field."""
    from transformers import BertConfig

    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertConfig(**{**fields, **overrides})


def make_bert(seed: int = 0, num_labels: int = 2):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(bert_config(num_labels)).eval()


def lm_batches(n: int = 4, batch: int = 2, length: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Causal-LM batches with labels, so model(**b).loss exists."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def cls_batches(n: int = 4, batch: int = 4, length: int = 10, seed: int = 0, num_labels: int = 2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, length), generator=g)
        labels = torch.randint(0, num_labels, (batch,), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


@pytest.fixture
def llama():
    return make_llama()


@pytest.fixture
def gpt2():
    return make_gpt2()


@pytest.fixture
def bert():
    return make_bert()
