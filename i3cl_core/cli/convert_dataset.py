"""``i3cl convert-dataset``: ArT/LSVT/Total-Text/CTW1500/ICDAR2015/MLT/RCTW/mmocr/PaddleOCR annotations ->
our COCO layout (:func:`i3cl_core.data.convert.convert`; the formats are in :mod:`i3cl_core.data.convert`)."""

from __future__ import annotations

import argparse
import sys

from i3cl_core.data.convert import FORMATS, convert
from i3cl_core.data.errors import DatasetError
from i3cl_core.data.validate import write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", required=True, choices=FORMATS, help="annotation format")
    parser.add_argument(
        "--ann", required=True, help="annotation json (art/lsvt), or a folder / file of txt or xml labels"
    )
    parser.add_argument(
        "--img-root",
        default=None,
        help="image folder; file_name is written relative to it (required unless --no-images)",
    )
    parser.add_argument("--out", required=True, help="output COCO json")
    parser.add_argument(
        "--no-images", action="store_true", help="convert the annotations alone, without reading any image"
    )
    parser.add_argument(
        "--sizes",
        default=None,
        help="with --no-images: json {file_name: [width, height]} or a COCO json with 'images'",
    )
    parser.add_argument(
        "--image-ext", default=".jpg", help="with --no-images: extension of derived image names"
    )
    parser.add_argument(
        "--encoding",
        default="utf-8",
        help="text encoding of the label files (default utf-8; e.g. latin-1, cp1252, gbk)",
    )


def run(args: argparse.Namespace) -> int:
    if args.img_root is None and not args.no_images:
        raise DatasetError("--img-root is required (or --no-images to convert the annotations alone)")
    dataset, stats = convert(
        args.format,
        args.ann,
        args.img_root,
        no_images=args.no_images,
        sizes=args.sizes,
        image_ext=args.image_ext,
        encoding=args.encoding,
    )
    write_json(args.out, dataset)
    for w in stats.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {args.out}: {stats.summary()}")
    return 0
