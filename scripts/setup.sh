#!/usr/bin/env bash
# Installs selfe and its dependencies into the current Python.
# torch goes first and pinned: on this kind of machine torch==2.13.0 is the local CPU build,
# while a bare "torch" requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test]"
