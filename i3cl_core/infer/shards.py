"""One model on one shard of images -> one file of COCO results: the ensemble's unit of work.

A shard file depends on the shard, the model (and the precision it was loaded in) and the batch size, never
on which worker or how many ran it. ``i3cl ensemble`` (:func:`i3cl_core.pseudo.ensemble.run_ensemble`) and the
pipeline's ensemble stage both run :func:`infer_shard`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from i3cl_core.infer.export import coco_results
from i3cl_core.infer.loop import predict_images
from i3cl_core.infer.run import ImageItem
from i3cl_core.infer.workers import device_workers
from i3cl_core.utils import atomic_write_json


class ShardSettings(BaseModel):
    """What a shard file depends on besides its images and its model (the cache key of a shard task);
    which worker and how many decoding threads ran it are not part of it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # the pipeline's infer.min_score (this name is part of the shard files' cache key, so it stays)
    score_thr: float = Field(0.05, ge=0.0, le=1.0)
    flips: tuple[Literal["h", "v"], ...] = ()
    scales: tuple[int, ...] = ()
    batch_size: int = Field(1, ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


@dataclass
class Shard:
    index: int
    items: list[ImageItem]

    @property
    def name(self) -> str:
        return f"shard_{self.index:05d}.json"


def plan_shards(items: list[ImageItem], shard_size: int) -> list[Shard]:
    return [Shard(i // shard_size, items[i : i + shard_size]) for i in range(0, len(items), shard_size)]


def run_shard(
    model, shard: Shard, path: Path, settings: ShardSettings, device, epsilon: float = 0.005, decoder=None
) -> dict:
    """Predict one shard with one loaded model (:func:`~i3cl_core.infer.loop.predict_images`, decoding in
    ``decoder``, a worker's thread pool) and write its COCO results at or above ``settings.score_thr``
    atomically."""
    images = [(it.path, f"image {it.image_id}") for it in shard.items]
    s = settings
    results, failures = [], []
    for p in predict_images(model, images, epsilon, device, s.batch_size, s.flips, s.scales, decoder):
        if p.error is not None:
            failures.append(p.error)
            continue
        image_id = shard.items[p.index].image_id
        results.extend(coco_results(image_id, p.polygons, s.score_thr))
    atomic_write_json(path, results)
    return {
        "shard": shard.index,
        "images": len(shard.items),
        "detections": len(results),
        "failures": failures,
    }


def infer_shard(
    checkpoint: str,
    shard: Shard,
    out_dir: str | os.PathLike,
    settings: ShardSettings,
    devices: list[str],
    loader_workers: int = 0,
) -> dict:
    """One model on one shard on a free worker of this process (of ``devices``, each with ``loader_workers``
    decoding threads) -> ``out_dir/shard_NNNNN.json`` (the ensemble stage's unit of work, the same for
    ``i3cl ensemble`` and the pipeline)."""
    workers = device_workers(devices)
    with workers.take() as w:
        model, epsilon, prec = workers.model(w, checkpoint, settings.precision)
        path = Path(out_dir) / shard.name
        decoder = workers.decoder(w, loader_workers)
        result = run_shard(model, shard, path, settings, workers.devices[w], epsilon, decoder)
    return {**result, "path": str(path), "device": workers.devices[w], "worker": w, "precision": prec}
