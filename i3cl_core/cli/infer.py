"""``i3cl infer``: a checkpoint (or an exported model) over a folder, glob, list or COCO json of images
(:func:`i3cl_core.infer.run.infer_images`; the outputs are described in :mod:`i3cl_core.infer.run`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from i3cl_core.data.errors import DatasetError
from i3cl_core.devices import resolve_device
from i3cl_core.infer.precision import PRECISIONS
from i3cl_core.infer.run import ENGINES, collect_images, infer_images


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="an i3cl checkpoint (.pth), for --engine torch")
    p.add_argument(
        "--engine",
        default="torch",
        choices=ENGINES,
        help="torch (default) runs a checkpoint; onnxruntime runs a file from `i3cl export` (--model) "
        "without importing torch",
    )
    p.add_argument("--model", help="an exported model (.onnx from `i3cl export`), for --engine onnxruntime")
    p.add_argument(
        "--threads",
        type=int,
        help="--engine onnxruntime: CPU threads of the session (default: onnxruntime's choice)",
    )
    p.add_argument("--images", required=True, help="folder, glob pattern, .txt list, or COCO json of images")
    p.add_argument("--img-root", help="image root for a COCO json (default: the json's folder)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--score-thr",
        type=float,
        default=None,
        help="keep detections with score >= this (default: the "
        "checkpoint config's infer.score_thr, 0.45 for the paper's recipes)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="image-decoding threads (0: decode inline)")
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto (default): float16 features on CUDA, bfloat16 on CPUs that compute it natively "
        "(AVX512-BF16/AMX), else float32; heads, boxes and masks always float32",
    )
    p.add_argument(
        "--short-side", type=int, help="test scale: short side (default from the checkpoint config)"
    )
    p.add_argument("--long-side", type=int, help="test scale: long-side cap")
    p.add_argument("--no-vis", action="store_true", help="skip the PNG visualisations")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise DatasetError("--batch-size must be >= 1")
    detector = None
    if args.engine == "onnxruntime":
        if not args.model or args.checkpoint:
            raise DatasetError(
                "--engine onnxruntime runs --model MODEL.onnx (from `i3cl export`), not --checkpoint"
            )
        source = args.model
        from i3cl_core.deploy.onnx_runtime import OnnxDetector  # deferred: only for --engine onnxruntime

        detector = OnnxDetector(
            source, threads=args.threads
        )  # a bad model file is refused before the images are listed
    else:
        if not args.checkpoint or args.model:
            raise DatasetError(
                "--engine torch runs --checkpoint CHECKPOINT.pth; an exported --model needs "
                "--engine onnxruntime"
            )
        source = args.checkpoint
    if args.engine == "torch":
        try:  # a bad device name is refused before any work, naming the option
            resolve_device(args.device, "--device")
        except ValueError as e:
            raise DatasetError(str(e)) from None
    items = collect_images(args.images, args.img_root)
    if not items:
        raise DatasetError(f"{args.images}: no images found")
    overrides = {}
    if args.short_side:
        overrides["test_short_side"] = args.short_side
    if args.long_side:
        overrides["test_long_side"] = args.long_side
    score_thr = args.score_thr
    if score_thr is None and detector is not None:
        score_thr = detector.score_thr
    elif score_thr is None:
        # deferred: pulls torch (the ONNX engine runs without it)
        from i3cl_core.model.checkpoint import config_from_checkpoint, load_checkpoint

        score_thr = config_from_checkpoint(load_checkpoint(source), source).infer.score_thr
    if not 0.0 <= score_thr <= 1.0:
        raise DatasetError(f"--score-thr must be in [0, 1], got {score_thr}")
    summary = infer_images(
        source,
        items,
        args.out,
        score_thr,
        args.device,
        args.batch_size,
        args.workers,
        visualize=not args.no_vis,
        model_overrides=overrides or None,
        progress=not args.no_progress,
        precision=args.precision,
        engine=args.engine,
        threads=args.threads,
        model=detector,
    )
    print(json.dumps(summary))
    if summary.get("submission_skipped"):
        print(f"i3cl infer: warning: {summary['submission_skipped']}", file=sys.stderr)
    done = summary["processed"] + summary["skipped_done"]
    if summary["failed"]:
        print(
            f"i3cl infer: {summary['failed']} of {summary['images']} images failed (listed in "
            f"{Path(args.out) / 'failed.txt'}); first: {summary['failures'][0]}",
            file=sys.stderr,
        )
        if done == 0:
            print("i3cl infer: error: no image could be processed", file=sys.stderr)
            return 1
    return 0
