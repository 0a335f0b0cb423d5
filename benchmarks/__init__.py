"""Benchmarks of GoRA against the LoRA family: `python -m benchmarks.run SUITE`, `python -m benchmarks.report`.

Modules:
    measure     wall-clock and peak-RSS measurement, versions and machine description
    provenance  git commit / diff, command, pip freeze, and the lock that keeps a results file to one of each
    tasks       the tasks (data, models, batches, evaluation through gora.app) of every suite
    methods     how each method builds its trainable model (all through transformers / PEFT)
    train       the one training loop that every method shares
    suites      which runs make up each suite; the evidence protocol (blocks: tune, select lr, main seeds)
    stats       lr selection, paired bootstrap intervals, McNemar's exact test
    worker      one run → one JSON record
    run         the command line: runs a suite (one subprocess per run, or in-process), resumable
    report      results → docs/BENCHMARKS.md and docs/img/*.png (report_evidence: the evidence suites' part)
    serving_llamacpp  run by hand: a GoRA adapter and its `gora export` in llama.cpp against PEFT
                      (llamacpp_logits runs inside the llama.cpp environment)
    init_overhead     GoRA's initialization against the floor of N fwd+bwd passes, and PEFT's LoRA-GA
    qgora_memory, hook_route, gpu_qgora, gpu_check, checkpoint_size: see their docstrings
"""
