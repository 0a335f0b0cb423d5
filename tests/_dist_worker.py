"""One rank of the 2-process gloo tests (tests/test_distributed.py); run with RANK/WORLD_SIZE/MASTER_* set.

Writes, per scenario, this rank's ranks, importances, statistics and adapters to <out>/<scenario>.rank<r>.*.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

import gora
from conftest import lm_batches, make_llama

BATCHES = 8


def config(**kwargs) -> gora.GoraConfig:
    base = dict(target_modules="all-linear", r=4, min_rank=1, max_rank=8, num_batches=BATCHES // 2, sketch_samples=64)
    return gora.GoraConfig(**{**base, **kwargs})


def run(name: str, model, wrapped, cfg: gora.GoraConfig, batches, out: Path, rank: int) -> None:
    stats = gora.estimate_gradients(wrapped, cfg, batches, show_progress=False)
    importances = gora.compute_importances(wrapped, stats, cfg.importance)
    allocation = gora.allocate_ranks(importances, stats.shapes, cfg)
    weights = gora.init_gora_weights(stats, allocation, cfg)
    tensors = {f"G/{k}": v for k, v in stats.gradients.items()}
    tensors.update({f"Y/{k}": v for k, v in stats.sketches.items()})
    tensors.update({f"A/{k}": a for k, (a, b) in weights.items()})
    tensors.update({f"B/{k}": b for k, (a, b) in weights.items()})
    torch.save({k: v.detach().cpu().clone() for k, v in tensors.items()}, out / f"{name}.rank{rank}.pt")
    meta = {
        "ranks": allocation.ranks,
        "importances": importances,
        "num_batches": stats.num_batches,
        "info": stats.info,
    }
    (out / f"{name}.rank{rank}.json").write_text(json.dumps(meta))


def main() -> None:
    out = Path(sys.argv[1])
    scenarios = sys.argv[2].split(",")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    batches = lm_batches(BATCHES)
    mine = batches[
        rank * BATCHES // world : (rank + 1) * BATCHES // world
    ]  # each rank: its half of the global batches
    if "ddp" in scenarios:  # DDP-wrapped model, gradient_store="full"
        from torch.nn.parallel import DistributedDataParallel

        model = make_llama()
        run("ddp", model, DistributedDataParallel(model), config(), mine, out, rank)
    if "sketch" in scenarios:
        model = make_llama()
        run("sketch", model, model, config(gradient_store="sketch"), mine, out, rank)
    if "fsdp" in scenarios:  # FSDP2: weights and gradients are sharded DTensors
        from torch.distributed.fsdp import fully_shard

        model = make_llama()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        run("fsdp", model, model, config(), mine, out, rank)
    if "adaptive" in scenarios:  # the stop decision must be the same on both ranks
        model = make_llama()
        cfg = config(num_batches=BATCHES // 2, adaptive_batches=True, adaptive_min_batches=2, adaptive_threshold=0.5)
        run("adaptive", model, model, cfg, mine, out, rank)
    if "peft" in scenarios:  # the one-call API: a PeftModel per rank
        model = make_llama()
        peft_model = gora.get_gora_model(model, config(), mine, show_progress=False)
        state = {k: v.detach().clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
        torch.save(state, out / f"peft.rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
