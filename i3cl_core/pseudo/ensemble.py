"""``i3cl ensemble``: every model over an unlabeled image set, sharded and resumable.

Layout written under ``--out``::

    images.json                       the unlabeled set (COCO images with sizes): IMAGES.json for fuse
    predictions/<model>/shard_00000.json   COCO results of one model on one shard, written atomically
    predictions/<model>/coverage.json      image ids the model has run on (written when it is complete)
    predictions/<model>/inputs.stamp       the checkpoint's fingerprint, the shards and the settings
                                           they came from
    members.json                      the prediction sources to fuse (ours, then --extra files)

A shard file that exists is finished and is skipped on a re-run, so a killed ensemble resumes where
it stopped and ends with the same files; when the checkpoint, the images, the shard size or a setting
(threshold, test-time augmentation, batch size, precision) changed, its shards are recomputed. Optional
test-time augmentation (horizontal/vertical flips, extra test scales) runs each model on every variant and
merges the variants per model with the same polygon fusion (equal weights, ``avg``) before the ensemble
fusion sees them.

Workers: one per entry of ``--devices`` (``auto``: every visible GPU, else the CPU). The (model,
shard) jobs go to whichever worker is free; a worker loads each model once and keeps it, decodes
images in its own pool of decoding threads and predicts ``--batch-size`` images per forward pass, in float16
features on CUDA or bfloat16 features on CPUs that compute them natively (``--precision auto``;
heads, boxes and masks stay float32).
A shard file depends on the shard, the model, the batch size and the precision, never on the
number of workers. The pipeline's ensemble stage runs the same
:func:`~i3cl_core.infer.shards.infer_shard`, on the same workers (:mod:`i3cl_core.infer.workers`), and the
shard's inference is the one loop of :mod:`i3cl_core.infer.loop`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import ValidationError

from i3cl_core.data.errors import DatasetError
from i3cl_core.data.image_io import header
from i3cl_core.devices import resolve_devices
from i3cl_core.infer.precision import resolve_precision
from i3cl_core.infer.run import ImageItem, collect_images
from i3cl_core.infer.shards import ShardSettings, infer_shard, plan_shards
from i3cl_core.infer.workers import device_workers, release_device_workers
from i3cl_core.pseudo.external import prepare_extra
from i3cl_core.utils import atomic_write_json, atomic_write_text, fingerprint, get_logger

log = get_logger("ensemble")


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
    """Sizes from the image headers (the image reader's rule); unreadable or too large images are reported
    and left out."""
    good, images, failures = [], [], []
    for it in items:
        try:
            w, h, _ = header(it.path, f"{it.path}: image {it.image_id}")
        except DatasetError as e:
            failures.append(str(e))
            continue
        good.append(it)
        images.append({"id": it.image_id, "file_name": it.file_name, "width": w, "height": h})
    return good, images, failures


def run_ensemble(
    checkpoints: list[str],
    images: str,
    out: str | os.PathLike,
    shard_size: int = 64,
    img_root: str | None = None,
    min_score: float = 0.05,
    devices: str | list[str] = "auto",
    flips=(),
    scales=(),
    extra: list[str] | None = None,
    progress: bool = True,
    batch_size: int = 4,
    loader_workers: int = 2,
    precision: str = "auto",
) -> dict:
    """Every checkpoint over ``images``: (model, shard) jobs, model by model, on one worker per
    device (``devices``); finished shard files are kept and skipped."""
    from tqdm import tqdm  # deferred: tqdm costs ~40 ms at import; only a run needs it

    if not checkpoints and not extra:
        raise DatasetError("ensemble: give at least one checkpoint (or --extra prediction file)")
    try:
        settings = ShardSettings(
            score_thr=min_score,
            flips=tuple(flips),
            scales=tuple(scales),
            batch_size=batch_size,
            precision=precision,
        )
    except ValidationError as e:  # a bad --min-score, --batch-size, ... named, as the CLI reports errors
        err = e.errors()[0]
        field = ".".join(map(str, err["loc"])).replace("score_thr", "min_score")  # the shard key's name
        raise DatasetError(f"ensemble: {field}: {err['msg']}") from None
    devs = resolve_devices(devices)
    for d in devs:
        resolve_precision(precision, d)  # refuse fp16 on a CPU before any work
    out = Path(out)
    items = collect_images(images, img_root)
    listed = len(items)
    items, table, failures = image_table(items)
    for f in failures:
        log.warning("skipping %s", f)
    if not items:
        raise DatasetError(f"{images}: no readable images")
    atomic_write_json(
        out / "images.json", {"images": table, "annotations": [], "categories": [{"id": 1, "name": "text"}]}
    )
    shards = plan_shards(items, shard_size)
    image_list = hashlib.sha1(
        json.dumps([[s.index, [it.image_id for it in s.items]] for s in shards]).encode()
    )
    image_list = image_list.hexdigest()
    shard_inputs = {
        "settings": settings.model_dump(mode="json"),
        "shard_size": shard_size,
        "precision": [resolve_precision(precision, d) for d in devs],  # what "auto" means on these devices
    }
    taken: set[str] = set()
    members, per_model, jobs = [], [], []
    t0 = time.time()
    for ckpt in checkpoints:
        name = model_name(ckpt, taken)
        pred_dir = out / "predictions" / name
        pred_dir.mkdir(parents=True, exist_ok=True)
        # what the shard files were computed from: when any of it changed, or is unknown (shards of an earlier
        # version), they are recomputed (a shard file that exists is otherwise taken as finished)
        stamp = pred_dir / "inputs.stamp"  # not .json: a member folder's json files are its shards
        inputs = json.dumps(
            {"checkpoint": fingerprint(ckpt), "shards": image_list, **shard_inputs}, sort_keys=True
        )
        stale = sorted(pred_dir.glob("shard_*.json"))
        if stale and (not stamp.exists() or stamp.read_text() != inputs):
            log.warning(
                "%s: the checkpoint %s, the images or the settings changed since its shards were written (or "
                "were not recorded); recomputing %d shards",
                pred_dir,
                ckpt,
                len(stale),
            )
            for f in stale:
                f.unlink()
            (pred_dir / "coverage.json").unlink(missing_ok=True)
        (pred_dir / "checkpoint.sha1").unlink(missing_ok=True)  # the stamp of earlier versions
        atomic_write_text(stamp, inputs)
        todo = [s for s in shards if not (pred_dir / s.name).exists()]
        jobs += [(ckpt, s, pred_dir) for s in todo]
        members.append(str(pred_dir))
        per_model.append(
            {
                "model": name,
                "checkpoint": ckpt,
                "shards": len(shards),
                "skipped_done": len(shards) - len(todo),
                "computed": len(todo),
            }
        )
    workers = device_workers(devs)
    bar = tqdm(
        total=sum(len(s.items) for _, s, _ in jobs),
        desc="ensemble",
        unit="img",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        with ThreadPoolExecutor(max_workers=len(devs), thread_name_prefix="ensemble-worker") as pool:
            futures = [
                pool.submit(infer_shard, ckpt, s, pred_dir, settings, devs, loader_workers)
                for ckpt, s, pred_dir in jobs
            ]
            for f in futures:  # in submission order: a failure stops the run with its own error
                r = f.result()
                failures.extend(r["failures"])
                bar.update(r["images"])
    finally:
        bar.close()
        loads = list(workers.loads)
        release_device_workers()
    for pred_dir in members:
        atomic_write_json(Path(pred_dir) / "coverage.json", {"images": [it.image_id for it in items]})
    members.extend(prepare_extra(e, table, out / "extra", k) for k, e in enumerate(extra or []))
    atomic_write_json(out / "members.json", members, indent=2)
    seconds = time.time() - t0
    computed = sum(len(s.items) for _, s, _ in jobs)
    unique = list(dict.fromkeys(failures))  # a file that no model could decode is listed once
    return {
        "images": len(items),
        "listed": listed,
        "shards": len(shards),
        "models": per_model,
        "members": members,
        "unreadable": unique[:20],
        "num_unreadable": len(unique),
        "seconds": round(seconds, 2),
        "images_per_s": round(computed / max(seconds, 1e-9), 3),
        "devices": devs,
        "model_loads_per_worker": loads,
        "images_json": str(out / "images.json"),
    }
