"""The inference precision of every command that runs a detector (``i3cl infer``, ``i3cl ensemble``, the
pipeline's ensemble stage): one rule, one loader.

``auto`` (the default): float16 features (CUDA AMP) on CUDA; on a CPU bfloat16 features where it computes
them natively (AVX512-BF16 or AMX), else float32. ``fp16`` needs CUDA. In every case only the backbone,
FPN and IntraCL run in the low precision; heads, boxes and masks stay float32, so coordinates keep
their precision. Inference also runs the convolutions in NHWC memory format (``channels_last``: the
same arithmetic in another order, faster with oneDNN and cuDNN; benchmarks/bench_model_latency.py).
"""

from __future__ import annotations

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str, device: str) -> str:
    """``precision`` (one of :data:`PRECISIONS`) on ``device`` -> fp32, bf16 or fp16; a clear error for
    fp16 on a CPU or an unknown name."""
    # deferred: pulls torch; the ONNX path and the flows import this module torch-free
    import torch

    from i3cl_core.model.detector import native_bf16

    dev = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"infer.precision: {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if precision == "auto":
        if dev.type == "cuda":
            return "fp16"
        return "bf16" if native_bf16(dev) else "fp32"
    if precision == "fp16" and dev.type != "cuda":
        raise ValueError(
            f"infer.precision: fp16 autocast needs a CUDA device, not {device}; use bf16 or fp32"
        )
    return precision


def load_inference_model(
    checkpoint,
    device,
    precision: str = "auto",
    model_overrides: dict | None = None,
    channels_last: bool = True,
):
    """(model in eval mode, config, resolved precision) of ``checkpoint`` on ``device``."""
    from i3cl_core.model.checkpoint import load_model  # deferred: pulls torch (as in resolve_precision)

    prec = resolve_precision(precision, str(device))
    model, cfg = load_model(
        checkpoint,
        device,
        {"channels_last": channels_last, **(model_overrides or {}), "bf16_features": prec == "bf16"},
    )
    model.fp16_features = prec == "fp16"
    return model, cfg, prec
