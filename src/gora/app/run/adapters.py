"""The adapter a fine-tune trains and its optimizer: GoRA through the library (`gora.model.estimate_and_allocate`,
`build_estimated`) from batches of the training set, or plain LoRA/rsLoRA at the same r (`gora.baseline`); the trained
parameters kept in float32; the LoRA+ optimizer."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...baseline import get_lora_model
from ...config import GoraConfig
from ...model import RunOptions, build_estimated, estimate_and_allocate
from ..config.runconfig import TrainConfig
from ..parallel import shard
from ..tasks.taskkind import TaskData

if TYPE_CHECKING:
    from ...stats import GradientStats

logger = logging.getLogger(__name__)


def make_optimizer(
    model: nn.Module,
    *,
    learning_rate: float,
    weight_decay: float = 0.0,
    loraplus_lr_ratio: float | None = None,
) -> torch.optim.Optimizer | None:
    """The LoRA+ optimizer (AdamW; lora_B and other 1-D parameters at `loraplus_lr_ratio` x `learning_rate`), built
    with PEFT's `create_loraplus_optimizer`; None without a ratio (the Trainer then builds its default AdamW).

    Pass it as `Trainer(..., optimizers=(make_optimizer(...), None))`.
    """
    if loraplus_lr_ratio is None:
        return None
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model,
        torch.optim.AdamW,
        lr=learning_rate,
        loraplus_lr_ratio=loraplus_lr_ratio,
        loraplus_weight_decay=weight_decay,
    )


def float32_trainables(peft_model: Any) -> None:
    """Keep every trained parameter in float32 (the LoRA weights are already, through PEFT's autocast_adapter_dtype;
    this also covers modules_to_save, e.g. a new classification head, on a bfloat16/float16 model), so the optimizer
    and fp16 loss scaling work in float32 while the frozen base stays in its dtype."""
    for param in peft_model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()


def estimation_loader(task: TaskData, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    """Batches for gradient estimation: the training set in a seeded random order that is the same on every pass
    (so the batches after the first N, which gamma='auto' takes as held-out batches, never repeat gradient ones)."""
    order = torch.randperm(len(task.train_set), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = [task.train_set[i] for i in order]
    # under torch.distributed rank r takes batches r, r + K, ...: the K ranks' i-th batches together are the i-th
    # batch of one process with batch size K x batch_size (as the Trainer's data-parallel batches are)
    batches = shard([rows[i : i + batch_size] for i in range(0, len(rows), batch_size)])
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, collate_fn=task.collator)


def build_adapter(
    task: TaskData,
    gora: GoraConfig,
    train: TrainConfig,
    timings: dict[str, float],
    show_progress: bool,
    stats: GradientStats | None = None,
) -> tuple[Any, dict[str, Any], GradientStats | None]:
    """The adapter, its parameter counts and (GoRA) the gradient statistics it was built from: GoRA (estimating,
    or from `stats`), or plain LoRA/rsLoRA (no statistics)."""

    start = time.perf_counter()
    if train.method == "gora":
        loader = estimation_loader(task, train.batch_size, train.train_seed)
        options = RunOptions(show_progress=show_progress, stats=stats)
        estimated = estimate_and_allocate(task.model, gora, loader, options)
        peft_model = build_estimated(task.model, gora, estimated, options)
        stats = estimated.stats
        record = peft_model.gora_records["default"]
        for key, value in record.timings_s.items():
            timings[f"gora_{key}"] = value
        timings["gora_s"] = time.perf_counter() - start
        ranks = dict(record.ranks)
        adapter, lora = record.trainable_params, record.lora_params
        shapes = {k: tuple(v) for k, v in record.shapes.items()}
    else:
        peft_model = get_lora_model(task.model, gora, use_rslora=train.method == "rslora")
        shapes = peft_model.lora_shapes
        ranks = dict.fromkeys(shapes, gora.r)
        adapter = lora = gora.r * sum((s[0] if len(s) == 3 else 1) * (s[-2] + s[-1]) for s in shapes.values())
        timings[f"{train.method}_init_s"] = time.perf_counter() - start
    float32_trainables(peft_model)
    trainable, total = peft_model.get_nb_trainable_parameters()
    params = {
        "adapter": adapter,
        "lora_same_r": lora,
        "ratio_to_lora": adapter / lora,
        "trainable_total": trainable,
        "model_total": total,
        "ranks": ranks,
        "shapes": {k: list(v) for k, v in shapes.items()},
    }
    return peft_model, params, stats
