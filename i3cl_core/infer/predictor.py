"""Run a detector over a dataset or a list of images: polygons and scores per image."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from i3cl_core.utils import get_logger

log = get_logger("infer")


def _flip_poly(poly: np.ndarray, w: int, h: int, flip: str) -> np.ndarray:
    p = poly.copy()
    if flip == "h":
        p[:, 0] = w - p[:, 0]
    else:
        p[:, 1] = h - p[:, 1]
    return p[::-1]


@torch.no_grad()
def predict_polygons(
    model, images: list, epsilon: float = 0.005, flips=(), scales=()
) -> list[list[tuple[np.ndarray, float]]]:
    """The one predictor: ``[(polygon, score), ...]`` per image of a batch (images already on the model's
    device, in input coordinates; detections whose mask gives no polygon are left out). Test-time
    augmentation: each of ``flips`` ('h', 'v') and ``scales`` (short sides) runs on the whole batch as
    well, and the variants are fused per image (Weighted Polygon Fusion, score average); the model's
    config is never changed (other scales go through ``predict(test_sides=)``)."""
    import torch

    variants = [(None, None)] + [(f, None) for f in flips] + [(None, s) for s in scales]
    per_image: list[list[list]] = [[] for _ in images]
    for flip, short in variants:
        batch = images
        if flip == "h":
            batch = [torch.flip(im, dims=[-1]) for im in images]
        elif flip == "v":
            batch = [torch.flip(im, dims=[-2]) for im in images]
        sides = None
        if (
            short is not None
        ):  # another short side, the long side limit scaled alike (never below the config's)
            base_short, base_long = model.cfg.test_short_side, model.cfg.test_long_side
            sides = (short, max(base_long, int(base_long * short / base_short)))
        outputs = model.predict(batch, epsilon=epsilon, test_sides=sides)
        for k, (im, out) in enumerate(zip(images, outputs)):
            h, w = im.shape[-2:]
            per_image[k].append(
                [
                    (_flip_poly(poly, w, h, flip) if flip else poly, s)
                    for poly, s in zip(out["polygons"], out["scores"].float().tolist())
                    if poly is not None
                ]
            )
    if len(variants) == 1:
        return [v[0] for v in per_image]
    from i3cl_core.fusion import cluster_predictions

    fused = []
    for outputs in per_image:
        clusters = cluster_predictions(
            outputs, None, iou_thr=0.55, skip_thr=0.0, conf_type="avg", epsilon=epsilon
        )
        fused.append([(c.polygon, c.score) for c in clusters if c.polygon is not None])
    return fused


@torch.no_grad()
def predict_batches(
    model,
    batches: Iterable[tuple[list, list[torch.Tensor]]],
    device,
    epsilon: float = 0.005,
    progress: bool = False,
    total: int | None = None,
) -> Iterable[tuple[object, list]]:
    """Yield ``(key, [(polygon, score), ...])`` for each image of each ``(keys, images)`` batch
    (:func:`predict_polygons`)."""
    from tqdm import tqdm

    model.eval()
    bar = tqdm(total=total, desc="inference", unit="img", disable=not progress, leave=False)
    for keys, images in batches:
        outputs = predict_polygons(model, [im.to(device, non_blocking=True) for im in images], epsilon)
        yield from zip(keys, outputs)
        bar.update(len(images))
    bar.close()


def predict_dataset(
    model,
    dataset,
    device,
    batch_size: int = 1,
    num_workers: int = 0,
    epsilon: float = 0.005,
    progress: bool = False,
) -> dict[int, list[tuple]]:
    """``{image_id: [(polygon, score), ...]}`` over a :class:`CocoTextDataset` (without transform)."""
    from torch.utils.data import DataLoader

    from i3cl_core.data.coco import collate

    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate
    )
    batches = (([t["image_id"] for t in targets], images) for images, targets in loader)
    results = {}
    for key, polygons in predict_batches(model, batches, device, epsilon, progress, total=len(dataset)):
        results[key] = polygons
    return results


def dataset_ground_truth(dataset) -> dict[int, list[tuple]]:
    """``{image_id: [(parts, dontcare), ...]}`` from the records of a :class:`CocoTextDataset`."""
    return {r.image_id: [(inst.parts, inst.iscrowd) for inst in r.instances] for r in dataset.records}


def evaluate_model(
    model,
    dataset,
    device,
    protocol: str = "art",
    score_thr: float = 0.45,
    batch_size: int = 1,
    num_workers: int = 0,
    progress: bool = False,
) -> dict:
    """P/R/F of ``model`` on ``dataset`` at ``score_thr``, plus a sweep of thresholds (``sweep``: P/R/F at
    0.05, 0.10, ..., 0.95) and its best one."""
    from i3cl_core.evaluation import prepare_polygons

    preds = predict_dataset(model, dataset, device, batch_size, num_workers, progress=progress)
    prepared = prepare_polygons(dataset_ground_truth(dataset), preds)
    at_thr = prepared.evaluate(protocol, score_thr)
    rows = prepared.sweep(protocol)
    best = next(r for r in rows if r.get("best"))
    return {
        "protocol": protocol,
        "score_thr": score_thr,
        "precision": at_thr["precision"],
        "recall": at_thr["recall"],
        "hmean": at_thr["hmean"],
        "best_thr": best.get("score_thr", best.get("threshold")),
        "best_hmean": best["hmean"],
        "sweep": [{k: r[k] for k in ("score_thr", "precision", "recall", "hmean")} for r in rows],
        "num_images": len(dataset),
    }
