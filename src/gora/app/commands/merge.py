"""`gora merge`: a saved adapter merged into its base model (`merge_and_unload`, float32) and saved as a plain
transformers folder, after checking that the base is the one the adapter was made on."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...experts import check_parameter_layers
from ...export import DTYPES, read_adapter
from ...fileio import check_output_folder, staged_folder
from ...record import RECORD_NAME, GoraRecord
from ..errors import UsageError

logger = logging.getLogger(__name__)


def merge_adapter(
    adapter: str,
    output_dir: str,
    *,
    base: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> dict[str, str]:
    """Merge a saved adapter into its base model (`merge_and_unload`, in float32) and save a plain transformers
    folder (safetensors) that loads without PEFT.

    Args:
        adapter: Folder with adapter_config.json (as `gora finetune` writes under adapter/).
        output_dir: Where to write the merged model (and the tokenizer, if the adapter folder or base has one).
        base: Base model folder (default: `base_model_name_or_path` in adapter_config.json).
        dtype: dtype of the saved weights ("float32", "bfloat16", "float16").
        overwrite: Replace a non-empty `output_dir`.

    Raises:
        UsageError: no adapter there, no base model, or a base model whose modules do not match the adapter's
            (nothing is written).
    """

    from peft import PeftConfig, PeftModel, PeftType
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise UsageError(f"{adapter!r} has no adapter_config.json: give the adapter folder (e.g. <run>/adapter)")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    check_output_folder(output_dir, overwrite)
    peft_config = PeftConfig.from_pretrained(adapter)
    base = base or peft_config.base_model_name_or_path
    if not base or not (Path(base) / "config.json").is_file():
        raise UsageError(
            f"base model {base!r} not found: pass --base, the folder of the model the adapter was made on"
        )
    task_type = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("task_type")
    loader = AutoModelForSequenceClassification if task_type == "SEQ_CLS" else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if task_type == "SEQ_CLS":
        kwargs.update(_head_kwargs(adapter))
    model = loader.from_pretrained(base, **kwargs)
    if peft_config.peft_type == PeftType.LORA and (Path(adapter) / "adapter_model.safetensors").is_file():
        _check_base_fits(model, adapter, base)
    _check_base_weights(model, adapter, base)
    try:
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as err:  # what PEFT raises for a base it cannot load the adapter on
        raise UsageError(f"the adapter {adapter!r} cannot be loaded on base model {base!r}: {err}") from err
    merged = merged.to(DTYPES[dtype])
    with staged_folder(output_dir, overwrite) as tmp:
        merged.save_pretrained(tmp)
        for folder in (adapter, base):
            try:
                AutoTokenizer.from_pretrained(folder).save_pretrained(tmp)
                break
            except Exception:  # no tokenizer there; try the next folder
                continue
    return {"model": output_dir, "base": base, "adapter": adapter, "dtype": dtype}


def _check_base_fits(model: nn.Module, adapter: str, base: str) -> None:
    """Every module the LoRA adapter adapts exists in `model` with the weight shape its A and B imply.

    Raises:
        UsageError: naming the first modules that are missing or of another shape.
    """
    saved = read_adapter(adapter)
    problems, covered = check_parameter_layers(  # target_parameters: fused expert stacks (docs/moe.md)
        model,
        saved.config.target_parameters or [],
        {n: (saved.tensors[x.a_key].shape, saved.tensors[x.b_key].shape) for n, x in saved.layers.items()},
    )
    for name, layer in ((n, x) for n, x in saved.layers.items() if n not in covered):
        A, B = saved.tensors[layer.a_key], saved.tensors[layer.b_key]
        out_in = (int(B.shape[0]), int(A.shape[1]))
        if layer.a_key.endswith("lora_embedding_A") or saved.config.fan_in_fan_out:  # weight stored [in, out]
            out_in = out_in[::-1]
        try:
            weight = model.get_submodule(name).weight
        except AttributeError:
            problems.append(f"{name} does not exist in the base model")
            continue
        if tuple(weight.shape[:2]) != out_in:
            problems.append(f"{name} has a weight of shape {tuple(weight.shape)}, the adapter's is {out_in}")
    if problems:
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise UsageError(
            f"base model {base!r} does not match the adapter {adapter!r}: {'; '.join(problems[:2])}{more}. Pass "
            "--base, the folder of the model the adapter was made on"
        )


def _check_base_weights(model: nn.Module, adapter: str, base: str) -> None:
    """The base's weights are those the GoRA adapter was made on (`GoraRecord.check_base`), where it can tell.

    Raises:
        UsageError: they differ (nothing is written).
    """
    if not (Path(adapter) / RECORD_NAME).is_file():
        logger.info("%s has no %s: the base model's weights are not checked, only its shapes", adapter, RECORD_NAME)
        return
    try:
        checked = GoraRecord.load(adapter).check_base(model)
    except ValueError as err:
        raise UsageError(f"{err} (base model {base!r}, adapter {adapter!r}): pass --base, its folder") from err
    if not checked:
        logger.warning(
            "the base model's weights are not checked against the adapter's record (it was made on a quantized base "
            "or by an older gora): make sure %r is the model the adapter was made on",
            base,
        )


def _head_kwargs(adapter: str) -> dict[str, Any]:
    """num_labels of a classification adapter, read from the saved head's weight shape."""
    from safetensors import safe_open

    path = Path(adapter) / "adapter_model.safetensors"
    if not path.is_file():
        return {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            if "modules_to_save" not in key and key.endswith(("classifier.weight", "score.weight", "out_proj.weight")):
                return {"num_labels": handle.get_slice(key).get_shape()[0]}
    return {}
