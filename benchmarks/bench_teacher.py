"""Train the tiny demo teacher on 200 synthetic images; F-measure (ArT protocol) on the synthetic
test split after every second epoch, against the number of training images seen (what the recipe
needs, whatever the machine) and, secondarily, wall-clock time. Goal: F >= 0.8 within 2,000 training
images (10 epochs of the 200-image split).

    .venv/bin/python benchmarks/bench_teacher.py [--config configs/demo/teacher_a.yaml]
        [--data data/bench] [--work-dir work_dirs/bench_teacher] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def ensure_bench_data(data: Path) -> None:
    """The benchmarks' synthetic data: seed 0, 320 px, 200 train / 200 unlabeled (hidden GT) / 100 test."""
    from i3cl_core.pipeline.stages import ensure_demo_data

    ensure_demo_data(data, seed=0, num_train=200, num_unlabeled=200, num_test=100, size=320)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo/teacher_a.yaml")
    ap.add_argument(
        "--data",
        default="data/bench",
        help="synthetic data (seed 0, 320 px: 200 train, 100 test images), generated when missing",
    )
    ap.add_argument("--work-dir", default="work_dirs/bench_teacher")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="extra overrides (the benchmark's schedule: 10 epochs, lr steps after 7 and 9, "
        "evaluation every 2 epochs)",
    )
    args = ap.parse_args()

    from i3cl_core.config import load_config
    from i3cl_core.engine.train import train

    data = Path(args.data)
    ensure_bench_data(data)
    cfg = load_config(
        args.config,
        [
            f"data.train=[{{ann_file: {data}/train/annotations.json, img_root: {data}/train/images}}]",
            f"data.val.ann_file={data}/test/annotations.json",
            f"data.val.img_root={data}/test/images",
            "train.epochs=10",
            "train.iters_per_epoch=null",
            "train.lr_steps=[7, 9]",
            "train.warmup_iters=100",
            "train.eval_interval=2",
            *args.overrides,
        ],
    )
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.time()
    summary = train(cfg, work, progress=False)
    total = time.time() - t0
    evals = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e.get("eval")]
    per_epoch = summary["iterations"] // max(1, cfg.train.epochs) * cfg.train.batch_size
    print(
        f"\n{args.config}: {summary['iterations']} iterations of {cfg.train.batch_size} images, "
        f"{summary['images_per_s']:.2f} training images/s (including evaluation time), {total:.0f} s in all"
    )
    print(
        f"{'epoch':>5} {'images':>7} {'time s':>7} {'P':>6} {'R':>6} {'F@' + str(cfg.infer.score_thr):>7} "
        f"{'best F':>7} {'at thr':>6}"
    )
    for e in evals:
        print(
            f"{e['epoch']:>5} {e['epoch'] * per_epoch:>7} {e['time']:>7.0f} "
            f"{e['precision']:>6.3f} {e['recall']:>6.3f} "
            f"{e['hmean']:>7.3f} {e['best_hmean']:>7.3f} {e['best_thr']:>6.2f}"
        )
    if not evals:
        print("no evaluation (data.val missing?)")
        return
    within = [e for e in evals if e["epoch"] * per_epoch <= 2000]
    best = max(within, key=lambda e: e["hmean"], default=None)
    if best is None:
        print("no evaluation within 2,000 training images")
    else:
        print(
            f"best F within 2,000 training images: {best['hmean']:.3f} "
            f"after {best['epoch'] * per_epoch} images "
            f"(goal 0.8); last evaluation: F {evals[-1]['hmean']:.3f} "
            f"after {evals[-1]['epoch'] * per_epoch} images, "
            f"{evals[-1]['time']:.0f} s"
        )


if __name__ == "__main__":
    main()
