"""The inference workers of one process: one per device, each keeping the models it has loaded.

The ensemble's (model, shard) jobs (:mod:`i3cl_core.infer.shards`) run on whichever worker is free; in a
Dask worker process, :func:`worker_devices` says which device it owns (clusters:
:mod:`i3cl_core.infer.dask_cluster`).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from i3cl_core.deploy.onnx_runtime import OnnxDetector
from i3cl_core.devices import resolve_devices
from i3cl_core.infer.loop import is_exported
from i3cl_core.infer.precision import load_inference_model, resolve_precision


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
        """(model, polygon epsilon, precision) of ``checkpoint`` on this worker's device, loaded on first use
        (a checkpoint file replaced under the same name is loaded again). An exported model (``.onnx``, from
        ``i3cl export``) is an :class:`~i3cl_core.deploy.onnx_runtime.OnnxDetector` on the CPU, in float32."""
        st = os.stat(checkpoint)
        device = self.devices[worker]
        onnx = is_exported(checkpoint)
        prec = "fp32" if onnx else resolve_precision(precision, device)
        key = (os.path.abspath(checkpoint), st.st_size, st.st_mtime_ns, prec)
        cache = self._models[worker]
        if key not in cache:
            if onnx:
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
            self._decoders[worker] = ThreadPoolExecutor(threads, thread_name_prefix=f"decode-{worker}")
        return self._decoders[worker]

    def release(self) -> None:
        """Drop every loaded model (and the CUDA cache) and stop the decoding threads, e.g. before a
        training needs the GPUs."""
        for cache in self._models:
            cache.clear()
        for k, pool in enumerate(self._decoders):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            self._decoders[k] = None
        import torch  # deferred: ONNX-only workers never load torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def worker_devices(spec: str | list[str] = "auto", dask_local: bool = False) -> list[str]:
    """The devices of this process's inference workers. Outside Dask: :func:`resolve_devices`. In a
    Dask worker process exactly one: on a cluster the flow started itself (``dask_local``), worker
    ``k`` takes entry ``k`` (mod their number) of the resolved list; on an external cluster each
    worker is expected to see its own GPU as the first (``CUDA_VISIBLE_DEVICES=k dask worker ...``
    or dask-cuda's ``dask cuda worker``), so ``auto`` means ``cuda:0`` there, else the CPU."""
    try:
        from distributed import get_worker  # deferred: optional [dask] extra

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
