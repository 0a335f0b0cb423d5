"""Where a result comes from: the library versions that shaped it and fingerprints of the base model's weights.

Both the gradient statistics file (stats.py) and GoRA's record beside an adapter (record.py) carry them, so that a
statistics file or an adapter used with another model can be refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import platform
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .config import GoraConfig
from .distributed import full_tensor, unwrap_model
from .experts import get_parameter
from .qlayers import bnb_kind, dequantize
from .targets import Target, find_targets

_CHECKSUM_LAYERS = 4  # weights whose leading values enter the fingerprint
_CHECKSUM_ROWS, _CHECKSUM_COLS = 2, 16


def versions() -> dict[str, str]:
    """Versions of the libraries that shape the result."""
    import peft
    import transformers

    return {
        "gora": __version__,
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def model_fingerprint(model: nn.Module, targets: list[Target]) -> str:
    """sha256 of the targets (names, shapes, layout) and the leading values of a few of their weights.

    The values are rounded to bfloat16 first, so the fingerprint is the same whether the model is loaded in
    float32, bfloat16 or float16 from the same checkpoint, on any device; different weights change it.

    Raises:
        ValueError: a target name is not a module of `model` or its weight has another shape.
    """
    model = unwrap_model(model)
    digest = hashlib.sha256()
    for t in targets:
        experts = f":E{t.experts}" if t.parameter else ""  # unchanged for module targets
        digest.update(f"{t.name}:{t.m}x{t.n}:{int(t.transposed)}{experts};".encode())
    for i in _picks(len(targets)):
        digest.update(_leading_values(model, targets[i]))
    return digest.hexdigest()


def targets_fingerprint(model: nn.Module, config: GoraConfig) -> str:
    """`model_fingerprint` of the targets `config` selects on `model`: what a resumed run checks its base model by.

    Raises:
        ValueError: any target problem `find_targets` reports.
    """
    return model_fingerprint(model, find_targets(model, config))


def base_fingerprint(model: nn.Module, names: list[str]) -> dict[str, Any]:
    """What an adapter records of the base model it was made on: the leading values of a few evenly spaced weights
    among the modules `names` (rounded to bfloat16, as in `model_fingerprint`), so that merging or loading it on
    another checkpoint of the same architecture, whose shapes all fit, can be refused.

    Returns:
        {"modules": the names read, "sha256": their digest, "quantized": whether any of them is a bitsandbytes
        layer (its values are then the dequantized ones, which a full-precision load of the checkpoint does not
        reproduce)}.

    Raises:
        ValueError: a name that is not a module of `model` with a weight.
    """
    model = unwrap_model(model)
    picked = [names[i] for i in _picks(len(names))]
    digest = hashlib.sha256()
    quantized = False
    for name in picked:
        module = _weight_module(model, name)
        quantized |= bnb_kind(module) is not None
        digest.update(f"{name};".encode() + _leading_block(module))
    return {"modules": picked, "sha256": digest.hexdigest(), "quantized": quantized}


def _picks(count: int) -> list[int]:
    """Indices of `_CHECKSUM_LAYERS` evenly spaced items among `count` (first and last included)."""
    if not count:
        return []
    return sorted({round(i * (count - 1) / max(1, _CHECKSUM_LAYERS - 1)) for i in range(_CHECKSUM_LAYERS)})


def _weight_module(model: nn.Module, name: str) -> nn.Module:
    """The module `name` of `model` (the base layer inside a PEFT LoRA layer), which must have a weight; for a
    parameter name (target_parameters) a stand-in whose `weight` is that parameter."""
    with contextlib.suppress(AttributeError):
        model.get_submodule(name)
        return _check_weight(model, name)
    with contextlib.suppress(AttributeError, ValueError):  # not a module: a targeted parameter?
        return _Parameter(get_parameter(model, name))
    return _check_weight(model, name)


def _check_weight(model: nn.Module, name: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
        if hasattr(module, "get_base_layer"):  # a PEFT LoRA layer around the target (the adapter was built since)
            module = module.get_base_layer()
        module.weight  # noqa: B018 (the AttributeError is the check)
    except AttributeError as err:
        raise ValueError(f"the model has no module {name!r} with a weight") from err
    return module


class _Parameter:
    """A targeted parameter seen as a module with that weight (its 2-D, or its first expert's, leading values)."""

    def __init__(self, param: torch.Tensor) -> None:
        self.weight = param[0] if param.dim() == 3 else param
        self.shape = tuple(param.shape)


def _leading_values(model: nn.Module, target: Target) -> bytes:
    module = _weight_module(model, target.name)
    if isinstance(module, _Parameter):
        shape, expected = module.shape, _stored_shape(target)
    elif bnb_kind(module) is not None:  # packed integers: check the layer's shape, read its dequantized values
        shape, expected = (module.out_features, module.in_features), (target.m, target.n)
    else:  # the stored layout, as it always was read ([n, m] for Conv1D)
        shape, expected = (
            tuple(module.weight.shape),
            (target.n, target.m) if target.transposed else (target.m, target.n),
        )
    if shape != expected:
        raise ValueError(f"{target.name} has weight shape {shape}, the statistics expect {expected}")
    return _leading_block(module)


def _stored_shape(target: Target) -> tuple[int, ...]:
    """The shape a targeted parameter is stored in: [m, n], (E, m, n), or (E, n, m) when transposed."""
    inner = (target.n, target.m) if target.transposed else (target.m, target.n)
    return (target.experts, *inner) if target.experts else inner


def _leading_block(module: nn.Module) -> bytes:
    """The first rows and columns of the module's weight (dequantized for bitsandbytes), as bfloat16-rounded bytes."""
    values = dequantize(module) if bnb_kind(module) is not None else full_tensor(module.weight.detach())
    block = values[:_CHECKSUM_ROWS, :_CHECKSUM_COLS]
    return block.to(device="cpu", dtype=torch.bfloat16).float().contiguous().numpy().tobytes()
