"""Protocols: RRC-style IoU matching (art, ctw1500, icdar2015) and Total-Text DetEval (totaltext).

All geometry is computed once per (ground truth, predictions) pair in :class:`PreparedEval`: every polygon is
built and repaired with vectorised shapely calls, and the intersection area of every GT/detection pair of the
same image whose bounding boxes overlap is computed in one ``shapely.intersection`` call over the whole data
set. The protocols then work on small per-image numpy matrices, so a score sweep costs almost nothing extra.

See ``docs/evaluation.md`` for the protocol definitions and every deviation from the public scripts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import shapely

from .geometry import STATUS_INVALID, STATUS_REPAIRED, build_geometries, candidate_pairs, intersection_areas
from .protocols import IOU_PROTOCOLS, PROTOCOLS  # noqa: F401  (PROTOCOLS re-exported)

MATCH_MODES = ("greedy", "best_iou")
# ``strict``: the one-to-one pass needs one detection that passes both sigma and tau (our reading of the
# protocol); ``official``: the rules of Total-Text's published ``Deteval.py`` (see _deteval_image)
DETEVAL_MODES = ("strict", "official")
DEFAULT_SWEEP = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05 .. 0.95
MAX_REPORTED_UNKNOWN = 10


@dataclass
class _Image:
    key: object
    gt_care: np.ndarray  # indices (into this image's valid-GT arrays) of care GT, file order
    gt_dc: np.ndarray  # indices of do-not-care GT
    gt_area: np.ndarray  # (n_valid_gt,)
    det_area: np.ndarray  # (n_det,) 0 for invalid detections
    det_score: np.ndarray  # (n_det,)
    det_invalid: np.ndarray  # (n_det,) bool
    det_repaired: np.ndarray  # (n_det,) bool
    order: np.ndarray  # detection indices by descending score, ties in file order
    inter: np.ndarray  # (n_valid_gt, n_det) intersection areas


class PreparedEval:
    """Geometry and pairwise intersections for one GT/prediction pair, reusable by every protocol."""

    def __init__(
        self,
        gt_by_image: Mapping,
        pred_by_image: Mapping,
        *,
        unknown_image_ids: Sequence = (),
        num_unknown_predictions: int = 0,
    ):
        keys = list(gt_by_image)
        gt_inst, gt_dc, gt_img = [], [], []
        for i, key in enumerate(keys):
            polys, flags = gt_by_image[key]
            if len(polys) != len(flags):
                raise ValueError(f"image {key!r}: {len(polys)} GT polygons but {len(flags)} dontcare flags")
            gt_inst.extend(polys)
            gt_dc.extend(bool(f) for f in flags)
            gt_img.extend([i] * len(polys))
        det_inst, det_score, det_img = [], [], []
        unknown = list(unknown_image_ids)
        n_unknown = int(num_unknown_predictions)
        index = {k: i for i, k in enumerate(keys)}
        for key, (polys, scores) in pred_by_image.items():
            if len(polys) != len(scores):
                raise ValueError(f"image {key!r}: {len(polys)} predicted polygons but {len(scores)} scores")
            i = index.get(key)
            if i is None:
                n_unknown += len(polys)
                if key not in unknown:
                    unknown.append(key)
                continue
            det_inst.extend(polys)
            det_score.extend(float(s) for s in scores)
            det_img.extend([i] * len(polys))

        g_geom, g_status = build_geometries(gt_inst)
        d_geom, d_status = build_geometries(det_inst)
        gt_dc_arr = np.asarray(gt_dc, dtype=bool)
        gt_img_arr = np.asarray(gt_img, dtype=np.int64)
        det_img_arr = np.asarray(det_img, dtype=np.int64)
        g_valid = g_status != STATUS_INVALID
        self.num_invalid_gt = int((~g_valid).sum())
        self.num_repaired_gt = int((g_status == STATUS_REPAIRED).sum())
        self.unknown_image_ids = unknown
        self.num_unknown_predictions = n_unknown

        # keep only valid GT; detections keep their invalid ones (area 0, they are false positives)
        vg = np.flatnonzero(g_valid)
        g_geom, gt_dc_arr, gt_img_arr = g_geom[vg], gt_dc_arr[vg], gt_img_arr[vg]
        g_area = shapely.area(g_geom) if len(g_geom) else np.zeros(0)
        d_area = shapely.area(d_geom) if len(d_geom) else np.zeros(0)
        g_bounds = shapely.bounds(g_geom) if len(g_geom) else np.zeros((0, 4))
        d_bounds = shapely.bounds(d_geom) if len(d_geom) else np.zeros((0, 4))
        d_score = np.asarray(det_score, dtype=np.float64)

        # group by image (stable: file order kept inside each image)
        g_sorted = np.argsort(gt_img_arr, kind="stable")
        d_sorted = np.argsort(det_img_arr, kind="stable")
        g_starts = np.searchsorted(gt_img_arr[g_sorted], np.arange(len(keys) + 1))
        d_starts = np.searchsorted(det_img_arr[d_sorted], np.arange(len(keys) + 1))

        pair_g, pair_d, slices = [], [], []
        for i in range(len(keys)):
            gi = g_sorted[g_starts[i] : g_starts[i + 1]]
            di = d_sorted[d_starts[i] : d_starts[i + 1]]
            if len(gi) and len(di):
                a, b = candidate_pairs(g_bounds[gi], d_bounds[di])
                pair_g.append(gi[a])
                pair_d.append(di[b])
                slices.append((a, b))
            else:
                slices.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
        if pair_g:
            pg = np.concatenate(pair_g)
            pd = np.concatenate(pair_d)
            areas = intersection_areas(g_geom[pg], d_geom[pd])
        else:
            areas = np.zeros(0)

        self.images: list[_Image] = []
        offset = 0
        for i, key in enumerate(keys):
            gi = g_sorted[g_starts[i] : g_starts[i + 1]]
            di = d_sorted[d_starts[i] : d_starts[i + 1]]
            a, b = slices[i]
            inter = np.zeros((len(gi), len(di)))
            if len(a):
                inter[a, b] = areas[offset : offset + len(a)]
                offset += len(a)
            dc = gt_dc_arr[gi]
            scores = d_score[di]
            self.images.append(
                _Image(
                    key=key,
                    gt_care=np.flatnonzero(~dc),
                    gt_dc=np.flatnonzero(dc),
                    gt_area=g_area[gi],
                    det_area=d_area[di],
                    det_score=scores,
                    det_invalid=d_status[di] == STATUS_INVALID,
                    det_repaired=d_status[di] == STATUS_REPAIRED,
                    order=np.argsort(-scores, kind="stable"),
                    inter=inter,
                )
            )

    # ------------------------------------------------------------------ public
    def evaluate(
        self,
        protocol: str = "art",
        score_thr: float | None = None,
        *,
        match: str = "greedy",
        iou_thr: float = 0.5,
        dc_thr: float = 0.5,
        tr: float = 0.7,
        tp: float = 0.6,
        split_credit: float = 0.8,
        deteval_mode: str = "strict",
    ) -> dict:
        """Dataset-wide P/R/H-mean and the counts behind them for one protocol."""
        if protocol in IOU_PROTOCOLS:
            if match not in MATCH_MODES:
                raise ValueError(f"match must be one of {MATCH_MODES}, got {match!r}")
            res = self._iou_protocol(score_thr, match, iou_thr, dc_thr)
            res.update(match=match, iou_thr=iou_thr)
        elif protocol == "totaltext":
            if deteval_mode not in DETEVAL_MODES:
                raise ValueError(f"deteval_mode must be one of {DETEVAL_MODES}, got {deteval_mode!r}")
            res = self._deteval(score_thr, tr, tp, dc_thr, split_credit, deteval_mode == "official")
            res.update(tr=tr, tp=tp, deteval_mode=deteval_mode)
        else:
            raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")
        out = {
            "protocol": protocol,
            "precision": res.pop("precision"),
            "recall": res.pop("recall"),
            "hmean": res.pop("hmean"),
            "score_thr": score_thr,
        }
        out.update(res)
        out.update(
            num_invalid_gt=self.num_invalid_gt,
            num_repaired_gt=self.num_repaired_gt,
            num_images=len(self.images),
            num_images_without_predictions=sum(1 for im in self.images if len(im.det_score) == 0),
            num_unknown_images=len(self.unknown_image_ids),
            num_unknown_predictions=self.num_unknown_predictions,
            unknown_image_ids=list(self.unknown_image_ids[:MAX_REPORTED_UNKNOWN]),
        )
        return out

    def sweep(
        self, protocol: str = "art", thresholds: Iterable[float] | None = None, **options
    ) -> list[dict]:
        """``evaluate`` at every score threshold; the entry with the best H-mean (lowest threshold on ties)
        has ``best: True``."""
        ths = list(DEFAULT_SWEEP if thresholds is None else thresholds)
        rows = [self.evaluate(protocol, score_thr=float(t), **options) for t in ths]
        if rows:
            best = max(range(len(rows)), key=lambda k: (rows[k]["hmean"], -k))
            for k, r in enumerate(rows):
                r["best"] = k == best
        return rows

    # --------------------------------------------------------------- internals
    @staticmethod
    def _kept(im: _Image, score_thr):
        """Detection indices that pass the score threshold, by descending score (ties: file order)."""
        if score_thr is None:
            return im.order
        return im.order[im.det_score[im.order] >= score_thr]

    def _iou_protocol(self, score_thr, match, iou_thr, dc_thr) -> dict:
        n_gt = n_det = n_match = n_gt_dc = n_det_dc = n_invalid = n_repaired = 0
        for im in self.images:
            dets = self._kept(im, score_thr)
            n_gt_dc += len(im.gt_dc)
            if len(im.gt_dc) and len(dets):
                area = im.det_area[dets]
                with np.errstate(divide="ignore", invalid="ignore"):
                    ap = np.where(
                        area > 0, im.inter[np.ix_(im.gt_dc, dets)] / np.where(area > 0, area, 1), 0.0
                    )
                is_dc = (ap > dc_thr).any(axis=0)
                n_det_dc += int(is_dc.sum())
                dets = dets[~is_dc]
            n_gt += len(im.gt_care)
            n_det += len(dets)
            n_invalid += int(im.det_invalid[dets].sum())
            n_repaired += int(im.det_repaired[dets].sum())
            if not len(im.gt_care) or not len(dets):
                continue
            inter = im.inter[np.ix_(im.gt_care, dets)]
            union = im.gt_area[im.gt_care][:, None] + im.det_area[dets][None, :] - inter
            iou = inter / union  # union >= GT area > 0
            n_match += _greedy(iou > iou_thr) if match == "greedy" else _best_iou(iou, iou_thr)
        p = n_match / n_det if n_det else 0.0
        r = n_match / n_gt if n_gt else 0.0
        return dict(
            precision=p,
            recall=r,
            hmean=_hmean(p, r),
            num_gt_care=n_gt,
            num_det_care=n_det,
            num_matched=n_match,
            num_gt_dontcare=n_gt_dc,
            num_det_dontcare=n_det_dc,
            num_invalid_det=n_invalid,
            num_repaired_det=n_repaired,
        )

    def _deteval(self, score_thr, tr, tp, dc_thr, k, official) -> dict:
        n_gt = n_det = n_gt_dc = n_det_dc = n_invalid = n_repaired = 0
        rec = prec = 0.0
        counts = {"one_to_one": 0, "split": 0, "merge": 0}
        for im in self.images:
            dets = np.sort(self._kept(im, score_thr))  # DetEval works in file order
            n_gt_dc += len(im.gt_dc)
            if len(im.gt_dc) and len(dets):
                ratio = im.inter[np.ix_(im.gt_dc, dets)] / (im.det_area[dets] + 1.0)
                is_dc = (ratio > dc_thr).any(axis=0)
                n_det_dc += int(is_dc.sum())
                dets = dets[~is_dc]
            n_gt += len(im.gt_care)
            n_det += len(dets)
            n_invalid += int(im.det_invalid[dets].sum())
            n_repaired += int(im.det_repaired[dets].sum())
            if not len(im.gt_care) or not len(dets):
                continue
            inter = im.inter[np.ix_(im.gt_care, dets)]
            d_area = im.det_area[dets]
            sigma = np.round(inter / im.gt_area[im.gt_care][:, None], 2)
            with np.errstate(divide="ignore", invalid="ignore"):
                tau = np.round(
                    np.where(d_area[None, :] > 0, inter / np.where(d_area > 0, d_area, 1)[None, :], 0.0), 2
                )
            r, p, c = _deteval_image(sigma, tau, tr, tp, k, official)
            rec += r
            prec += p
            for name in counts:
                counts[name] += c[name]
        p = prec / n_det if n_det else 0.0
        r = rec / n_gt if n_gt else 0.0
        return dict(
            precision=p,
            recall=r,
            hmean=_hmean(p, r),
            num_gt_care=n_gt,
            num_det_care=n_det,
            recall_credit=rec,
            precision_credit=prec,
            num_one_to_one=counts["one_to_one"],
            num_split=counts["split"],
            num_merge=counts["merge"],
            num_gt_dontcare=n_gt_dc,
            num_det_dontcare=n_det_dc,
            num_invalid_det=n_invalid,
            num_repaired_det=n_repaired,
        )


def _hmean(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _greedy(hit: np.ndarray) -> int:
    """RRC matching: GT in file order; each takes the first free detection (columns are in descending-score
    order) with IoU above the threshold."""
    free = np.ones(hit.shape[1], dtype=bool)
    n = 0
    for g in np.flatnonzero(hit.any(axis=1)):
        cand = np.flatnonzero(hit[g] & free)
        if len(cand):
            free[cand[0]] = False
            n += 1
    return n


def _best_iou(iou: np.ndarray, thr: float) -> int:
    """Greedy by descending IoU over all pairs above the threshold (ties: GT order, then score order)."""
    gi, di = np.nonzero(iou > thr)
    if not len(gi):
        return 0
    order = np.lexsort((di, gi, -iou[gi, di]))
    used_g = np.zeros(iou.shape[0], dtype=bool)
    used_d = np.zeros(iou.shape[1], dtype=bool)
    n = 0
    for k in order:
        g, d = gi[k], di[k]
        if not used_g[g] and not used_d[d]:
            used_g[g] = used_d[d] = True
            n += 1
    return n


def _deteval_image(
    sigma: np.ndarray, tau: np.ndarray, tr: float, tp: float, k: float, official: bool = False
):
    """DetEval on one image (rows = care GT in file order, columns = care detections in file order).

    The two modes differ in three places, all where detections overlap several objects:

    * one-to-one, ``strict``: the GT's only detection with sigma > tr is also its only one with tau > tp,
      and that detection passes either test for no other GT. ``official``: the GT has exactly one
      detection with sigma > tr and exactly one with tau > tp (they may be different detections); the
      first passes sigma > tr for no other GT, the second tau > tp for no other GT; the sigma one is used.
    * split candidates: ``strict`` takes free detections with sigma > 0 and tau >= tp; ``official`` every
      free detection with tau >= tp (sigma may have rounded to 0).
    * merge candidates: ``strict`` takes free GT with tau > 0 and sigma >= tp; ``official`` every free GT
      with sigma >= tp.
    """
    n_g, n_d = sigma.shape
    gt_free = np.ones(n_g, dtype=bool)
    det_free = np.ones(n_d, dtype=bool)
    rec = prec = 0.0
    counts = {"one_to_one": 0, "split": 0, "merge": 0}
    s_hit = sigma > tr
    t_hit = tau > tp
    # 1) one-to-one
    s_cnt, t_cnt = s_hit.sum(axis=1), t_hit.sum(axis=1)
    s_arg, t_arg = s_hit.argmax(axis=1), t_hit.argmax(axis=1)
    one = (s_cnt == 1) & (t_cnt == 1)
    if official:
        one &= (s_hit.sum(axis=0)[s_arg] == 1) & (t_hit.sum(axis=0)[t_arg] == 1)
    else:
        one &= (s_arg == t_arg) & (s_hit.sum(axis=0)[s_arg] == 1) & (t_hit.sum(axis=0)[s_arg] == 1)
    # column uniqueness of sigma > tr means no detection is claimed by two rows: order independent
    gt_free[one] = False
    det_free[s_arg[one]] = False
    n_one = int(one.sum())
    rec += n_one
    prec += n_one
    counts["one_to_one"] += n_one
    # 2) one-to-many (split): a free GT overlapped by >= 2 detections (sigma > 0); one candidate ->
    #    one-to-one if sigma >= tr; several -> credit k if their sigma sum >= tr
    for g in np.flatnonzero(gt_free & ((sigma > 0).sum(axis=1) >= 2)):
        pool = np.arange(n_d) if official else np.flatnonzero(sigma[g] > 0)
        cand = pool[det_free[pool] & (tau[g, pool] >= tp)]
        if len(cand) == 1:
            d = cand[0]
            if sigma[g, d] >= tr and tau[g, d] >= tp:
                gt_free[g] = det_free[d] = False
                rec += 1.0
                prec += 1.0
                counts["one_to_one"] += 1
        elif len(cand) >= 2 and sigma[g, cand].sum() >= tr:
            gt_free[g] = False
            det_free[cand] = False
            rec += k
            prec += k * len(cand)
            counts["split"] += 1
    # 3) many-to-one (merge): a free detection overlapping >= 2 GT (tau > 0); candidates = free GT with
    #    sigma >= tp (tp, as the published code has it); one -> one-to-one if sigma >= tr and tau >= tp;
    #    several -> credit if their tau sum >= tp
    for d in np.flatnonzero((tau > 0).sum(axis=0) >= 2):
        if not det_free[d]:
            continue
        pool = np.arange(n_g) if official else np.flatnonzero(tau[:, d] > 0)
        cand = pool[gt_free[pool] & (sigma[pool, d] >= tp)]
        if len(cand) == 1:
            g = cand[0]
            if sigma[g, d] >= tr and tau[g, d] >= tp:
                gt_free[g] = det_free[d] = False
                rec += 1.0
                prec += 1.0
                counts["one_to_one"] += 1
        elif len(cand) >= 2 and tau[cand, d].sum() >= tp:
            gt_free[cand] = False
            det_free[d] = False
            rec += k * len(cand)
            prec += k
            counts["merge"] += 1
    return rec, prec, counts


# ---------------------------------------------------------------------- API
def _prepared(gt, preds) -> PreparedEval:
    cache = getattr(preds, "_cache", None)
    if cache is not None and cache[0] is gt:
        return cache[1]
    gt_by_image = {k: (img.polygons, img.dontcare) for k, img in gt.images.items()}
    prep = PreparedEval(
        gt_by_image,
        preds.by_image,
        unknown_image_ids=preds.unknown_image_ids,
        num_unknown_predictions=preds.num_unknown_predictions,
    )
    preds._cache = (gt, prep)
    return prep


def prepare(gt, preds) -> PreparedEval:
    """Geometry for a loaded :class:`GroundTruth` / :class:`Predictions` pair (cached on ``preds``)."""
    return _prepared(gt, preds)


def evaluate(gt, preds, protocol: str = "art", score_thr: float | None = None, **options) -> dict:
    """Score ``preds`` against ``gt`` with one protocol (``art``, ``totaltext``, ``ctw1500``, ``icdar2015``).

    ``score_thr`` drops predictions with score < T first. Options: ``match`` (``greedy``/``best_iou``) and
    ``iou_thr`` for the IoU protocols, ``tr``/``tp`` and ``deteval_mode`` (``strict``/``official``) for
    totaltext, ``dc_thr`` for both.
    """
    return _prepared(gt, preds).evaluate(protocol, score_thr, **options)


def sweep(
    gt, preds, protocol: str = "art", thresholds: Iterable[float] | None = None, **options
) -> list[dict]:
    """``evaluate`` at each score threshold (default 0.05, 0.10, ..., 0.95); the best H-mean is marked."""
    return _prepared(gt, preds).sweep(protocol, thresholds, **options)


def evaluate_polygons(
    gt_by_image: Mapping,
    pred_by_image: Mapping,
    protocol: str = "art",
    score_thr: float | None = None,
    **options,
) -> dict:
    """Evaluate in-memory data.

    ``gt_by_image``: ``{image_key: [(polygon, dontcare), ...]}``; ``pred_by_image``:
    ``{image_key: [(polygon, score), ...]}``; a polygon is an ``(N, 2)`` array (or a flat list, or a list of
    parts). Prediction keys absent from ``gt_by_image`` are reported as unknown and ignored.
    """
    return prepare_polygons(gt_by_image, pred_by_image).evaluate(protocol, score_thr, **options)


def prepare_polygons(gt_by_image: Mapping, pred_by_image: Mapping) -> PreparedEval:
    """:class:`PreparedEval` for in-memory data (same arguments as :func:`evaluate_polygons`); call its
    ``evaluate``/``sweep`` for several protocols or thresholds without recomputing the geometry."""
    gts = {k: ([p for p, _ in v], [bool(dc) for _, dc in v]) for k, v in gt_by_image.items()}
    preds = {k: ([p for p, _ in v], [float(s) for _, s in v]) for k, v in pred_by_image.items()}
    return PreparedEval(gts, preds)
