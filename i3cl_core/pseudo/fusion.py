"""Weighted Polygon Fusion (DESIGN.md section 5): the polygon counterpart of Weighted Boxes Fusion.

Per image, K models each give (polygon, score) predictions; model k has weight w_k.

1. Predictions with score < ``skip_thr`` are dropped; the rest are ordered by weighted score
   (score x w_k), highest first (stable for ties).
2. Each prediction joins the cluster whose *current fused geometry* it overlaps most, if that polygon
   IoU is > ``iou_thr``; otherwise it opens a new cluster. The current fused geometry is the
   weighted-score mean of the members' corresponding points, the exact analogue of WBF's coordinate
   averaging: members with the same number of vertices correspond vertex by vertex (each polygon
   clockwise, starting at the vertex nearest its box's top-left corner), otherwise every member is
   resampled to 32 points by arc length first. For axis-aligned rectangles (4 vertices) this *is*
   WBF's weighted box, so clusters and scores equal ``ensemble_boxes.weighted_boxes_fusion``.
3. Fused scores follow WBF's ``conf_type`` rules (avg, max, box_and_model_avg,
   absent_model_aware_avg; no overflow above 1 for avg).
4. The output polygon of a cluster is a weighted vote of the member masks: each member is rasterised
   inside the cluster's box (about 128 px on its long side), weighted by its weighted score; pixels
   with at least half the total weight form the mask, whose largest outer contour is simplified
   (approxPolyDP, 0.005 x perimeter) and returned clockwise. Unlike the point mean, the vote does not
   need corresponding vertices, so curved polygons with different vertex counts fuse cleanly.
5. ``votes`` = number of distinct models in the cluster; a cluster is kept as a pseudo label if
   votes >= ``min_votes`` and score >= ``keep_thr``; clusters with a score inside ``uncertain_band``
   (when set) become do-not-care regions (``iscrowd: 1``) instead of being dropped.
6. ``lossweight`` = score x votes / K by default (in [0, 1]); alternatives: score, votes / K, 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from i3cl_core.data.polygons import mask_to_polygon

RESAMPLE_POINTS = 32
VOTE_RESOLUTION = 96


@dataclass
class Member:
    polygon: np.ndarray  # (N, 2) float64, canonical order
    score: float
    model: int
    weight: float  # model weight w_k

    @property
    def weighted_score(self) -> float:
        return self.score * self.weight


@dataclass
class Cluster:
    members: list[Member] = field(default_factory=list)
    points: np.ndarray | None = None  # current fused geometry (corresponding-point mean)
    geometry: object = None  # shapely polygon of ``points``
    bounds: np.ndarray | None = None
    score: float = 0.0  # fused score (after the conf_type rescaling)
    polygon: np.ndarray | None = None  # output geometry (mask vote)

    @property
    def votes(self) -> int:
        return len({m.model for m in self.members})


# ------------------------------------------------------------------------------------ geometry
def signed_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]) + x[-1] * y[0] - x[0] * y[-1]) / 2.0


def canonical(poly) -> np.ndarray | None:
    """Clockwise on screen (positive shoelace area with y down), first vertex nearest the top-left
    corner of the box; None for fewer than 3 points, non-finite values or zero area."""
    p = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    if len(p) >= 2 and p[0, 0] == p[-1, 0] and p[0, 1] == p[-1, 1]:
        p = p[:-1]
    if len(p) < 3 or not np.isfinite(p).all():
        return None
    area = signed_area(p)
    if area == 0 or not np.isfinite(area):
        return None
    if area < 0:
        p = p[::-1]
    d = p - p.min(axis=0)
    start = int(np.argmin(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1]))
    return np.concatenate([p[start:], p[:start]]) if start else np.ascontiguousarray(p)


def canonical_many(polys: list) -> list[np.ndarray | None]:
    """:func:`canonical` for many polygons at once (vectorised over all their vertices)."""
    arrays = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polys]
    arrays = [a[:-1] if len(a) >= 2 and a[0, 0] == a[-1, 0] and a[0, 1] == a[-1, 1] else a for a in arrays]
    ok = np.array([len(a) >= 3 for a in arrays], dtype=bool)
    if not ok.any():
        return [None] * len(arrays)
    sel = [a for a, k in zip(arrays, ok) if k]
    lengths = np.array([len(a) for a in sel])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    xy = np.concatenate(sel)
    group = np.repeat(np.arange(len(sel)), lengths)
    nxt = np.arange(len(xy)) + 1
    nxt[starts + lengths - 1] = starts
    cross = xy[:, 0] * xy[nxt, 1] - xy[nxt, 0] * xy[:, 1]
    area = np.bincount(group, cross, minlength=len(sel)) / 2.0
    finite = np.bincount(group, ~np.isfinite(xy).all(axis=1), minlength=len(sel)) == 0
    # reverse counter-clockwise polygons (in place of their vertex block)
    pos = np.arange(len(xy)) - starts[group]
    flip = area[group] < 0
    order = np.where(flip, starts[group] + lengths[group] - 1 - pos, np.arange(len(xy)))
    xy = xy[order]
    mins = np.minimum.reduceat(xy, starts, axis=0)
    d = xy - mins[group]
    dist = d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1]
    first = np.lexsort((np.arange(len(xy)), dist, group))
    start_of = np.empty(len(sel), dtype=np.int64)
    is_first = np.r_[True, group[first][1:] != group[first][:-1]]
    start_of[group[first][is_first]] = pos[first][is_first]
    rolled = starts[group] + (pos + start_of[group]) % lengths[group]
    xy = xy[rolled]
    good = finite & (area != 0) & np.isfinite(area)
    chunks = np.split(xy, np.cumsum(lengths)[:-1])
    out: list[np.ndarray | None] = []
    it = iter(zip(chunks, good))
    for k in ok:
        if not k:
            out.append(None)
            continue
        chunk, g = next(it)
        out.append(chunk if g else None)
    return out


def resample(poly: np.ndarray, n: int = RESAMPLE_POINTS) -> np.ndarray:
    """``n`` points evenly spaced by arc length along the closed polygon, starting at vertex 0."""
    closed = np.vstack([poly, poly[:1]])
    seg = np.sqrt(((closed[1:] - closed[:-1]) ** 2).sum(axis=1))
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.linspace(0.0, cum[-1], n, endpoint=False)
    x = np.interp(t, cum, closed[:, 0])
    y = np.interp(t, cum, closed[:, 1])
    return np.stack([x, y], axis=1)


def mean_points(members: list[Member]) -> np.ndarray:
    sizes = {len(m.polygon) for m in members}
    if len(sizes) == 1:
        pts = np.stack([m.polygon for m in members])
    else:
        pts = np.stack([resample(m.polygon) for m in members])
    w = np.array([m.weighted_score for m in members], dtype=np.float64)
    return (w[:, None, None] * pts).sum(axis=0) / w.sum()


def _geometry(points: np.ndarray):
    import shapely
    from shapely.geometry import Polygon

    g = Polygon(points)
    if not g.is_valid:
        g = shapely.make_valid(g)
    return g


def _geometries(polys: list[np.ndarray]) -> list:
    """Valid shapely polygons for many point arrays at once (vectorised creation and checks)."""
    import shapely

    if not polys:
        return []
    coords = np.concatenate(polys)
    index = np.repeat(np.arange(len(polys)), [len(p) for p in polys])
    geoms = shapely.polygons(shapely.linearrings(coords, indices=index))
    bad = ~shapely.is_valid(geoms)
    if bad.any():
        geoms[bad] = shapely.make_valid(geoms[bad])
    return list(geoms)


def vote_polygon(members: list[Member], resolution: int = VOTE_RESOLUTION, epsilon: float = 0.005) -> np.ndarray | None:
    """Weighted mask vote of the members (see the module docstring); None if the vote is empty."""
    import cv2

    allpts = np.concatenate([m.polygon for m in members])
    x0, y0 = allpts.min(axis=0)
    x1, y1 = allpts.max(axis=0)
    s = resolution / max(x1 - x0, y1 - y0, 1e-6)
    gw, gh = int(np.ceil((x1 - x0) * s)) + 2, int(np.ceil((y1 - y0) * s)) + 2
    acc = np.zeros((gh, gw), dtype=np.float32)
    total = 0.0
    for m in members:
        # pixel (r, c) covers [c, c + 1): its centre c + 0.5 is grid coordinate c in cv2's convention
        q = np.rint(((m.polygon - (x0, y0)) * s + 0.5) * 16).astype(np.int32)  # 4 fractional bits
        mask = np.zeros((gh, gw), dtype=np.uint8)
        cv2.fillPoly(mask, [q], 1, lineType=cv2.LINE_8, shift=4)
        acc += m.weighted_score * mask
        total += m.weighted_score
    binary = (acc >= 0.5 * total).astype(np.uint8)
    poly = mask_to_polygon(binary, epsilon)
    if poly is None:
        return None
    # contour points are boundary pixel centres: grid coordinate g is image coordinate (g + 0.5) / s + origin
    poly = (poly.astype(np.float64) + 0.5) / s + (x0 - 0.5 / s, y0 - 0.5 / s)
    return canonical(poly)


# ------------------------------------------------------------------------------------ scores
def cluster_score(members: list[Member], conf_type: str, weights: np.ndarray) -> float:
    """WBF's fused confidence of one cluster (get_weighted_box followed by the rescaling step)."""
    ws = np.array([m.weighted_score for m in members])
    n = len(members)
    w_sum = float(sum(m.weight for m in members))
    if conf_type == "max":
        return float(ws.max()) / float(weights.max())
    conf = float(ws.sum()) / n
    if conf_type == "avg":
        return conf * min(len(weights), n) / float(weights.sum())
    models = sorted({m.model for m in members})
    if conf_type == "box_and_model_avg":
        conf = conf * n / w_sum
        return conf * float(weights[models].sum()) / float(weights.sum())
    if conf_type == "absent_model_aware_avg":
        absent = np.ones(len(weights), dtype=bool)
        absent[models] = False
        return conf * n / (w_sum + float(weights[absent].sum()))
    raise ValueError(f"unknown conf_type {conf_type!r}")


# ------------------------------------------------------------------------------------ fusion
def cluster_predictions(
    predictions: list[list[tuple]],
    weights=None,
    iou_thr: float = 0.55,
    skip_thr: float = 0.0,
    conf_type: str = "avg",
    vote: bool = True,
    epsilon: float = 0.005,
) -> list[Cluster]:
    """Cluster one image's predictions of K models (``predictions[k]`` = [(polygon, score), ...]).

    Returns every cluster with its fused score and (with ``vote``) its voted polygon, highest score
    first. Invalid polygons (fewer than 3 points, non-finite, zero area) must be filtered before;
    here they are skipped silently.
    """
    import shapely

    k = len(predictions)
    weights = np.ones(k) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(weights) != k:
        raise ValueError(f"{len(weights)} model weights for {k} models")
    raw = [(poly, float(score), model) for model, preds in enumerate(predictions) for poly, score in preds if score >= skip_thr]
    members = [Member(p, s, model, float(weights[model]))
               for p, (_, s, model) in zip(canonical_many([r[0] for r in raw]), raw) if p is not None]
    order = sorted(range(len(members)), key=lambda i: -members[i].weighted_score)  # stable for ties
    member_geoms = _geometries([members[i].polygon for i in order])

    clusters: list[Cluster] = []
    geoms: list = []
    bounds = np.zeros((len(order), 4))
    areas = np.zeros(len(order))
    member_bounds = shapely.bounds(np.array(member_geoms, dtype=object)) if member_geoms else np.zeros((0, 4))
    member_areas = shapely.area(np.array(member_geoms, dtype=object)) if member_geoms else np.zeros(0)
    for i, g, b, a in zip(order, member_geoms, member_bounds, member_areas):
        m = members[i]
        best = -1
        n = len(clusters)
        if n:
            cb = bounds[:n]
            iw = np.minimum(cb[:, 2], b[2]) - np.maximum(cb[:, 0], b[0])
            ih = np.minimum(cb[:, 3], b[3]) - np.maximum(cb[:, 1], b[1])
            # IoU <= I / (a + a_c - I) with I <= min(box intersection, a, a_c): skip clusters that cannot pass
            imax = np.minimum(np.minimum(np.maximum(iw, 0.0) * np.maximum(ih, 0.0), a), areas[:n])
            bound = imax / np.maximum(a + areas[:n] - imax, 1e-12)
            cand = np.where((iw > 0) & (ih > 0) & (bound > iou_thr))[0]
            if len(cand):
                cg = np.array([geoms[j] for j in cand], dtype=object)
                inter = shapely.area(shapely.intersection(cg, g))
                union = areas[cand] + a - inter
                ious = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
                j = int(np.argmax(ious))
                if ious[j] > iou_thr:
                    best = int(cand[j])
        if best < 0:
            clusters.append(Cluster(members=[m], points=m.polygon))
            geoms.append(g)
            bounds[n] = b
            areas[n] = a
        else:
            c = clusters[best]
            c.members.append(m)
            c.points = mean_points(c.members)
            geoms[best] = _geometry(c.points)
            bounds[best] = np.concatenate([c.points.min(axis=0), c.points.max(axis=0)])
            areas[best] = geoms[best].area
    for c, g in zip(clusters, geoms):
        c.geometry = g
        c.score = cluster_score(c.members, conf_type, weights)
        if vote:
            c.polygon = vote_polygon(c.members, epsilon=epsilon) if len(c.members) > 1 else c.members[0].polygon
            if c.polygon is None:  # degenerate vote: fall back to the point mean
                c.polygon = canonical(c.points)
    clusters.sort(key=lambda c: -c.score)
    return clusters


LOSSWEIGHT_FORMULAS = {
    "score_x_votes": lambda score, votes, k: score * votes / k,
    "score": lambda score, votes, k: score,
    "votes": lambda score, votes, k: votes / k,
    "one": lambda score, votes, k: 1.0,
}


def pseudo_labels(clusters: list[Cluster], num_models: int, cfg) -> list[dict]:
    """Turn clusters into pseudo labels by ``cfg`` (a :class:`~i3cl_core.config.FuseConfig`):
    kept text, do-not-care from the uncertain band, everything else dropped."""
    out = []
    formula = LOSSWEIGHT_FORMULAS[cfg.lossweight]
    for c in clusters:
        if c.polygon is None:
            continue
        votes = c.votes
        keep = votes >= cfg.min_votes and c.score >= cfg.keep_thr
        uncertain = (not keep and cfg.uncertain_band is not None and cfg.uncertain_band[0] <= c.score < cfg.uncertain_band[1])
        if not (keep or uncertain):
            continue
        weight = float(min(1.0, max(0.0, formula(c.score, votes, num_models)))) if keep else 0.0
        out.append({"polygon": c.polygon, "score": float(c.score), "votes": votes, "iscrowd": 0 if keep else 1,
                    "lossweight": round(weight, 6)})
    return out
