"""A checkpoint -> one ONNX file holding the whole detector (``i3cl export``).

The graph takes one pre-processed image and returns the detections before polygon tracing:

* inputs ``image`` float32 [1, 3, H, W] (RGB in [0, 1], normalised with the metadata's mean/std, resized
  by the test-scale rule and zero-padded at the bottom and right to a multiple of ``size_divisible``) and
  ``image_size`` int64 [2] (the resized image's height and width before padding);
* outputs ``boxes`` float32 [N, 4] (x1, y1, x2, y2 in the resized image), ``scores`` float32 [N] and
  ``mask_probs`` float32 [N, M, M] (each detection's mask probabilities over its box).

Inside: backbone, FPN, IntraCL, RPN (anchors, top-k, NMS per level), RoI heads (RoIAlign, box head,
per-class NMS), InterCL and the mask head, in float32. Resizing, mask pasting and polygon tracing stay
outside (numpy/OpenCV in :mod:`i3cl_core.deploy.onnx_runtime`, the same functions the PyTorch predictor
uses). The file's metadata records the model config, the pre-processing and the post-processing
settings, so the runtime needs nothing else.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np

from i3cl_core import __version__
from i3cl_core.utils import atomic_write_bytes, get_logger

log = get_logger("export")

FORMAT_VERSION = "1"
DEFAULT_OPSET = 17
INPUT_NAMES = ("image", "image_size")
OUTPUT_NAMES = ("boxes", "scores", "mask_probs")


class ExportError(RuntimeError):
    """A model that cannot be exported; the message names the part."""


def export_graph(model):
    """The detector as a module with tensor inputs and outputs (see the module docstring)."""
    # deferred: torch loads only when exporting (this module imports torch-free)
    import torch
    from torch import nn
    from torchvision.models.detection.image_list import ImageList

    class DetectorGraph(nn.Module):
        def __init__(self, detector):
            super().__init__()
            self.detector = detector

        def forward(self, image: torch.Tensor, image_size: torch.Tensor):
            d = self.detector
            sizes = [(image_size[0], image_size[1])]
            padded = torch._shape_as_tensor(image)[-2:]
            feats = d.features(image)
            proposals, _ = d.rpn(ImageList(image, sizes), feats)
            heads = d.roi_heads
            levels = feats[:4]
            class_logits, box_regression = heads.box_head(heads.box_pooler(levels, proposals))
            det = heads.postprocess(class_logits, box_regression, proposals, sizes)[0]
            mask_logits = heads.mask_forward(levels, [det["boxes"]], sizes, padded)
            labels = det["labels"]
            probs = mask_logits[torch.arange(labels.shape[0]), labels - 1].sigmoid()
            return det["boxes"], det["scores"], probs

    return DetectorGraph(model).eval()


def metadata(cfg, checkpoint: str, opset: int) -> dict[str, str]:
    """The file's ``metadata_props``: format version, the whole config, pre- and post-processing settings."""
    m = cfg.model
    postprocess = {
        "mask_thr": m.mask_thr,
        "polygon_epsilon": cfg.infer.polygon_epsilon,
        "score_thr": cfg.infer.score_thr,
        "model_score_thr": m.score_thr,
        "boxes": "divide by the resize scale, clip to the original image",
    }
    return {
        "i3cl.format_version": FORMAT_VERSION,
        "i3cl.version": __version__,
        "i3cl.opset": str(opset),
        "i3cl.checkpoint": os.path.basename(str(checkpoint)),
        "i3cl.config": json.dumps(cfg.model_dump(mode="json")),
        "i3cl.preprocess": metadata_preprocess(m),
        "i3cl.postprocess": json.dumps(postprocess),
        "i3cl.inputs": (
            "image float32 [1, 3, H, W] normalised and padded; image_size int64 [2] (h, w) before padding"
        ),
        "i3cl.outputs": (
            "boxes float32 [N, 4] in the resized image; scores float32 [N]; mask_probs float32 [N, M, M]"
        ),
    }


def sample_image(size: tuple[int, int] = (480, 320)) -> np.ndarray:
    """An RGB uint8 image (w, h = ``size``) with text on it, from the synthetic renderer: a trained model
    finds detections in it, so that tracing follows every step of the post-processing."""
    # deferred: i3cl --help imports this module (cli.export); the renderer is large
    from i3cl_core.data.synth.render import render_sample

    image, _ = render_sample(seed=7, index=1, size=size)
    return image


def _graph_inputs(model, rgb):
    """(image, image_size) tensors for ``rgb`` by the runtime's pre-processing rule."""
    # deferred: torch loads only when exporting; i3cl --help imports this module (cli.export)
    import torch

    from i3cl_core.deploy.onnx_runtime import preprocess

    image, image_size, _ = preprocess(rgb, preprocess_settings(model.cfg))
    return torch.from_numpy(image), torch.from_numpy(image_size)


def preprocess_settings(model_cfg) -> dict:
    """What the runtime needs to pre-process an image for this model (``i3cl.preprocess``)."""
    return json.loads(metadata_preprocess(model_cfg))


def metadata_preprocess(model_cfg) -> str:
    from i3cl_core.model.detector import PIXEL_MEAN, PIXEL_STD  # deferred: pulls torch

    return json.dumps(
        {
            "color": "RGB",
            "scale": "divide by 255",
            "mean": list(PIXEL_MEAN),
            "std": list(PIXEL_STD),
            "test_short_side": model_cfg.test_short_side,
            "test_long_side": model_cfg.test_long_side,
            "resize": "scale = min(long_side / max(h, w), short_side / min(h, w)); "
            "new size round(h * scale), round(w * scale) (at least 1); "
            "bilinear, half-pixel centres, no antialiasing",
            "size_divisible": model_cfg.size_divisible,
            "pad": "zeros at the bottom and right, after normalising",
        }
    )


def _failing_part(graph, inputs, opset: int) -> str:
    """Which part of the detector stops the export: the feature extractor alone is tried first."""
    # deferred: torch loads only when exporting (this module imports torch-free)
    import torch
    from torch import nn

    class Features(nn.Module):
        def __init__(self, detector):
            super().__init__()
            self.detector = detector

        def forward(self, image):
            return tuple(self.detector.features(image))

    name = graph.detector.cfg.backbone.name
    try:
        torch.onnx.export(
            Features(graph.detector), (inputs[0],), io.BytesIO(), dynamo=False, opset_version=opset
        )
    except Exception:  # noqa: BLE001 - any failure here names the part
        return f"the backbone, FPN or IntraCL (backbone {name!r})"
    return "the RPN or the RoI heads (box head, InterCL, mask head)"


def export_onnx(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    sample: np.ndarray | None = None,
) -> dict:
    """Export ``checkpoint`` to ``out`` (written atomically); returns a summary with the parity of the
    exported graph against PyTorch on the tracing image (its detections, scores and masks)."""
    # deferred: onnx is the optional [deploy] extra; torch loads only when exporting
    import onnx
    import torch

    from i3cl_core.model.checkpoint import load_model

    if opset < 16:
        raise ExportError(f"--opset must be >= 16 (RoiAlign with half-pixel centres), got {opset}")
    model, cfg = load_model(checkpoint, "cpu")
    # float32 and the default memory format: the graph is one precision whatever the exporting CPU has
    model.cfg = model.cfg.model_copy(update={"bf16_features": False, "channels_last": False})
    model = model.to(memory_format=torch.contiguous_format).eval()
    graph = export_graph(model)
    rgb = sample if sample is not None else sample_image()
    inputs = _graph_inputs(model, rgb)
    with torch.no_grad():
        expected = graph(*inputs)
    if expected[0].shape[0] == 0:
        raise ExportError(
            f"{checkpoint}: the model finds no text in the tracing image, so the export could not "
            "follow its post-processing; give an image with text it detects (--sample-image)"
        )
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # the tracer's notes on constants that are truly fixed (RoI sizes)
            torch.onnx.export(
                graph,
                inputs,
                buf,
                dynamo=False,
                opset_version=opset,
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={
                    "image": {2: "height", 3: "width"},
                    "boxes": {0: "detections"},
                    "scores": {0: "detections"},
                    "mask_probs": {0: "detections"},
                },
            )
    except Exception as e:  # noqa: BLE001 - re-raised with the part named
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ExportError(
            f"{checkpoint}: cannot export {_failing_part(graph, inputs, opset)} to ONNX opset {opset}: "
            f"{first}"
        ) from e
    proto = onnx.load_from_string(buf.getvalue())
    meta = metadata(cfg, str(checkpoint), opset)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "i3cl"
    onnx.checker.check_model(proto)
    out = Path(out)
    atomic_write_bytes(out, proto.SerializeToString())
    summary = {
        "out": str(out),
        "opset": opset,
        "bytes": out.stat().st_size,
        "sample_detections": int(expected[0].shape[0]),
    }
    if importlib.util.find_spec("onnxruntime") is None:  # the [deploy] extra is absent: exported, not checked
        return summary
    from i3cl_core.deploy.onnx_runtime import OnnxDetector  # deferred: only the parity check runs the graph

    got = OnnxDetector(out).run_graph(*(t.numpy() for t in inputs))
    ref = [t.numpy() for t in expected]
    if got[0].shape != ref[0].shape:
        summary["parity"] = {"detections": [int(ref[0].shape[0]), int(got[0].shape[0])]}
    else:
        summary["parity"] = {
            "detections": int(ref[0].shape[0]),
            "max_box_diff": float(np.abs(got[0] - ref[0]).max()),
            "max_score_diff": float(np.abs(got[1] - ref[1]).max()),
            "max_mask_diff": float(np.abs(got[2] - ref[2]).max()),
        }
    return summary
