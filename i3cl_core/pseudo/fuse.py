"""``i3cl fuse``: ensemble predictions -> ``train_lossweight.json`` (+ a report beside it).

Inputs: one prediction source per model (a COCO results json, an ArT submission json, or a folder of
COCO results shard files as written by ``i3cl ensemble``) and ``IMAGES.json``, a COCO json whose
``images`` list defines the unlabeled set. Output: a COCO dataset json that the training dataset
loads directly (relative file names under the unlabeled root; each annotation with polygon
``segmentation``, ``bbox``, ``area``, ``iscrowd``, ``lossweight``, plus ``score`` and ``votes``), and
``report.json``/``report.md`` with histograms (PNG), sample pictures, and, with ``--gt``, the
pseudo labels' precision/recall/F against the hidden ground truth (ArT protocol) per threshold.
Nothing is dropped silently: unknown images, invalid polygons and empty models are counted and
reported.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

from i3cl_core.data.errors import DatasetError
from i3cl_core.data.image_io import read_image
from i3cl_core.data.polygons import coco_bbox, polygon_area
from i3cl_core.fusion import cluster_predictions, pseudo_labels
from i3cl_core.pseudo.report import histogram_png, pr_curve_png
from i3cl_core.pseudo.sources import load_images, load_model_predictions
from i3cl_core.utils import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    cpu_workers,
    die_with_parent,
    get_logger,
    safe_join,
    writing,
)

log = get_logger("fuse")


# ------------------------------------------------------------------------------------ fusion
def _fuse_one(args):
    """Clusters of one image -> (cluster sizes, pseudo labels, every cluster as (polygon, score))."""
    per_model, cfg, weights = args
    clusters = cluster_predictions(per_model, weights, cfg.iou_thr, cfg.skip_thr, cfg.conf_type)
    everything = [(c.polygon, c.score) for c in clusters if c.polygon is not None]
    return [len(c.members) for c in clusters], pseudo_labels(clusters, len(per_model), cfg), everything


def _load_members(
    sources: list[str], images: list[dict], images_json, cfg, allow_empty: bool = False
) -> tuple[list[dict], list[dict], np.ndarray]:
    """Every model's predictions on ``images`` (checked for a matching image set), their stats, and
    the model weights."""
    if not sources:
        raise DatasetError("fuse: no prediction sources given")
    k = len(sources)
    weights = np.ones(k) if cfg.model_weights is None else np.asarray(cfg.model_weights, dtype=np.float64)
    if len(weights) != k:
        raise DatasetError(f"fuse.model_weights: {len(weights)} weights for {k} prediction sources")
    models, model_stats = [], []
    for src in sources:
        preds, stats = load_model_predictions(src, images)
        coverage = stats.pop("_coverage_set")
        if coverage is not None and coverage != {im["id"] for im in images}:
            missing = len({im["id"] for im in images} - coverage)
            raise DatasetError(
                f"{src}: models with mismatched image sets: this model ran on {len(coverage)} images, "
                f"{images_json} has {len(images)} ({missing} missing, e.g. {stats['missing_images']})"
            )
        if stats["predictions"] == 0:
            if not allow_empty:
                raise DatasetError(
                    f"{src}: no usable prediction at all ({stats.get('invalid_polygon', 0)} invalid "
                    f"polygons, {stats.get('unknown_image', 0)} for unknown images); the fused labels "
                    "would be wrong. Check the file, or pass allow_empty (--allow-empty) if this "
                    "model really found nothing"
                )
            log.warning("%s: no usable predictions at all (an empty prediction set)", src)
        if stats.get("unknown_image"):
            log.warning(
                "%s: %d predictions for images not in %s were ignored (e.g. %s)",
                src,
                stats["unknown_image"],
                images_json,
                stats["unknown_examples"],
            )
        if stats.get("outside_image"):
            log.warning(
                "%s: %d predictions with points more than one image size outside their image were ignored",
                src,
                stats["outside_image"],
            )
        if stats.get("invalid_polygon"):
            log.warning(
                "%s: %d predictions with fewer than 3 points, non-finite values or zero area were ignored",
                src,
                stats["invalid_polygon"],
            )
        models.append(preds)
        model_stats.append(stats)
    return models, model_stats, weights


def _fuse_images(
    images: list[dict], models: list[dict], cfg, weights, workers: int | None = None, progress: bool = False
) -> list:
    """``_fuse_one`` over every image (in a process pool with ``workers`` > 1), in image order; the
    result does not depend on ``workers``."""
    from tqdm import tqdm  # deferred: tqdm costs ~40 ms at import; only a run needs it

    workers = cpu_workers() if workers is None else workers  # the pool starts above 64 images only
    jobs = [([m.get(im["id"], []) for m in models], cfg, weights) for im in images]
    results = []
    bar = tqdm(total=len(jobs), desc="fuse", unit="img", disable=not progress, dynamic_ncols=True)
    if workers > 1 and len(jobs) > 64:
        with mp.get_context("spawn").Pool(
            workers, initializer=die_with_parent
        ) as pool:  # no orphans on kill -9
            for r in pool.imap(_fuse_one, jobs, chunksize=32):
                results.append(r)
                bar.update(1)
    else:
        for job in jobs:
            results.append(_fuse_one(job))
            bar.update(1)
    bar.close()
    return results


def fuse_clusters(sources: list[str], images_json: str | os.PathLike, cfg) -> dict:
    """``{image_id: pseudo labels}`` (dicts with polygon, score, votes, iscrowd, lossweight) of the
    fusion of ``sources`` over the images of ``images_json``, in memory (nothing written)."""
    images = load_images(images_json)
    models, _, weights = _load_members(sources, images, images_json, cfg, allow_empty=True)
    return {
        im["id"]: labels for im, (_, labels, _) in zip(images, _fuse_images(images, models, cfg, weights))
    }


def fuse_predictions(
    sources: list[str],
    images_json: str,
    out: str | os.PathLike,
    cfg,
    gt: str | None = None,
    img_root: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    samples: int = 4,
    allow_empty: bool = False,
    report_extra: dict | None = None,
) -> dict:
    """Fuse K models' predictions over the images of ``images_json`` into ``out`` (a COCO json), with
    ``report.json`` beside it (``report_extra``: more sections for it, such as how keep_thr was chosen)."""
    t0 = time.time()
    images = load_images(images_json)
    k = len(sources)
    models, model_stats, weights = _load_members(sources, images, images_json, cfg, allow_empty)
    results = _fuse_images(images, models, cfg, weights, workers, progress)

    annotations, per_image, cluster_sizes, all_clusters = [], [], Counter(), {}
    for im, (sizes, labels, everything) in zip(images, results):
        all_clusters[im["id"]] = everything
        cluster_sizes.update(sizes)
        per_image.append(sum(1 for lab in labels if not lab["iscrowd"]))
        for lab in labels:
            poly = lab["polygon"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": im["id"],
                    "category_id": 1,
                    "segmentation": [[round(float(v), 2) for v in poly.reshape(-1)]],
                    "bbox": [round(v, 2) for v in coco_bbox([poly])],
                    "area": round(polygon_area(poly), 2),
                    "iscrowd": lab["iscrowd"],
                    "lossweight": lab["lossweight"],
                    "score": round(lab["score"], 5),
                    "votes": lab["votes"],
                }
            )
    out = Path(out)
    dataset = {
        "info": {
            "description": "pseudo labels by Weighted Polygon Fusion",
            "models": [str(s) for s in sources],
            "fuse": cfg.model_dump(mode="json"),
            "images_json": str(images_json),
        },
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "text"}],
    }
    atomic_write_json(out, dataset)
    kept = [a for a in annotations if not a["iscrowd"]]
    summary = {
        "out": str(out),
        "images": len(images),
        "models": k,
        "pseudo_labels": len(kept),
        "dontcare": len(annotations) - len(kept),
        "images_with_labels": sum(1 for n in per_image if n),
        "labels_per_image": dict(sorted(Counter(min(n, 10) for n in per_image).items())),
        "cluster_sizes": dict(sorted(cluster_sizes.items())),
        "model_stats": model_stats,
        "seconds": round(time.time() - t0, 2),
    }
    report_dir = out.parent
    summary["report"] = str(
        write_report(
            dataset,
            summary,
            report_dir,
            sources,
            models,
            all_clusters,
            gt,
            img_root or _default_root(images_json),
            samples,
            report_extra,
        )
    )
    log.info(
        "fused %d models over %d images: %d pseudo labels, %d do-not-care -> %s",
        k,
        len(images),
        len(kept),
        summary["dontcare"],
        out,
    )
    return summary


def _default_root(images_json: str) -> str:
    parent = Path(images_json).parent
    return str(parent / "images") if (parent / "images").is_dir() else str(parent)


# ------------------------------------------------------------------------------------ report
def write_report(
    dataset, summary, report_dir: Path, sources, models, all_clusters, gt, img_root, samples, extra=None
) -> Path:
    anns = dataset["annotations"]
    kept = [a for a in anns if not a["iscrowd"]]
    figs = report_dir / "report_figures"
    pngs = {}
    with writing(figs / "scores.png"):  # the figures' writer raises bare OSErrors: name the file
        pngs["scores"] = histogram_png(
            [a["score"] for a in anns], np.linspace(0, 1, 21), "fused score", figs / "scores.png"
        )
    with writing(figs / "votes.png"):
        pngs["votes"] = histogram_png(
            [a["votes"] for a in anns],
            np.arange(0.5, len(sources) + 1.5),
            "votes",
            figs / "votes.png",
            xlabel="models agreeing on the instance",
        )
    with writing(figs / "weights.png"):
        pngs["weights"] = histogram_png(
            [a["lossweight"] for a in kept],
            np.linspace(0, 1, 21),
            "lossweight",
            figs / "weights.png",
            xlabel="per-instance loss weight",
        )
    report = {k: v for k, v in summary.items() if k != "report"}
    report["fuse"] = dataset["info"]["fuse"]
    report["figures"] = {k: str(p) for k, p in pngs.items()}
    if gt:
        q = report["quality"] = pseudo_label_quality(dataset, gt, models, all_clusters, sources)
        with writing(figs / "pr_curve.png"):
            pngs["pr_curve"] = pr_curve_png(
                q["fused_sweep"],
                figs / "pr_curve.png",
                keep_thr=dataset["info"]["fuse"]["keep_thr"],
                teachers=[{"name": Path(m["source"]).name, "hmean": m["hmean"]} for m in q["models"]],
            )
        report["figures"]["pr_curve"] = str(pngs["pr_curve"])
    sample_paths = _draw_samples(dataset, img_root, figs, samples)
    report["samples"] = [str(p) for p in sample_paths]
    report.update(extra or {})
    atomic_write_json(report_dir / "report.json", report, indent=2)
    md = [
        "# Pseudo labels",
        "",
        f"* images: **{summary['images']}**, models: **{summary['models']}**",
        f"* pseudo labels: **{summary['pseudo_labels']}**, do-not-care: **{summary['dontcare']}**, "
        f"images with labels: **{summary['images_with_labels']}**",
        "",
    ]
    if gt:
        q = report["quality"]
        md += [
            "## Quality against the hidden ground truth (ArT protocol)",
            "",
            "| source | threshold | P | R | F |",
            "|---|---|---|---|---|",
        ]
        for row in q["table"]:
            md.append(
                f"| {row['source']} | {row['threshold']} | {row['precision']:.4f} | "
                f"{row['recall']:.4f} | {row['hmean']:.4f} |"
            )
        md.append("")
    md += [f"![{k}]({Path(p).relative_to(report_dir)})" for k, p in pngs.items()]
    md += [f"![sample]({Path(p).relative_to(report_dir)})" for p in sample_paths]
    atomic_write_text(report_dir / "report.md", "\n".join(md) + "\n")
    return report_dir / "report.json"


def pseudo_label_quality(dataset, gt_path, models, all_clusters, sources) -> dict:
    """P/R/F (ArT protocol) against the hidden ground truth: of the pseudo labels as written, of all
    fused clusters per score threshold (what another ``keep_thr`` would give), and of every input
    model at its best threshold."""
    # deferred: pulls shapely (evaluation.core)
    from i3cl_core.evaluation import load_ground_truth, prepare_polygons

    gt = load_ground_truth(gt_path)
    if gt.format != "coco":
        raise DatasetError(
            f"{gt_path}: --gt must be a COCO json with the same image ids as the unlabeled set"
        )
    gt_by_image = {key: list(zip(im.polygons, im.dontcare)) for key, im in gt.images.items()}
    fused = {}
    for a in dataset["annotations"]:
        if not a["iscrowd"]:
            fused.setdefault(a["image_id"], []).append(
                (np.asarray(a["segmentation"][0]).reshape(-1, 2), a["score"])
            )
    at_output = prepare_polygons(gt_by_image, fused).evaluate("art", 0.0)
    table = [{"source": "pseudo labels (as written)", "threshold": "keep_thr", **_prf(at_output)}]
    sweep = prepare_polygons(gt_by_image, all_clusters).sweep("art")
    best = next(r for r in sweep if r["best"])
    table.append(
        {"source": "all fused clusters (best threshold)", "threshold": best["score_thr"], **_prf(best)}
    )
    per_model = []
    for src, preds in zip(sources, models):
        rows = prepare_polygons(gt_by_image, preds).sweep("art")
        b = next(r for r in rows if r["best"])
        per_model.append({"source": str(src), "best_threshold": b["score_thr"], **_prf(b)})
        table.append(
            {"source": f"model {Path(src).name} (best threshold)", "threshold": b["score_thr"], **_prf(b)}
        )
    return {
        "fused": _prf(at_output),
        "fused_sweep": [{"threshold": r["score_thr"], **_prf(r)} for r in sweep],
        "models": per_model,
        "best_single_model_hmean": max((m["hmean"] for m in per_model), default=0.0),
        "table": table,
    }


def _prf(r: dict) -> dict:
    return {
        "precision": round(r["precision"], 4),
        "recall": round(r["recall"], 4),
        "hmean": round(r["hmean"], 4),
    }


def _draw_samples(dataset, img_root, figs: Path, n: int) -> list[Path]:
    import cv2  # deferred: OpenCV loads only when samples are drawn

    by_image = {}
    for a in dataset["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    chosen = sorted(by_image, key=lambda i: -len(by_image[i]))[:n]
    names = {im["id"]: im["file_name"] for im in dataset["images"]}
    paths = []
    for image_id in chosen:
        try:
            img = read_image(safe_join(img_root, names[image_id]), rgb=False)
        except (ValueError, DatasetError):
            continue
        for a in by_image[image_id]:
            pts = np.rint(np.asarray(a["segmentation"][0]).reshape(-1, 2)).astype(np.int32)
            color = (0, 0, 255) if a["iscrowd"] else (0, 200, 0)
            cv2.polylines(img, [pts], True, color, 1, cv2.LINE_AA)
            cv2.putText(
                img,
                f"{a['score']:.2f}/{a['votes']}",
                (int(pts[:, 0].min()), max(10, int(pts[:, 1].min()) - 2)),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.35,
                color,
                1,
                cv2.LINE_AA,
            )
        p = figs / f"sample_{image_id}.png"
        ok, png = cv2.imencode(".png", img)  # cv2.imwrite says nothing when the disk is full
        if not ok:
            raise RuntimeError(f"could not encode PNG for image id {image_id}")
        paths.append(atomic_write_bytes(p, png.tobytes()))
    return paths
