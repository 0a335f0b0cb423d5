"""QGoRA: GoRA on a quantized (bitsandbytes) base, trained through PEFT's bitsandbytes integration.

Two starting points, one result (a stock PeftModel whose LoRA layers wrap bitsandbytes bases):

* a model loaded quantized (`from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))`, or
  8-bit): plain `get_gora_model` takes it. Its 4-bit / 8-bit targets have no weight gradient, so estimation reads
  G = Σ_tokens dyᵀ x through module hooks (routes.py), which is the gradient at the base that is trained,
  Ŵ = deq(Q(W0)); the importance dequantizes one layer at a time (full store) or only where the sketch samples
  (sketch store). Peak memory: the quantized model, one batch's activations, the statistics, and one layer's
  dequantized weight. `get_qgora_model(model_loaded_quantized, ...)` does the same (kept for existing callers).
* a full-precision model: `get_qgora_model(model, ..., quantization_config)` estimates G, I(W), the ranks, A0 and
  B0 on the full-precision W0 (as the research code's `quant=True` layers do); then every base nn.Linear (except the
  output layer, `llm_int8_skip_modules` and `modules_to_save`) is replaced by a `Linear4bit` holding NF4(W0),
  exactly as transformers quantizes at load time, and the adapter is written on top. The adapter applies to the
  quantized base Q(W0): W = Q(W0) + s_i·B·A.

Verified on CPU (bitsandbytes 0.50 CPU backend, tiny config-built Llama) and on one H200 (benchmarks/results/
gpu_check.json, gpu_qgora.json).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .batches import ForwardFn
from .config import GoraConfig
from .distributed import check_not_sharded
from .model import RunOptions, build_estimated, estimate_and_allocate
from .qlayers import bnb_kind
from .targets import find_targets

logger = logging.getLogger(__name__)


def get_qgora_model(
    model: nn.Module,
    config: GoraConfig,
    dataloader: Iterable[Any],
    quantization_config: Any = None,
    *,
    forward_fn: ForwardFn | None = None,
    adapter_name: str = "default",
    offload_to_cpu: bool = False,
    show_progress: bool = True,
    eval_dataloader: Iterable[Any] | None = None,
):
    """Run GoRA and return a stock PeftModel on a quantized base (QGoRA), ready to train.

    Args:
        model: A full-precision model (estimated on, then quantized to 4-bit in place) or a model already quantized
            by bitsandbytes (loaded with `quantization_config=BitsAndBytesConfig(...)`, 4-bit or 8-bit), which is
            exactly `get_gora_model(model, ...)`.
        config: The GoRA configuration.
        dataloader: Batches as for `get_gora_model`.
        quantization_config: A `transformers.BitsAndBytesConfig` with `load_in_4bit=True` for a full-precision
            model; None = NF4 with the model's dtype as compute dtype. Must be None for an already quantized model.
        forward_fn: Optional `forward_fn(model, batch) -> loss`.
        adapter_name: Name of the LoRA adapter.
        offload_to_cpu: Keep gradient accumulators on the CPU.
        show_progress: Show progress bars.
        eval_dataloader: Held-out batches for `gamma="auto"` (see `get_gora_model`); γ is chosen on the quantized
            base.

    Returns:
        A `peft.PeftModel` whose LoRA layers are PEFT's bitsandbytes LoRA layers. The record gains
        `extra["qgora"]` (what was quantized, how, and where the gradient was estimated).

    Raises:
        ValueError: bitsandbytes missing, a config that is not 4-bit, GPT-2 style Conv1D targets, targets quantized
            another way, or anything `get_gora_model` rejects. The model is left as it was.
    """
    check_not_sharded(model, "get_qgora_model")
    options = RunOptions(
        forward_fn=forward_fn,
        adapter_name=adapter_name,
        offload_to_cpu=offload_to_cpu,
        show_progress=show_progress,
        eval_dataloader=eval_dataloader,
    )
    _import_bnb()
    kinds = sorted({bnb_kind(m) for m in model.modules()} - {None})
    if kinds:
        if quantization_config is not None:
            raise ValueError(
                f"the model is already quantized (bitsandbytes {'/'.join(kinds)} layers): pass "
                "quantization_config=None, or call gora.get_gora_model(model, ...), which is the same"
            )
        peft_model = build_estimated(model, config, estimate_and_allocate(model, config, dataloader, options), options)
        estimated_on = f"the quantized base ({'/'.join(kinds)}, module hooks)"
        peft_model.gora_records[adapter_name].extra["qgora"] = {"estimated_on": estimated_on, "prequantized": True}
        return peft_model
    qconfig = _check_quantization_config(quantization_config, model)
    _check_linear_targets(model, config)
    estimated = estimate_and_allocate(model, config, dataloader, options)
    start = time.perf_counter()
    originals = _quantize(model, qconfig, _skip_modules(model, qconfig, config))
    estimated.timings["quantize_s"] = time.perf_counter() - start
    info: dict[str, Any] = {
        "estimated_on": "full precision",
        "prequantized": False,
        "quantized_modules": sorted(originals),
        "quant_type": qconfig.bnb_4bit_quant_type,
        "compute_dtype": str(qconfig.bnb_4bit_compute_dtype),
        "double_quant": bool(qconfig.bnb_4bit_use_double_quant),
    }
    try:
        peft_model = build_estimated(model, config, estimated, options)
    except BaseException:
        _restore(model, originals)
        raise
    logger.info("QGoRA: %d linear layers quantized to 4-bit %s", len(originals), qconfig.bnb_4bit_quant_type)
    peft_model.gora_records[adapter_name].extra["qgora"] = info
    return peft_model


def quantize_base(model: nn.Module, quantization_config: Any = None, *, skip_modules: Iterable[str] = ()) -> list[str]:
    """Replace the base nn.Linear layers of `model` by bitsandbytes `Linear4bit` layers, in place.

    The result is the model transformers builds with `from_pretrained(..., quantization_config=...)` from the same
    weights: the output layer (and tied weights), `llm_int8_skip_modules` and `skip_modules` stay in full precision.

    Returns:
        The names of the quantized modules.
    """
    _import_bnb()
    qconfig = _check_quantization_config(quantization_config, model)
    skip = _default_skips(model, qconfig) + list(skip_modules)
    return sorted(_quantize(model, qconfig, skip))


def _quantize(model: nn.Module, qconfig: Any, skip: list[str]) -> dict[str, nn.Module]:
    """Quantize every plain nn.Linear outside `skip`; returns name -> original module (for `_restore`)."""
    bnb = _import_bnb()
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and should_convert_module(n, skip)]
    if not names:
        raise ValueError("no nn.Linear layer to quantize: the model has none outside the skipped modules")
    originals: dict[str, nn.Module] = {}
    had_flag = hasattr(model, "is_loaded_in_4bit")
    try:
        for name in names:
            original = model.get_submodule(name)
            with torch.device("meta"):
                new = bnb.nn.Linear4bit(
                    original.in_features,
                    original.out_features,
                    original.bias is not None,
                    qconfig.bnb_4bit_compute_dtype,
                    compress_statistics=qconfig.bnb_4bit_use_double_quant,
                    quant_type=qconfig.bnb_4bit_quant_type,
                    quant_storage=qconfig.bnb_4bit_quant_storage,
                )
            weight = original.weight.detach()
            # Params4bit.to(device) runs bnb.functional.quantize_4bit: the same call transformers makes when loading
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, **new.weight.__dict__).to(weight.device)
            new.bias = original.bias
            new.train(original.training)
            _set_submodule(model, name, new)
            originals[name] = original
        model.is_loaded_in_4bit = True  # PEFT dispatches Linear4bit bases to its bnb LoRA layer only with this flag
    except BaseException:
        _restore(model, originals, had_flag)
        raise
    return originals


def _restore(model: nn.Module, originals: dict[str, nn.Module], had_flag: bool = False) -> None:
    for name, original in originals.items():
        _set_submodule(model, name, original)
    if not had_flag and "is_loaded_in_4bit" in model.__dict__:
        del model.is_loaded_in_4bit


def _skip_modules(model: nn.Module, qconfig: Any, config: GoraConfig) -> list[str]:
    """Modules that stay in full precision: transformers' defaults plus PEFT's `modules_to_save` (trained in full)."""
    return _default_skips(model, qconfig) + list(config.lora_kwargs.get("modules_to_save") or [])


def _default_skips(model: nn.Module, qconfig: Any) -> list[str]:
    from transformers import PreTrainedModel

    skip = list(qconfig.llm_int8_skip_modules or [])
    if isinstance(model, PreTrainedModel):
        try:  # transformers 5
            from transformers.quantizers.base import get_keys_to_not_convert
        except ImportError:  # transformers 4.x
            from transformers.integrations.bitsandbytes import get_keys_to_not_convert

        if qconfig.llm_int8_skip_modules is None:
            skip += get_keys_to_not_convert(model)  # output embeddings, tied weights, last module
        skip += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return skip


def should_convert_module(name: str, skip: list[str]) -> bool:
    """Whether transformers' bitsandbytes loading quantizes module `name` given the skipped `skip`: its own rule in
    transformers 5 (quantizers_utils.should_convert_module: a prefix up to a module boundary, a regex, or a suffix);
    in 4.x the rule of integrations/bitsandbytes.py `_replace_with_bnb_linear` (the module's own name is in `skip`,
    or an entry equals the full name or is followed by a "." in it)."""
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module as rule
    except ImportError:
        short = name.rpartition(".")[2]
        return short not in skip and not any(f"{key}." in name or key == name for key in skip)
    return rule(name, skip)


def _check_quantization_config(quantization_config: Any, model: nn.Module) -> Any:
    from transformers import BitsAndBytesConfig

    if quantization_config is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    if not isinstance(quantization_config, BitsAndBytesConfig) or not quantization_config.load_in_4bit:
        raise ValueError(
            f"QGoRA trains on a 4-bit base: pass transformers.BitsAndBytesConfig(load_in_4bit=True, "
            f"bnb_4bit_quant_type='nf4'), got {quantization_config!r}"
        )
    return quantization_config


def _check_linear_targets(model: nn.Module, config: GoraConfig) -> None:
    if config.target_parameters is not None:  # docs/moe.md
        raise ValueError(
            "QGoRA does not handle target_parameters (fused expert stacks, which bitsandbytes does not quantize): "
            "use get_gora_model on a full-precision model, or drop target_parameters"
        )
    conv = [t.name for t in find_targets(model, config) if t.transposed]
    if conv:
        raise ValueError(
            f"QGoRA quantizes nn.Linear targets; these are GPT-2 style Conv1D layers: {', '.join(conv[:4])}. "
            "Use get_gora_model (full precision) for such models"
        )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _import_bnb() -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ValueError(
            "QGoRA needs bitsandbytes for the 4-bit base: pip install 'gora-peft[quant]' (or bitsandbytes)"
        ) from error
    return bnb
