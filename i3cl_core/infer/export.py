"""Output formats of detections (docs/model.md).

* COCO results: ``{"image_id", "category_id": 1, "segmentation": [[x1, y1, ...]], "bbox": [x, y, w, h],
  "score"}``, polygons in original image coordinates, clockwise on screen;
* ArT submission json: ``{"res_<n>": [{"points": [[x, y], ...], "confidence": c}]}``, the key from the
  last ``_``-separated token of the file stem (``gt_123.jpg`` -> ``res_123``), integer points;
* per-image txt lines ``x1,y1,...,xn,yn,score`` with integer coordinates;
* the official scripts' inputs (``i3cl export-submission``): Total-Text's ``Deteval.py`` reads one
  ``<image stem>.txt`` per image with lines ``y1,x1,...,yn,xn`` (integers, **y first**); the CTW1500
  2020 kit one ``<image stem>.txt`` per image with lines ``x1,y1,...,xn,yn`` (integers). Both without
  scores: threshold first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from i3cl_core.data.polygons import coco_bbox
from i3cl_core.evaluation.io import name_token
from i3cl_core.utils import atomic_write_bytes


def art_key(file_name: str) -> str:
    """The ArT submission key of an image: ``res_`` + the last ``_`` token of its stem (``gt_12.jpg`` ->
    ``res_12``)."""
    return "res_" + name_token(file_name)


def coco_result(image_id, poly: np.ndarray, score: float, category_id: int = 1) -> dict:
    poly = np.asarray(poly, dtype=np.float64)
    return {
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": [[round(float(v), 2) for v in poly.reshape(-1)]],
        "bbox": [round(v, 2) for v in coco_bbox([poly])],
        "score": round(float(score), 5),
    }


def coco_results(image_id, polygons, score_thr: float) -> list[dict]:
    """One image's predictions ``[(polygon, score)]`` as COCO results, those scored at or above
    ``score_thr``: the one rule by which ``i3cl infer``'s per-image records and the ensemble's shard files
    keep a prediction."""
    return [coco_result(image_id, poly, score) for poly, score in polygons if score >= score_thr]


def int_points(poly) -> list[list[int]] | None:
    """Integer points with consecutive duplicates removed; None with fewer than 3 left."""
    pts = np.rint(np.asarray(poly, dtype=np.float64).reshape(-1, 2)).astype(int).tolist()
    out = [p for i, p in enumerate(pts) if i == 0 or p != pts[i - 1]]
    if len(out) > 1 and out[0] == out[-1]:
        out.pop()
    return out if len(out) >= 3 else None


def art_entries(results: list[dict]) -> list[dict]:
    """ArT submission entries for one image's COCO results."""
    entries = []
    for r in results:
        pts = int_points(r["segmentation"][0])
        if pts is not None:
            entries.append({"points": pts, "confidence": float(r["score"])})
    return entries


def txt_lines(results: list[dict]) -> str:
    lines = []
    for r in results:
        pts = int_points(r["segmentation"][0])
        if pts is not None:
            lines.append(",".join(str(v) for p in pts for v in p) + f",{float(r['score']):.5f}")
    return "\n".join(lines) + ("\n" if lines else "")


def totaltext_lines(results: list[dict]) -> str:
    """Total-Text Deteval.py input: ``y1,x1,...,yn,xn`` per detection (integer coordinates)."""
    lines = []
    for r in results:
        pts = int_points(r["segmentation"][0])
        if pts is not None:
            lines.append(",".join(f"{y},{x}" for x, y in pts))
    return "\n".join(lines) + ("\n" if lines else "")


def ctw1500_lines(results: list[dict]) -> str:
    """CTW1500 evaluation-kit input: ``x1,y1,...,xn,yn`` per detection (integer coordinates)."""
    lines = []
    for r in results:
        pts = int_points(r["segmentation"][0])
        if pts is not None:
            lines.append(",".join(f"{x},{y}" for x, y in pts))
    return "\n".join(lines) + ("\n" if lines else "")


def draw_results(image_rgb: np.ndarray, results: list[dict], path: Path) -> None:
    """PNG of the image with polygons and scores."""
    import cv2  # deferred: OpenCV loads only when results are drawn

    canvas = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    thickness = max(1, round(min(canvas.shape[:2]) / 400))
    for r in results:
        pts = np.rint(np.asarray(r["segmentation"][0]).reshape(-1, 2)).astype(np.int32)
        cv2.polylines(canvas, [pts], True, (0, 220, 0), thickness, cv2.LINE_AA)
        x, y = int(pts[:, 0].min()), int(pts[:, 1].min())
        cv2.putText(
            canvas,
            f"{r['score']:.2f}",
            (x, max(10, y - 3)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.4 * thickness,
            (0, 0, 255),
            thickness,
            cv2.LINE_AA,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", canvas)
    if ok:
        atomic_write_bytes(path, buf.tobytes())
