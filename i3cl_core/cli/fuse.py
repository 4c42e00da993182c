"""``i3cl fuse``: ensemble predictions -> pseudo labels (``train_lossweight.json``) and a report beside
them (:func:`i3cl_core.pseudo.fuse.fuse_predictions`; inputs and outputs in :mod:`i3cl_core.pseudo.fuse`)."""

from __future__ import annotations

import argparse
import json
import sys

from i3cl_core.cli.options import add_set_option
from i3cl_core.data.errors import DatasetError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--predictions",
        nargs="+",
        required=True,
        metavar="P",
        help="one per model: COCO results json, ArT submission json, or a folder of shard files",
    )
    p.add_argument(
        "--images",
        required=True,
        metavar="IMAGES.json",
        help="COCO json whose images define the unlabeled set",
    )
    p.add_argument(
        "--out", required=True, help="output COCO json (e.g. work_dir/pseudo/train_lossweight.json)"
    )
    p.add_argument("--config", help="YAML config whose fuse section to start from")
    add_set_option(p, "e.g. --set fuse.iou_thr=0.5 --set fuse.conf_type=max", metavar="fuse.KEY=VALUE")
    p.add_argument("--gt", help="ground truth of the unlabeled set, to measure pseudo-label quality")
    p.add_argument("--img-root", help="image root of the unlabeled set (for sample pictures)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="fusion processes (default: the CPUs, at most 8; a pool is used above 64 images only)",
    )
    p.add_argument(
        "--allow-empty",
        action="store_true",
        help="accept a prediction source with no usable prediction (default: an error)",
    )
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    # deferred: i3cl --help loads every command module; the library loads on run
    from i3cl_core.config import ConfigError, load_config
    from i3cl_core.pseudo.fuse import fuse_predictions

    if args.workers is not None and args.workers < 1:
        raise DatasetError(f"--workers must be >= 1, got {args.workers}")
    unused = [o for o in args.overrides if not o.split("=", 1)[0].strip().startswith("fuse.")]
    if unused:
        raise ConfigError(
            f"--set {unused[0]}: i3cl fuse reads only fuse.* settings (got {', '.join(unused)})"
        )
    cfg = load_config(args.config, args.overrides).fuse
    if cfg.min_votes > len(args.predictions):
        print(
            f"i3cl fuse: fuse.min_votes={cfg.min_votes} is more than the {len(args.predictions)} prediction "
            f"sources; using {len(args.predictions)} (every model must agree)",
            file=sys.stderr,
        )
    summary = fuse_predictions(
        args.predictions,
        args.images,
        args.out,
        cfg,
        gt=args.gt,
        img_root=args.img_root,
        workers=args.workers,
        progress=not args.no_progress,
        allow_empty=args.allow_empty,
    )
    printable = {k: v for k, v in summary.items() if k != "model_stats"}
    print(json.dumps(printable))
    return 0
