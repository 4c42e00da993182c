"""Polygon construction, repair and vectorised pairwise intersection areas (shapely 2).

Conventions used by every protocol:

* An *instance* is one polygon given as an ``(N, 2)`` array of ``x, y`` vertices, or (COCO multi-part
  segmentations, RLE masks with several blobs) a list of such arrays whose union is the instance.
* ``STATUS_OK``: a valid simple polygon. ``STATUS_REPAIRED``: the polygon was invalid (self-intersection,
  duplicated vertices, ...) and was repaired with ``shapely.make_valid``; we keep the **union of the polygonal
  parts** of the result (line or point debris is dropped). A bow-tie quadrilateral therefore becomes its two
  triangles, whose area is half of its bounding box. ``STATUS_INVALID``: fewer than 3 vertices, a non-finite
  coordinate, or zero area after repair; the geometry is an empty polygon (area 0, intersects nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import shapely

from i3cl_core.data.polygons import polygonal_union, repaired_geometry
from i3cl_core.utils import cpu_workers

STATUS_OK = 0
STATUS_REPAIRED = 1
STATUS_INVALID = 2

_EMPTY = shapely.Polygon()


def as_parts(instance) -> list[np.ndarray]:
    """Normalise an instance to a list of float64 ``(N, 2)`` arrays (no validity checks beyond shape).

    Accepted: an ``(N, 2)`` array, a flat ``[x0, y0, x1, y1, ...]`` list/array, a list of ``[x, y]`` points,
    or a list of any of those (a multi-part instance).
    """
    if isinstance(instance, np.ndarray) and instance.dtype != object:
        if instance.ndim == 2 and instance.shape[1] == 2:
            return [instance.astype(np.float64, copy=False)]
        if instance.ndim == 1:
            return [_flat_to_xy(instance)]
        if instance.ndim == 2 and instance.shape[0] == 0:
            return [np.zeros((0, 2))]
        raise ValueError(f"polygon array must be (N, 2) or flat, got shape {instance.shape}")
    parts = list(instance)
    if not parts:
        return [np.zeros((0, 2))]
    if all(isinstance(p, np.ndarray) for p in parts):
        return [q for p in parts for q in as_parts(p)]
    if all(np.isscalar(v) or v is None for v in parts):  # a single flat list x0,y0,x1,y1,...
        return [_flat_to_xy(parts)]
    if all(_is_point(p) for p in parts):  # a list of [x, y] points
        return [np.asarray(parts, dtype=np.float64).reshape(-1, 2)]
    return [
        q
        for p in parts
        for q in as_parts(p if isinstance(p, np.ndarray) else np.asarray(p, dtype=np.float64))
    ]


def _is_point(p) -> bool:
    return (
        isinstance(p, (list, tuple, np.ndarray))
        and len(p) == 2
        and all(np.isscalar(v) or v is None for v in p)
    )


def _flat_to_xy(flat) -> np.ndarray:
    arr = np.asarray(flat, dtype=np.float64).ravel()
    if arr.size % 2:
        raise ValueError(f"flat polygon has an odd number of coordinates ({arr.size})")
    return arr.reshape(-1, 2)


def build_geometries(instances: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Shapely geometries and status codes for a sequence of instances.

    Single-part instances (the common case) are built with one vectorised ``shapely.polygons`` call; only
    invalid ones go through ``make_valid`` one by one.
    """
    n = len(instances)
    geoms = np.empty(n, dtype=object)
    geoms[:] = _EMPTY
    status = np.full(n, STATUS_INVALID, dtype=np.int8)
    single_idx: list[int] = []
    single_coords: list[np.ndarray] = []
    multi: list[tuple[int, list[np.ndarray], bool]] = []
    for i, inst in enumerate(instances):
        if isinstance(inst, np.ndarray) and inst.ndim == 2 and inst.shape[1] == 2 and inst.dtype != object:
            single_idx.append(i)  # fast path; size and finiteness are checked vectorised below
            single_coords.append(inst)
            continue
        parts = as_parts(inst)
        good = [p for p in parts if len(p) >= 3 and np.isfinite(p).all()]
        if not good:
            continue  # STATUS_INVALID
        if len(parts) == 1:
            single_idx.append(i)
            single_coords.append(good[0])
        else:
            multi.append((i, good, len(good) < len(parts)))
    if single_idx:
        lengths = np.fromiter((len(c) for c in single_coords), dtype=np.int64, count=len(single_coords))
        idx = np.asarray(single_idx)
        coords = np.concatenate(single_coords, axis=0).astype(np.float64, copy=False)
        finite = np.isfinite(coords).all(axis=1)
        ok = lengths >= 3
        if not finite.all():
            ring_of_pt = np.repeat(np.arange(len(lengths)), lengths)
            ok &= np.bincount(ring_of_pt[~finite], minlength=len(lengths)) == 0
        keep_pt = np.repeat(ok, lengths)
        coords = coords[keep_pt]
        lengths, idx = lengths[ok], idx[ok]
    if single_idx and len(idx):
        ring_ids = np.repeat(np.arange(len(idx)), lengths)
        rings = shapely.linearrings(coords, indices=ring_ids)
        polys = shapely.polygons(rings)
        valid = shapely.is_valid(polys)
        geoms[idx] = polys
        status[idx[valid]] = STATUS_OK
        for k in np.flatnonzero(~valid):
            geoms[idx[k]] = repaired_geometry(polys[k])
            status[idx[k]] = STATUS_REPAIRED
    for i, parts, dropped in multi:
        polys = [shapely.Polygon(p) for p in parts]
        broken = [not p.is_valid for p in polys]
        geoms[i] = polygonal_union(
            shapely.union_all([repaired_geometry(p) if b else p for p, b in zip(polys, broken)])
        )
        status[i] = STATUS_REPAIRED if (dropped or any(broken)) else STATUS_OK
    if n:
        areas = shapely.area(geoms)
        degenerate = ~(areas > 0)
        status[degenerate] = STATUS_INVALID
        geoms[degenerate] = _EMPTY
    return geoms, status


PARALLEL_PAIRS = 4096  # below this many pairs, one thread (the pool costs more than it saves)


def intersection_areas(a: np.ndarray, b: np.ndarray, workers: int | None = None) -> np.ndarray:
    """``|a_k ∩ b_k|`` for aligned geometry arrays. Pairs that do not intersect at all (a cheap predicate)
    skip the overlay; the rest are split over ``workers`` threads (default: the CPUs, at most 8), since
    shapely's vectorised operations release the GIL. The same numbers as one
    ``shapely.area(shapely.intersection(a, b))`` call, pair for pair."""
    out = np.zeros(len(a), dtype=np.float64)
    if not len(a):
        return out
    if workers is None:
        workers = cpu_workers()
    chunks = np.array_split(np.arange(len(a)), max(1, min(workers, len(a) // PARALLEL_PAIRS)))

    def run(idx: np.ndarray) -> None:
        hit = idx[shapely.intersects(a[idx], b[idx])]
        out[hit] = shapely.area(shapely.intersection(a[hit], b[hit]))

    if len(chunks) == 1:
        run(chunks[0])
    else:
        with ThreadPoolExecutor(len(chunks), thread_name_prefix="intersections") as pool:
            list(pool.map(run, chunks))
    return out


def candidate_pairs(ab: np.ndarray, bb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs whose bounding boxes overlap with positive area (NaN bounds of empty geometries never
    do)."""
    overlap = (
        (ab[:, None, 0] < bb[None, :, 2])
        & (bb[None, :, 0] < ab[:, None, 2])
        & (ab[:, None, 1] < bb[None, :, 3])
        & (bb[None, :, 1] < ab[:, None, 3])
    )
    return np.nonzero(overlap)
