"""The one inference loop: decode images, batch them, predict, yield polygons with their scores.

``i3cl infer`` (:func:`i3cl_core.infer.run.infer_images`), the ensemble's shards
(:func:`i3cl_core.infer.shards.run_shard`) and the evaluation during training and of checkpoints
(:func:`i3cl_core.infer.evaluate.predict_dataset`) all run :func:`predict_images`; what they write
around it (per-image files, shard files, scores) is theirs.

Images are read by the one image reader (:func:`i3cl_core.data.image_io.read_image`), in a pool of
decoding threads when one is given (threads, not processes: the decoders release the GIL, and forking a
process whose other threads compute can deadlock), in order and a few images ahead of the model. A PyTorch
model gets ``batch_size`` images per forward pass, scaled to [0, 1] on the CPU as the training data are and
copied to its device (pinned, without blocking, on CUDA); an exported model
(:class:`~i3cl_core.deploy.onnx_runtime.OnnxDetector`) gets one RGB array at a time. An unreadable image is
yielded with its error, never raised.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from i3cl_core.data.errors import DatasetError
from i3cl_core.data.image_io import read_image


@dataclass
class ImagePrediction:
    """One image's outcome: ``polygons`` (``[(polygon [N, 2], score), ...]``, every score, in the image's
    pixels) or ``error``; ``rgb`` only when asked for (to draw on)."""

    index: int  # position in the list given to predict_images
    polygons: list[tuple[np.ndarray, float]]
    height: int = 0
    width: int = 0
    rgb: np.ndarray | None = None
    error: str | None = None


def is_exported(model_file: str | os.PathLike) -> bool:
    """Whether a model file is an exported model (``.onnx`` from ``i3cl export``) rather than a checkpoint."""
    return str(model_file).lower().endswith(".onnx")


@contextlib.contextmanager
def decoding_threads(threads: int) -> Iterator:
    """A pool of ``threads`` decoding threads for :func:`predict_images` (None when 0: decode inline),
    shut down on leaving, pending decodes cancelled."""
    if threads < 1:
        yield None
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def decode(job: tuple[str, str]) -> tuple[np.ndarray | None, str | None]:
    """``(path, what)`` -> (RGB array, None) or (None, error)."""
    try:
        return read_image(job[0], job[1]), None
    except DatasetError as e:
        return None, str(e)


def predict_images(
    model,
    images: Sequence[tuple[str | os.PathLike, str]],
    epsilon: float,
    device=None,
    batch_size: int = 1,
    flips: Iterable[str] = (),
    scales: Iterable[int] = (),
    decoder=None,
    keep_rgb: bool = False,
) -> Iterator[ImagePrediction]:
    """Predict ``images`` (``(path, what)`` pairs; ``what`` names the image in errors) with ``model``, in
    their order. ``device``: where a PyTorch model's inputs go (default: its parameters' device).
    ``flips``/``scales``: test-time augmentation (PyTorch models only). ``decoder``: an executor whose
    ``map`` decodes ahead (None: decode inline)."""
    flips, scales = tuple(flips), tuple(scales)
    torch_module = sys.modules.get("torch")  # an exported model runs without importing torch
    exported = torch_module is None or not isinstance(model, torch_module.nn.Module)
    if exported:
        if flips or scales:
            raise DatasetError(
                f"{getattr(model, 'path', 'an exported model')}: test-time augmentation (flips, scales) is "
                "not available for exported models; "
                "leave infer.tta_flips/tta_scales empty or use the checkpoint"
            )
        yield from _predict_exported(model, images, epsilon, decoder, keep_rgb)
        return
    # deferred: torch; the ONNX engine runs this loop without it
    import torch

    from i3cl_core.infer.predictor import predict_polygons

    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    pin = device.type == "cuda"
    batch: list[tuple[int, np.ndarray, object]] = []

    def flush() -> Iterator[ImagePrediction]:
        with torch.inference_mode():  # not across a yield: the caller's code runs in its own mode
            outputs = predict_polygons(model, [x for _, _, x in batch], epsilon, flips, scales)
        for (j, rgb, _), polygons in zip(batch, outputs):
            yield ImagePrediction(j, polygons, rgb.shape[0], rgb.shape[1], rgb if keep_rgb else None)
        batch.clear()

    for j, (rgb, err) in enumerate(_decoded(images, decoder, ahead=2 * batch_size + 2)):
        if err is not None:
            yield ImagePrediction(j, [], error=err)
            continue
        # scaled to [0, 1] on the CPU, exactly as the training data (a CUDA division by a scalar multiplies by
        # its reciprocal, one ulp off for half the pixel values)
        x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float().div_(255.0)
        x = (x.pin_memory() if pin else x).to(device, non_blocking=True)
        batch.append((j, rgb, x))
        if len(batch) == batch_size:
            yield from flush()
    if batch:
        yield from flush()


def _decoded(images, decoder, ahead: int) -> Iterator[tuple[np.ndarray | None, str | None]]:
    """The decoded images in order; with a ``decoder``, at most ``ahead`` of them decoded before the model
    takes them (memory stays bounded over any number of images)."""
    jobs = ((str(path), what) for path, what in images)
    if decoder is None:
        yield from map(decode, jobs)
        return
    pending: deque = deque()
    try:
        for job in jobs:
            pending.append(decoder.submit(decode, job))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # a consumer that stops early leaves nothing queued
        for f in pending:
            f.cancel()


def _predict_exported(detector, images, epsilon, decoder, keep_rgb) -> Iterator[ImagePrediction]:
    """An exported model (``detector.predict(rgb, epsilon)``): one RGB array at a time, no torch."""
    for j, (rgb, err) in enumerate(_decoded(images, decoder, ahead=4)):
        if err is not None:
            yield ImagePrediction(j, [], error=err)
            continue
        polygons = detector.predict(rgb, epsilon)
        yield ImagePrediction(j, polygons, rgb.shape[0], rgb.shape[1], rgb if keep_rgb else None)
