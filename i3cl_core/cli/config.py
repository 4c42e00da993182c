"""``i3cl config CONFIG [--set key=value ...]``: print the resolved config as YAML."""

from __future__ import annotations

import argparse

import yaml

from i3cl_core.cli.options import add_set_option


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file (may name _base_ files)")
    add_set_option(p)


def run(args: argparse.Namespace) -> int:
    # deferred: pydantic; i3cl --help loads every command module
    from i3cl_core.config import config_to_dict, load_config

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0
