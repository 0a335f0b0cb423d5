"""GoRA with several processes: `torchrun` or `accelerate launch`, then transformers' Trainer (DDP).

    torchrun --nproc_per_node 2 examples/distributed.py                 # CPU (gloo) or one GPU per process (nccl)
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no
        examples/distributed.py              # (one line) also on CPU, with gloo: --cpu would start only 1 process
    python examples/distributed.py                                      # one process: the same code path

Both launchers run in about a minute on 2 CPU cores and log "adapter identical on all 2 ranks" after GoRA and after
training; rank 0 writes outputs/distributed/adapter.

Every rank estimates gradients on its own share of the batches (DistributedSampler); gora sums the statistics
over ranks once, so every rank gets the same ranks, A0 and B0, equal to one process seeing all the batches.
Call GoRA on the plain model *before* the Trainer wraps it in DDP; only rank 0 writes the adapter.
Add `--sketch` for the bounded-memory statistics (`gradient_store="sketch"`).
"""

import hashlib
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
    set_seed,
)

import gora
from gora.app.assets import minilm_path, rotten_tomatoes

logger = logging.getLogger("distributed")


def check_identical(model: torch.nn.Module, when: str) -> None:
    """Log that every rank holds the same adapter (a sha256 of its LoRA weights, compared over ranks), else raise."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    if not torch.distributed.is_initialized():
        logger.info("%s: one process, adapter sha256 %s", when, digest.hexdigest()[:16])
        return
    digests: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"{when}: the ranks hold different adapters: {digests}")
    logger.info("%s: adapter identical on all %d ranks (sha256 %s)", when, len(digests), digests[0][:16])


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
    set_seed(args.seed)  # the new classifier head must be the same on every rank: G is summed over ranks
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
    check_identical(model, "after GoRA")
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate)
    trainer.train()
    check_identical(model, "after training")
    if trainer.is_world_process_zero():
        model.save_pretrained("outputs/distributed/adapter")  # plain LoRA adapter + gora_record.json
        logger.info("adapter written to %s", os.path.abspath("outputs/distributed/adapter"))


if __name__ == "__main__":
    main()
