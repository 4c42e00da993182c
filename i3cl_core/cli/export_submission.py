"""``i3cl export-submission``: predictions -> the input files of the official Total-Text / CTW1500 / ArT
evaluation scripts (:func:`i3cl_core.infer.submission.export_submission`)."""

from __future__ import annotations

import argparse
import sys

from i3cl_core.infer.submission import FORMATS, export_submission


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format", required=True, choices=FORMATS, help="which official script's input to write"
    )
    parser.add_argument("--pred", required=True, help="predictions: COCO results list or ArT submission json")
    parser.add_argument(
        "--images",
        required=True,
        help="COCO json with the 'images' the predictions belong to (ground truth, or infer's images.json)",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--score-thr", type=float, default=0.0, help="drop predictions with score < T (default 0)"
    )


def run(args: argparse.Namespace) -> int:
    s = export_submission(args.format, args.pred, args.images, args.out, args.score_thr)
    if s["unknown_images"]:
        print(
            f"warning: predictions for {s['unknown_images']} images not in --images were ignored",
            file=sys.stderr,
        )
    if s["skipped"]:
        print(
            f"warning: {s['skipped']} polygons had fewer than 3 distinct integer points and were skipped",
            file=sys.stderr,
        )
    print(
        f"wrote {s['images']} {'entries' if args.format == 'art' else 'files'} with {s['detections']} "
        f"detections to {s['out']}"
    )
    return 0
