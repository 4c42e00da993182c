#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): training with AMP, inference next to torchvision's Mask
# R-CNN, bf16 features on/off, the tiny ssl-pipeline with infer.devices=auto; one table at the end.
# Finishes within 8 minutes on one GPU (each part has its own limit). Extra arguments go to the script,
# e.g. --out gpu_check.json, --parts train infer, --quick --device cpu (a smoke run on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    make venv >/dev/null
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
exec timeout 480 .venv/bin/python benchmarks/gpu_check.py "$@"
