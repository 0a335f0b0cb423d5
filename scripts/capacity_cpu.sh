#!/usr/bin/env bash
# Issue #19 on this CPU: the capacity comparison (`evidence-capacity-long`) on word_sorting at the GPU's budget
# (256 steps of 8), where `capacity-gate-long` found that rank binds with each rank at its own lr. About 40 minutes
# of one core a run (2 at a time on 2 cores, one torch thread each): the core block (lora / rslora / gora tuned over
# 5+ lrs on one seed, then 8 paired seeds each plus rsLoRA r = 32) is ~47 runs, ~16 hours, so it runs over several
# sessions. Runs finished are kept (a run cut mid-way is lost and reruns); the lock keeps every run to one code version,
# so run it from a frozen checkout of one commit while the main checkout moves on:
#
#   git worktree add --detach ../gora-capacity COMMIT && cd ../gora-capacity
#   PYTHON=/path/to/main/.venv/bin/python nohup bash scripts/capacity_cpu.sh > ../capacity.log 2>&1 &
#   # later: copy benchmarks/results/evidence-capacity-long.* back to the main checkout and commit them
#
# The library is imported from this checkout (PYTHONPATH), not from the environment's editable install.
# BLOCKS picks the blocks (default: all, in order: the core block, then the controls at the core's GoRA lr, then the
# r_ref = 8 baselines); one invocation runs them so that a later block sees the lrs the core block chose.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # the library of this checkout (see the lock)
PY="${PYTHON:-.venv/bin/python}"
JOBS="${JOBS:-2}"
BLOCKS="${BLOCKS:-cap-core cap-controls cap-r8}"
# shellcheck disable=SC2086  # BLOCKS is a list
"$PY" -m benchmarks.harness.run evidence-capacity-long --blocks $BLOCKS --jobs "$JOBS"
status=$?
"$PY" -m benchmarks.harness.report_doc || status=1
exit $status
