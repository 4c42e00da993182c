"""``i3cl synth``: command-line glue for the synthetic curved-text generator (:mod:`i3cl_core.data.synth`)."""

from __future__ import annotations

import argparse
import sys


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _side(text: str) -> int:
    value = _positive_int(text)
    if not 64 <= value <= 8192:
        raise argparse.ArgumentTypeError(f"image side must be between 64 and 8192 pixels, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Writes OUT/images/synth_NNNNNN.jpg and OUT/annotations.json (COCO polygons, iscrowd=1 and "
        "transcription '###' for unreadable text). With --preset demo it writes OUT/train, OUT/unlabeled "
        "(images.json without annotations + hidden gt.json) and OUT/test; --num-images then sets the "
        "number of train images (default 200) and --size defaults to 384 384. The annotations depend only "
        "on --seed, sizes, backgrounds and fonts, not on --workers."
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--num-images",
        type=_positive_int,
        default=None,
        help="number of images (default 100; with --preset demo: train images, default 200)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--size",
        type=_side,
        nargs=2,
        metavar=("W", "H"),
        default=None,
        help="image width and height (default 512 512; demo preset 384 384)",
    )
    parser.add_argument(
        "--backgrounds",
        default=None,
        metavar="DIR",
        help="extra folder of background photos (used for ~70%% of images, besides scikit-image's)",
    )
    parser.add_argument("--workers", type=_positive_int, default=1, help="worker processes (default 1)")
    parser.add_argument("--preset", choices=["demo"], default=None, help="demo: train/unlabeled/test splits")
    parser.add_argument(
        "--num-unlabeled", type=_positive_int, default=200, help="demo preset: unlabeled images (default 200)"
    )
    parser.add_argument(
        "--num-test", type=_positive_int, default=100, help="demo preset: test images (default 100)"
    )
    parser.add_argument(
        "--num-val",
        type=_non_negative_int,
        default=0,
        help="demo preset: labeled validation images (default 0: none)",
    )
    parser.add_argument(
        "--no-cjk", action="store_true", help="Latin text only, even when a CJK font is installed"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _line(name: str, s: dict) -> str:
    return (
        f"{name}: {s['num_images']} images, {s['num_instances']} instances ({s['num_dontcare']} "
        f"do-not-care), CJK {'on' if s['cjk'] else 'off'}, {s['seconds']:.1f} s, "
        f"{s['images_per_s']:.1f} images/s -> {s['ann_file']}"
    )


def run(args: argparse.Namespace) -> int:
    from i3cl_core.data import synth  # deferred: i3cl --help loads every command module

    cjk = False if args.no_cjk else None
    progress = not args.no_progress
    if args.preset == "demo":
        summary = synth.generate_demo(
            args.out,
            seed=args.seed,
            num_train=args.num_images or 200,
            num_unlabeled=args.num_unlabeled,
            num_test=args.num_test,
            num_val=args.num_val,
            size=tuple(args.size or (384, 384)),
            workers=args.workers,
            progress=progress,
            cjk=cjk,
            backgrounds_dir=args.backgrounds,
        )
        for split, s in summary.items():
            print(_line(split, s))
        return 0
    summary = synth.generate_dataset(
        args.out,
        args.num_images or 100,
        seed=args.seed,
        size=tuple(args.size or (512, 512)),
        backgrounds_dir=args.backgrounds,
        workers=args.workers,
        progress=progress,
        cjk=cjk,
    )
    print(_line("synth", summary))
    sys.stdout.flush()
    return 0
