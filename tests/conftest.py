"""Fixtures over the tiny models of `helpers.py` (tests import builders from there, never from this file)."""

from __future__ import annotations

import os

import pytest

from helpers import make_bert, make_gpt2, make_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def no_leaked_mixed_precision(monkeypatch):
    """Every test starts without ACCELERATE_MIXED_PRECISION: transformers 4.x's TrainingArguments writes it into the
    process environment (bf16 after an earlier test's bfloat16 run), where a later Trainer with bf16=False would
    still pick up bf16 autocast."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)


@pytest.fixture
def llama():
    return make_llama()


@pytest.fixture
def gpt2():
    return make_gpt2()


@pytest.fixture
def bert():
    return make_bert()
