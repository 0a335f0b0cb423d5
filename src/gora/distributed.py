"""torch.distributed helpers for gradient estimation: DDP / FSDP2 / DeepSpeed awareness and collectives.

Everything here is a no-op in a single process. In a process group, gradient statistics are summed over all
ranks once at the end of estimation (not per batch), so every rank ends with the same float32 statistics and
therefore the same importances, allocation, A0 and B0.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def is_distributed() -> bool:
    """True when a torch.distributed process group with more than one rank is initialized."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1


def world_size() -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


def rank() -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0
    return torch.distributed.get_rank()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DeepSpeedEngine / accelerate wrappers (they keep it as `.module`).

    Target names are those of the unwrapped model, so adapters match `model.module` and a later PEFT wrap.
    """
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine":
        model = model.module
    return model


def check_not_zero3(model: nn.Module) -> None:
    """Refuse DeepSpeed ZeRO-3 partitioned parameters: their `.grad` is never filled, so hooks see nothing."""
    if any(hasattr(p, "ds_id") or hasattr(p, "ds_numel") for p in model.parameters()):
        raise ValueError(
            "the model's parameters are partitioned by DeepSpeed ZeRO-3, whose gradients never reach param.grad: "
            "run GoRA on the model before deepspeed.initialize (ZeRO-1/2 are fine), or shard it with FSDP2 "
            "(torch.distributed.fsdp.fully_shard), which gora supports"
        )


def is_dtensor(tensor: Any) -> bool:
    """True for a DTensor (FSDP2-sharded parameter or gradient)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(tensor, DTensor)


def check_not_sharded(model: nn.Module, what: str) -> None:
    """Refuse to put LoRA layers into an FSDP2-sharded model (`what` names the caller in the error).

    PEFT would add lora_A / lora_B as plain tensors that the existing `fully_shard` groups do not manage: their
    gradients would never be averaged over ranks, so the ranks' adapters drift apart from the first optimizer step.
    """
    if any(is_dtensor(p) for p in unwrap_model(model).parameters()):
        raise ValueError(
            f"{what} got a model sharded with FSDP2 (fully_shard): LoRA layers added to it now would be plain "
            "tensors that FSDP never synchronizes, so the ranks would train different adapters. Estimate on the "
            "sharded model and build the adapter on an unsharded copy, then shard the PeftModel: "
            "stats = gora.estimate_gradients(sharded, config, loader); allocation = gora.allocate_ranks("
            "gora.compute_importances(sharded, stats, config.importance), stats.shapes, config); "
            "peft_model = gora.build_gora_model(unsharded, config, stats, allocation); then fully_shard the "
            "PeftModel's layers and the PeftModel (README: Distributed)"
        )


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathers a DTensor (FSDP2 shard), returns a plain tensor as is."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over all ranks; a CPU tensor goes through the accelerator when the backend is NCCL."""
    if not is_distributed():
        return tensor
    dist = torch.distributed
    if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
        moved = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        tensor.copy_(moved.cpu())
        return tensor
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _comm_device() -> torch.device:
    dist = torch.distributed
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sharded_grad_factor() -> int:
    """How many ranks' gradients an FSDP2 gradient shard holds the sum of: 1 where its reduce-scatter averages
    (ReduceOp.AVG, as FSDP2 asks for float32 gradients), the world size where the backend sums instead. Gloo in
    torch 2.8 does (2.13 averages): probed once with that same collective, which every rank joins."""
    if not is_distributed():
        return 1
    dist = torch.distributed
    n = dist.get_world_size()
    out = torch.zeros(1, device=_comm_device())
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # the newer name, if any
    scatter(out, torch.ones(n, device=out.device), op=dist.ReduceOp.AVG)
    return n if round(float(out)) == n and n > 1 else 1


def sum_counts(values: list[int]) -> list[int]:
    """Element-wise sum of integer counters over all ranks."""
    if not is_distributed() or not values:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64, device=_comm_device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return [int(v) for v in tensor.tolist()]


def ranks_where_false(flag: bool) -> list[int]:
    """The ranks whose `flag` is False, as the same ascending list on every rank (one collective every rank joins).

    In a single process: [] if `flag` else [0].
    """
    if not is_distributed():
        return [] if flag else [0]
    values = [0] * world_size()
    values[rank()] = int(not flag)
    return [r for r, value in enumerate(sum_counts(values)) if value]


@contextlib.contextmanager
def fail_together(active: bool, what: str) -> Iterator[None]:
    """An exception inside the block is raised on every rank, not only on the rank where it happened.

    Without this, a rank that fails (a bad batch, a non-finite loss) leaves the others waiting forever in the next
    collective. The block must contain no collective; after it every rank joins one (`ranks_where_false`): the
    failing rank re-raises its own error, the others a RuntimeError naming it. `active=False` (a single process, or
    a block whose ranks already meet in collectives) makes this a no-op.
    """
    if not active:
        yield
        return
    try:
        yield
    except Exception:
        ranks_where_false(False)
        raise
    failed = ranks_where_false(True)
    if failed:
        raise RuntimeError(f"rank(s) {failed} failed during {what}: see their error; every rank stops here")


def sum_floats(values: list[float]) -> list[float]:
    """Element-wise sum of float64 values over all ranks."""
    if not is_distributed() or not values:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return [float(v) for v in tensor.tolist()]


def all_true(flag: bool) -> bool:
    """True on every rank iff `flag` is True on every rank (the same decision everywhere)."""
    if not is_distributed():
        return flag
    tensor = torch.tensor([int(flag)], dtype=torch.int64, device=_comm_device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
    return bool(tensor.item())


def sync_importances(importances: dict[str, float]) -> dict[str, float]:
    """Rank 0's importances on every rank, so the (pure) allocation is identical everywhere.

    They are computed from identical all-reduced statistics, so they already agree unless the model weights
    differ across ranks; that is logged as a warning and rank 0 wins.
    """
    if not is_distributed():
        return importances
    payload = [importances]
    torch.distributed.broadcast_object_list(payload, src=0, device=_comm_device())
    reference: dict[str, float] = payload[0]
    differs = [
        name
        for name, value in importances.items()
        if not math.isclose(value, reference.get(name, math.nan), rel_tol=1e-5, abs_tol=0.0)
    ]
    if differs or set(reference) != set(importances):
        logger.warning(
            "rank %d: importances differ from rank 0 for %d layer(s) (e.g. %s): the model weights differ across "
            "ranks; using rank 0's",
            rank(),
            len(differs),
            ", ".join(differs[:3]),
        )
    return dict(reference)
