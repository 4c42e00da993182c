"""Options several commands share."""

from __future__ import annotations

import argparse


def add_set_option(
    parser: argparse.ArgumentParser,
    help: str = "override one config key, e.g. --set train.lr=0.001 (repeatable)",
    metavar: str = "KEY=VALUE",
) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``: config overrides, checked against the
    schema."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar=metavar, help=help)
