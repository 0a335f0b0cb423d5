"""The plain LoRA / rsLoRA baseline at GoRA's settings: what GoRA is compared with, built the way PEFT users build it.

The same targets as GoRA (`find_targets`), r = `config.r` everywhere, α = `config.lora_alpha`, scaling α/r (LoRA,
PEFT's default) or α/√r (rsLoRA), PEFT's default init (B = 0).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import GoraConfig
from .targets import find_targets


def get_lora_model(model: nn.Module, config: GoraConfig, *, use_rslora: bool = False) -> Any:
    """A stock `peft.PeftModel` with plain LoRA at GoRA's settings (rsLoRA scaling with `use_rslora`); its
    `lora_shapes` attribute maps each target to its (out, in) shape, (E, out, in) for an expert stack."""
    from peft import LoraConfig, get_peft_model

    targets = find_targets(model, config)
    modules = [t for t in targets if not t.parameter]
    kwargs = dict(config.lora_kwargs)
    kwargs.setdefault("fan_in_fan_out", bool(modules) and all(t.transposed for t in modules))
    if len(modules) < len(targets):  # target_parameters (docs/moe.md)
        kwargs["target_parameters"] = [t.name for t in targets if t.parameter]
    lora_config = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=[t.name for t in modules],
        use_rslora=use_rslora,
        **kwargs,
    )
    peft_model = get_peft_model(model, lora_config)
    peft_model.__dict__["lora_shapes"] = {t.name: t.shape for t in targets}  # (E, m, n) for an expert stack
    return peft_model
