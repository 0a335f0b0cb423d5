"""GoRA inside a transformers `Trainer` (TRL's `SFTTrainer` is one): initialize from the trainer's own batches.

    trainer = SFTTrainer(model=base, args=..., train_dataset=...)   # no peft_config: GoRA builds the adapter
    gora.prepare_trainer(trainer, gora.GoraConfig(...))              # before trainer.train()
    trainer.train()

The gradient batches are exactly what the trainer trains on: `trainer.get_train_dataloader()` (its collator, packing,
completion-only masking, per-rank sharding under torch.distributed), and the loss is the trainer's own
`compute_loss`, so GoRA's G is the gradient of the objective that is then trained. The trainer's model is replaced
by the PeftModel before any optimizer exists, so the optimizer sees only the adapter (and `modules_to_save`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

from torch import nn

from .config import GoraConfig
from .model import get_gora_model

logger = logging.getLogger(__name__)

_TASK_TYPES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
)
# what TRL's SFTTrainer.compute_loss adds to on every call (token counts, entropy/accuracy for the logs); the
# estimation batches are not training steps, so these are put back as they were afterwards
_TRAINER_LOG_STATE = ("_metrics", "_total_train_tokens")


def prepare_trainer(
    trainer: Any,
    config: GoraConfig,
    *,
    adapter_name: str = "default",
    offload_to_cpu: bool = False,
    show_progress: bool = True,
):
    """Run GoRA on the trainer's model with the trainer's own training batches and loss; the trainer then trains the
    GoRA adapter (and only it).

    Works for `transformers.Trainer` and its subclasses (TRL's `SFTTrainer`), with gradient accumulation (G is the mean
    over per-device micro-batches), torch.distributed (each rank estimates on its shard; the statistics are summed
    once) and `gamma="auto"` (held-out batches: the trainer's eval dataloader when it has an eval dataset, else the
    training batches after the first `num_batches`).

    Args:
        trainer: A constructed trainer whose `model` is the plain base model (no `peft_config` given to it), before
            `train()`.
        config: The GoRA configuration. Without `lora_kwargs["task_type"]`, it follows the model's class
            (`...ForCausalLM` → CAUSAL_LM, `...ForSequenceClassification` → SEQ_CLS).
        adapter_name: Name of the LoRA adapter.
        offload_to_cpu: Keep the gradient statistics on the CPU.
        show_progress: Show progress bars.

    Returns:
        The `peft.PeftModel`, now `trainer.model`.

    Raises:
        ValueError: the trainer already built its optimizer, its model already carries adapters, or anything
            `get_gora_model` refuses; the trainer and its model are left as they were.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    if getattr(trainer, "optimizer", None) is not None:
        raise ValueError(
            "the trainer already has an optimizer, which would keep training the old parameters: call "
            "gora.prepare_trainer(trainer, config) right after constructing the trainer, before train()"
        )
    model = trainer.model
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError(
            "the trainer's model already carries PEFT adapter layers (was peft_config= given to the trainer?): "
            "construct the trainer with the plain base model and no peft_config; GoRA builds the adapter"
        )
    config = _with_task_type(config, model)
    train_batches = iter(trainer.get_train_dataloader())  # one pass: the first N estimate, the next K are held out
    eval_batches = None
    if config.gamma == "auto" and getattr(trainer, "eval_dataset", None) is not None:
        eval_batches = trainer.get_eval_dataloader()
    with _log_state_restored(trainer):
        peft_model = get_gora_model(
            model,
            config,
            train_batches,
            forward_fn=_TrainerLoss(trainer),
            adapter_name=adapter_name,
            offload_to_cpu=offload_to_cpu,
            show_progress=show_progress,
            eval_dataloader=eval_batches,
        )
    trainer.model = peft_model
    trainer.model_wrapped = peft_model
    record = peft_model.gora_records[adapter_name]
    logger.info(
        "GoRA: the trainer now trains the adapter (%d parameters, %.3fx LoRA at r=%d)",
        record.trainable_params,
        record.trainable_params / record.lora_params,
        config.r,
    )
    return peft_model


class _TrainerLoss:
    """forward_fn for GoRA: the trainer's own `compute_loss` on the batch as the trainer prepares it."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def __call__(self, model: nn.Module, batch: Any) -> Any:
        return self.trainer.compute_loss(model, self.trainer._prepare_inputs(batch))


def _with_task_type(config: GoraConfig, model: nn.Module) -> GoraConfig:
    if "task_type" in config.lora_kwargs:
        return config
    name = type(model).__name__
    task_type = next((task for suffix, task in _TASK_TYPES if name.endswith(suffix)), None)
    if task_type is None:
        return config
    return dataclasses.replace(config, lora_kwargs={**config.lora_kwargs, "task_type": task_type})


@contextlib.contextmanager
def _log_state_restored(trainer: Any) -> Iterator[None]:
    saved = {k: copy.deepcopy(getattr(trainer, k)) for k in _TRAINER_LOG_STATE if hasattr(trainer, k)}
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(trainer, key, value)
