"""Run a detector over a dataset or a list of images: polygons and scores per image."""
from __future__ import annotations

from typing import Iterable

import torch

from i3cl_core.utils import get_logger

log = get_logger("infer")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


@torch.no_grad()
def predict_batches(model, batches: Iterable[tuple[list, list[torch.Tensor]]], device, epsilon: float = 0.005,
                    progress: bool = False, total: int | None = None) -> Iterable[tuple[object, dict]]:
    """Yield ``(key, result)`` for each image of each ``(keys, images)`` batch; ``result`` has
    ``boxes``, ``scores`` (CPU tensors) and ``polygons`` (arrays or None) in input coordinates."""
    from tqdm import tqdm

    model.eval()
    bar = tqdm(total=total, desc="inference", unit="img", disable=not progress, leave=False)
    for keys, images in batches:
        outputs = model.predict([im.to(device, non_blocking=True) for im in images], epsilon=epsilon)
        for key, out in zip(keys, outputs):
            yield key, {"boxes": out["boxes"].cpu(), "scores": out["scores"].cpu(), "polygons": out["polygons"]}
        bar.update(len(images))
    bar.close()


def predict_dataset(model, dataset, device, batch_size: int = 1, num_workers: int = 0, epsilon: float = 0.005,
                    progress: bool = False) -> dict[int, list[tuple]]:
    """``{image_id: [(polygon, score), ...]}`` over a :class:`CocoTextDataset` (without transform)."""
    from torch.utils.data import DataLoader

    from i3cl_core.data.coco import collate

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    batches = (([t["image_id"] for t in targets], images) for images, targets in loader)
    results = {}
    for key, out in predict_batches(model, batches, device, epsilon, progress, total=len(dataset)):
        results[key] = [(p, float(s)) for p, s in zip(out["polygons"], out["scores"]) if p is not None]
    return results


def dataset_ground_truth(dataset) -> dict[int, list[tuple]]:
    """``{image_id: [(parts, dontcare), ...]}`` from the records of a :class:`CocoTextDataset`."""
    return {r.image_id: [(inst.parts, inst.iscrowd) for inst in r.instances] for r in dataset.records}


def evaluate_model(model, dataset, device, protocol: str = "art", score_thr: float = 0.45, batch_size: int = 1,
                   num_workers: int = 0, progress: bool = False) -> dict:
    """P/R/F of ``model`` on ``dataset`` at ``score_thr`` plus the best threshold of a sweep."""
    from i3cl_core.evaluation import prepare_polygons

    preds = predict_dataset(model, dataset, device, batch_size, num_workers, progress=progress)
    prepared = prepare_polygons(dataset_ground_truth(dataset), preds)
    at_thr = prepared.evaluate(protocol, score_thr)
    best = next(r for r in prepared.sweep(protocol) if r.get("best"))
    return {
        "protocol": protocol,
        "score_thr": score_thr,
        "precision": at_thr["precision"],
        "recall": at_thr["recall"],
        "hmean": at_thr["hmean"],
        "best_thr": best.get("score_thr", best.get("threshold")),
        "best_hmean": best["hmean"],
        "num_images": len(dataset),
    }
