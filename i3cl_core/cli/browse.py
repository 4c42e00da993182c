"""``i3cl browse --ann A.json --img-root DIR --out DIR``: a dataset's polygons (and predictions) drawn on
its images into PNG files (:mod:`i3cl_core.data.browse`)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ann", required=True, help="COCO dataset json (images + annotations)")
    parser.add_argument(
        "--img-root", required=True, help="folder that the images' file_name entries are relative to"
    )
    parser.add_argument("--out", required=True, help="output folder for the PNG files (one per image)")
    parser.add_argument("--limit", type=int, default=None, help="draw at most N images (in json order)")
    parser.add_argument("--ids", type=int, nargs="+", default=None, metavar="ID", help="only these image ids")
    parser.add_argument(
        "--pred",
        default=None,
        help="COCO results json (list of {image_id, segmentation, score}) to overlay",
    )
    parser.add_argument(
        "--min-score", type=float, default=0.0, help="hide predictions scoring below this (default 0)"
    )


def run(args: argparse.Namespace) -> int:
    from i3cl_core.data.browse import browse_dataset  # deferred: i3cl --help loads every command module

    written = browse_dataset(
        args.ann,
        args.img_root,
        args.out,
        limit=args.limit,
        pred_file=args.pred,
        ids=args.ids,
        min_score=args.min_score,
    )
    print(f"i3cl browse: wrote {len(written)} PNG file(s) to {args.out}", file=sys.stderr)
    return 0
