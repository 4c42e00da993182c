"""``i3cl train CONFIG [--set key=value ...] [--work-dir DIR] [--resume]``.

The same command runs under ``torchrun --nproc_per_node=N -m i3cl_core.cli train ...`` (or
``torchrun ... $(which i3cl) train ...``) for DistributedDataParallel. The training itself is
:func:`i3cl_core.engine.train.train`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from i3cl_core.cli.options import add_set_option
from i3cl_core.utils import die_with_parent


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML training config")
    add_set_option(p)
    p.add_argument(
        "--work-dir",
        help="output folder (default: work_dirs/<config folder>_<config name>, e.g. "
        "work_dirs/i3cl_r50_pretrain, where the next stage's load_from looks)",
    )
    p.add_argument("--resume", action="store_true", help="continue from work_dir/checkpoints/latest.pth")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def run(args: argparse.Namespace) -> int:
    # deferred: pulls torch (i3cl --help stays torch-free)
    from i3cl_core.config import load_config
    from i3cl_core.engine.train import TrainingError, default_work_dir, train

    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun: die with it, even when it is SIGKILLed
        parent = os.getppid()
        die_with_parent()
        if os.getppid() != parent:  # it died before the request took effect
            return 1
    cfg = load_config(args.config, args.overrides)
    work_dir = Path(args.work_dir) if args.work_dir else default_work_dir(args.config)
    from i3cl_core import workdir_lock  # deferred: i3cl --help loads every command module

    main_rank = int(os.environ.get("RANK", "0")) == 0
    if main_rank:  # one training per work dir (the other ranks are rank 0's)
        workdir_lock.acquire(work_dir, f"i3cl train {args.config}")
    try:
        summary = train(cfg, work_dir, resume=args.resume, progress=not args.no_progress)
    except TrainingError as e:
        print(f"i3cl train: error: {e}")
        return 1
    finally:
        if main_rank:
            workdir_lock.release(work_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0
