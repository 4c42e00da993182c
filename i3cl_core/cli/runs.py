"""``i3cl runs compare|gc WORK_DIR``: a work dir's pseudo-label variants and the models trained on each;
removing old variants (:func:`i3cl_core.pipeline.variants.compare`,
:func:`i3cl_core.pipeline.variants.gc`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from i3cl_core.data.errors import DatasetError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="runs_command", metavar="ACTION", required=True)
    c = sub.add_parser("compare", help="one row per pseudo-label variant and the models trained on it")
    c.add_argument("work_dir")
    c.add_argument("--json", action="store_true")
    g = sub.add_parser("gc", help="remove old pseudo-label variants that nothing current depends on")
    g.add_argument("work_dir")
    g.add_argument(
        "--keep", type=int, default=3, help="variants to keep per stage folder, newest first (default 3)"
    )
    g.add_argument("--dry-run", action="store_true")


def run(args: argparse.Namespace) -> int:
    from i3cl_core.pipeline.variants import compare, gc  # deferred: i3cl --help loads every command module

    wd = Path(args.work_dir)
    if not wd.is_dir():
        raise DatasetError(f"{wd}: no such work dir")
    if args.runs_command == "compare":
        rows = compare(wd)
        if args.json:
            print(json.dumps(rows, indent=1))
            return 0
        print(
            f"{'stage':<14} {'variant':<13} {'cur':<3} {'keep_thr':>8} {'min_votes':>9} {'conf_type':<10} "
            f"{'labels':>7} {'F vs GT':>8}  models (F on test)"
        )
        for r in rows:
            f = r["fuse"]
            q = f"{r['quality']['hmean']:.4f}" if r.get("quality") else "-"
            models = ", ".join(f"{m} ({s:.4f})" if s is not None else m for m, s in r["models"]) or "-"
            print(
                f"{r['stage']:<14} {r['variant']:<13} {'*' if r['current'] else '':<3} "
                f"{str(r['keep_thr']):>8} "
                f"{str(f.get('min_votes', '-')):>9} {str(f.get('conf_type', '-')):<10} "
                f"{str(r['pseudo_labels']):>7} {q:>8}  {models}"
            )
        return 0
    removed = gc(wd, args.keep, args.dry_run)
    for p in removed:
        print(("would remove " if args.dry_run else "removed ") + str(p))
    print(f"{len(removed)} variant(s) {'to remove' if args.dry_run else 'removed'}")
    return 0
