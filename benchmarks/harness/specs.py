"""Suite → runs: the spec dicts of each suite's runs, in the order they run (the definitions they read are in
`benchmarks.harness.suites` and `benchmarks.harness.capacity_suites`)."""

from __future__ import annotations

from typing import Any

from .capacity_suites import GATE_TASKS, GATES, Gate
from .suites import (
    ABLATION_METHODS,
    BASE,
    CORE_METHODS,
    EVIDENCE,
    GRID_LRS,
    GRID_METHODS,
    GRID_SIZES,
    INIT_SEED_OFFSET,
    LORAPLUS_METHODS,
    MAIN_METHODS,
    SUITES,
    Block,
)


def gate_specs(suite: str, gate: Gate | None = None, overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The gate's runs, candidate-major (both ranks of a task finish before the next task starts)."""
    gate = gate or GATES[suite]
    specs = []
    depth = max(len(gate.lrs_for(r)) for r in gate.ranks)
    for name in gate.tasks:
        for i in range(depth):
            for seed in gate.seeds:
                for r in gate.ranks:
                    if i >= len(gate.lrs_for(r)):
                        continue
                    lr = gate.lrs_for(r)[i]
                    specs.append(
                        {
                            **BASE[gate.base],
                            **GATE_TASKS[name],
                            **(overrides or {}),
                            "suite": suite,
                            "block": "gate",
                            "regime": f"r{r}",
                            "stage": "gate",
                            "gate_task": name,
                            "method": gate.method,
                            "r": r,
                            "seed": seed,
                            "init_seed": seed + INIT_SEED_OFFSET,
                            "lr": lr,
                            "eval_split": "val",
                            "groups": ["gate"],
                        }
                    )
    return specs


def _block_spec(suite: str, block: Block, method: str, seed: int, lr: float, stage: str) -> dict[str, Any]:
    return {
        **BASE[block.base],
        **block.overrides,
        "suite": suite,
        "block": block.name,
        "regime": block.regime,
        "stage": stage,
        "method": method,
        "seed": seed,
        "init_seed": seed + INIT_SEED_OFFSET,
        "lr": lr,
        "eval_split": "val" if stage == "tune" else "test",
        "groups": [block.name],
    }


def tune_specs(suite: str, block: Block) -> list[dict[str, Any]]:
    """The tuning runs of a block: lr-major within each method, so each method's grid completes in turn."""
    return [
        _block_spec(suite, block, method, seed, lr, "tune")
        for method in block.tuned
        for lr in block.lrs
        for seed in block.tune_seeds
    ]


def main_specs(suite: str, block: Block, lrs: dict[str, float | None]) -> list[dict[str, Any]]:
    """The main runs of a block at the chosen lrs (`lrs`: tuned method -> lr, None when tuning failed), seed-major so
    a partial run is a complete paired table on its first seeds. Methods without an lr are left out."""
    specs = []
    for seed in block.seeds:
        for method in block.methods:
            source = block.source(method)
            lr = block.fixed_lr.get(source) if not block.tune_seeds else lrs.get(source)
            if lr is None:
                continue
            spec = _block_spec(suite, block, method, seed, lr, "main")
            spec["lr_from"] = source if block.tune_seeds else "fixed"
            specs.append(spec)
    return specs


def _spec(suite: str, base: str, method: str, seed: int, group: str, **overrides: Any) -> dict[str, Any]:
    return {**BASE[base], "suite": suite, "method": method, "seed": seed, "groups": [group], **overrides}


def suite_specs(suite: str, seeds: list[int] | None = None) -> list[dict[str, Any]]:
    """The runs of `suite`, most important first. `seeds` replaces every group's seeds."""
    specs: list[dict[str, Any]] = []
    if suite == "smoke":
        for method in [*MAIN_METHODS, *ABLATION_METHODS]:
            for seed in seeds or [0]:
                specs.append(_spec(suite, "smoke-nlu", method, seed, "main"))
        specs.append(_spec(suite, "smoke-nlu", "init-cost", 0, "cost"))
        for method in ("lora", "gora"):
            for seed in seeds or [0]:
                specs.append(_spec(suite, "smoke-nlg", method, seed, "main"))
    elif suite == "nlu":
        main_seeds = seeds or [0, 1, 2]
        # seed 0 of every method first, then the core comparison's other seeds, then the rest: a partial run is
        # still a complete table
        specs += [_spec(suite, "nlu", m, main_seeds[0], "main") for m in MAIN_METHODS]
        specs.append(_spec(suite, "nlu", "init-cost", main_seeds[0], "cost"))
        for group in (CORE_METHODS, [m for m in MAIN_METHODS if m not in CORE_METHODS]):
            for seed in main_seeds[1:]:
                specs += [_spec(suite, "nlu", m, seed, "main") for m in group]
        for seed in main_seeds:
            specs += [_spec(suite, "nlu", m, seed, "ablation") for m in ABLATION_METHODS]
        for seed in main_seeds:  # the LoRA+ table shows all three seeds
            specs += [_spec(suite, "nlu", m, seed, "loraplus") for m in LORAPLUS_METHODS]
        for size in GRID_SIZES:  # the cheap column first
            for seed in seeds or [0, 1]:
                for lr in GRID_LRS:
                    specs += [_spec(suite, "nlu", m, seed, "grid", lr=lr, train_size=size) for m in GRID_METHODS]
    elif suite == "nlg":
        for seed in seeds or [0]:
            specs += [_spec(suite, "nlg", m, seed, "main") for m in ("lora", "rslora", "gora")]
    elif suite in EVIDENCE:
        raise ValueError(f"{suite} runs in stages: use tune_specs / main_specs on EVIDENCE[{suite!r}]")
    else:
        raise ValueError(f"unknown suite {suite!r}: choose from {', '.join(SUITES)}")
    return specs
