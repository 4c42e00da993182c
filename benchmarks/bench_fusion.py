"""Weighted Polygon Fusion vs ensemble-boxes WBF on the same data, in the same run.

N images x 3 models x 30 predictions (curved 14-point polygons around jittered text lines, plus
false positives). WBF gets each polygon's bounding box, normalised to [0, 1] (clipped, so it takes
them as they are, without warnings); ours gets the polygons and does all of its work (clusters,
scores and fused polygons). Prints seconds for both, per 1,000 images, and the ratios: one process
each, and ours over ``--processes`` worker processes (what ``i3cl fuse --workers`` does) against
WBF's one process. Goal: <= 1.5x.

    .venv/bin/python benchmarks/bench_fusion.py [--images 10000] [--models 3] [--polygons 30] [--processes 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def curved(rng, x, y, w, h, n=7):
    t = np.linspace(0, 1, n)
    bend = rng.uniform(-0.3, 0.3) * h
    top = np.stack([x + w * t, y + bend * np.sin(np.pi * t)], 1)
    bottom = np.stack([x + w * t[::-1], y + h + bend * np.sin(np.pi * t[::-1])], 1)
    return np.vstack([top, bottom])


def make_data(rng, n_images, k, m, size=(1024, 768)):
    W, H = size
    data = []
    for _ in range(n_images):
        base = [
            (rng.uniform(0, W - 200), rng.uniform(0, H - 60), rng.uniform(60, 200), rng.uniform(15, 50))
            for _ in range(int(m * 0.8))
        ]
        per_model = []
        for _ in range(k):
            preds = []
            for x, y, w, h in base:
                j = rng.normal(0, 3, 4)
                preds.append(
                    (curved(rng, x + j[0], y + j[1], w + j[2], h + j[3]), float(rng.uniform(0.3, 1.0)))
                )
            while len(preds) < m:
                x, y = rng.uniform(0, W - 100), rng.uniform(0, H - 40)
                preds.append(
                    (
                        curved(rng, x, y, rng.uniform(30, 100), rng.uniform(10, 30)),
                        float(rng.uniform(0.05, 0.6)),
                    )
                )
            per_model.append(preds)
        data.append(per_model)
    return data, (W, H)


def _cluster_one(img) -> int:
    from i3cl_core.fusion import cluster_predictions

    return len(cluster_predictions(img, None, iou_thr=0.55, skip_thr=0.05, conf_type="avg"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--polygons", type=int, default=30)
    ap.add_argument("--processes", type=int, default=2)
    args = ap.parse_args()
    from ensemble_boxes import weighted_boxes_fusion

    from i3cl_core.fusion import cluster_predictions

    rng = np.random.default_rng(0)
    data, (W, H) = make_data(rng, args.images, args.models, args.polygons)
    norm = np.array([W, H, W, H], dtype=np.float64)
    boxes = [
        [[np.clip(np.r_[p.min(0), p.max(0)] / norm, 0.0, 1.0) for p, _ in preds] for preds in img]
        for img in data
    ]
    scores = [[[s for _, s in preds] for preds in img] for img in data]
    labels = [[[0] * len(preds) for preds in img] for img in data]

    t0 = time.perf_counter()
    n_wbf = 0
    for b, s, lab in zip(boxes, scores, labels):
        fb, fs, _ = weighted_boxes_fusion(b, s, lab, iou_thr=0.55, skip_box_thr=0.05)
        n_wbf += len(fb)
    t_wbf = time.perf_counter() - t0

    t0 = time.perf_counter()
    n_ours = 0
    for img in data:
        n_ours += len(cluster_predictions(img, None, iou_thr=0.55, skip_thr=0.05, conf_type="avg"))
    t_ours = time.perf_counter() - t0

    import multiprocessing as mp

    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(args.processes) as pool:  # start-up included
        n_pool = sum(pool.imap(_cluster_one, data, chunksize=64))
    t_pool = time.perf_counter() - t0
    assert n_pool == n_ours

    n = args.images
    print(f"{n} images x {args.models} models x {args.polygons} predictions")
    print(
        f"  ensemble-boxes WBF (boxes), 1 process             : {t_wbf:8.2f} s  "
        f"({1000 * t_wbf / n:6.2f} s per 1,000 images), {n_wbf} clusters"
    )
    print(
        f"  Weighted Polygon Fusion (polygons), 1 process     : {t_ours:8.2f} s  "
        f"({1000 * t_ours / n:6.2f} s per 1,000 images), {n_ours} clusters"
    )
    print(
        f"  Weighted Polygon Fusion, {args.processes} processes             : {t_pool:8.2f} s  "
        f"({1000 * t_pool / n:6.2f} s per 1,000 images)"
    )
    print(f"  ratio polygon / box, one process each             : {t_ours / t_wbf:8.2f}x")
    print(
        f"  ratio polygon ({args.processes} processes) / box (1 process)     : "
        f"{t_pool / t_wbf:8.2f}x  (goal: <= 1.5x)"
    )


if __name__ == "__main__":
    main()
