"""COCO bbox / segm mAP through pycocotools (COCO ground truth only).

The ground truth is re-emitted from what :func:`load_ground_truth` parsed: one category (id 1, "text"),
do-not-care GT (``iscrowd: 1`` or ``ignore: true``) as ``iscrowd: 1`` so that pycocotools ignores detections
on them, GT parts with fewer than 3 usable points dropped. Predictions become COCO results with compressed-RLE
segmentations (rasterised at the GT image size) and the polygon's bounding box; predictions without a usable
polygon are dropped (they cannot be rasterised).
"""

from __future__ import annotations

import contextlib
import io as _io

import numpy as np

from i3cl_core.data.errors import DatasetError
from i3cl_core.data.polygons import coco_bbox

from .geometry import as_parts


def _flat_parts(instance) -> list[list[float]]:
    out = []
    for p in as_parts(instance):
        if len(p) >= 3 and np.isfinite(p).all():
            out.append([float(v) for v in p.ravel()])
    return out


def coco_map(gt, preds, max_dets: int = 100) -> dict:
    """bbox and segm AP (IoU .50:.95), AP50 and AP75. ``gt`` must come from a COCO dataset json with image
    ``width``/``height``."""
    # deferred: pycocotools loads only when COCO mAP is asked for
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if gt.format != "coco":
        raise DatasetError(f"{gt.source}: --coco-map needs COCO ground truth (got {gt.format} format)")
    key_to_id = {}
    images, anns = [], []
    for n, (key, img) in enumerate(gt.images.items(), start=1):
        if not img.width or not img.height:
            raise DatasetError(
                f"{gt.source}: image {key!r} ({img.file_name}) has no width/height, needed for segm mAP"
            )
        key_to_id[key] = n
        images.append(
            {"id": n, "file_name": img.file_name, "width": int(img.width), "height": int(img.height)}
        )
        for poly, dc in zip(img.polygons, img.dontcare):
            parts = _flat_parts(poly)
            if not parts:
                continue
            rle = mask_utils.merge(mask_utils.frPyObjects(parts, int(img.height), int(img.width)))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": n,
                    "category_id": 1,
                    "segmentation": parts,
                    "bbox": coco_bbox(parts),
                    "area": float(mask_utils.area(rle)),
                    "iscrowd": int(bool(dc)),
                }
            )
    results = []
    for key, (polys, scores) in preds.by_image.items():
        if key not in key_to_id:
            continue
        img = gt.images[key]
        for poly, score in zip(polys, scores):
            parts = _flat_parts(poly)
            if not parts:
                continue
            rle = mask_utils.merge(mask_utils.frPyObjects(parts, int(img.height), int(img.width)))
            rle["counts"] = rle["counts"].decode("ascii")
            results.append(
                {
                    "image_id": key_to_id[key],
                    "category_id": 1,
                    "segmentation": rle,
                    "bbox": coco_bbox(parts),
                    "score": float(score),
                }
            )
    out = {
        "protocol": "coco_map",
        "num_images": len(images),
        "num_detections": len(results),
        "max_dets": max_dets,
    }
    names = ("mAP", "AP50", "AP75")
    if not results or not anns:
        for iou_type in ("bbox", "segm"):
            out.update({f"{iou_type}_{n}": 0.0 for n in names})
        return out
    dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "text"}]}
    with contextlib.redirect_stdout(_io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        for iou_type in ("bbox", "segm"):
            res = [dict(r) for r in results]
            if iou_type == "bbox":
                for r in res:
                    r.pop("segmentation")
            coco_dt = coco_gt.loadRes(res)
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.params.maxDets = [1, 10, max_dets]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            for n, v in zip(names, ev.stats[:3]):
                out[f"{iou_type}_{n}"] = float(max(v, 0.0))  # pycocotools reports -1 when undefined
    return out
