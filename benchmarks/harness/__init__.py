"""The benchmark suites' machinery: `python -m benchmarks.harness.run SUITE`, `python -m benchmarks.harness.report_doc`.

Modules:
    measure         wall-clock and peak-RSS measurement, versions and machine description
    provenance      git commit / diff, command, pip freeze, and the lock that keeps a results file to one of each
    tasks           the tasks (data, models, batches, evaluation through gora.app) of every suite
    methods         how each method builds its trainable model (all through transformers / PEFT)
    training        the one training loop that every method shares
    suites          which runs make up each suite; the evidence protocol (blocks: tune, select lr, main seeds)
    paired_stats    lr selection, paired bootstrap intervals, McNemar's exact test
    worker          one run → one JSON record
    run             the command line: runs a suite (one subprocess per run, or in-process), resumable
    report_doc      results → docs/BENCHMARKS.md and docs/img/*.png (report_evidence: the evidence suites' part)
"""
