"""The benchmark suites' machinery: `python -m benchmarks.harness.run SUITE`, `python -m benchmarks.harness.report_doc`.

Modules:
    measure         wall-clock and peak-RSS measurement, versions and machine description
    provenance      git commit / diff, command, pip freeze, and the lock that keeps a results file to one of each
    tasks           the tasks (data, models, batches, evaluation through gora.app) of every suite
    methods         how each method builds its trainable model (all through transformers / PEFT)
    training        the one training loop that every method shares
    suites          what each suite is: methods, settings, the evidence protocol's blocks (tune, select lr, main seeds)
    capacity_suites the capacity suites: the gates and the comparisons built from them
    specs           suite → its runs (spec dicts), in the order they run
    capacity        the capacity gate read (which task qualifies) and the comparison's blocks and lr widening
    paired_stats    lr selection, paired bootstrap intervals, McNemar's exact test
    worker          one run → one JSON record
    run             the command line: runs a suite (one subprocess per run, or in-process), resumable
    report_doc      results → docs/BENCHMARKS.md and docs/img/*.png, from its parts:
      report_verdict   the verdict table at the top and the notes around it
      report_capacity  the capacity suites' part
      report_evidence  the evidence suites' part
      report_budget    the budget curve of `evidence-budget` (issue #34; not yet part of the report)
      report_historic  the historic suites' part (smoke, nlu, nlg)
      tables, plots    table cells and figures, shared by the parts
"""
