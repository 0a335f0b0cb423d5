"""What stage 1 produces (`GradientStats`) and its artifact: save once, allocate and initialize again without a
forward pass.

One `.safetensors` file: the tensors (`gradients/<module>` = G, `sketches/<module>` = Y = G·A_maxᵀ) and, in its
metadata under the key "gora", a JSON header with the model fingerprint, targets, N, seed, store mode,
importances of sketched layers and library versions. Never pickle. Written through a temporary file and
`os.replace`, so an interrupted save leaves either the old file or none, never a truncated one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import GoraConfig
from .fileio import atomic_write
from .provenance import model_fingerprint, versions
from .targets import Target, find_targets

FORMAT = "gora-gradient-stats"
FORMAT_VERSION = 1


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
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    device: str | torch.device = "cpu",
    config: GoraConfig | None = None,
) -> GradientStats:
    """Read statistics written by `save_gradient_stats`, after checking that they belong to `model`.

    Args:
        path: The `.safetensors` file.
        model: The model to allocate and initialize for; its targets and leading weight values must match the
            fingerprint stored in the file.
        device: Where to put the tensors.
        config: The configuration they are to be used with: when given, the statistics must hold the targets it
            selects on `model` (else allocation would silently follow the file) and, for a sketch, have been drawn
            with its seed (A0 must be the sketch's random matrix).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a gora statistics file, an unknown format version, a model that does not match, or
            statistics that do not fit `config`.
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
    stats = GradientStats(
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
    if config is not None:
        _check_fits(stats, model, config)
    return stats


def _check_fits(stats: GradientStats, model: nn.Module, config: GoraConfig) -> None:
    """The statistics hold the targets `config` selects on `model`, in order, and a sketch was drawn with its seed."""
    saved, wanted = [t.name for t in stats.targets], [t.name for t in find_targets(model, config)]
    if saved != wanted:
        raise ValueError(
            f"the statistics hold {len(saved)} target modules but target_modules selects {len(wanted)} "
            f"({', '.join(sorted(set(saved) ^ set(wanted))[:4]) or 'another order'} differ): use the target_modules "
            "they were saved with, or re-estimate"
        )
    if stats.sketches and stats.seed != config.seed:
        raise ValueError(
            f"the statistics hold a sketch drawn with seed={stats.seed}, the configuration has seed={config.seed}: "
            f"A0 must be the sketch's random matrix, so use seed={stats.seed}"
        )
