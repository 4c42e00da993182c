"""Evaluation speed: our vectorised evaluator vs a plain shapely double loop, on the same random data.

    .venv/bin/python benchmarks/bench_evaluation.py [--n 1000] [--seed 0]

Generates N images of random curved/rotated text polygons (20-30 GT each, ~10 % do-not-care) and predictions
(jittered copies of most GT, a few duplicates and false positives, random scores). Both evaluators score the
``art`` (RRC IoU) and ``totaltext`` (DetEval) protocols; the baseline builds every polygon with
``shapely.Polygon`` and computes the intersection of every GT/detection pair of an image in a Python double
loop (no bounding-box prefilter, no vectorisation). The script checks that both give the same P/R/F and
prints seconds per 1,000 images and the speed-up.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import shapely

from i3cl_core.evaluation.core import _deteval_image, prepare_polygons


def text_polygon(rng, w_img=1280, h_img=720) -> np.ndarray:
    """A rotated, optionally bent text polygon with 2k points (k = 2..7 per long side)."""
    k = int(rng.integers(2, 8))
    w, h = rng.uniform(30, 220), rng.uniform(12, 40)
    bend = rng.uniform(-0.3, 0.3) * h if k > 2 else 0.0
    xs = np.linspace(-w / 2, w / 2, k)
    ys = bend * (1 - (2 * xs / w) ** 2)
    top = np.stack([xs, ys - h / 2], 1)
    bottom = np.stack([xs[::-1], ys[::-1] + h / 2], 1)
    pts = np.vstack([top, bottom])
    a = rng.uniform(-0.5, 0.5)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    centre = rng.uniform([0, 0], [w_img, h_img])
    return pts @ rot.T + centre


def make_data(n_images: int, seed: int):
    rng = np.random.default_rng(seed)
    gt, pred = {}, {}
    for i in range(n_images):
        g = [(text_polygon(rng), bool(rng.uniform() < 0.1)) for _ in range(int(rng.integers(20, 31)))]
        p = []
        for poly, _ in g:
            if rng.uniform() < 0.85:
                c = poly.mean(0)
                q = (
                    (poly - c) * rng.uniform(0.9, 1.1)
                    + c
                    + rng.normal(0, 3, 2)
                    + rng.normal(0, 0.5, poly.shape)
                )
                p.append((q, float(rng.uniform(0.3, 1.0))))
                if rng.uniform() < 0.05:  # duplicate
                    p.append((q + rng.normal(0, 2, 2), float(rng.uniform(0.05, 0.5))))
        p += [(text_polygon(rng), float(rng.uniform(0.05, 0.7))) for _ in range(int(rng.integers(2, 7)))]
        gt[i] = g
        pred[i] = p
    return gt, pred


# ----------------------------------------------------------------- baseline
def _shape(pts):
    poly = shapely.Polygon(pts)
    if poly.is_valid:
        return poly
    fixed = shapely.make_valid(poly)
    parts = [q for q in shapely.get_parts(fixed) if q.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else shapely.Polygon()


def baseline(gt, pred, tr=0.7, tp=0.6):
    """Plain double loop over every GT/detection pair of each image; returns (art P/R/H, totaltext P/R/H)."""
    m = ng = nd = 0
    t_rec = t_prec = 0.0
    t_ng = t_nd = 0
    for key, gts in gt.items():
        g_polys = [_shape(p) for p, _ in gts]
        g_dc = [dc for _, dc in gts]
        dets = pred.get(key, [])
        d_polys = [_shape(p) for p, _ in dets]
        inter = [[g.intersection(d).area for d in d_polys] for g in g_polys]
        d_area = [d.area for d in d_polys]
        g_area = [g.area for g in g_polys]
        care_g = [i for i, dc in enumerate(g_dc) if not dc]
        dc_g = [i for i, dc in enumerate(g_dc) if dc]
        # RRC: DC filter by area precision, then GT-major greedy over detections by descending score
        order = sorted(range(len(dets)), key=lambda j: -dets[j][1])
        care_d = [j for j in order if not any(d_area[j] > 0 and inter[i][j] / d_area[j] > 0.5 for i in dc_g)]
        used = set()
        for i in care_g:
            for j in care_d:
                if j in used:
                    continue
                if inter[i][j] / (g_area[i] + d_area[j] - inter[i][j]) > 0.5:
                    used.add(j)
                    m += 1
                    break
        ng += len(care_g)
        nd += len(care_d)
        # DetEval: DC filter |D & G_dc| / (|D| + 1), file order
        tt_d = [j for j in range(len(dets)) if not any(inter[i][j] / (d_area[j] + 1) > 0.5 for i in dc_g)]
        t_ng += len(care_g)
        t_nd += len(tt_d)
        if care_g and tt_d:
            sigma = np.round(np.array([[inter[i][j] / g_area[i] for j in tt_d] for i in care_g]), 2)
            tau = np.round(
                np.array([[inter[i][j] / d_area[j] if d_area[j] > 0 else 0.0 for j in tt_d] for i in care_g]),
                2,
            )
            r, p, _ = _deteval_image(sigma, tau, tr, tp, 0.8)
            t_rec += r
            t_prec += p

    def prh(num_p, den_p, num_r, den_r):
        p = num_p / den_p if den_p else 0.0
        r = num_r / den_r if den_r else 0.0
        return p, r, (2 * p * r / (p + r) if p + r else 0.0)

    return prh(m, nd, m, ng), prh(t_prec, t_nd, t_rec, t_ng)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    gt, pred = make_data(args.n, args.seed)
    n_gt = sum(len(v) for v in gt.values())
    n_det = sum(len(v) for v in pred.values())
    print(f"{args.n} images, {n_gt} GT polygons, {n_det} predictions")

    t0 = time.perf_counter()
    prep = prepare_polygons(gt, pred)
    t1 = time.perf_counter()
    ours_art = prep.evaluate("art")
    t2 = time.perf_counter()
    ours_tt = prep.evaluate("totaltext")
    t3 = time.perf_counter()
    prep.sweep("art")
    t4 = time.perf_counter()
    base_art, base_tt = baseline(gt, pred)
    t5 = time.perf_counter()

    ours_s = t3 - t0
    base_s = t5 - t4
    per = 1000.0 / args.n
    print(
        f"ours     : geometry+intersections {t1 - t0:.2f} s, art {t2 - t1:.3f} s, totaltext {t3 - t2:.3f} s, "
        f"19-threshold art sweep {t4 - t3:.2f} s"
    )
    print(f"ours     : {ours_s * per:8.2f} s per 1,000 images (art + totaltext)")
    print(f"baseline : {base_s * per:8.2f} s per 1,000 images (plain shapely double loop, art + totaltext)")
    print(f"speed-up : {base_s / ours_s:.1f}x")

    ok = True
    for name, ours, base in (("art", ours_art, base_art), ("totaltext", ours_tt, base_tt)):
        mine = (ours["precision"], ours["recall"], ours["hmean"])
        same = np.allclose(mine, base, rtol=0, atol=1e-12)
        ok &= same
        print(
            f"{name:<9}: ours P/R/F {mine[0]:.4f}/{mine[1]:.4f}/{mine[2]:.4f}  baseline "
            f"{base[0]:.4f}/{base[1]:.4f}/{base[2]:.4f}  {'same' if same else 'DIFFERENT'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
