"""QGoRA: GoRA on a 4-bit (bitsandbytes NF4/FP4) base, trained through PEFT's bitsandbytes integration.

Two starting points, one result (a stock PeftModel whose LoRA layers wrap `bnb.nn.Linear4bit` bases):

* a full-precision model: G, I(W), the ranks, A0 and B0 come from the full-precision W0 (as the research code's
  `quant=True` layers do); then every base nn.Linear (except the output layer, `llm_int8_skip_modules` and
  `modules_to_save`) is replaced by a `Linear4bit` holding NF4(W0), exactly as transformers quantizes at load time,
  and the adapter is written on top. The adapter applies to the quantized base Q(W0): W = Q(W0) + s_i·B·A.
* a model already quantized (`Linear4bit` layers): each target `Linear4bit` is swapped, one layer at a time, for an
  nn.Linear holding its dequantized weight Ŵ = deq(Q(W0)) while gradients and importances are estimated, so
  G = ∂L/∂Ŵ is the gradient at the base that is trained; afterwards the exact original modules are put back.
  Peak memory: the 4-bit model plus the dequantized target weights and the float32 gradient statistics.

Verified on CPU only (bitsandbytes 0.50 CPU backend, tiny config-built Llama); not yet run on a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .batches import ForwardFn
from .config import GoraConfig
from .distributed import check_not_sharded
from .model import RunOptions, build_estimated, estimate_and_allocate
from .targets import QUANTIZED_CLASS_HINTS, base_lora_config, find_targets

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
    """Run GoRA and return a stock PeftModel on a 4-bit base (QGoRA), ready to train.

    Args:
        model: A full-precision model (quantized in place after estimation) or a model whose targets are already
            bitsandbytes `Linear4bit` layers (e.g. loaded with `quantization_config=BitsAndBytesConfig(...)`).
        config: The GoRA configuration.
        dataloader: Batches as for `get_gora_model`.
        quantization_config: A `transformers.BitsAndBytesConfig` with `load_in_4bit=True` for a full-precision
            model; None = NF4 with the model's dtype as compute dtype. Must be None for an already quantized model.
        forward_fn: Optional `forward_fn(model, batch) -> loss`.
        adapter_name: Name of the LoRA adapter.
        offload_to_cpu: Keep gradient accumulators on the CPU.
        show_progress: Show progress bars.
        eval_dataloader: Held-out batches for `gamma="auto"` (see `get_gora_model`); γ is chosen on the 4-bit base.

    Returns:
        A `peft.PeftModel` whose LoRA layers are `peft.tuners.lora.bnb.Linear4bit`. The record gains
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
    bnb = _import_bnb()
    prequantized = any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    if prequantized and quantization_config is not None:
        raise ValueError(
            "the model is already quantized (it has bitsandbytes Linear4bit layers): pass quantization_config=None"
        )
    qconfig = None if prequantized else _check_quantization_config(quantization_config, model)
    if not prequantized:
        _check_linear_targets(model, config)
    with dequantized_targets(model, config) if prequantized else contextlib.nullcontext():
        estimated = estimate_and_allocate(model, config, dataloader, options)
    if prequantized:
        info: dict[str, Any] = {"estimated_on": "dequantized 4-bit weights", "prequantized": True}
        set_flag = not getattr(model, "is_loaded_in_4bit", False)
        model.is_loaded_in_4bit = True  # PEFT dispatches Linear4bit bases to its bnb LoRA layer only with this flag
        try:
            peft_model = build_estimated(model, config, estimated, options)
        except BaseException:
            if set_flag:
                del model.is_loaded_in_4bit
            raise
    else:
        start = time.perf_counter()
        originals = _quantize(model, qconfig, _skip_modules(model, qconfig, config))
        estimated.timings["quantize_s"] = time.perf_counter() - start
        info = {
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


@contextlib.contextmanager
def dequantized_targets(model: nn.Module, config: GoraConfig) -> Iterator[list[str]]:
    """Swap each target `Linear4bit` for an nn.Linear with its dequantized weight, then put the originals back.

    Inside the context the targets are plain nn.Linear layers (so `estimate_gradients`, `compute_importances` and
    `find_targets` work unchanged); on exit the exact original module objects are restored, untouched.

    Yields:
        The names of the swapped modules.

    Raises:
        ValueError: when a target is quantized by something other than bitsandbytes 4-bit.
    """
    bnb = _import_bnb()
    _check_not_cpu_packed(model)
    names, other = [], []
    for name, module in _matching_modules(model, config):
        if isinstance(module, bnb.nn.Linear4bit):
            names.append(name)
        elif type(module).__name__.startswith(QUANTIZED_CLASS_HINTS):
            other.append(f"{name} ({type(module).__name__})")
    if other:
        raise ValueError(
            f"QGoRA can dequantize bitsandbytes 4-bit (Linear4bit) layers only; these targets are quantized otherwise: "
            f"{', '.join(other[:4])}. Load the model in full precision and pass quantization_config to get_qgora_model"
        )
    originals: dict[str, nn.Module] = {}
    try:
        for name in names:  # one layer at a time: dequantize, swap in
            original = model.get_submodule(name)
            _set_submodule(model, name, _DequantizedLinear.from_linear4bit(original))
            originals[name] = original
        yield names
    finally:
        for name, original in originals.items():
            _set_submodule(model, name, original)


class _DequantizedLinear(nn.Linear):
    """An nn.Linear holding Ŵ = deq(Q(W0)) of a Linear4bit; computes in Ŵ's dtype and returns the input dtype."""

    @classmethod
    def from_linear4bit(cls, layer: nn.Module) -> _DequantizedLinear:
        weight = _dequantize(layer)
        new = cls(layer.in_features, layer.out_features, bias=False, device="meta")
        new.weight = nn.Parameter(weight, requires_grad=False)
        new.bias = layer.bias  # the original Parameter: estimation restores its flags
        new.train(layer.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.weight.dtype)
        return F.linear(x.to(self.weight.dtype), self.weight, bias).to(x.dtype)


def _dequantize(layer: nn.Module) -> torch.Tensor:
    """Ŵ [out, in] of a Linear4bit, in its compute dtype (or the dtype it was quantized from)."""
    bnb = _import_bnb()
    state = layer.weight.quant_state
    dtype = layer.compute_dtype or state.dtype
    weight = bnb.functional.dequantize_4bit(layer.weight.data, state)
    return weight.to(dtype).reshape(layer.out_features, layer.in_features)


def _quantize(model: nn.Module, qconfig: Any, skip: list[str]) -> dict[str, nn.Module]:
    """Quantize every plain nn.Linear outside `skip`; returns name -> original module (for `_restore`)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

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
        from transformers.quantizers.base import get_keys_to_not_convert

        if qconfig.llm_int8_skip_modules is None:
            skip += get_keys_to_not_convert(model)  # output embeddings, tied weights, last module
        skip += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return skip


def _check_not_cpu_packed(model: nn.Module) -> None:
    packed = [
        n for n, m in model.named_modules() if getattr(getattr(m, "quant_state", None), "packing_format_for_cpu", 0)
    ]
    if packed:
        raise ValueError(
            f"{len(packed)} 4-bit layer(s) (e.g. {packed[0]}) are in bitsandbytes' CPU inference layout, which an "
            "eval-mode forward without gradients on a CPU sets and through which bitsandbytes cannot backpropagate: "
            "reload the quantized model (or keep it in train mode) before QGoRA"
        )


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
    conv = [t.name for t in find_targets(model, config) if t.transposed]
    if conv:
        raise ValueError(
            f"QGoRA quantizes nn.Linear targets; these are GPT-2 style Conv1D layers: {', '.join(conv[:4])}. "
            "Use get_gora_model (full precision) for such models"
        )


def _matching_modules(model: nn.Module, config: GoraConfig) -> list[tuple[str, nn.Module]]:
    """Modules matched by PEFT's rules for `config.target_modules` (as `find_targets`, without its type checks)."""
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists

    lora_config = _maybe_include_all_linear_layers(base_lora_config(config, model), model)
    return [(n, m) for n, m in model.named_modules() if n and check_target_module_exists(lora_config, n)]


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
