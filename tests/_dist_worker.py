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
from gora.distributed import sharded_grad_factor
from helpers import lm_batches, make_llama, make_mixtral

BATCHES = 8
TRAIN_LR = 0.1


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


def record_error(name: str, fn, out: Path, rank: int) -> None:
    """Run `fn`; write the ValueError / RuntimeError it raised as "Type: message" (or "") to <out>/<name>.rank<r>.err."""
    try:
        fn()
        message = ""
    except (ValueError, RuntimeError) as error:
        message = f"{type(error).__name__}: {error}"
    (out / f"{name}.rank{rank}.err").write_text(message)


def fsdp_llama():
    from torch.distributed.fsdp import fully_shard

    model = make_llama()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def peft_state(peft_model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peft_model.state_dict().items() if "lora_" in k}


def fsdp_build(mine: list, out: Path, rank: int) -> None:
    """The documented FSDP2 flow: estimate on the sharded model, build on an unsharded copy, shard the PeftModel,
    train one step, save the adapter from the full state dict (rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    cfg = config()
    sharded = fsdp_llama()
    stats = gora.estimate_gradients(sharded, cfg, mine, show_progress=False)
    allocation = gora.allocate_ranks(gora.compute_importances(sharded, stats, cfg.importance), stats.shapes, cfg)
    peft_model = gora.build_gora_model(make_llama(), cfg, stats, allocation)
    torch.save(peft_state(peft_model), out / f"fsdp_build.init.rank{rank}.pt")
    (out / f"fsdp_build.factor.rank{rank}.txt").write_text(str(sharded_grad_factor()))  # 2: the backend sums
    for layer in peft_model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(peft_model)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=TRAIN_LR)
    peft_model.train()
    peft_model(**mine[0]).loss.backward()  # FSDP averages the LoRA gradients over the ranks' batches
    optimizer.step()
    full = get_model_state_dict(peft_model, options=StateDictOptions(full_state_dict=True))
    torch.save({k: v.detach().clone() for k, v in full.items() if "lora_" in k}, out / f"fsdp_build.rank{rank}.pt")
    if rank == 0:
        peft_model.save_pretrained(out / "fsdp_adapter", state_dict=full)


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
    if "hooks_ddp" in scenarios:  # module-hook route (as for quantized layers) under DDP: the same end-of-run sums
        from torch.nn.parallel import DistributedDataParallel

        model = make_llama()
        run("hooks_ddp", model, DistributedDataParallel(model), config(gradient_route="hooks"), mine, out, rank)
    if "hooks_sketch" in scenarios:
        model = make_llama()
        run("hooks_sketch", model, model, config(gradient_store="sketch", gradient_route="hooks"), mine, out, rank)
    if "fsdp" in scenarios:  # FSDP2: weights and gradients are sharded DTensors
        model = fsdp_llama()
        run("fsdp", model, model, config(), mine, out, rank)
    if "adaptive" in scenarios:  # the stop decision must be the same on both ranks
        model = make_llama()
        cfg = config(num_batches=BATCHES // 2, adaptive_batches=True, adaptive_min_batches=2, adaptive_threshold=0.5)
        run("adaptive", model, model, cfg, mine, out, rank)
    if "peft" in scenarios:  # the one-call API: a PeftModel per rank
        model = make_llama()
        peft_model = gora.get_gora_model(model, config(), mine, show_progress=False)
        torch.save(peft_state(peft_model), out / f"peft.rank{rank}.pt")
    # Uneven data: rank 1 gets no batch at all (empty_*), or one batch fewer than rank 0 (uneven_fsdp).
    some = mine if rank == 0 else []
    if "empty_full" in scenarios:  # no per-batch collective: rank 1 adds nothing, G = mean of rank 0's batches
        model = make_llama()
        run("empty_full", model, model, config(), some, out, rank)
    if "empty_sketch" in scenarios:  # rank 1 still joins the pilot's all-reduce, with zero sums
        model = make_llama()
        run("empty_sketch", model, model, config(gradient_store="sketch"), some, out, rank)
    if "empty_fsdp" in scenarios:  # every batch is a collective: the same error on both ranks, no hang
        model = fsdp_llama()
        record_error(
            "empty_fsdp", lambda: gora.estimate_gradients(model, config(), some, show_progress=False), out, rank
        )
    if "empty_adaptive" in scenarios:
        model = make_llama()
        cfg = config(adaptive_batches=True, adaptive_min_batches=2)
        record_error(
            "empty_adaptive", lambda: gora.estimate_gradients(model, cfg, some, show_progress=False), out, rank
        )
    # One rank's batch has no labels (so no loss): that rank raises its ValueError, the other a RuntimeError naming it
    unlabeled = {"input_ids": mine[1]["input_ids"]}
    if "bad_batch" in scenarios:  # in the N batches (full store)
        bad = mine if rank == 0 else [mine[0], unlabeled, *mine[2:]]
        record_error(
            "bad_batch", lambda: gora.estimate_gradients(make_llama(), config(), bad, show_progress=False), out, rank
        )
    if "bad_pilot" in scenarios:  # in the sketch's pilot batch, before the pilot's all-reduce
        bad = mine if rank == 0 else [unlabeled, *mine[1:]]
        cfg = config(gradient_store="sketch")
        record_error(
            "bad_pilot", lambda: gora.estimate_gradients(make_llama(), cfg, bad, show_progress=False), out, rank
        )
    if "uneven_fsdp" in scenarios:  # 4 batches on rank 0, 3 on rank 1: both stop after 3
        model = fsdp_llama()
        run("uneven_fsdp", model, model, config(), mine if rank == 0 else mine[:-1], out, rank)
    if "gamma" in scenarios:  # gamma="auto": the held-out loss is averaged over ranks, so both choose the same γ
        held_out = lm_batches(4, seed=1)[rank * 2 : rank * 2 + 2]
        cfg = config(gamma="auto", gamma_batches=2)
        peft_model = gora.get_gora_model(make_llama(), cfg, mine, eval_dataloader=held_out, show_progress=False)
        torch.save(peft_state(peft_model), out / f"gamma.rank{rank}.pt")
        (out / f"gamma.rank{rank}.json").write_text(json.dumps(peft_model.gora_records["default"].extra))
    if "gamma_short" in scenarios:  # rank 1 has one held-out batch of two: the same error on both ranks
        held_out = lm_batches(2, seed=1)[: 2 - rank]
        cfg = config(gamma="auto", gamma_batches=2)
        record_error(
            "gamma_short",
            lambda: gora.get_gora_model(make_llama(), cfg, mine, eval_dataloader=held_out, show_progress=False),
            out,
            rank,
        )
    if "fsdp_inject" in scenarios:  # LoRA layers into an already-sharded model: refused, before any collective
        model = fsdp_llama()
        record_error("fsdp_inject", lambda: gora.get_gora_model(model, config(), mine, show_progress=False), out, rank)
    if "fsdp_build" in scenarios:
        fsdp_build(mine, out, rank)
    if "experts" in scenarios:  # a DDP-wrapped Mixtral with its fused experts as target_parameters
        from torch.nn.parallel import DistributedDataParallel

        model = make_mixtral()
        cfg = config(target_modules=["q_proj", "v_proj"], target_parameters="all-experts")
        run("experts", model, DistributedDataParallel(model), cfg, mine, out, rank)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
