"""``i3cl ensemble``: every model over an unlabeled image set, sharded and resumable
(:func:`i3cl_core.pseudo.ensemble.run_ensemble`; the layout it writes is described in
:mod:`i3cl_core.pseudo.ensemble`)."""

from __future__ import annotations

import argparse
import json
import sys

from i3cl_core.data.errors import DatasetError
from i3cl_core.devices import resolve_devices
from i3cl_core.infer.precision import PRECISIONS, resolve_precision


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoints",
        nargs="+",
        default=[],
        help="i3cl checkpoints (.pth) or exported models (.onnx, "
        "from `i3cl export`, run by onnxruntime on the CPU), one per ensemble member",
    )
    p.add_argument(
        "--images", required=True, help="folder, glob, .txt list or COCO json of the unlabeled images"
    )
    p.add_argument("--img-root", help="image root for a COCO json (default: its folder)")
    p.add_argument("--out", required=True)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument(
        "--min-score",
        "--score-thr",  # its name in earlier versions
        dest="min_score",
        type=float,
        default=0.05,
        help="keep each model's detections with score >= this as candidates for fusion (the pipeline's "
        "infer.min_score)",
    )
    p.add_argument(
        "--devices",
        nargs="+",
        default=["auto"],
        help="auto (every visible GPU, else the CPU) or devices, one inference worker each: "
        "cuda:0 cuda:1, cpu cpu",
    )
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    p.add_argument(
        "--loader-workers", type=int, default=2, help="image-decoding threads per inference worker"
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="precision of backbone, FPN and IntraCL (heads stay fp32); auto: fp16 on CUDA, bf16 on CPUs "
        "with native bfloat16, else fp32",
    )
    p.add_argument("--tta-flips", nargs="*", default=[], choices=["h", "v"])
    p.add_argument("--tta-scales", nargs="*", type=int, default=[], help="extra test short sides")
    p.add_argument(
        "--extra",
        nargs="*",
        default=[],
        help="predictions of other detectors: a COCO results or ArT json, or FORMAT:PATH with FORMAT "
        "paddleocr, rapidocr, doctr or mmocr (converted into OUT/extra/)",
    )
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from i3cl_core.pseudo.ensemble import run_ensemble  # deferred: pydantic; i3cl --help loads every command

    for flag, value in (("--shard-size", args.shard_size), ("--batch-size", args.batch_size)):
        if value < 1:
            raise DatasetError(f"{flag} must be >= 1, got {value}")
    if args.loader_workers < 0:
        raise DatasetError(f"--loader-workers must be >= 0, got {args.loader_workers}")
    try:  # bad device names and precisions are refused before any work
        devices = resolve_devices("auto" if args.devices == ["auto"] else args.devices)
        for d in devices:
            resolve_precision(args.precision, d)
    except ValueError as e:
        raise DatasetError(
            str(e).replace("infer.devices", "--devices").replace("infer.precision", "--precision")
        ) from None
    summary = run_ensemble(
        args.checkpoints,
        args.images,
        args.out,
        args.shard_size,
        args.img_root,
        args.min_score,
        devices,
        args.tta_flips,
        args.tta_scales,
        args.extra,
        progress=not args.no_progress,
        batch_size=args.batch_size,
        loader_workers=args.loader_workers,
        precision=args.precision,
    )
    print(json.dumps(summary))
    if summary["num_unreadable"]:
        print(
            f"i3cl ensemble: {summary['num_unreadable']} of {summary['listed']} images could not be read; "
            f"first: {summary['unreadable'][0]}",
            file=sys.stderr,
        )
        if summary["num_unreadable"] >= summary["listed"]:
            print("i3cl ensemble: error: no image could be processed", file=sys.stderr)
            return 1
    return 0
