"""Weighted Polygon Fusion: the polygon counterpart of Weighted Boxes Fusion. The ensemble's pseudo labels
(:mod:`i3cl_core.pseudo.fuse`) and the merge of test-time augmented views (:mod:`i3cl_core.infer.predictor`)
both use it.

Per image, K models each give (polygon, score) predictions; model k has weight w_k.

1. Predictions with score < ``skip_thr`` are dropped; the rest are ordered by weighted score
   (score x w_k), highest first (stable for ties).
2. Each prediction joins the cluster whose *current fused geometry* it overlaps most, if that polygon
   IoU is > ``iou_thr``; otherwise it opens a new cluster. The current fused geometry is the
   weighted-score mean of the members' corresponding points, the exact analogue of WBF's coordinate
   averaging: quadrilaterals correspond vertex by vertex (each polygon clockwise, starting at the
   vertex nearest its box's top-left corner), other polygons are first resampled to 32 points by arc
   length from that vertex. For axis-aligned rectangles this *is* WBF's weighted box, so clusters
   and scores equal ``ensemble_boxes.weighted_boxes_fusion``.
3. Fused scores follow WBF's ``conf_type`` rules (avg, max, box_and_model_avg,
   absent_model_aware_avg; no overflow above 1 for avg).
4. The output polygon of a cluster is that point mean (WBF's rule; for quadrilaterals the corner
   mean). Where the point mean self-intersects (members whose vertices correspond poorly), it is the
   members' weighted mean *shape* instead: each member is rasterised in the cluster's box (160 cells
   on its long side) and turned into a signed distance field
   (negative inside); the weighted-score mean of these fields, cut at zero, is the fused mask, whose
   largest outer contour is simplified (approxPolyDP, 0.002 x perimeter) and returned clockwise.
   Averaging distance fields moves each boundary to the weighted mean of the members' boundaries,
   the shape counterpart of WBF's coordinate averaging, without needing corresponding vertices, so
   curved polygons with different vertex counts fuse cleanly. (A plain weighted mask vote at half
   the weight would give the weighted *median* instead, which strays from WBF's box when a heavy
   and a light member differ.)
5. ``votes`` = number of distinct models in the cluster; a cluster is kept as a pseudo label if
   votes >= ``min_votes`` (at most K) and score >= ``keep_thr``; with ``uncertain_band`` (low, high) set, the
   clusters that are not kept but plausible (a score in [low, high), or a score >= low with too few votes)
   become do-not-care regions (``iscrowd: 1``) instead of being dropped, so that the student is not taught
   that they are background.
6. ``lossweight`` = score x votes / K by default (in [0, 1]); alternatives: score, votes / K, 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from i3cl_core.data.polygons import mask_to_polygon, repaired_geometry, signed_area

RESAMPLE_POINTS = 32
MEAN_SHAPE_RESOLUTION = 160  # grid cells along the long side of a cluster for its mean shape


@dataclass
class Member:
    polygon: np.ndarray  # (N, 2) float64, canonical order
    score: float
    model: int
    weight: float  # model weight w_k
    resampled: np.ndarray | None = None  # (32, 2) by arc length, for point correspondence

    def resampled_points(self) -> np.ndarray:
        """Its 32 points by arc length (computed for all members at once in :func:`cluster_predictions`)."""
        if self.resampled is None:
            self.resampled = resample(self.polygon)
        return self.resampled

    @property
    def weighted_score(self) -> float:
        return self.score * self.weight


@dataclass
class Cluster:
    members: list[Member] = field(default_factory=list)
    points: np.ndarray | None = None  # current fused geometry (corresponding-point mean)
    # running weighted sums behind ``points``: the weighted-score mean of corresponding points, vertex by
    # vertex while every member is a quadrilateral, else over every member's 32 resampled points
    weight_sum: float = 0.0
    resampled_sum: np.ndarray | None = None  # sum of weighted_score x the members' 32 resampled points
    quad_sum: np.ndarray | None = None  # sum of weighted_score x the corners, while every member is a quad
    geometry: object = None  # shapely polygon of ``points``
    bounds: np.ndarray | None = None
    simple: bool = True  # ``points`` form a simple (valid) polygon
    score: float = 0.0  # fused score (after the conf_type rescaling)
    polygon: np.ndarray | None = None  # output geometry (corner mean or mean shape)

    @property
    def votes(self) -> int:
        return len({m.model for m in self.members})

    def add(self, m: Member) -> None:
        """Add a member and update ``points`` (the members' corresponding-point mean, kept incrementally:
        the sums in member order, as a sum over the stacked members would add them)."""
        w = m.weighted_score
        self.members.append(m)
        quad = len(m.polygon) == 4
        if len(self.members) == 1:
            self.weight_sum, self.resampled_sum = w, w * m.resampled_points()
            self.quad_sum = w * m.polygon if quad else None
            self.points = m.polygon
            return
        self.weight_sum += w
        self.resampled_sum = self.resampled_sum + w * m.resampled_points()
        self.quad_sum = self.quad_sum + w * m.polygon if (quad and self.quad_sum is not None) else None
        self.points = (self.quad_sum if self.quad_sum is not None else self.resampled_sum) / self.weight_sum


# ------------------------------------------------------------------------------------ geometry
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
    # each polygon starts at its first vertex of least distance (NaN groups keep 0: they are dropped below)
    nearest = np.flatnonzero(dist == np.minimum.reduceat(dist, starts)[group])
    groups_with, first = np.unique(group[nearest], return_index=True)
    start_of = np.zeros(len(sel), dtype=np.int64)
    start_of[groups_with] = pos[nearest[first]]
    rolled = starts[group] + (pos + start_of[group]) % lengths[group]
    xy = xy[rolled]
    good = (finite & (area != 0) & np.isfinite(area)).tolist()
    ends = (starts + lengths).tolist()
    chunks = iter([xy[a:e] if g else None for a, e, g in zip(starts.tolist(), ends, good)])
    return [next(chunks) if k else None for k in ok.tolist()]


def resample(poly: np.ndarray, n: int = RESAMPLE_POINTS) -> np.ndarray:
    """``n`` points evenly spaced by arc length along the closed polygon, starting at vertex 0."""
    closed = np.vstack([poly, poly[:1]])
    seg = np.sqrt(((closed[1:] - closed[:-1]) ** 2).sum(axis=1))
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.linspace(0.0, cum[-1], n, endpoint=False)
    x = np.interp(t, cum, closed[:, 0])
    y = np.interp(t, cum, closed[:, 1])
    return np.stack([x, y], axis=1)


def resample_many(polys: list[np.ndarray], n: int = RESAMPLE_POINTS) -> np.ndarray:
    """:func:`resample` for many polygons at once: (len(polys), n, 2)."""
    sizes = np.array([len(p) for p in polys])
    lengths = sizes + 1  # each polygon closed by repeating its first vertex
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    src = np.concatenate(polys)
    src_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    xy = np.empty((int(lengths.sum()), 2))
    body = np.ones(len(xy), dtype=bool)
    body[starts + sizes] = False
    xy[body] = src
    xy[starts + sizes] = src[src_starts]
    seg = np.sqrt((np.diff(xy, axis=0) ** 2).sum(axis=1))
    seg[starts[1:] - 1] = 0.0  # no step from one polygon's closing point to the next polygon
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    totals = cum[starts + lengths - 1] - cum[starts]
    # one increasing parameter over all polygons: a gap of 1 between consecutive polygons
    offset = cum[starts] + np.arange(len(polys))
    param = cum + np.repeat(np.arange(len(polys)), lengths)
    t = offset[:, None] + totals[:, None] * (np.arange(n) / n)[None, :]
    x = np.interp(t.ravel(), param, xy[:, 0])
    y = np.interp(t.ravel(), param, xy[:, 1])
    return np.stack([x, y], axis=1).reshape(len(polys), n, 2)


def _geometry(points: np.ndarray):
    """(shapely geometry, whether ``points`` form a simple polygon); invalid ones are made valid."""
    import shapely  # deferred: shapely loads on first use (importing fusion stays light)

    g = shapely.polygons(points)
    if shapely.is_valid(g):
        return g, True
    return repaired_geometry(g), False


def _geometries(polys: list[np.ndarray]) -> list:
    """Valid shapely polygons for many point arrays at once (vectorised creation and checks)."""
    import shapely  # deferred: shapely loads on first use (importing fusion stays light)

    if not polys:
        return []
    coords = np.concatenate(polys)
    index = np.repeat(np.arange(len(polys)), [len(p) for p in polys])
    geoms = shapely.polygons(shapely.linearrings(coords, indices=index))
    bad = ~shapely.is_valid(geoms)
    if bad.any():
        for k in np.flatnonzero(bad):
            geoms[k] = repaired_geometry(geoms[k])
    return list(geoms)


def mean_shape_polygon(
    members: list[Member], resolution: int = MEAN_SHAPE_RESOLUTION, epsilon: float = 0.002
) -> np.ndarray | None:
    """The weighted mean shape of the members (see the module docstring); None if it is empty."""
    import cv2  # deferred: OpenCV loads only when mean shapes are computed

    allpts = np.concatenate([m.polygon for m in members])
    s = resolution / max(float(np.ptp(allpts[:, 0])), float(np.ptp(allpts[:, 1])), 1e-6)
    margin = 3
    x0, y0 = allpts.min(axis=0) - margin / s
    gw = int(np.ceil(np.ptp(allpts[:, 0]) * s)) + 2 * margin + 1
    gh = int(np.ceil(np.ptp(allpts[:, 1]) * s)) + 2 * margin + 1
    acc = np.zeros((gh, gw), dtype=np.float32)
    total = 0.0
    for m in members:
        # pixel (r, c) covers [c, c + 1): its centre c + 0.5 is grid coordinate c in cv2's convention
        q = np.rint(((m.polygon - (x0, y0)) * s - 0.5) * 16).astype(np.int32)  # 4 fractional bits
        mask = np.zeros((gh, gw), dtype=np.uint8)
        cv2.fillPoly(mask, [q], 1, lineType=cv2.LINE_8, shift=4)
        outside = cv2.distanceTransform(1 - mask, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        inside = cv2.distanceTransform(mask, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        acc += m.weighted_score * (outside - inside)  # signed distance: negative inside
        total += m.weighted_score
    poly = mask_to_polygon((acc < 0).astype(np.uint8), epsilon)
    if poly is None:
        return None
    # contour points are boundary pixel centres; the true boundary lies half a pixel further out on
    # average, which the +0.5 of the pixel-centre convention accounts for
    poly = (poly.astype(np.float64) + 0.5) / s + (x0, y0)
    return canonical(poly)


# ------------------------------------------------------------------------------------ scores
def cluster_score(members: list[Member], conf_type: str, weights: np.ndarray) -> float:
    """WBF's fused confidence of one cluster (get_weighted_box followed by the rescaling step); or, with
    ``model_max_avg``, the weighted mean over the models of each model's best score in the cluster (a model
    that found nothing there counts 0), so that a model's own low-scoring duplicates cannot lower it."""
    ws = np.array([m.weighted_score for m in members])
    n = len(members)
    w_sum = float(sum(m.weight for m in members))
    if conf_type == "max":
        return float(ws.max()) / float(weights.max())
    conf = float(ws.sum()) / n
    if conf_type == "avg":
        return conf * min(len(weights), n) / float(weights.sum())
    if conf_type == "model_max_avg":
        # each model's best member counts once: agreement counts, duplicates do not
        best: dict[int, float] = {}
        for m in members:
            best[m.model] = max(best.get(m.model, 0.0), m.weighted_score)
        return float(sum(best.values())) / float(weights.sum())
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
    geometry: bool = True,
    epsilon: float = 0.002,
    one_per_model: bool = False,
) -> list[Cluster]:
    """Cluster one image's predictions of K models (``predictions[k]`` = [(polygon, score), ...]).

    Returns every cluster with its fused score and (with ``geometry``) its output polygon, highest score
    first. Invalid polygons (fewer than 3 points, non-finite, zero area) must be filtered before;
    here they are skipped silently. ``one_per_model``: a cluster takes at most one member of each model (a
    model's own overlapping detections start clusters of their own instead of joining, and lowering, the
    cluster of its better detection), as for the views of one model under test-time augmentation.
    """
    import shapely  # deferred: shapely loads on first use (importing fusion stays light)

    k = len(predictions)
    weights = np.ones(k) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(weights) != k:
        raise ValueError(f"{len(weights)} model weights for {k} models")
    raw = [
        (poly, float(score), model)
        for model, preds in enumerate(predictions)
        for poly, score in preds
        if score >= skip_thr
    ]
    members = [
        Member(p, s, model, float(weights[model]))
        for p, (_, s, model) in zip(canonical_many([r[0] for r in raw]), raw)
        if p is not None
    ]
    if members:  # every member, quads too: a quad that joins a curved cluster is averaged by its 32 points
        for m, r in zip(members, resample_many([m.polygon for m in members])):
            m.resampled = r
    order = sorted(range(len(members)), key=lambda i: -members[i].weighted_score)  # stable for ties
    member_geoms = np.array(_geometries([members[i].polygon for i in order]), dtype=object)
    member_bounds = shapely.bounds(member_geoms) if len(order) else np.zeros((0, 4))
    member_areas = shapely.area(member_geoms) if len(order) else np.zeros(0)

    clusters: list[Cluster] = []
    geoms = np.empty(len(order), dtype=object)  # current fused geometry of cluster j
    x0, y0, x1, y1 = np.zeros((4, len(order)))  # its bounds, one contiguous row each
    areas = [0.0] * len(order)
    for i, g, b, a in zip(order, member_geoms, member_bounds.tolist(), member_areas.tolist()):
        m = members[i]
        best, best_iou = -1, 0.0
        n = len(clusters)
        if n:
            bx0, by0, bx1, by1 = b
            # clusters whose box overlaps the member's with positive area (min(x1) - max(x0) > 0 per axis)
            for j in np.flatnonzero(
                (x0[:n] < bx1) & (x1[:n] > bx0) & (y0[:n] < by1) & (y1[:n] > by0)
            ).tolist():
                if one_per_model and any(o.model == m.model for o in clusters[j].members):
                    continue
                # IoU <= I / (a + a_c - I) with I <= min(box intersection, a, a_c): skip clusters that cannot
                # pass
                iw = min(float(x1[j]), bx1) - max(float(x0[j]), bx0)
                ih = min(float(y1[j]), by1) - max(float(y0[j]), by0)
                imax = min(min(iw * ih, a), areas[j])
                if not imax > iou_thr * (a + areas[j] - imax):
                    continue
                inter = float(shapely.area(shapely.intersection(geoms[j], g)))
                union = areas[j] + a - inter
                iou = inter / max(union, 1e-12) if union > 0 else 0.0
                if iou > best_iou:  # the first of equal IoUs wins, as argmax would pick it
                    best, best_iou = j, iou
            if best_iou <= iou_thr:
                best = -1
        if best < 0:
            c = Cluster()
            c.add(m)
            clusters.append(c)
            geoms[n] = g
            x0[n], y0[n], x1[n], y1[n] = b
            areas[n] = a
        else:
            c = clusters[best]
            c.add(m)
            geoms[best], c.simple = _geometry(c.points)
            x0[best], y0[best] = c.points.min(axis=0)
            x1[best], y1[best] = c.points.max(axis=0)
            areas[best] = float(shapely.area(geoms[best]))
    for c, g in zip(clusters, geoms[: len(clusters)]):
        c.geometry = g
        c.score = cluster_score(c.members, conf_type, weights)
        if geometry:
            if len(c.members) == 1:
                c.polygon = c.members[0].polygon
            elif c.simple:
                c.polygon = c.points  # the point mean is a simple polygon: WBF's own rule
            else:  # it self-intersects: the members' mean shape instead
                c.polygon = mean_shape_polygon(c.members, epsilon=epsilon)
                if c.polygon is None:
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
    formula = LOSSWEIGHT_FORMULAS[cfg.lossweight_formula]
    min_votes = min(cfg.min_votes, num_models)
    for c in clusters:
        if c.polygon is None:
            continue
        votes = c.votes
        keep = votes >= min_votes and c.score >= cfg.keep_thr
        # not kept but plausible: a score inside the band, or a high score with too few votes
        uncertain = (
            not keep
            and cfg.uncertain_band is not None
            and c.score >= cfg.uncertain_band[0]
            and (c.score < cfg.uncertain_band[1] or votes < min_votes)
        )
        if not (keep or uncertain):
            continue
        weight = float(min(1.0, max(0.0, formula(c.score, votes, num_models)))) if keep else 0.0
        out.append(
            {
                "polygon": c.polygon,
                "score": float(c.score),
                "votes": votes,
                "iscrowd": 0 if keep else 1,
                "lossweight": round(weight, 6),
            }
        )
    return out
