"""What stage 1 produces (`GradientStats`) and its artifact: save once, allocate and initialize again without a
forward pass.

One `.safetensors` file: the tensors (`gradients/<module>` = G, `sketches/<module>` = Y = G·A_maxᵀ) and, in its
metadata under the key "gora", a JSON header with the model fingerprint, targets, N, seed, store mode,
importances of sketched layers and library versions. Never pickle. Written through a temporary file and
`os.replace`, so an interrupted save leaves either the old file or none, never a truncated one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .distributed import full_tensor, unwrap_model
from .experts import get_parameter
from .fileio import atomic_write
from .qlayers import bnb_kind, dequantize
from .targets import Target

FORMAT = "gora-gradient-stats"
FORMAT_VERSION = 1
_CHECKSUM_LAYERS = 4  # weights whose leading values enter the fingerprint
_CHECKSUM_ROWS, _CHECKSUM_COLS = 2, 16


@dataclass
class GradientStats:
    """What gradient estimation produced.

    Attributes:
        targets: The adapted modules with their shapes, in model order.
        gradients: Module name -> G, the float32 mean gradient in the [out, in] layout (every layer with
            `store="full"`; only the small layers stored whole with `store="sketch"`).
        num_batches: N, the number of batches averaged (over all ranks under torch.distributed).
        no_grad: Targets whose weight received no gradient at all (unused in the forward); they get no adapter.
        store: "full" or "sketch" (`GoraConfig.gradient_store`).
        sketches: Module name -> Y = G·A_maxᵀ [m, min(max_rank, m, n)] (sketch mode).
        importances: Module name -> I estimated during estimation (sketched layers), for `importance_metric`.
        importance_metric: The metric of `importances`.
        seed: The seed of A_max (sketch mode: A0 must be drawn with it).
        info: How the statistics were made (world size, batches per rank, adaptive stopping, bytes, ...).
    """

    targets: list[Target]
    gradients: dict[str, torch.Tensor]
    num_batches: int
    no_grad: list[str] = field(default_factory=list)
    store: str = "full"
    sketches: dict[str, torch.Tensor] = field(default_factory=dict)
    importances: dict[str, float] = field(default_factory=dict)
    importance_metric: str | None = None
    seed: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> (m, n), or (E, m, n) for an expert stack (docs/moe.md)."""
        return {t.name: t.shape for t in self.targets if t.name in self.gradients or t.name in self.sketches}

    def nbytes(self) -> int:
        """Bytes held by the statistics' tensors."""
        return sum(x.numel() * x.element_size() for x in [*self.gradients.values(), *self.sketches.values()])


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


def save_gradient_stats(stats: GradientStats, path: str | os.PathLike[str], model: nn.Module) -> Path:
    """Write `stats` to `path` (a `.safetensors` file), fingerprinted against `model`, atomically.

    Args:
        stats: What `estimate_gradients` returned (either store).
        path: The file to write; its folder is created.
        model: The model the statistics were estimated on (wrappers are looked through).

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    from .record import versions

    tensors: dict[str, torch.Tensor] = {}
    for kind, table in (("gradients", stats.gradients), ("sketches", stats.sketches)):
        for name, tensor in table.items():
            tensors[f"{kind}/{name}"] = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
    header: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fingerprint": model_fingerprint(model, stats.targets),
        "targets": [_target_row(t) for t in stats.targets],
        "num_batches": stats.num_batches,
        "no_grad": list(stats.no_grad),
        "store": stats.store,
        "seed": stats.seed,
        "importances": dict(stats.importances),
        "importance_metric": stats.importance_metric,
        "info": stats.info,
        "versions": versions(),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"gora": json.dumps(header)}))


def _target_row(t: Target) -> list[Any]:
    row = [t.name, t.m, t.n, t.transposed]
    return [*row, t.parameter, t.experts] if t.parameter else row  # module targets: the format as it always was


def _target(name: str, m: int, n: int, transposed: bool, parameter: bool = False, experts: int = 0) -> Target:
    return Target(name, int(m), int(n), bool(transposed), parameter=bool(parameter), experts=int(experts))


def load_gradient_stats(
    path: str | os.PathLike[str], model: nn.Module, *, device: str | torch.device = "cpu"
) -> GradientStats:
    """Read statistics written by `save_gradient_stats`, after checking that they belong to `model`.

    Args:
        path: The `.safetensors` file.
        model: The model to allocate and initialize for; its targets and leading weight values must match the
            fingerprint stored in the file.
        device: Where to put the tensors.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a gora statistics file, an unknown format version, or a model that does not match.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no gradient statistics file at {path}")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types for foreign or corrupt files
        raise ValueError(
            f"{path} is not a safetensors file ({err}): was it written by gora.save_gradient_stats?"
        ) from err
    with handle:
        raw = (handle.metadata() or {}).get("gora")
        if raw is None:
            raise ValueError(f"{path} has no gora header: was it written by gora.save_gradient_stats?")
        header = json.loads(raw)
        if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} is format {header.get('format')!r} v{header.get('format_version')}, this gora reads "
                f"{FORMAT!r} v{FORMAT_VERSION}: re-estimate the statistics"
            )
        targets = [_target(*row) for row in header["targets"]]
        fingerprint = model_fingerprint(model, targets)
        if fingerprint != header["fingerprint"]:
            raise ValueError(
                f"the gradient statistics in {path} were estimated on a different model (fingerprint "
                f"{header['fingerprint'][:12]}, this model {fingerprint[:12]}): the targets or weights differ. "
                "Load them with the model they were estimated on, or re-estimate"
            )
        tables: dict[str, dict[str, torch.Tensor]] = {"gradients": {}, "sketches": {}}
        for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
            kind, name = key.split("/", 1)
            tables[kind][name] = handle.get_tensor(key).to(device)
    return GradientStats(
        targets=targets,
        gradients=tables["gradients"],
        num_batches=int(header["num_batches"]),
        no_grad=list(header["no_grad"]),
        store=header["store"],
        sketches=tables["sketches"],
        importances={k: float(v) for k, v in header["importances"].items()},
        importance_metric=header["importance_metric"],
        seed=int(header["seed"]),
        info=dict(header["info"]),
    )
