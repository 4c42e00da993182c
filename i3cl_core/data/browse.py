"""A COCO dataset's polygons (and optionally predictions) drawn on its images (``i3cl browse``).

Care instances are drawn in green, do-not-care ones (``iscrowd: 1`` or ``ignore: true``) in red, and
predictions from a COCO results file in blue with their score. Each polygon is labelled with its
annotation id (plus ``w=<lossweight>`` when present and not 1). One PNG per image, named after the image.

This module reads the json itself (no dependency on the dataset loader) and keeps heavy imports (cv2,
pycocotools) inside functions.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from i3cl_core.data.errors import DatasetError
from i3cl_core.data.image_io import read_image
from i3cl_core.data.validate import coco_images, far_outside, score_value
from i3cl_core.utils import atomic_write_bytes, read_json, safe_join

# BGR (OpenCV) colours
CARE_COLOUR = (0, 255, 0)  # green
DONTCARE_COLOUR = (0, 0, 255)  # red
PRED_COLOUR = (255, 128, 0)  # blue


# ------------------------------------------------------------------------------------------------ reading


def _dataset_error(msg: str) -> Exception:
    return DatasetError(msg)


def read_dataset(ann_file: str | os.PathLike) -> tuple[list[dict], dict[int, list[dict]]]:
    """Images (json order) and annotations grouped by image id, with basic checks naming the file."""
    data = read_json(ann_file)
    images = coco_images(data, str(ann_file), size="optional")
    anns = data.get("annotations") or []
    if not isinstance(anns, list):
        raise _dataset_error(f"{ann_file}: 'annotations' must be a list")
    by_image: dict[int, list[dict]] = defaultdict(list)
    for k, ann in enumerate(anns):
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise _dataset_error(f"{ann_file}: annotations[{k}] needs 'image_id'")
        by_image[ann["image_id"]].append(ann)
    return images, by_image


def read_results(pred_file: str | os.PathLike) -> dict[int, list[dict]]:
    """COCO results (a list of {image_id, segmentation, score}) grouped by image id."""
    data = read_json(pred_file)
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = data["annotations"]  # a dataset-shaped file with scores also works
    if not isinstance(data, list):
        raise _dataset_error(
            f"{pred_file}: COCO results must be a json list of {{image_id, segmentation, score}}"
        )
    by_image: dict[int, list[dict]] = defaultdict(list)
    for k, det in enumerate(data):
        if not isinstance(det, dict) or "image_id" not in det or "segmentation" not in det:
            raise _dataset_error(f"{pred_file}: results[{k}] needs 'image_id' and 'segmentation'")
        if det.get("score") is not None:  # the same rule as evaluate and fuse: a number in [0, 1]
            score_value(det["score"], f"{pred_file}: result #{k} (image_id {det['image_id']})")
        by_image[det["image_id"]].append(det)
    return by_image


def polygons_of(segmentation: Any, height: int, width: int, far: list | None = None) -> list:
    """Polygons (int32 arrays of shape (K, 2)) from a COCO segmentation: polygon list, flat list or RLE.
    A polygon with a point more than one image size outside the image is not drawn; with ``far`` given,
    one entry is appended to it per such polygon."""
    polys = []
    if isinstance(segmentation, dict):  # RLE
        # deferred: OpenCV and pycocotools load only for RLE segmentations
        import cv2
        from pycocotools import mask as mask_utils

        rle = segmentation
        if isinstance(rle.get("counts"), list):
            h, w = rle.get("size", (height, width))
            rle = mask_utils.frPyObjects(rle, h, w)
        with warnings.catch_warnings():  # pycocotools' own numpy-2 deprecation notice
            warnings.simplefilter("ignore", DeprecationWarning)
            m = mask_utils.decode(rle)
        if m.ndim == 3:
            m = m.max(axis=2)
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        return [c.reshape(-1, 2).astype(np.int32) for c in contours if len(c) >= 3]
    if isinstance(segmentation, list) and segmentation and not isinstance(segmentation[0], list):
        segmentation = [segmentation]  # a single flat polygon
    for seg in segmentation or []:
        try:
            pts = np.asarray(seg, dtype=np.float64).reshape(-1, 2)
        except (TypeError, ValueError):
            continue
        if len(pts) >= 2 and np.isfinite(pts).all():
            if far_outside(pts, width, height):
                if far is not None:
                    far.append(1)
                continue
            polys.append(np.round(pts).astype(np.int32))
    return polys


# ------------------------------------------------------------------------------------------------ drawing


def _label(img, text: str, anchor, colour, scale: float) -> None:
    import cv2  # deferred: OpenCV loads only when images are drawn

    h, w = img.shape[:2]
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    x = int(min(max(anchor[0], 0), max(w - tw - 1, 0)))
    y = int(min(max(anchor[1] - 3, th + 1), h - base - 1))
    cv2.rectangle(img, (x - 1, y - th - 1), (x + tw + 1, y + base), (0, 0, 0), -1)
    cv2.putText(img, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)


def draw(
    img, anns: Iterable[dict], preds: Iterable[dict] = (), min_score: float = 0.0, far: list | None = None
):
    """Draw annotations (and predictions) on a BGR uint8 image in place and return it (``far``: see
    :func:`polygons_of`)."""
    import cv2  # deferred: OpenCV loads only when images are drawn

    h, w = img.shape[:2]
    thickness = max(1, round(min(h, w) / 600))
    scale = max(0.35, min(h, w) / 1400)
    labels = []
    for det in preds:
        score = det.get("score")
        if score is not None and float(score) < min_score:
            continue
        polys = polygons_of(det.get("segmentation"), h, w, far)
        cv2.polylines(img, polys, True, PRED_COLOUR, thickness, cv2.LINE_8)
        if polys and score is not None:
            top = min(polys, key=lambda p: p[:, 1].min())
            labels.append((f"{float(score):.2f}", top[top[:, 1].argmin()], PRED_COLOUR))
    # do-not-care last so that its colour shows where outlines touch
    order = sorted(anns, key=lambda a: bool(a.get("iscrowd") or a.get("ignore")))
    for ann in order:
        dontcare = bool(ann.get("iscrowd")) or bool(ann.get("ignore"))
        colour = DONTCARE_COLOUR if dontcare else CARE_COLOUR
        polys = polygons_of(ann.get("segmentation"), h, w, far)
        cv2.polylines(img, polys, True, colour, thickness, cv2.LINE_8)
        if not polys:
            continue
        text = str(ann.get("id", ""))
        lw = ann.get("lossweight")
        if lw is not None and abs(float(lw) - 1.0) > 1e-6:
            text += f" w={float(lw):.2f}"
        first = polys[0][0]
        labels.append((text, first, colour))
    for text, anchor, colour in labels:  # labels on top of all lines
        _label(img, text, anchor, colour, scale)
    return img


def browse_dataset(
    ann_file: str | os.PathLike,
    img_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    limit: int | None = None,
    pred_file: str | os.PathLike | None = None,
    ids: Iterable[int] | None = None,
    min_score: float = 0.0,
) -> list[Path]:
    """Draw the dataset ``ann_file`` (images under ``img_root``) into ``out_dir/<image stem>.png``.

    A ``file_name`` that escapes ``img_root`` raises DatasetError; a missing or unreadable image is
    reported on stderr and skipped. Returns the PNG paths written, in json order.
    """
    import cv2  # deferred: OpenCV loads only when images are drawn

    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    images, anns_by_image = read_dataset(ann_file)
    preds_by_image = read_results(pred_file) if pred_file is not None else {}
    if ids is not None:
        wanted = set(ids)
        images = [im for im in images if im["id"] in wanted]
        missing = wanted - {im["id"] for im in images}
        if missing:
            print(f"i3cl browse: image id(s) not in {ann_file}: {sorted(missing)}", file=sys.stderr)
    if limit is not None:
        images = images[:limit]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    used: set[str] = set()
    skipped = 0
    far: list = []
    for im in images:
        try:
            path = safe_join(img_root, im["file_name"])
        except ValueError as e:
            raise _dataset_error(f"{ann_file}: image id {im['id']}: {e}") from None
        try:
            img = read_image(path, f"image id {im['id']}", rgb=False)
        except DatasetError as e:
            print(f"i3cl browse: {ann_file}: {e}, skipped", file=sys.stderr)
            skipped += 1
            continue
        draw(img, anns_by_image.get(im["id"], []), preds_by_image.get(im["id"], []), min_score, far)
        stem = Path(im["file_name"]).stem
        name = f"{stem}.png" if stem not in used else f"{stem}_id{im['id']}.png"
        used.add(stem)
        ok, png = cv2.imencode(".png", img)
        if not ok:
            raise RuntimeError(f"could not encode PNG for image id {im['id']}")
        written.append(atomic_write_bytes(out / name, png.tobytes()))
    if far:
        print(
            f"i3cl browse: {ann_file}: {len(far)} polygons with points more than one image size "
            "outside their image "
            "were not drawn; check the coordinate scale",
            file=sys.stderr,
        )
    return written
