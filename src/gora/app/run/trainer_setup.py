"""transformers' Trainer for a run: its settings (`training_arguments`, from TrainConfig and the model's dtype) and the
Trainer itself with the run's callbacks, optimizer and task adjustments (`make_trainer`)."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..config.runconfig import DataConfig, TrainConfig
from ..tasks.registry import task_kind
from ..tasks.taskkind import TaskData
from .adapters import make_optimizer
from .runfolder import (
    RunFolder,
)

logger = logging.getLogger(__name__)


def training_arguments(train: TrainConfig, folder: Path, show_progress: bool, data: DataConfig) -> Any:
    """The Trainer's settings (checkpoints in `folder`); built before the run folder is written, so settings the
    Trainer refuses are bad input like any other. Mixed precision follows --dtype (bf16 / fp16 autocast; the adapter
    and the other trained parameters stay float32)."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    # transformers 5 takes the warmup share as a float warmup_steps < 1 (warmup_ratio is gone); 4.x as warmup_ratio
    v5 = "warmup_ratio" not in names
    warmup = {"warmup_steps": train.warmup_ratio} if v5 else {"warmup_ratio": train.warmup_ratio}
    # later 5.x name gradient checkpointing activation_checkpointing (the old names warn)
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    checkpointing = {ckpt: train.gradient_checkpointing, f"{ckpt}_kwargs": {"use_reentrant": False}}
    return TrainingArguments(
        output_dir=str(folder),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.eval_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        **checkpointing,  # non-reentrant: the frozen base's inputs need no grad
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        **warmup,
        lr_scheduler_type=train.lr_scheduler,
        logging_steps=train.logging_steps,
        save_strategy="steps" if train.save_strategy == "auto" else train.save_strategy,  # auto: + EpochEndSave
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        seed=train.train_seed,
        report_to=list(train.report_to or []) or "none",
        bf16=data.dtype == "bfloat16",
        fp16=data.dtype == "float16",
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        disable_tqdm=not show_progress,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every trained parameter is used in every step
    )


def make_trainer(
    peft_model: Any,
    task: TaskData,
    data: DataConfig,
    train: TrainConfig,
    run: RunFolder,
    show_progress: bool,
    callbacks: list[Any],
) -> Any:
    """transformers' Trainer for the run: checkpoints under <run>/checkpoints/, the LoRA+ optimizer if asked,
    TensorBoard logs (--report-to tensorboard) under <run>/logs/ unless TENSORBOARD_LOGGING_DIR says otherwise."""
    from transformers import Trainer
    from transformers.integrations import TensorBoardCallback

    optimizer = make_optimizer(
        peft_model,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        loraplus_lr_ratio=train.loraplus_lr_ratio,
    )
    trainer = Trainer(
        model=peft_model,
        args=training_arguments(train, run.checkpoints, show_progress, data),
        train_dataset=task.train_set,
        data_collator=task.collator,
        optimizers=(optimizer, None),
        callbacks=callbacks,
    )
    for callback in trainer.callback_handler.callbacks:
        if not isinstance(callback, TensorBoardCallback):
            continue
        if not hasattr(callback, "logging_dir"):  # transformers 4.x: the callback writes to args.logging_dir
            trainer.args.logging_dir = os.environ.get("TENSORBOARD_LOGGING_DIR") or str(run.path / "logs")
        elif callback.logging_dir is None:
            callback.logging_dir = str(run.path / "logs")
    task_kind(data.task).adjust_trainer(trainer)  # e.g. how the Trainer scales the task's loss
    if not show_progress:  # -q: without tqdm the Trainer prints every log dict instead; the report keeps them
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer
