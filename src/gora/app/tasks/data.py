"""A run's inputs put together (`load_task`): the model folder checked and loaded with its tokenizer (models.py), the
rows read (or the preset's) and checked (rows.py), labels, encoding and collator from the task kind (tasks.py:
classification.py, sft.py). Every problem with the user's model or data raises `UsageError` with a message that says
what to change; torch and transformers are imported only when a task is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from .models import check_bitsandbytes, check_model, check_precision, load_model, load_tokenizer
from .registry import task_kind
from .rows import load_rows
from .taskkind import TaskData

if TYPE_CHECKING:
    from ..config.runconfig import AllocateConfig, DataConfig, Preset, TrainConfig


def load_task(
    data: DataConfig, train: TrainConfig | AllocateConfig, preset: Preset | None, device: Any = None
) -> TaskData:
    """Check the inputs (cheap checks first), then load tokenizer, model (on `device`, default: the CPU) and the
    encoded train/eval sets.

    Raises:
        UsageError: any problem with the model or the data, with what to change.
    """
    import torch
    from transformers import set_seed

    device = torch.device("cpu") if device is None else torch.device(device)
    if train.threads is not None:
        torch.set_num_threads(train.threads)
    model_path = data.model if data.model is not None else (preset.model() if preset else None)
    if model_path is None:
        raise UsageError("no model: pass --model (a local transformers folder) or a --preset")
    if data.load_in_4bit or data.load_in_8bit:
        check_bitsandbytes("--load-in-4bit" if data.load_in_4bit else "--load-in-8bit")
    check_precision(data, device)
    kind = task_kind(data.task)
    model_config = check_model(model_path, kind)
    train_rows, eval_rows, sources = load_rows(data, preset, train.train_seed, kind)
    sources["model"] = model_path
    labels = kind.labels(data, model_config, train_rows + eval_rows)
    set_seed(train.train_seed)
    tokenizer = load_tokenizer(model_path, kind)
    encoded = kind.encode(data, tokenizer, labels, train_rows, eval_rows, sources)
    model = load_model(model_path, data, model_config, labels, device, kind)
    return TaskData(
        model=model,
        tokenizer=tokenizer,
        model_path=model_path,
        train_rows=train_rows,
        eval_rows=eval_rows,
        train_set=encoded.train_set,
        eval_set=encoded.eval_set,
        collator=encoded.collator,
        label_names=labels.names if labels else None,
        sources=sources,
        eval_examples=encoded.eval_examples,
    )
