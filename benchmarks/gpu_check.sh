#!/usr/bin/env bash
# One command for a GPU: the full check (benchmarks/gpu_check.py) on the first visible GPU, within
# 8 minutes, report in outputs/gpu_check/ (gpu_check.md, gpu_check.json). Without a GPU it runs the
# CPU smoke profile instead. Extra arguments go to gpu_check.py (e.g. --blocks 8,16, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    exec python benchmarks/gpu_check.py --device cuda --profile gpu --budget-s 450 --out outputs/gpu_check "$@"
fi
echo "gpu_check.sh: no CUDA device visible; running the CPU smoke profile" >&2
exec python benchmarks/gpu_check.py --device cpu --profile cpu --out outputs/gpu_check "$@"
