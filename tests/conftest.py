"""Fixtures over the tiny models of `helpers.py` (tests import builders from there, never from this file)."""

from __future__ import annotations

import os

import pytest

from helpers import make_bert, make_gpt2, make_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def llama():
    return make_llama()


@pytest.fixture
def gpt2():
    return make_gpt2()


@pytest.fixture
def bert():
    return make_bert()
