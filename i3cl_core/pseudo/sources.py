"""Where fusion's inputs come from: the unlabeled image list and one prediction source per model.

A source is read by the evaluation's own readers (:func:`i3cl_core.evaluation.io.load_predictions`), so
``i3cl fuse`` and ``i3cl evaluate`` accept the same files with the same messages: a COCO results list
(polygon or RLE ``segmentation``, or ``bbox``), a COCO dataset json with scored annotations, an ArT
submission ``{"res_<n>": [{"points", "confidence"}]}``, or a folder of COCO results shard files as
``i3cl ensemble`` writes them (its ``coverage.json`` lists the image ids the model ran on). What fusion
cannot use is counted per source, never dropped silently: predictions for images that are not in the
list, polygons with fewer than 3 points, non-finite values or zero area, and polygons with a point
more than one image size outside their image.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from i3cl_core.data.errors import DatasetError
from i3cl_core.data.polygons import signed_area
from i3cl_core.data.validate import coco_images, far_outside
from i3cl_core.evaluation.io import GroundTruth, GtImage, parse_predictions
from i3cl_core.fusion import canonical
from i3cl_core.utils import read_json


def load_images(path: str | os.PathLike) -> list[dict]:
    """The ``images`` of IMAGES.json (``id``, ``file_name``, ``width``, ``height``, all required)."""
    p = Path(path)
    try:
        data = read_json(p)
    except FileNotFoundError:
        raise DatasetError(f"{p}: IMAGES.json not found") from None
    return coco_images(data, str(p), non_empty=True)


def _image_list(images: list[dict]):
    return GroundTruth(
        images={
            im["id"]: GtImage(key=im["id"], file_name=im["file_name"], width=im["width"], height=im["height"])
            for im in images
        },
        format="coco",
        source="IMAGES.json",
    )


def _fusion_polygon(instance: list) -> np.ndarray | None:
    """One polygon per prediction: the largest valid part (an RLE mask may trace into several)."""
    best, best_area = None, 0.0
    for part in instance:
        poly = canonical(part)
        if poly is not None:
            area = abs(signed_area(poly))
            if area > best_area:
                best, best_area = poly, area
    return best


def load_model_predictions(source: str | os.PathLike, images: list[dict]) -> tuple[dict, dict]:
    """``({image_id: [(polygon, score)]}, stats)`` for one model on ``images`` (see the module docstring)."""
    src = Path(source)
    gt = _image_list(images)
    coverage = None
    if src.is_dir():
        files = []
        for f in sorted(src.glob("*.json")):
            data = read_json(f)
            if f.name == "coverage.json":
                coverage = set(data["images"])
            elif not isinstance(data, list):
                raise DatasetError(f"{f}: a shard must be a COCO results list")
            else:
                files.append((f, data))
    elif src.is_file():
        files = [(src, read_json(src))]
    else:
        raise DatasetError(f"{src}: prediction file or folder not found")

    preds: dict = {}
    counts = {
        "predictions": 0,
        "images_with_predictions": 0,
        "unknown_image": 0,
        "invalid_polygon": 0,
        "outside_image": 0,
    }
    unknown: list = []
    for f, data in files:
        loaded = parse_predictions(data, gt, str(f))
        counts["unknown_image"] += loaded.num_unknown_predictions
        unknown.extend(u for u in loaded.unknown_image_ids if u not in unknown)
        for key, (instances, scores) in loaded.by_image.items():
            img = gt.images[key]
            for instance, score in zip(instances, scores):
                # far outside first: at 1e12 the area of a small box rounds to 0 and would read as "invalid"
                if any(
                    np.isfinite(part).all() and far_outside(part, img.width, img.height) for part in instance
                ):
                    counts["outside_image"] += 1
                    continue
                poly = _fusion_polygon(instance)
                if poly is None:
                    counts["invalid_polygon"] += 1
                else:
                    preds.setdefault(key, []).append((poly, score))
                    counts["predictions"] += 1
    counts["images_with_predictions"] = len(preds)
    ids = set(gt.images)
    return preds, {
        "source": str(src),
        **counts,
        "unknown_examples": unknown[:5],
        "coverage": None if coverage is None else len(coverage & ids),
        "missing_images": None if coverage is None else sorted(ids - coverage)[:5],
        "_coverage_set": coverage,
    }
