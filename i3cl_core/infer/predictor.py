"""The model-level predictor: polygons and scores per image of a batch, with test-time augmentation."""

from __future__ import annotations

import numpy as np
import torch

from i3cl_core.fusion import cluster_predictions
from i3cl_core.utils import get_logger

log = get_logger("infer")


def _flip_poly(poly: np.ndarray, w: int, h: int, flip: str) -> np.ndarray:
    p = poly.copy()
    if flip == "h":
        p[:, 0] = w - p[:, 0]
    else:
        p[:, 1] = h - p[:, 1]
    return p[::-1]


@torch.no_grad()
def predict_polygons(
    model, images: list, epsilon: float = 0.005, flips=(), scales=()
) -> list[list[tuple[np.ndarray, float]]]:
    """The one predictor: ``[(polygon, score), ...]`` per image of a batch (images already on the model's
    device, in input coordinates; detections whose mask gives no polygon are left out). Test-time
    augmentation: each of ``flips`` ('h', 'v') and ``scales`` (short sides) runs on the whole batch as
    well, and the variants are fused per image (Weighted Polygon Fusion, at most one detection of each
    variant per cluster, score average over the variants); the model's
    config is never changed (other scales go through ``predict(test_sides=)``)."""
    variants = [(None, None)] + [(f, None) for f in flips] + [(None, s) for s in scales]
    per_image: list[list[list]] = [[] for _ in images]
    for flip, short in variants:
        batch = images
        if flip == "h":
            batch = [torch.flip(im, dims=[-1]) for im in images]
        elif flip == "v":
            batch = [torch.flip(im, dims=[-2]) for im in images]
        sides = None
        if (
            short is not None
        ):  # another short side, the long side limit scaled alike (never below the config's)
            base_short, base_long = model.cfg.test_short_side, model.cfg.test_long_side
            sides = (short, max(base_long, int(base_long * short / base_short)))
        outputs = model.predict(batch, epsilon=epsilon, test_sides=sides)
        for k, (im, out) in enumerate(zip(images, outputs)):
            h, w = im.shape[-2:]
            per_image[k].append(
                [
                    (_flip_poly(poly, w, h, flip) if flip else poly, s)
                    for poly, s in zip(out["polygons"], out["scores"].float().tolist())
                    if poly is not None
                ]
            )
    if len(variants) == 1:
        return [v[0] for v in per_image]
    fused = []
    for outputs in per_image:
        # one member per view in a cluster: a view's own lower-scoring overlapping detections must not pull
        # the cluster's average down (they did, by 4 points of F on the validation split for a student
        # trained with strong augmentation, whose output has twice the teacher's overlapping detections)
        clusters = cluster_predictions(
            outputs, None, iou_thr=0.55, skip_thr=0.0, conf_type="avg", epsilon=epsilon, one_per_model=True
        )
        fused.append([(c.polygon, c.score) for c in clusters if c.polygon is not None])
    return fused
