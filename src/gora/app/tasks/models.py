"""The model and tokenizer of a run: the model folder (or Hub id) checked for the task, the device checked for the
--dtype, bitsandbytes checked for --load-in-4bit / --load-in-8bit, and both loaded with what the task kind needs."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError

if TYPE_CHECKING:
    from torch import nn

    from ..config.runconfig import DataConfig
    from .taskkind import TaskKind


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def check_model(path: str, task: TaskKind) -> Any:
    """The model's `PretrainedConfig`, after checking that `path` (a local transformers folder, or a Hugging Face
    Hub id) is a model fit for `task`.

    Raises:
        UsageError: a missing folder, a hub id that is not in the local cache while the hub cannot be reached, no
            config.json, or a model type the task cannot use.
    """
    from transformers import AutoConfig

    folder = Path(path)
    if folder.exists():
        if not (folder / "config.json").is_file():
            raise UsageError(
                f"{path!r} has no config.json, so it is not a transformers model folder: save the model with "
                "save_pretrained() and pass that folder to --model"
            )
    elif not _HUB_ID.match(path):
        raise UsageError(f"model folder {path!r} does not exist: give --model a local transformers folder")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:
        if folder.exists():
            raise UsageError(f"cannot read the model config in {path!r}: {err}") from err
        raise UsageError(_hub_message(path, err)) from err
    task.check_model_type(config.model_type)
    return config


def _hub_message(model_id: str, err: BaseException) -> str:
    from huggingface_hub import constants

    # huggingface_hub < 1.0 (beside transformers 4.x) reads HF_HUB_OFFLINE once, at its import: the variable counts too
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        return (
            f"--model {model_id!r} is not a local folder, and as a Hugging Face Hub id it is not in the local cache: "
            "the hub cannot be reached, since gora runs offline (HF_HUB_OFFLINE=1) unless told otherwise: run with "
            f"HF_HUB_OFFLINE=0 to download it, or pass the local folder of the model"
        )
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"--model {model_id!r} is not a local folder, and the Hugging Face Hub cannot be reached or has no such "
        f"model ({first}): check the id and the connection, or pass the local folder of the model"
    )


def check_bitsandbytes(option: str = "--load-in-4bit") -> None:
    """Raise UsageError unless bitsandbytes (the backend of --load-in-4bit / --load-in-8bit) can be imported."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise UsageError(
            f"{option} needs bitsandbytes, which is not installed: pip install 'gora-peft[quant]' (or "
            "pip install bitsandbytes)"
        ) from err


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (x86: AVX512-BF16 or AMX; ARM: the BF16 extension).

    Without it torch still runs bfloat16 by converting to float32 and back, several times slower than float32; gora
    refuses --dtype bfloat16 there instead of running it that way.
    """
    import platform

    import torch

    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux (e.g. Apple silicon, whose recent chips have bf16): trust torch
        return True
    return "bf16" in flags


def check_precision(data: DataConfig, device: Any) -> None:
    """Refuse a --dtype this device cannot train in: bfloat16 without hardware support, float16 on a CPU (mixed
    precision with loss scaling needs a GPU).

    Raises:
        UsageError: with what to use instead.
    """
    import torch

    if data.dtype == "bfloat16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UsageError(
                f"--dtype bfloat16: this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16 support: use "
                "--dtype float16 or float32"
            )
        if device.type == "cpu" and not cpu_supports_bf16():
            raise UsageError(
                "--dtype bfloat16: this CPU has no native bfloat16 support (AVX512-BF16 or AMX on x86, BF16 on ARM), "
                "so torch would emulate it, slower than float32: use --dtype float32 (or a GPU)"
            )
    if data.dtype == "float16" and device.type == "cpu":
        raise UsageError(
            "--dtype float16 trains with mixed precision and loss scaling, which needs a GPU: on a CPU use --dtype "
            "bfloat16 (where the CPU supports it) or float32"
        )


def load_tokenizer(path: str, task: TaskKind) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise UsageError(
            f"no usable tokenizer in {path!r} ({err}): save one there with tokenizer.save_pretrained"
        ) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UsageError(f"the tokenizer in {path!r} has neither a pad nor an eos token: add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    task.prepare_tokenizer(tokenizer)
    return tokenizer


def load_model(path: str, data: DataConfig, model_config: Any, labels: Any, device: Any, task: TaskKind) -> nn.Module:
    """The model in `data.dtype` on `device`; with `data.load_in_4bit` its linear layers in bitsandbytes NF4
    (compute dtype `data.dtype`), with `data.load_in_8bit` in LLM.int8, loaded straight onto `device` as
    bitsandbytes requires."""
    import torch

    dtype = getattr(torch, data.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if data.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": device}
    elif data.load_in_8bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}
    model = task.load_model(path, kwargs, data, model_config, labels)
    if data.load_in_4bit:
        _keep_4bit_trainable(model, device)
    elif not data.load_in_8bit:
        model.to(device)
    return model


def _keep_4bit_trainable(model: nn.Module, device: Any) -> None:
    """On a CPU, keep bitsandbytes' 4-bit weights in their trainable layout: on CPUs with AVX512-BF16 it repacks
    them for inference on the first eval-mode forward without gradients (gora's evaluation before training), and
    cannot backpropagate through the repacked layout afterwards."""
    if device.type != "cpu":
        return
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
