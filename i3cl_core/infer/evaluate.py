"""Scores of a model on a labeled dataset: its predictions by the one inference loop, matched against the
ground truth by the evaluation protocols (:mod:`i3cl_core.evaluation`)."""

from __future__ import annotations

import contextlib

from i3cl_core.data.errors import DatasetError
from i3cl_core.infer.loop import decoding_threads, predict_images
from i3cl_core.utils import get_logger

log = get_logger("evaluate")


def predict_dataset(
    model,
    dataset,
    device,
    batch_size: int = 1,
    num_workers: int = 0,
    epsilon: float = 0.005,
    progress: bool = False,
) -> dict[int, list[tuple]]:
    """``{image_id: [(polygon, score), ...]}`` over the images of a :class:`CocoTextDataset` (its records;
    no transform), by the one inference loop (:func:`i3cl_core.infer.loop.predict_images`) with
    ``num_workers`` decoding threads. An unreadable image raises: a score must cover every image."""
    from tqdm import tqdm  # deferred: tqdm costs ~40 ms at import; only a run needs it

    model.eval()
    records = dataset.records
    images = [(r.path, f"image {r.image_id}") for r in records]
    results = {}
    bar = tqdm(total=len(records), desc="inference", unit="img", disable=not progress, leave=False)
    with decoding_threads(num_workers) as decoder, contextlib.closing(bar):
        for p in predict_images(model, images, epsilon, device, batch_size, decoder=decoder):
            if p.error is not None:
                raise DatasetError(p.error)
            r = records[p.index]
            if (p.height, p.width) != (r.height, r.width):
                log.warning(
                    "%s: image %s is %dx%d but the json says %dx%d; "
                    "its predictions are in the image's pixels",
                    r.path, r.image_id, p.width, p.height, r.width, r.height,
                )  # fmt: skip
            results[r.image_id] = p.polygons
            bar.update(1)
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
    from i3cl_core.evaluation import prepare_polygons  # deferred: pulls shapely (evaluation.core)

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
