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

Workers: one per entry of ``--devices`` (``auto``: every visible GPU, else the CPU). The (model,
shard) jobs go to whichever worker is free; a worker loads each model once and keeps it, decodes
images in its own pool of decoding threads and predicts ``--batch-size`` images per forward pass, in float16
features on CUDA or bfloat16 features on CPUs that compute them natively (``--precision auto``;
heads, boxes and masks stay float32).
A shard file depends on the shard, the model, the batch size and the precision, never on the
number of workers. The pipeline's ensemble stage runs the same :func:`infer_shard`.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from i3cl_core.data.errors import DatasetError
from i3cl_core.devices import resolve_devices
from i3cl_core.infer.precision import load_inference_model, resolve_precision
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
    """Sizes from the image headers (the image reader's rule); unreadable or too large images are reported
    and left out."""
    from i3cl_core.data.errors import DatasetError
    from i3cl_core.data.image_io import header

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


def plan_shards(items: list[ImageItem], shard_size: int) -> list[Shard]:
    return [Shard(i // shard_size, items[i : i + shard_size]) for i in range(0, len(items), shard_size)]


# ------------------------------------------------------------------------------------ devices


class DeviceWorkers:
    """The inference workers of one process: one per entry of ``devices``. A shard task holds a worker
    while it runs (tasks beyond the number of workers wait for one to be free), and each worker keeps
    the models it has loaded, so every teacher is loaded once per worker, not once per shard."""

    def __init__(self, devices: list[str], max_models: int = 8):
        self.devices = list(devices)
        self.max_models = max_models
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(len(self.devices)):
            self._free.put(i)
        self._models: list[OrderedDict] = [OrderedDict() for _ in self.devices]
        self._decoders: list = [None] * len(self.devices)
        self.loads = [0] * len(self.devices)

    @contextlib.contextmanager
    def take(self):
        i = self._free.get()
        try:
            yield i
        finally:
            self._free.put(i)

    def model(self, worker: int, checkpoint: str, precision: str):
        """(model, polygon epsilon, precision) of ``checkpoint`` on this worker's device, loaded on first use (a
        checkpoint file replaced under the same name is loaded again). An exported model (``.onnx``, from
        ``i3cl export``) is an :class:`~i3cl_core.deploy.onnx_runtime.OnnxDetector` on the CPU, in float32."""
        st = os.stat(checkpoint)
        device = self.devices[worker]
        onnx = is_exported(checkpoint)
        prec = "fp32" if onnx else resolve_precision(precision, device)
        key = (os.path.abspath(checkpoint), st.st_size, st.st_mtime_ns, prec)
        cache = self._models[worker]
        if key not in cache:
            if onnx:
                from i3cl_core.deploy.onnx_runtime import OnnxDetector

                model = OnnxDetector(checkpoint)
                cache[key] = (model, model.polygon_epsilon)
            else:
                model, cfg, _ = load_inference_model(checkpoint, device, prec)
                cache[key] = (model, cfg.infer.polygon_epsilon)
            self.loads[worker] += 1
            while len(cache) > self.max_models:
                cache.popitem(last=False)
        cache.move_to_end(key)
        model, epsilon = cache[key]
        return model, epsilon, prec

    def decoder(self, worker: int, threads: int):
        """This worker's pool of ``threads`` image-decoding threads, started on first use and kept (None:
        decode inline). Threads, not processes: the decoders (OpenCV, Pillow) release the GIL, and a
        forked decoding process of a process whose other threads are computing can deadlock."""
        if threads < 1:
            return None
        if self._decoders[worker] is None:
            from concurrent.futures import ThreadPoolExecutor

            self._decoders[worker] = ThreadPoolExecutor(threads, thread_name_prefix=f"decode-{worker}")
        return self._decoders[worker]

    def release(self) -> None:
        """Drop every loaded model (and the CUDA cache) and stop the decoding processes, e.g. before a
        training needs the GPUs."""
        for cache in self._models:
            cache.clear()
        for k, pool in enumerate(self._decoders):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            self._decoders[k] = None
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def worker_devices(spec: str | list[str] = "auto", dask_local: bool = False) -> list[str]:
    """The devices of this process's inference workers. Outside Dask: :func:`resolve_devices`. In a
    Dask worker process exactly one: on a cluster the flow started itself (``dask_local``), worker
    ``k`` takes entry ``k`` (mod their number) of the resolved list; on an external cluster each
    worker is expected to see its own GPU as the first (``CUDA_VISIBLE_DEVICES=k dask worker ...``
    or dask-cuda's ``dask cuda worker``), so ``auto`` means ``cuda:0`` there, else the CPU."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return resolve_devices(spec)
    if not dask_local and spec in ("auto", ["auto"]):
        return resolve_devices("auto")[:1]
    devices = resolve_devices(spec)
    index = int(worker.name) if str(worker.name).isdigit() else 0
    return [devices[index % len(devices)]]


_WORKERS: dict[tuple[str, ...], DeviceWorkers] = {}
_WORKERS_LOCK = threading.Lock()


def device_workers(devices: list[str]) -> DeviceWorkers:
    """The process-wide :class:`DeviceWorkers` for this device list (created on first use)."""
    key = tuple(devices)
    with _WORKERS_LOCK:
        if key not in _WORKERS:
            _WORKERS[key] = DeviceWorkers(list(devices))
        return _WORKERS[key]


def release_device_workers() -> None:
    with _WORKERS_LOCK:
        for w in _WORKERS.values():
            w.release()
        _WORKERS.clear()


def is_exported(checkpoint: str | os.PathLike) -> bool:
    """Whether an ensemble member is an exported model (``.onnx`` from ``i3cl export``) rather than a checkpoint."""
    return str(checkpoint).lower().endswith(".onnx")


# ------------------------------------------------------------------------------------ one shard
def decode(job: tuple[str, str]) -> tuple[np.ndarray | None, str | None]:
    """``(path, what)`` -> (RGB array, None) or (None, error): one image, in a decoding thread."""
    from i3cl_core.data.image_io import read_image

    try:
        return read_image(job[0], job[1]), None
    except DatasetError as e:
        return None, str(e)


def run_shard(
    model,
    shard: Shard,
    path: Path,
    score_thr: float,
    device,
    epsilon: float = 0.005,
    flips=(),
    scales=(),
    batch_size: int = 1,
    decoder=None,
) -> dict:
    """Predict one shard with one loaded model and write its COCO results atomically. Images are
    decoded by ``decoder`` (a thread pool, see :meth:`DeviceWorkers.decoder`; None: inline) ahead of the
    model predicts ``batch_size`` at a time; the file depends on the shard, the model (and the precision
    it was loaded in) and the batch size only, not on which worker or how many ran it."""
    import torch

    from i3cl_core.infer.export import coco_result
    from i3cl_core.infer.predictor import predict_polygons

    jobs = [(str(it.path), f"image {it.image_id}") for it in shard.items]
    decoded = (
        decoder.map(decode, jobs) if decoder is not None else map(decode, jobs)
    )  # in order, decoded ahead
    results, failures, batch = [], [], []
    exported = not isinstance(model, torch.nn.Module)  # an OnnxDetector: RGB arrays in, one at a time
    if exported and (flips or scales):
        raise DatasetError(
            f"{getattr(model, 'path', 'an exported model')}: test-time augmentation (flips, scales) "
            "is not available for exported members; leave infer.tta_flips/tta_scales empty or use "
            "the checkpoint"
        )

    def flush() -> None:
        if exported:
            preds = [model.predict(rgb, epsilon) for _, rgb in batch]
        else:
            preds = predict_polygons(model, [t for _, t in batch], epsilon, flips, scales)
        for (j, _), image_preds in zip(batch, preds):
            item = shard.items[j]
            results.extend(coco_result(item.image_id, poly, s) for poly, s in image_preds if s >= score_thr)
        batch.clear()

    with torch.inference_mode():
        for j, (rgb, err) in enumerate(decoded):
            if err is not None:
                failures.append(err)
                continue
            if exported:
                batch.append((j, rgb))
            else:
                t = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).to(
                    device, non_blocking=True
                )
                batch.append((j, t.float().div_(255.0)))
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
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
    score_thr: float,
    devices: list[str],
    flips=(),
    scales=(),
    batch_size: int = 1,
    loader_workers: int = 0,
    precision: str = "auto",
) -> dict:
    """One model on one shard on a free worker of this process -> ``out_dir/shard_NNNNN.json``
    (the ensemble stage's unit of work, the same for ``i3cl ensemble`` and the pipeline)."""
    workers = device_workers(devices)
    with workers.take() as w:
        model, epsilon, prec = workers.model(w, checkpoint, precision)
        path = Path(out_dir) / shard.name
        result = run_shard(
            model,
            shard,
            path,
            score_thr,
            workers.devices[w],
            epsilon,
            flips,
            scales,
            batch_size,
            workers.decoder(w, loader_workers),
        )
    return {**result, "path": str(path), "device": workers.devices[w], "worker": w, "precision": prec}


def run_ensemble(
    checkpoints: list[str],
    images: str,
    out: str | os.PathLike,
    shard_size: int = 64,
    img_root: str | None = None,
    score_thr: float = 0.05,
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
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from i3cl_core.utils import fingerprint

    if not checkpoints and not extra:
        raise DatasetError("ensemble: give at least one checkpoint (or --extra prediction file)")
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
    taken: set[str] = set()
    members, per_model, jobs = [], [], []
    t0 = time.time()
    for ckpt in checkpoints:
        name = model_name(ckpt, taken)
        pred_dir = out / "predictions" / name
        pred_dir.mkdir(parents=True, exist_ok=True)
        stamp, fp = pred_dir / "checkpoint.sha1", fingerprint(ckpt)
        if stamp.exists() and stamp.read_text() != fp:
            stale = sorted(pred_dir.glob("shard_*.json"))
            log.warning(
                "%s: the checkpoint %s changed since its shards were written; recomputing %d shards",
                pred_dir,
                ckpt,
                len(stale),
            )
            for f in stale:
                f.unlink()
            (pred_dir / "coverage.json").unlink(missing_ok=True)
        stamp.write_text(fp)
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
                pool.submit(
                    infer_shard,
                    ckpt,
                    s,
                    pred_dir,
                    score_thr,
                    devs,
                    flips,
                    scales,
                    batch_size,
                    loader_workers,
                    precision,
                )
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
    from i3cl_core.pseudo.external import prepare_extra

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
