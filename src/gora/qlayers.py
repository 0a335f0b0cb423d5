"""Quantized base layers (bitsandbytes 4-bit `Linear4bit` and 8-bit `Linear8bitLt`): recognise them, read their
weight, and check that they can backpropagate.

These layers have no weight gradient (their weight is packed integers), so stage 1 estimates their G through
module hooks (routes.py, `_ModuleRoute`), and the importance mean|W ⊙ G| reads Ŵ = deq(Q(W0)) one layer at a time
through `dequantize`, the one place that turns a quantized weight into numbers. bitsandbytes is never imported here:
if the user has not imported it, no layer of theirs can be one of its layers.
"""

from __future__ import annotations

import sys
from typing import Literal

import torch
from torch import nn

BnbKind = Literal["4bit", "8bit"]

# what quantized linear layers of other libraries look like: their class names, or the packages they live in
OTHER_QUANTIZED_HINTS = ("QuantLinear", "HQQLinear", "Int8", "FP8Linear", "WQLinear", "Linear4bit", "Linear8bitLt")
OTHER_QUANTIZED_PACKAGES = (
    "torch.ao.nn.quantized",
    "auto_gptq",
    "gptqmodel",
    "awq",
    "hqq",
    "optimum.quanto",
    "torchao",
)


def bnb_kind(module: nn.Module) -> BnbKind | None:
    """ "4bit" for a bitsandbytes `Linear4bit`, "8bit" for a `Linear8bitLt`, else None."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "8bit"
    return None


def is_other_quantized(module: nn.Module) -> bool:
    """A quantized linear layer that is not bitsandbytes 4/8-bit (GPTQ, AWQ, HQQ, quanto, torch.ao, FP8, ...), or
    any layer whose weight is not a floating-point tensor: GoRA has no way to read its gradient."""
    if bnb_kind(module) is not None:
        return False
    weight = getattr(module, "weight", None)
    if callable(weight) and not isinstance(weight, torch.Tensor):  # torch.ao packs it behind a method
        return True
    if isinstance(weight, torch.Tensor) and not weight.is_floating_point():
        return True
    cls = type(module)
    return cls.__name__.startswith(OTHER_QUANTIZED_HINTS) or cls.__module__.startswith(OTHER_QUANTIZED_PACKAGES)


@torch.no_grad()
def dequantize(module: nn.Module) -> torch.Tensor:
    """Ŵ [out_features, in_features] of one bitsandbytes layer: a new tensor on the layer's device.

    4-bit: `bnb.functional.dequantize_4bit` in the layer's compute dtype (the dtype its forward multiplies in);
    8-bit: the int8 weight times its row scales SCB / 127 (`int8_vectorwise_dequant`, float32). Nothing of the layer
    is changed (unlike `peft.utils.integrations.dequantize_bnb_weight`, which may set `state.SCB`).

    Raises:
        ValueError: `module` is not a bitsandbytes 4-bit or 8-bit linear layer.
    """
    kind = bnb_kind(module)
    if kind is None:
        raise ValueError(f"{type(module).__name__} is not a bitsandbytes Linear4bit / Linear8bitLt layer")
    import bitsandbytes as bnb

    weight = module.weight
    if kind == "4bit":
        state = weight.quant_state
        values = bnb.functional.dequantize_4bit(weight.data, state).to(module.compute_dtype or state.dtype)
    else:
        scb = getattr(weight, "SCB", None)
        scb = module.state.SCB if scb is None else scb  # bitsandbytes moves SCB to the state at the first forward
        if scb is None:
            raise ValueError(
                f"this Linear8bitLt ({module.out_features}x{module.in_features}) holds no int8 weight yet: quantize "
                "it first (load the model with BitsAndBytesConfig(load_in_8bit=True))"
            )
        values = bnb.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device))
    return values.reshape(module.out_features, module.in_features)


def inference_packed(module: nn.Module) -> bool:
    """Whether bitsandbytes repacked this 4-bit weight into its CPU inference layout (no backward through it).

    It does so on the first eval-mode CPU forward without gradients on a CPU with AVX512-BF16
    (`batches.eval_mode` switches that off for gora's own forwards).
    """
    return bool(getattr(getattr(getattr(module, "weight", None), "quant_state", None), "packing_format_for_cpu", 0))


def check_backpropagates(modules: dict[str, nn.Module]) -> None:
    """Refuse 4-bit layers in bitsandbytes' CPU inference layout, through which it cannot backpropagate.

    Raises:
        ValueError: naming the layers and how to get a trainable layout back.
    """
    packed = [name for name, module in modules.items() if inference_packed(module)]
    if packed:
        raise ValueError(
            f"{len(packed)} 4-bit layer(s) (e.g. {packed[0]}) are in bitsandbytes' CPU inference layout, which an "
            "eval-mode forward without gradients on a CPU sets and through which bitsandbytes cannot backpropagate: "
            "reload the quantized model (or keep it in train mode) before GoRA"
        )
