"""``i3cl check-data CONFIG [--set ...] [--workers N] [--decode]``: every image of a config's datasets,
checked before training (:mod:`i3cl_core.data.check`)."""

from __future__ import annotations

import argparse
import sys

from i3cl_core.cli.options import add_set_option


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config whose data sets to check")
    add_set_option(parser)
    parser.add_argument("--workers", type=int, default=8, help="threads (default 8)")
    parser.add_argument(
        "--decode", action="store_true", help="decode every pixel (finds truncated files; slower)"
    )


def run(args: argparse.Namespace) -> int:
    # deferred: i3cl --help loads every command module; the library loads on run
    from i3cl_core.config import load_config
    from i3cl_core.data.check import check_sources, config_sources

    cfg = load_config(args.config, args.overrides)
    result = check_sources(config_sources(cfg), args.workers, args.decode)
    for p in result.problems:
        print(p, file=sys.stderr)
    print(result.summary())
    return 1 if result.problems else 0
