"""Benchmarks of GoRA against the LoRA family: `python -m benchmarks.run SUITE`, `python -m benchmarks.report`.

Modules:
    measure  wall-clock and peak-RSS measurement, versions and machine description
    tasks    the tasks (data, models, batches, evaluation) of the `smoke`, `nlu` and `nlg` suites
    methods  how each method builds its trainable model (all through transformers / PEFT)
    train    the one training loop that every method shares
    suites   which runs make up each suite
    worker   one run → one JSON record
    run      the command line: runs a suite (one subprocess per run), resumable
    report   results → docs/BENCHMARKS.md and docs/img/*.png
    serving_llamacpp  run by hand: a GoRA adapter and its `gora export` in llama.cpp against PEFT
                      (llamacpp_logits runs inside the llama.cpp environment)
"""
