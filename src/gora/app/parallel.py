"""`gora finetune` under torchrun / accelerate launch: one process per device, data-parallel, one output folder.

    torchrun --nproc_per_node K -m gora finetune ...      accelerate launch -m gora finetune ...

Every rank runs the whole command. The process group is started first, the way the Trainer starts it
(`TrainingArguments.device`, accelerate's PartialState: NCCL on GPUs, gloo on CPUs), so that everything before
training already sees it: GoRA's estimation splits its batches over the ranks and sums the statistics (the library
does this whenever torch.distributed is initialized), so every rank builds the same adapter; the evaluation splits
the examples over the ranks and combines the figures (`shard`, `weighted_means`); rank 0 alone writes the run folder
(`main_process`, `on_main`) while the others wait for it, and an error there is raised on every rank. Training is the
Trainer's DDP. Single-process runs go through the same code, where all of this is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

from ..distributed import fail_together, is_distributed, rank, sum_floats, world_size

T = TypeVar("T")


def launched() -> bool:
    """Started by torchrun / accelerate launch with more than one process (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def main_process() -> bool:
    """Rank 0, or the only process: the one that prints and writes."""
    return rank() == 0 if is_distributed() else int(os.environ.get("RANK", "0")) == 0


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of `items` (every world_size-th, from its rank); all of them in one process."""
    if not is_distributed():
        return list(items)
    return list(items[rank() :: world_size()])


def weighted_means(values: list[float], weight: float, what: str) -> list[float]:
    """Means over all ranks of each of `values`, weighted by `weight` (this rank's count of examples or tokens):
    the figure one process computes over all of them. In one process, `values` unchanged."""
    if not is_distributed():
        return list(values)
    with fail_together(True, what):
        local = [v * weight for v in values] + [float(weight)]
    *sums, total = sum_floats(local)
    return [s / total for s in sums] if total else [0.0] * len(values)


def same_on_all_ranks(value: T) -> T:
    """Rank 0's `value` on every rank (e.g. a default output folder named after the time)."""
    if not is_distributed():
        return value
    import torch

    payload = [value]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else None
    torch.distributed.broadcast_object_list(payload, src=0, device=device)
    return payload[0]


def on_main(write: Callable[[], T], what: str) -> T | None:
    """Run `write` on rank 0 only; every rank returns once it has finished (a barrier), and an error in it is
    raised on every rank (the others with a RuntimeError naming it). In one process: `write()`."""
    if not is_distributed():
        return write()
    result = None
    with fail_together(True, what):
        if rank() == 0:
            result = write()
    return result


def any_rank(flag: bool) -> bool:
    """True on every rank iff some rank's `flag` is True (one collective; e.g. "a signal arrived")."""
    if not is_distributed():
        return flag
    return any(v > 0 for v in sum_floats([float(flag)]))


def max_over_ranks(value: int) -> int:
    """The largest of every rank's `value` (one collective), e.g. the signal any rank received."""
    if not is_distributed():
        return value
    import torch

    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def launch_prefix(processes: int | None = None) -> str:
    """How a command for `processes` processes (default: this run's) starts: "" for one, else the torchrun line
    (one node; across nodes, the same launcher options as the run's)."""
    processes = world_size() if processes is None else processes
    if processes <= 1:
        return ""
    nodes = processes // int(os.environ.get("LOCAL_WORLD_SIZE", processes) or processes)
    if nodes > 1:
        return f"torchrun --nnodes {nodes} --nproc_per_node {processes // nodes} <your rendezvous options> -m "
    return f"torchrun --nproc_per_node {processes} -m "
