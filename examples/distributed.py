"""GoRA with several processes: `torchrun` or `accelerate launch`, then transformers' Trainer (DDP).

    torchrun --nproc_per_node 2 examples/distributed.py                 # CPU (gloo) or one GPU per process (nccl)
    accelerate launch --num_processes 2 examples/distributed.py
    python examples/distributed.py                                      # one process: the same code path

Every rank estimates gradients on its own share of the batches (DistributedSampler); gora sums the statistics
over ranks once, so every rank gets the same ranks, A0 and B0, equal to one process seeing all the batches.
Call GoRA on the plain model *before* the Trainer wraps it in DDP; only rank 0 writes the adapter.
Add `--sketch` for the bounded-memory statistics (`gradient_store="sketch"`).
"""

import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import gora
from gora.assets import minilm_path, rotten_tomatoes


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = TrainingArguments(
        "outputs/distributed",
        max_steps=20,
        per_device_train_batch_size=16,
        learning_rate=5e-4,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        save_strategy="no",
        ddp_find_unused_parameters=False,
    )
    _ = args.device  # initializes torch.distributed under torchrun / accelerate launch (no-op in one process)

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    rows, _ = rotten_tomatoes(train_size=640)
    train = [{**tokenizer(r["text"], truncation=True, max_length=64), "labels": r["label"]} for r in rows]
    collate = DataCollatorWithPadding(tokenizer)

    # Each rank reads a different share of the data, as the Trainer will; gora averages over all of it.
    sampler = None
    if torch.distributed.is_initialized():
        sampler = torch.utils.data.DistributedSampler(train, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(
        train, batch_size=16, sampler=sampler, shuffle=sampler is None, collate_fn=collate
    )
    config = gora.GoraConfig(
        target_modules=["query", "key", "value", "dense"],
        num_batches=8,  # per rank: G averages num_batches x world_size batches
        gradient_store="sketch" if "--sketch" in sys.argv else "full",
        lora_kwargs={"task_type": "SEQ_CLS"},
    )
    model = gora.get_gora_model(model, config, loader)  # identical stock PeftModel on every rank
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate)
    trainer.train()
    if trainer.is_world_process_zero():
        model.save_pretrained("outputs/distributed/adapter")  # plain LoRA adapter + gora_record.json


if __name__ == "__main__":
    main()
