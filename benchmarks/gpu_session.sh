#!/usr/bin/env bash
# The prepared device call of issue 34, about 9 minutes on one H100/H200 (torch only, no Ray or MLflow):
#   1. benchmarks/gpu_check.py, section production at the full 0.5b depth (8 + 16 blocks, batch 32, 1,024
#      image + 64 text tokens, bf16, compiled under one-rank FSDP2): MFU of Self-E and flow matching and
#      their step ratio, then peak memory;
#   2. benchmarks/gpu_study.py: Self-E and flow matching on the 71M 64x64 model, equal wall time each,
#      GenEval-lite at 1/2/4/8/50 steps, grids and a table.
# Prepare here first (once): python benchmarks/device_prep.py   (.device/minilm: carry it)
# Device call:  bash benchmarks/gpu_session.sh   (reports under $OUT, else outputs/gpu_session)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-outputs/gpu_session}"
TEXT="${SELFE_DEVICE_TEXT:-.device/minilm}"
[ -d "$TEXT" ] || { echo "gpu_session.sh: no text encoder at $TEXT; run python benchmarks/device_prep.py first" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# A failed section is recorded in the report; the study runs either way.
timeout 200 python benchmarks/gpu_check.py --device cuda --profile gpu --blocks 8,16 --sections production,memory \
    --budget-s 170 --out "$OUT/check" || echo "gpu_check.py ended with $?"
python benchmarks/gpu_study.py --profile gpu --device cuda --train-s "${STUDY_TRAIN_S:-120}" --out "$OUT/study" \
    "--text.name=$TEXT"
