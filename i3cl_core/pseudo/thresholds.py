"""Fusion thresholds chosen on a labeled validation split, never on the unlabeled set.

The teachers run over a small labeled split (``val``) exactly as they run over the unlabeled images;
their predictions are fused with the run's fusion settings but ``keep_thr`` 0, and the fused clusters
are scored against the split's labels (ArT protocol) at every score threshold. ``keep_thr`` becomes
the threshold with the best F on that split. Only the validation split's labels are read: the
unlabeled set's hidden ground truth, where one exists, is for measuring alone.
"""

from __future__ import annotations

import os

from i3cl_core.pseudo.fuse import fuse_clusters
from i3cl_core.utils import get_logger

log = get_logger("fuse")

SWEEP = [round(0.05 * k, 2) for k in range(1, 20)]


def val_sweep(
    sources: list[str], images_json: str | os.PathLike, cfg, thresholds: list[float] = SWEEP
) -> list[dict]:
    """P/R/F of the fused clusters (votes >= ``cfg.min_votes``) on the labeled split ``images_json``
    (a COCO json with annotations) at every threshold of ``thresholds``."""
    # deferred: pulls shapely (evaluation.core)
    from i3cl_core.evaluation import load_ground_truth, prepare_polygons

    gt = load_ground_truth(images_json)
    gt_by_image = {key: list(zip(im.polygons, im.dontcare)) for key, im in gt.images.items()}
    open_cfg = cfg.model_copy(update={"keep_thr": 0.0, "uncertain_band": None})
    labels = fuse_clusters(sources, images_json, open_cfg)
    fused = {
        image_id: [(lab["polygon"], lab["score"]) for lab in labs if not lab["iscrowd"]]
        for image_id, labs in labels.items()
    }
    rows = prepare_polygons(gt_by_image, fused).sweep("art", list(thresholds))
    return [
        {
            "threshold": r["score_thr"],
            "precision": round(r["precision"], 4),
            "recall": round(r["recall"], 4),
            "hmean": round(r["hmean"], 4),
            "best": r["best"],
        }
        for r in rows
    ]


def f_beta(precision: float, recall: float, beta: float) -> float:
    """F-beta of ``precision`` and ``recall``: beta < 1 weighs precision more (recall counts beta times as
    much)."""
    b2 = beta * beta
    den = b2 * precision + recall
    return (1 + b2) * precision * recall / den if den > 0 else 0.0


def choose_keep_thr(sources: list[str], images_json: str | os.PathLike, cfg) -> dict:
    """``{"keep_thr", "val": P/R/F there, "sweep"}``: the fused-score threshold with the best F-beta
    (``cfg.keep_thr_beta``; 1 = F) on the labeled validation split (lowest threshold on ties)."""
    rows = val_sweep(sources, images_json, cfg)
    beta = getattr(cfg, "keep_thr_beta", 1.0)
    if beta != 1.0:
        scores = [f_beta(r["precision"], r["recall"], beta) for r in rows]
        top = max(scores)
        for r, sc in zip(rows, scores):
            r["f_beta"] = round(sc, 4)
            r["best"] = False
        rows[scores.index(top)]["best"] = True
    best = next(r for r in rows if r["best"])
    if best["hmean"] <= 0.0:
        log.warning(
            "%s: the fused predictions match no validation label at any threshold; keeping keep_thr %.2f",
            images_json,
            cfg.keep_thr,
        )
        return {"keep_thr": cfg.keep_thr, "val": None, "sweep": rows}
    by = "" if beta == 1.0 else f"F-beta({beta:g}) {best['f_beta']:.3f}; "
    log.info(
        "keep_thr %.2f chosen on %s (%sF %.3f, P %.3f, R %.3f)",
        best["threshold"],
        images_json,
        by,
        best["hmean"],
        best["precision"],
        best["recall"],
    )
    return {
        "keep_thr": float(best["threshold"]),
        "val": {k: best[k] for k in ("precision", "recall", "hmean")},
        "sweep": rows,
    }


def quality_at_keep_thr(sources: list[str], images_json: str | os.PathLike, cfg) -> dict:
    """P/R/F of the fused labels on the labeled validation split at the given ``cfg.keep_thr`` (what
    :func:`choose_keep_thr` reports for the threshold it chooses), for a run whose ``keep_thr`` is fixed."""
    row = val_sweep(sources, images_json, cfg, thresholds=[cfg.keep_thr])[0]
    return {k: row[k] for k in ("precision", "recall", "hmean")}


def choose_fusion(sources: list[str], images_json: str | os.PathLike, cfg) -> dict:
    """:func:`choose_keep_thr` for each ``min_votes`` from 1 to the number of sources (only ``cfg.min_votes``
    unless ``cfg.auto_min_votes``); the one with the best F-beta on the validation split wins (ties: more
    votes, the more precise labels). Adds ``min_votes`` and ``by_min_votes`` (its F-beta there, per value)."""
    candidates = (
        range(1, len(sources) + 1)
        if getattr(cfg, "auto_min_votes", False)
        else [min(cfg.min_votes, len(sources))]
    )
    beta = getattr(cfg, "keep_thr_beta", 1.0)
    best, by_votes = None, {}
    for m in candidates:
        r = choose_keep_thr(sources, images_json, cfg.model_copy(update={"min_votes": m}))
        v = r["val"]
        score = f_beta(v["precision"], v["recall"], beta) if v else -1.0
        by_votes[m] = round(score, 4)
        if best is None or score >= best[0]:
            best = (score, m, r)
    _, m, r = best
    if len(by_votes) > 1:
        log.info("min_votes %d chosen on %s (F-beta by min_votes: %s)", m, images_json, by_votes)
    return {**r, "min_votes": m, "by_min_votes": by_votes}


def with_keep_thr(cfg, keep_thr: float):
    """``cfg`` with ``keep_thr`` replaced; an uncertain band then reaches from its low edge (at most
    the new threshold) up to the new threshold."""
    update = {"keep_thr": float(keep_thr)}
    if cfg.uncertain_band is not None:
        update["uncertain_band"] = (float(min(cfg.uncertain_band[0], keep_thr)), float(keep_thr))
    return cfg.model_copy(update=update)
