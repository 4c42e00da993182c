"""The ``i3cl`` command line.

One module per subcommand in this package, named after the command with underscores
(``i3cl check-data`` -> :mod:`i3cl_core.cli.check_data`), exposes two functions: ``add_arguments(parser)``
and ``run(args) -> int``. They hold the argument handling only (argparse lives in this package and nowhere
else): ``run`` reads ``args``, calls the library function that does the work (:mod:`i3cl_core.data.convert`,
:mod:`i3cl_core.infer.run`, :mod:`i3cl_core.pseudo.fuse`, ...) and prints its result. Heavy imports (torch,
cv2, shapely) stay inside ``run`` so that ``i3cl --help`` is fast and the commands that need no model do
not import torch. ``python -m i3cl_core.cli`` (:mod:`i3cl_core.cli.__main__`) runs :func:`main`, as under
``torchrun -m i3cl_core.cli train ...``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from i3cl_core import __version__
from i3cl_core.data.errors import DatasetError
from i3cl_core.model.errors import CheckpointError

# subcommand -> (its module in this package, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "config": (
        "i3cl_core.cli.config",
        "print a resolved config (after _base_ and --set), or explain why it is invalid",
    ),
    "synth": ("i3cl_core.cli.synth", "generate a synthetic curved-text dataset (COCO json + images)"),
    "check-data": (
        "i3cl_core.cli.check_data",
        "check every image of a config's datasets (exists, decodes, size) before training",
    ),
    "browse": ("i3cl_core.cli.browse", "draw a dataset's polygons on its images into PNG files"),
    "model-summary": (
        "i3cl_core.cli.model_summary",
        "parameter counts per part of a model config, and output strides",
    ),
    "train": ("i3cl_core.cli.train", "train a detector (one process, or under torchrun for DDP)"),
    "infer": ("i3cl_core.cli.infer", "run a checkpoint over images: COCO results, ArT submission, txt, PNGs"),
    "ensemble": (
        "i3cl_core.cli.ensemble",
        "run several checkpoints over unlabeled images, sharded and resumable",
    ),
    "fuse": ("i3cl_core.cli.fuse", "fuse ensemble predictions into pseudo labels (train_lossweight.json)"),
    "convert-predictions": (
        "i3cl_core.cli.convert_predictions",
        "PaddleOCR/RapidOCR, docTR or mmocr predictions -> COCO results (for --extra)",
    ),
    "evaluate": (
        "i3cl_core.cli.evaluate",
        "score predictions against ground truth (ArT, Total-Text, CTW1500, IC15)",
    ),
    "export-submission": (
        "i3cl_core.cli.export_submission",
        "write predictions as the input files of the official Total-Text / CTW1500 / ArT scripts",
    ),
    "runs": (
        "i3cl_core.cli.runs",
        "compare a work dir's pseudo-label variants and the models trained on each; gc old ones",
    ),
    "convert-dataset": (
        "i3cl_core.cli.convert_dataset",
        "convert ArT/LSVT/Total-Text/CTW1500/ICDAR2015/MLT/RCTW/mmocr/PaddleOCR annotations to COCO",
    ),
    "convert-checkpoint": (
        "i3cl_core.cli.convert_checkpoint",
        "import a checkpoint of the original mmdetection I3CL release",
    ),
    "export": (
        "i3cl_core.cli.export",
        "export a checkpoint to ONNX (the whole detector) for the torch-free runtime",
    ),
}


# the subcommands that write into an output folder of their own: one writer at a time
# (i3cl_core/workdir_lock.py);
# train takes its work dir's lock itself (rank 0 only, after resolving the default work dir)
WRITES_OUT_DIR = ("infer", "ensemble")

# the subcommands that read image pixels or sizes: they take --exif-transpose (the image reader's rule)
READS_IMAGES = ("check-data", "browse", "train", "infer", "ensemble", "fuse", "convert-dataset")


def _load(module: str):
    return importlib.import_module(module)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="i3cl", description="I3CL arbitrary-shaped scene text detection")
    parser.add_argument("--version", action="version", version=f"i3cl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = _load(module)
        except ModuleNotFoundError as e:  # a subcommand whose module is missing must not break the others
            if e.name and e.name.startswith("i3cl_core"):
                continue
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        if name in READS_IMAGES:
            p.add_argument(
                "--exif-transpose",
                action="store_true",
                help="turn images to their EXIF orientation, pixels and sizes alike (for data annotated on "
                "the displayed pictures; by default pixels are read as stored, as the text datasets' "
                "annotations assume)",
            )
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    # deferred: config pulls pydantic (--help exits before); the lock keeps `import i3cl_core.cli` small
    from i3cl_core.config import ConfigError
    from i3cl_core.workdir_lock import WorkDirLocked, locked

    out_dir = getattr(args, "out", None) if args.command in WRITES_OUT_DIR else None
    try:
        if getattr(args, "exif_transpose", False):
            from i3cl_core.data.image_io import set_exif_transpose  # deferred: pulls numpy; this flag only

            set_exif_transpose(True)  # the environment carries it to DataLoader workers and torchrun children
        if out_dir:
            with locked(out_dir, f"i3cl {args.command} --out {out_dir}"):
                return int(args._module.run(args) or 0)
        return int(args._module.run(args) or 0)
    except (ConfigError, DatasetError, CheckpointError, FileNotFoundError, WorkDirLocked) as e:
        print(f"i3cl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"i3cl {args.command}: interrupted", file=sys.stderr)
        return 130
