#!/usr/bin/env bash
# The SSL benchmark (benchmarks/bench_ssl.py) on one GPU at a larger scale than the CPU default:
# 3 seeds, 50 labeled / 800 unlabeled / 100 validation / 300 test synthetic images at 384 px, every
# arm of the continue protocol (control, ssl, ssl_strong, ssl_strong_bg, oracle), ensembles on the GPU in batches of 8.
# Meant to finish within 9 minutes on one H100-class GPU (never measured yet: a timeout of 540 s ends it
# and the per-seed results written so far stay in work_dirs/gpu_ssl/seed*/result.json).
# SMOKE=1 runs the same path at toy size on the CPU in about a minute (what tests/benchmarks/test_bench_ssl.py runs).
# Extra arguments go to the script, e.g. --arms control ssl_strong_bg oracle.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    make venv >/dev/null
fi
PY=.venv/bin/python
OUT=${OUT_DIR:-work_dirs/gpu_ssl}
if [ "${SMOKE:-0}" = 1 ]; then
    exec "$PY" benchmarks/bench_ssl.py --data "$OUT/data" --work-dir "$OUT/wd" --seeds 1 --teachers teacher_a \
        --protocol continue --tta-flips \
        --arms control ssl_strong_bg --labeled 3 --unlabeled 4 --val 3 --test 3 --size 160 --devices cpu \
        --set-teachers train.epochs=1 --set-teachers train.iters_per_epoch=1 --set-teachers train.warmup_iters=0 \
        --set-arms train.epochs=1 --set-arms train.iters_per_epoch=2 "$@"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# teachers: 250 iterations of 8 images (the CPU default's 2,000 images seen); arms: 75 iterations of 8 (600 images)
exec timeout 540 "$PY" benchmarks/bench_ssl.py --data "$OUT/data" --work-dir "$OUT/wd" --seeds 1 2 3 --size 384 \
    --protocol continue --teachers teacher_a teacher_c --tta-flips \
    --arms control ssl ssl_strong ssl_strong_bg oracle \
    --labeled 50 --unlabeled 800 --val 100 --test 300 --data-workers 16 --devices auto --infer-batch 8 \
    --set-teachers train.batch_size=8 --set-teachers train.epochs=25 --set-teachers train.iters_per_epoch=10 \
    --set-teachers train.lr_steps=[21] --set-teachers data.num_workers=4 \
    --set-arms train.batch_size=8 --set-arms train.epochs=5 --set-arms train.iters_per_epoch=15 \
    --set-arms data.num_workers=4 "$@"
