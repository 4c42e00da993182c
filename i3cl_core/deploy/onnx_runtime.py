"""Run an exported detector without torch: onnxruntime, numpy and OpenCV.

:class:`OnnxDetector` reads the file's metadata (written by ``i3cl export``), pre-processes an RGB image
as the PyTorch model does (scale to [0, 1], normalise, resize to the test scale, pad), runs the graph and
turns its boxes and mask probabilities into polygons with the functions the PyTorch predictor uses
(:func:`i3cl_core.data.polygons.masks_to_polygons`). Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from i3cl_core.data.polygons import masks_to_polygons
from i3cl_core.model.errors import CheckpointError

REQUIRED_KEYS = ("i3cl.format_version", "i3cl.preprocess", "i3cl.postprocess")


def preprocess(rgb: np.ndarray, settings: dict) -> tuple[np.ndarray, np.ndarray, float]:
    """``(image [1, 3, H, W] float32, image_size [2] int64, scale)`` for an RGB uint8 ``rgb`` [h, w, 3]: the
    test-scale rule of :meth:`i3cl_core.model.detector.I3CL.preprocess` in numpy/OpenCV."""
    import cv2  # deferred: infer.run and the workers import this module; OpenCV loads on use

    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape [H, W, 3], got {rgb.shape}")
    mean = np.asarray(settings["mean"], np.float32)
    std = np.asarray(settings["std"], np.float32)
    img = (rgb.astype(np.float32) / 255.0 - mean) / std
    h, w = rgb.shape[:2]
    scale = min(settings["test_long_side"] / max(h, w), settings["test_short_side"] / min(h, w))
    nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    if (nh, nw) != (h, w):
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    d = settings["size_divisible"]
    ph, pw = int(math.ceil(nh / d) * d), int(math.ceil(nw / d) * d)
    batch = np.zeros((1, 3, ph, pw), np.float32)
    batch[0, :, :nh, :nw] = img.transpose(2, 0, 1)
    return batch, np.array([nh, nw], np.int64), scale


class OnnxDetector:
    """An exported I3CL detector in an onnxruntime session. ``predict(rgb)`` -> ``[(polygon, score), ...]``
    in the image's coordinates, as :func:`i3cl_core.infer.predictor.predict_polygons` gives for one image.
    ``threads``: onnxruntime's intra-op threads (default: its own choice)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort  # deferred: optional [deploy] extra

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such ONNX file")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises several types for a bad file
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{self.path}: cannot load the ONNX file: truncated, corrupt or not an ONNX model ({first})"
            ) from e
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in REQUIRED_KEYS if k not in meta]
        if missing:
            raise CheckpointError(
                f"{self.path}: not an i3cl export (metadata {', '.join(missing)} missing); "
                "export the checkpoint with `i3cl export`"
            )
        self.metadata = meta
        self.preprocess_settings = json.loads(meta["i3cl.preprocess"])
        self.postprocess_settings = json.loads(meta["i3cl.postprocess"])
        self.config = json.loads(meta["i3cl.config"]) if "i3cl.config" in meta else {}

    @property
    def score_thr(self) -> float:
        """The exported checkpoint's ``infer.score_thr``."""
        return float(self.postprocess_settings["score_thr"])

    @property
    def polygon_epsilon(self) -> float:
        return float(self.postprocess_settings["polygon_epsilon"])

    def run_graph(self, image: np.ndarray, image_size: np.ndarray) -> list[np.ndarray]:
        """The raw outputs (boxes, scores, mask_probs) for pre-processed inputs."""
        return self.session.run(None, {"image": image, "image_size": image_size})

    def detect(self, rgb: np.ndarray) -> dict:
        """Boxes (clipped, in the image's coordinates), scores and mask probabilities of one RGB image."""
        image, image_size, scale = preprocess(rgb, self.preprocess_settings)
        boxes, scores, probs = self.run_graph(image, image_size)
        h, w = rgb.shape[:2]
        boxes = boxes / scale
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        return {"boxes": boxes, "scores": scores, "mask_probs": probs}

    def predict(self, rgb: np.ndarray, epsilon: float | None = None) -> list[tuple[np.ndarray, float]]:
        """``[(polygon (K, 2) float32, score), ...]``; detections whose mask gives no polygon are left out."""
        det = self.detect(rgb)
        eps = self.polygon_epsilon if epsilon is None else epsilon
        polys = masks_to_polygons(
            det["boxes"], det["mask_probs"], rgb.shape[:2], float(self.postprocess_settings["mask_thr"]), eps
        )
        return [(p, float(s)) for p, s in zip(polys, det["scores"]) if p is not None]
