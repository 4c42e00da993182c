"""``i3cl model-summary CONFIG [--set ...] [--json]``: parameters per part and output strides
(:mod:`i3cl_core.model.summary`)."""

from __future__ import annotations

import argparse
import json

from i3cl_core.cli.options import add_set_option
from i3cl_core.model.summary import config_summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (default: the paper's R50 I3CL)")
    add_set_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from i3cl_core.config import load_config  # deferred: pydantic; i3cl --help loads every command module

    cfg = load_config(args.config, args.overrides)
    info = config_summary(cfg)
    if args.json:
        print(json.dumps(info))
        return 0
    print(
        f"backbone {info['backbone']}: channels {info['backbone_channels']}, "
        f"strides {info['backbone_strides']}"
    )
    print(f"FPN: {info['fpn_channels']} channels, strides {info['fpn_strides']} (P2-P6)")
    width = max(map(len, info["parameters"]))
    for name, n in info["parameters"].items():
        print(f"  {name:<{width}}  {n:>12,}")
    print(f"  {'trainable':<{width}}  {info['trainable']:>12,}")
    return 0
