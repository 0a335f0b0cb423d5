"""Which runs make up each suite, in the order they run (the most important first, so partial runs are useful).

A spec is a flat dict; `benchmarks.worker.run_id` says which of its keys identify a run, so a run shared by two
groups (e.g. GoRA at the main setting is also a cell of the grid) runs once.
"""

from __future__ import annotations

from typing import Any

MAIN_METHODS = [
    "full",
    "lora",
    "rslora",
    "pissa",
    "loraga",
    "adalora",
    "eva",
    "gora",
    "gora-gamma0",
    "gora-fixed",
    "gora-matched",
    "lora+loraplus",
    "gora+loraplus",
]
CORE_METHODS = ["lora", "rslora", "gora", "gora-matched", "pissa", "loraga", "gora-gamma0", "gora-fixed"]
ABLATION_METHODS = [
    "gora-rank6-15",
    "gora-gamma3e-2",
    "gora-gamma8e-2",
    "gora-imp-grad_nuclear",
    "gora-imp-wg_nuclear",
]
# LoRA+ check: GoRA + LoRA+ collapsed at the main setting while LoRA + LoRA+ did not; these vary one part at a time
# (B's learning-rate ratio, rsLoRA's scaling without GoRA, GoRA without its non-zero B0)
LORAPLUS_METHODS = ["gora+loraplus4", "rslora+loraplus", "gora-gamma0+loraplus"]
GRID_METHODS = ["lora", "rslora", "gora", "gora-matched"]
GRID_LRS = [1e-4, 5e-4]
GRID_SIZES = [500, 2000]

BASE: dict[str, dict[str, Any]] = {
    "nlu": {
        "task": "nlu",
        "train_size": 2000,
        "test_size": None,  # the fixed 1,000-review held-out split
        "batch_size": 16,
        "max_length": 64,
        "num_batches": 16,
        "r": 8,
        "lr": 5e-4,
        "lr_full": 5e-5,
        "warmup_ratio": 0.1,
        "scheduler": "linear",
        "threads": 2,
    },
    # reduced to fit the shared 2-core CPU machine (a fwd+bwd of 8 x 256 tokens took 20-50 s there): first planned
    # as 240 examples in batches of 8 (30 steps), N = 8 calibration batches, 50 held-out problems
    "nlg": {
        "task": "nlg",
        "train_size": 96,
        "test_size": 25,
        "batch_size": 4,
        "max_length": 256,
        "num_batches": 4,
        "r": 8,
        "lr": 2e-4,
        "lr_full": 2e-5,
        "warmup_ratio": 0.1,
        "scheduler": "linear",
        "max_new_tokens": 160,
        "threads": 2,
    },
    "smoke-nlu": {
        "task": "smoke-nlu",
        "eva_tau": 0.5,  # EVA cycles the batches until its components converge: slow on a random tiny model
        "cost_repeats": 1,
        "train_size": 48,
        "test_size": 32,
        "batch_size": 8,
        "max_length": 32,
        "num_batches": 2,
        "r": 4,
        "lr": 5e-3,
        "lr_full": 1e-3,
        "warmup_ratio": 0.1,
        "scheduler": "linear",
        "threads": 1,
    },
    "smoke-nlg": {
        "task": "smoke-nlg",
        "eva_tau": 0.5,  # EVA cycles the batches until its components converge: slow on a random tiny model
        "cost_repeats": 1,
        "train_size": 12,
        "test_size": 4,
        "batch_size": 4,
        "max_length": 96,
        "num_batches": 2,
        "r": 4,
        "lr": 5e-3,
        "lr_full": 1e-3,
        "warmup_ratio": 0.1,
        "scheduler": "linear",
        "max_new_tokens": 8,
        "threads": 1,
    },
}

SUITES = ("smoke", "nlu", "nlg")


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
        for seed in main_seeds[:1]:
            specs += [_spec(suite, "nlu", m, seed, "loraplus") for m in LORAPLUS_METHODS]
        for size in GRID_SIZES:  # the cheap column first
            for seed in seeds or [0, 1]:
                for lr in GRID_LRS:
                    specs += [_spec(suite, "nlu", m, seed, "grid", lr=lr, train_size=size) for m in GRID_METHODS]
    elif suite == "nlg":
        for seed in seeds or [0]:
            specs += [_spec(suite, "nlg", m, seed, "main") for m in ("lora", "rslora", "gora")]
    else:
        raise ValueError(f"unknown suite {suite!r}: choose from {', '.join(SUITES)}")
    return specs
