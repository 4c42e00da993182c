"""``i3cl ensemble``: every model over an unlabeled image set, sharded and resumable.

Layout written under ``--out``::

    images.json                       the unlabeled set (COCO images with sizes): IMAGES.json for fuse
    predictions/<model>/shard_00000.json   COCO results of one model on one shard, written atomically
    predictions/<model>/coverage.json      image ids the model has run on (written when it is complete)
    members.json                      the prediction sources to fuse (ours, then --extra files)

A shard file that exists is finished and is skipped on a re-run, so a killed ensemble resumes where
it stopped and ends with the same files. Optional test-time augmentation (horizontal/vertical flips,
extra test scales) runs each model on every variant and merges the variants per model with the same
polygon fusion (equal weights, ``avg``) before the ensemble fusion sees them.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from i3cl_core.data.errors import DatasetError
from i3cl_core.infer.run import ImageItem, collect_images
from i3cl_core.utils import atomic_write_json, get_logger

log = get_logger("ensemble")


@dataclass
class Shard:
    index: int
    items: list[ImageItem]

    @property
    def name(self) -> str:
        return f"shard_{self.index:05d}.json"


def model_name(checkpoint: str, taken: set[str]) -> str:
    base = Path(checkpoint).stem
    if base in ("latest", "best") or base.startswith("epoch_"):
        base = Path(checkpoint).parent.parent.name or base  # work_dir/<name>/checkpoints/latest.pth
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


def image_table(items: list[ImageItem]) -> tuple[list[ImageItem], list[dict], list[str]]:
    """Sizes from the image headers; unreadable images are reported and left out."""
    from PIL import Image

    good, images, failures = [], [], []
    for it in items:
        try:
            with Image.open(it.path) as im:
                w, h = im.size
        except Exception as e:  # PIL raises several types for broken files
            failures.append(f"{it.path}: image {it.image_id} is unreadable ({type(e).__name__})")
            continue
        good.append(it)
        images.append({"id": it.image_id, "file_name": it.file_name, "width": w, "height": h})
    return good, images, failures


def plan_shards(items: list[ImageItem], shard_size: int) -> list[Shard]:
    return [Shard(i // shard_size, items[i : i + shard_size]) for i in range(0, len(items), shard_size)]


def _flip_poly(poly: np.ndarray, w: int, h: int, flip: str) -> np.ndarray:
    p = poly.copy()
    if flip == "h":
        p[:, 0] = w - p[:, 0]
    else:
        p[:, 1] = h - p[:, 1]
    return p[::-1]


def predict_with_tta(model, image, epsilon: float, flips=(), scales=()) -> list[tuple[np.ndarray, float]]:
    """(polygon, score) of one image; with TTA the variants are fused per model."""
    import torch

    variants = [(None, None)] + [(f, None) for f in flips] + [(None, s) for s in scales]
    h, w = image.shape[-2:]
    outputs = []
    for flip, short in variants:
        img = image
        if flip == "h":
            img = torch.flip(image, dims=[-1])
        elif flip == "v":
            img = torch.flip(image, dims=[-2])
        sides = None
        if short is not None:  # another short side, the long side limit scaled alike (never below the config's)
            base_short, base_long = model.cfg.test_short_side, model.cfg.test_long_side
            sides = (short, max(base_long, int(base_long * short / base_short)))
        out = model.predict([img], epsilon=epsilon, test_sides=sides)[0]
        preds = []
        for poly, s in zip(out["polygons"], out["scores"].tolist()):
            if poly is not None:
                preds.append((_flip_poly(poly, w, h, flip) if flip else poly, s))
        outputs.append(preds)
    if len(outputs) == 1:
        return outputs[0]
    from i3cl_core.pseudo.fusion import cluster_predictions

    clusters = cluster_predictions(outputs, None, iou_thr=0.55, skip_thr=0.0, conf_type="avg", epsilon=epsilon)
    return [(c.polygon, c.score) for c in clusters if c.polygon is not None]


def run_shard(model, shard: Shard, path: Path, score_thr: float, device, epsilon: float = 0.005,
              flips=(), scales=()) -> dict:
    """Predict one shard with one loaded model and write its COCO results atomically."""
    import torch

    from i3cl_core.data.image_io import read_image
    from i3cl_core.infer.export import coco_result

    results, failures = [], []
    with torch.no_grad():
        for it in shard.items:
            try:
                rgb = read_image(it.path, f"image {it.image_id}")
            except DatasetError as e:
                failures.append(str(e))
                continue
            t = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
            t = t.float().div_(255.0).to(device)
            for poly, s in predict_with_tta(model, t, epsilon, flips, scales):
                if s >= score_thr:
                    results.append(coco_result(it.image_id, poly, s))
    atomic_write_json(path, results)
    return {"shard": shard.index, "images": len(shard.items), "detections": len(results), "failures": failures}


def run_ensemble(
    checkpoints: list[str],
    images: str,
    out: str | os.PathLike,
    shard_size: int = 64,
    img_root: str | None = None,
    score_thr: float = 0.05,
    device: str = "auto",
    flips=(),
    scales=(),
    extra: list[str] | None = None,
    progress: bool = True,
) -> dict:
    from tqdm import tqdm

    from i3cl_core.infer.predictor import resolve_device
    from i3cl_core.model.checkpoint import load_model
    from i3cl_core.stages import fingerprint

    if not checkpoints and not extra:
        raise DatasetError("ensemble: give at least one checkpoint (or --extra prediction file)")
    out = Path(out)
    items = collect_images(images, img_root)
    items, table, failures = image_table(items)
    for f in failures:
        log.warning("skipping %s", f)
    if not items:
        raise DatasetError(f"{images}: no readable images")
    atomic_write_json(out / "images.json", {"images": table, "annotations": [], "categories": [{"id": 1, "name": "text"}]})
    shards = plan_shards(items, shard_size)
    dev = resolve_device(device)
    taken: set[str] = set()
    members, per_model = [], []
    t0 = time.time()
    for ckpt in checkpoints:
        name = model_name(ckpt, taken)
        pred_dir = out / "predictions" / name
        pred_dir.mkdir(parents=True, exist_ok=True)
        stamp, fp = pred_dir / "checkpoint.sha1", fingerprint(ckpt)
        if stamp.exists() and stamp.read_text() != fp:
            stale = sorted(pred_dir.glob("shard_*.json"))
            log.warning("%s: the checkpoint %s changed since its shards were written; recomputing %d shards",
                        pred_dir, ckpt, len(stale))
            for f in stale:
                f.unlink()
            (pred_dir / "coverage.json").unlink(missing_ok=True)
        stamp.write_text(fp)
        todo = [s for s in shards if not (pred_dir / s.name).exists()]
        done = len(shards) - len(todo)
        if todo:
            model, cfg = load_model(ckpt, dev)
            eps = cfg.infer.polygon_epsilon
            bar = tqdm(total=sum(len(s.items) for s in todo), desc=f"ensemble {name}", unit="img", disable=not progress,
                       dynamic_ncols=True)
            for s in todo:
                r = run_shard(model, s, pred_dir / s.name, score_thr, dev, eps, flips, scales)
                failures.extend(r["failures"])
                bar.update(len(s.items))
            bar.close()
            del model
        atomic_write_json(pred_dir / "coverage.json", {"images": [it.image_id for it in items]})
        members.append(str(pred_dir))
        per_model.append({"model": name, "checkpoint": ckpt, "shards": len(shards), "skipped_done": done,
                          "computed": len(todo)})
    from i3cl_core.pseudo.external import prepare_extra

    members.extend(prepare_extra(e, table, out / "extra", k) for k, e in enumerate(extra or []))
    atomic_write_json(out / "members.json", members, indent=2)
    return {"images": len(items), "shards": len(shards), "models": per_model, "members": members,
            "unreadable": failures[:20], "num_unreadable": len(failures), "seconds": round(time.time() - t0, 2),
            "images_json": str(out / "images.json")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoints", nargs="+", default=[], help="i3cl checkpoints, one per ensemble member")
    p.add_argument("--images", required=True, help="folder, glob, .txt list or COCO json of the unlabeled images")
    p.add_argument("--img-root", help="image root for a COCO json (default: its folder)")
    p.add_argument("--out", required=True)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--score-thr", type=float, default=0.05, help="keep detections with score >= this")
    p.add_argument("--device", default="auto")
    p.add_argument("--tta-flips", nargs="*", default=[], choices=["h", "v"])
    p.add_argument("--tta-scales", nargs="*", type=int, default=[], help="extra test short sides")
    p.add_argument("--extra", nargs="*", default=[], help="predictions of other detectors: a COCO results or ArT json, or FORMAT:PATH with FORMAT "
                        "paddleocr, rapidocr, doctr or mmocr (converted into OUT/extra/)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.shard_size < 1:
        raise DatasetError("--shard-size must be >= 1")
    summary = run_ensemble(args.checkpoints, args.images, args.out, args.shard_size, args.img_root, args.score_thr,
                           args.device, args.tta_flips, args.tta_scales, args.extra, progress=not args.no_progress)
    print(json.dumps(summary))
    return 0
