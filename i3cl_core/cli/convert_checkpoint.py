"""``i3cl convert-checkpoint ORIGINAL.pth OUT.pth [--config CONFIG] [--set ...]``: import a checkpoint of
the original mmdetection-based I3CL release (:func:`i3cl_core.model.convert.convert_checkpoint`)."""

from __future__ import annotations

import argparse

from i3cl_core.cli.options import add_set_option


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("original", help="checkpoint of the original mmdetection I3CL release (.pth)")
    p.add_argument("out", help="i3cl checkpoint to write")
    p.add_argument(
        "--config",
        help="model config of the original (default: the paper's R50 I3CL); e.g. "
        "configs/_base_/i3cl_r50_fpn.yaml, configs/i3cl_vitae/train.yaml",
    )
    add_set_option(p, "config override, e.g. --set model.inter_cl=false for a checkpoint without InterCL")


def run(args: argparse.Namespace) -> int:
    # deferred: i3cl --help loads every command module; the library loads on run
    from i3cl_core.config import load_config
    from i3cl_core.model.convert import convert_checkpoint

    cfg = load_config(args.config, args.overrides)
    convert_checkpoint(args.original, args.out, cfg)
    return 0
