"""``i3cl convert-predictions``: PaddleOCR/RapidOCR, docTR or mmocr predictions -> a COCO results json
(:func:`i3cl_core.pseudo.external.convert_predictions`; the formats are described in
:mod:`i3cl_core.pseudo.external`)."""

from __future__ import annotations

import argparse
import sys

from i3cl_core.pseudo.external import EXTERNAL_FORMATS, convert_predictions, skipped_message


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format", required=True, choices=EXTERNAL_FORMATS, help="the detector's output format"
    )
    parser.add_argument("--pred", required=True, help="the detector's output file or folder")
    parser.add_argument(
        "--images",
        required=True,
        help="COCO json whose 'images' the predictions belong to (ensemble's images.json, or a dataset)",
    )
    parser.add_argument("--out", required=True, help="output COCO results json")
    parser.add_argument(
        "--encoding",
        default="utf-8",
        help="text encoding of the --pred files (default utf-8; e.g. latin-1, cp1252, gbk)",
    )


def run(args: argparse.Namespace) -> int:
    stats = convert_predictions(args.format, args.pred, args.images, args.out, encoding=args.encoding)
    if stats.get("unknown_images"):
        print(
            f"warning: {stats['unknown_images']} images not in {args.images} were ignored "
            f"(e.g. {stats['unknown_examples']})",
            file=sys.stderr,
        )
    if skipped_message(stats):
        print(f"warning: {skipped_message(stats)}", file=sys.stderr)
    print(
        f"wrote {args.out}: {stats['detections']} detections on {stats['images']} images"
        + (f"; skipped {stats['non_finite']} with non-finite coordinates" if stats.get("non_finite") else "")
    )
    return 0
