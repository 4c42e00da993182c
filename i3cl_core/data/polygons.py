"""Polygon helpers shared by the dataset, the augmentations and the model.

Polygons are float32 arrays of shape (K, 2) holding (x, y) in continuous image coordinates. An
*instance* is a list of such polygons (COCO allows several parts per annotation).

Coordinate convention (the one used everywhere in the project: datasets, augmentations, boxes, masks,
polygon tracing, fusion and evaluation): pixel (column j, row i) covers the area [j, j+1) x [i, i+1), so
its centre is (j + 0.5, i + 0.5) and an image of width W spans x in [0, W]. This is COCO's
polygon-to-mask rule. OpenCV's drawing and contour functions work on pixel centres instead (their
integer coordinate j is our j + 0.5); every call into OpenCV converts with that half-pixel shift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Polygon = np.ndarray  # (K, 2) float32
Parts = list  # list[Polygon]: the parts of one instance (COCO allows several)


@dataclass
class RepairResult:
    parts: list[Polygon]
    status: str  # "ok", "repaired", or why there are no parts: a key of REPAIR_REASONS


REPAIR_REASONS = {
    "non_finite": "non-finite coordinates",
    "too_few_points": "fewer than 3 points",
    "too_large": "coordinates too large for a finite box or area",
    "zero_area": "zero area",
}


def flat_to_polygon(flat) -> Polygon:
    arr = np.asarray(flat, dtype=np.float64).reshape(-1, 2)
    return arr.astype(np.float32)


def signed_area(poly) -> float:
    """Shoelace area of an (N, 2) polygon, positive when clockwise on screen (y pointing down);
    0 for fewer than 3 points."""
    p = np.asarray(poly, dtype=np.float64)
    if len(p) < 3:
        return 0.0
    # relative to a vertex: exact for far coordinates (1e12 + 100), where products of 1e24 are not
    p = p - p[0]
    x, y = p[:, 0], p[:, 1]
    return float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0


def polygon_area(poly: Polygon) -> float:
    """Absolute shoelace area."""
    return abs(signed_area(poly))


def instance_area(parts: Parts) -> float:
    return float(sum(polygon_area(p) for p in parts))


def instance_box(parts: Parts) -> np.ndarray:
    """Axis-aligned box (x1, y1, x2, y2) around all parts."""
    pts = np.concatenate(parts, axis=0)
    return np.array([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()], dtype=np.float32)


def coco_bbox(parts) -> list[float]:
    """COCO ``bbox`` [x, y, width, height] (Python floats, float64 arithmetic) around all parts of an
    instance."""
    xy = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in parts])
    x0, y0 = xy.min(axis=0)
    x1, y1 = xy.max(axis=0)
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def polygonal_union(geom):
    """The polygonal part of a shapely geometry: a Polygon or MultiPolygon as it is, the union of the polygons
    of a collection (lines and points dropped), an empty polygon when none is left."""
    import shapely  # deferred: shapely loads on first use (importing polygons stays light)

    if geom is None or geom.is_empty:
        return shapely.Polygon()
    if shapely.get_type_id(geom) in (3, 6):  # Polygon, MultiPolygon
        return geom
    parts = [p for p in shapely.get_parts(geom) if shapely.get_type_id(p) in (3, 6)]
    if not parts:
        return shapely.Polygon()
    return parts[0] if len(parts) == 1 else shapely.union_all(parts)


def repaired_geometry(geom):
    """The project's one repair of an invalid polygon (a shapely geometry): ``shapely.make_valid``, keeping
    its polygonal part (:func:`polygonal_union`). Datasets, converters, clipping, fusion and evaluation all
    repair through it; a bow-tie quadrilateral becomes its two triangles."""
    import shapely  # deferred: shapely loads on first use (importing polygons stays light)

    return polygonal_union(shapely.make_valid(geom))


def _shapely_parts(geom, dtype=np.float32) -> list[Polygon]:
    """Exterior rings of the polygonal parts of a shapely geometry, largest first."""
    import shapely  # deferred: shapely loads on first use (importing polygons stays light)

    polys = []
    for g in shapely.get_parts(geom):
        if g.geom_type == "Polygon" and not g.is_empty and g.area > 0:
            polys.append(g)
        elif g.geom_type in ("MultiPolygon", "GeometryCollection"):
            polys.extend(p for p in shapely.get_parts(g) if p.geom_type == "Polygon" and p.area > 0)
    polys.sort(key=lambda g: -g.area)
    return [np.asarray(g.exterior.coords[:-1], dtype=dtype) for g in polys]


def repair_polygon(poly, keep: str = "largest", dtype=np.float32) -> RepairResult:
    """The project's rule for a usable polygon, for datasets, converters and the validator alike: an (N, 2)
    array of at least 3 points, every coordinate finite, a bounding box whose area is a finite number, and a
    positive area. A self-intersecting polygon is repaired with shapely's ``make_valid``, its polygonal parts
    kept (holes dropped): ``keep="largest"`` keeps the largest part (a bow-tie becomes its bigger lobe),
    ``keep="all"`` every part, largest first. Parts come back as ``dtype`` (float64 keeps coordinates such as
    1e12 + 100 apart). Evaluation builds its geometries by the same rule, vectorised
    (:func:`i3cl_core.evaluation.geometry.build_geometries`), and keeps the union of the parts.
    """
    p = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(p).all():
        return RepairResult([], "non_finite")
    if len(p) < 3:
        return RepairResult([], "too_few_points")
    # Python floats: inf, not a numpy overflow warning, for spans such as +-1.5e308
    span_x, span_y = float(p[:, 0].max()) - float(p[:, 0].min()), float(p[:, 1].max()) - float(p[:, 1].min())
    if not math.isfinite(span_x * span_y):
        return RepairResult([], "too_large")
    if len(np.unique(p, axis=0)) < 3:
        return RepairResult([], "zero_area")
    # deferred: shapely loads on first use (importing polygons stays light)
    from shapely.geometry import Polygon as SPolygon

    g = SPolygon(p)
    if g.is_valid:
        if g.area <= 0:
            return RepairResult([], "zero_area")
        return RepairResult([np.asarray(poly, dtype=dtype).reshape(-1, 2)], "ok")
    parts = _shapely_parts(repaired_geometry(g), dtype)
    if not parts:
        return RepairResult([], "zero_area")
    return RepairResult(parts if keep == "all" else parts[:1], "repaired")


def clip_instance(parts: Parts, width: float, height: float) -> Parts:
    """Intersect an instance with the image rectangle [0, width] x [0, height]."""
    pts = np.concatenate(parts, axis=0)
    if (
        pts[:, 0].min() >= 0
        and pts[:, 1].min() >= 0
        and pts[:, 0].max() <= width
        and pts[:, 1].max() <= height
    ):
        return parts
    # deferred: shapely loads on first use (importing polygons stays light)
    from shapely.geometry import Polygon as SPolygon
    from shapely.geometry import box

    frame = box(0, 0, width, height)
    out: list[Polygon] = []
    for p in parts:
        g = SPolygon(p)
        if not g.is_valid:
            g = repaired_geometry(g)
        out.extend(_shapely_parts(g.intersection(frame)))
    return out


def rasterize_instance(parts: Parts, height: int, width: int) -> np.ndarray:
    """Binary uint8 mask (H, W) of an instance, through pycocotools (the COCO convention)."""
    from pycocotools import mask as mask_utils  # deferred: pycocotools loads only to rasterize

    flat = [p.astype(np.float64).reshape(-1).tolist() for p in parts if len(p) >= 3]
    if not flat:
        return np.zeros((height, width), dtype=np.uint8)
    rles = mask_utils.frPyObjects(flat, height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(np.uint8)


def mask_to_parts(mask: np.ndarray) -> list[np.ndarray]:
    """The pixel boundary of every blob of a binary mask (outer boundaries; holes dropped), in the
    pixel-area convention: pixel ``(x, y)`` covers ``[x, x+1) x [y, y+1)``, so a 40x20 block at column
    100, row 10 becomes exactly the box [100, 140] x [10, 30]. OpenCV's contours run through pixel
    centres; they are offset outwards by half a pixel (mitre joins, square caps for lines and points)."""
    # deferred: OpenCV and shapely load only when masks are traced
    import cv2
    import shapely

    contours, _ = cv2.findContours(
        np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    shapes = []
    for c in contours:
        pts = c.reshape(-1, 2).astype(np.float64) + 0.5
        line = shapely.Point(pts[0]) if len(pts) == 1 else shapely.LineString(np.vstack([pts, pts[:1]]))
        shapes.append(shapely.buffer(line, 0.5, cap_style="square", join_style="mitre"))
        if len(pts) >= 3:
            shapes.append(repaired_geometry(shapely.Polygon(pts)))
    if not shapes:
        return []
    parts = [
        np.asarray(g.exterior.coords)[:-1]
        for g in shapely.get_parts(shapely.union_all(shapes))
        if shapely.get_type_id(g) == 3 and not g.is_empty
    ]
    return sorted(parts, key=lambda q: -polygon_area(q))


def mask_to_instance(mask: np.ndarray, min_area: float = 1.0) -> list[np.ndarray]:
    """Polygons of a binary mask for training (largest first; parts below ``min_area`` dropped), on
    the same pixel boundaries as the evaluation (:func:`mask_to_parts`)."""
    return [q.astype(np.float32) for q in mask_to_parts(mask) if polygon_area(q) >= min_area]


def mask_to_polygon(mask: np.ndarray, epsilon: float = 0.005) -> np.ndarray | None:
    """Largest outer contour of a binary mask, simplified with approxPolyDP (epsilon x perimeter),
    clockwise on screen (positive shoelace area with y pointing down), in pixel-index coordinates;
    None when nothing usable remains."""
    import cv2  # deferred: OpenCV loads only when masks are traced

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contours = [c for c in contours if len(c) >= 3]
    if not contours:
        return None
    c = max(contours, key=cv2.contourArea)
    if epsilon > 0:
        c = cv2.approxPolyDP(c, epsilon * cv2.arcLength(c, True), True)
    poly = c.reshape(-1, 2).astype(np.float32)
    if len(poly) < 3:
        return None
    if signed_area(poly) < 0:
        poly = poly[::-1].copy()
    return poly


def paste_mask(
    prob: np.ndarray, box: np.ndarray, image_hw: tuple[int, int], thr: float
) -> tuple[np.ndarray, int, int]:
    """Binary mask of one detection inside its (integer, clipped) box: (mask, x0, y0). ``prob`` is the
    mask head's M x M probability grid covering the float ``box`` (x1, y1, x2, y2), mapped onto the
    integer crop with bilinear interpolation and binarised at ``thr``."""
    import cv2  # deferred: OpenCV loads only when masks are pasted

    h, w = image_hw
    x0, y0 = int(math.floor(box[0])), int(math.floor(box[1]))
    x1, y1 = int(math.ceil(box[2])), int(math.ceil(box[3]))
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(max(x1, x0 + 1), w), min(max(y1, y0 + 1), h)
    bw, bh = max(x1 - x0, 1), max(y1 - y0, 1)
    m = prob.shape[0]
    sx, sy = m / max(box[2] - box[0], 1e-3), m / max(box[3] - box[1], 1e-3)
    affine = np.array(
        [[sx, 0, (x0 - box[0]) * sx + 0.5 * sx - 0.5], [0, sy, (y0 - box[1]) * sy + 0.5 * sy - 0.5]],
        np.float32,
    )
    crop = cv2.warpAffine(
        prob.astype(np.float32),
        affine,
        (bw, bh),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )
    return (crop >= thr).astype(np.uint8), x0, y0


def masks_to_polygons(
    boxes: np.ndarray, probs: np.ndarray, image_hw: tuple[int, int], thr: float, epsilon: float
) -> list[np.ndarray | None]:
    """One polygon per detection (``boxes`` [N, 4] and mask ``probs`` [N, M, M] in image coordinates): the
    pasted mask's largest contour (:func:`mask_to_polygon`), ``None`` where the mask gives none, so that
    indices stay aligned with the boxes and scores. The PyTorch predictor and the ONNX runtime share it."""
    polys = []
    for box, prob in zip(boxes, probs):
        mask, x0, y0 = paste_mask(prob, box, image_hw, thr)
        poly = mask_to_polygon(mask, epsilon)
        polys.append(None if poly is None else poly + np.array([x0, y0], np.float32))
    return polys
