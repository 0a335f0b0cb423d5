"""One rank of the 2-process `gora.prepare_trainer` test (tests/test_trainer.py), run under torchrun (gloo, CPU).

A transformers Trainer on a tiny Llama; the process group is started by the Trainer's own arguments. Writes
<out>/rank<r>.pt: the LoRA weights after prepare_trainer, the gradient batches this rank ran (as the trainer gave them
to its compute_loss), the record's number of batches, and the LoRA weights after two DDP training steps.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import gora
from _tiny_folders import make_tokenizer, sum_rows
from helpers import llama_config

NUM_BATCHES = 3
TARGETS = ["q_proj", "v_proj", "up_proj"]


def config() -> gora.GoraConfig:
    return gora.GoraConfig(target_modules=TARGETS, r=4, min_rank=1, max_rank=8, num_batches=NUM_BATCHES)


def make_model() -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(max_position_embeddings=128, pad_token_id=0, eos_token_id=4, bos_token_id=2))


def main(out: Path) -> None:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    torch.set_num_threads(1)
    tokenizer = make_tokenizer()
    rows = [tokenizer(f"{r['prompt']} {r['response']}") for r in sum_rows(40)]
    dataset = [{"input_ids": r["input_ids"], "labels": list(r["input_ids"])} for r in rows]
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
        ddp_backend="gloo",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=make_model(),
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
    )
    seen: list[dict[str, torch.Tensor]] = []
    original = trainer.compute_loss

    def recording(model, inputs, *rest, **kwargs):
        if torch.is_grad_enabled():
            seen.append({k: v.detach().cpu().clone() for k, v in inputs.items()})
        return original(model, inputs, *rest, **kwargs)

    trainer.compute_loss = recording
    peft_model = gora.prepare_trainer(trainer, config(), show_progress=False)
    trainer.compute_loss = original
    lora = {k: v.detach().clone() for k, v in peft_model.named_parameters() if "lora_" in k}
    num_batches = peft_model.gora_records["default"].num_batches
    trainer.train()
    trained = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" in k}
    rank = int(os.environ["RANK"])
    torch.save(
        {"init": lora, "batches": seen, "num_batches": num_batches, "trained": trained, "world": args.world_size},
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
