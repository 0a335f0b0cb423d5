"""Benchmarks of GoRA against the LoRA family; benchmarks/README.md is the index (what each file is, the command that
runs it, where its results go).

    harness/  the suite machinery: `python -m benchmarks.harness.run SUITE`, `python -m benchmarks.harness.report_doc`
    studies/  one-off studies, each with its own main(): `python -m benchmarks.studies.NAME`
    results/  every record (both write there; records are history and are never rewritten)
"""
