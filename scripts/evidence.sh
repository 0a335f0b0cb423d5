#!/usr/bin/env bash
# The evidence run of issue #15, most important first: GoRA vs rsLoRA/LoRA and the mechanism controls at r = 8
# and r = 2 (evidence-nlu core blocks), then the generative suite, then the PEFT baselines. One torch thread per
# run; resumable: rerun this script after an interruption and it continues where it stopped (the results files
# lock the commit and environment they started with). Run it from a clean checkout's root, after scripts/setup.sh:
#
#     nohup bash scripts/evidence.sh > evidence.log 2>&1 &
#
# (results go to benchmarks/results/evidence-*.jsonl; they, docs/ and *.log files do not count as changes to the code)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # the library of this checkout (see the lock)
PY=.venv/bin/python
status=0
$PY -m benchmarks.harness.run evidence-nlu --in-process --blocks nlu-r8-core nlu-r2-core || status=1
$PY -m benchmarks.harness.run evidence-nlg --in-process || status=1
$PY -m benchmarks.harness.run evidence-nlu --in-process --blocks nlu-r8-baselines || status=1
$PY -m benchmarks.harness.report_doc || status=1
exit $status
