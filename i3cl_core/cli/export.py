"""``i3cl export CHECKPOINT --out MODEL.onnx``: a checkpoint -> one ONNX file holding the whole detector,
for the torch-free runtime (:func:`i3cl_core.deploy.onnx_export.export_onnx`)."""

from __future__ import annotations

import argparse
import json
import sys

from i3cl_core.data.image_io import read_image
from i3cl_core.deploy.onnx_export import DEFAULT_OPSET, ExportError, export_onnx


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="an i3cl checkpoint (.pth)")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format (onnx)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET}, at least 16)"
    )
    p.add_argument(
        "--sample-image",
        help="the image the export traces (default: a synthetic one with text); the "
        "model must detect text in it",
    )


def run(args: argparse.Namespace) -> int:
    sample = None
    if args.sample_image:
        sample = read_image(args.sample_image, "--sample-image")
    try:
        summary = export_onnx(args.checkpoint, args.out, args.opset, sample)
    except ExportError as e:
        print(f"i3cl export: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0
