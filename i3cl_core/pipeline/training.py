"""What a pipeline training does with its output folder before it launches: reuse a finished training of the
same inputs, resume an interrupted one, follow a Slurm job still running, or start afresh."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class TrainingStart:
    how: Literal["done", "attach", "resume", "fresh"]
    resume: bool  # launch with --resume (an interrupted training of the same inputs left latest.pth)


def training_start(
    out: Path, inputs_fingerprint: str, world_size: int = 1, slurm: bool = False
) -> TrainingStart:
    """How the training into ``out`` starts, given the fingerprint of its inputs (resolved config, annotation
    files, start checkpoint: :func:`i3cl_core.pipeline.stages.training_fingerprint`) and the number of
    processes it runs on (``world_size``: it sets the batch and the iterations per epoch):

    - ``done``: a finished training of the same inputs and world size is there; nothing to do (its checkpoint
      is the result);
    - ``attach``: a Slurm job of an earlier attempt on the same inputs still runs: follow it, touch nothing
      (``resume`` says whether a job submitted in its place, should it have ended meanwhile, resumes);
    - ``resume``: an interrupted training of the same inputs left ``latest.pth``: continue from it;
    - ``fresh``: anything else; the checkpoints and metrics of other inputs are removed first.

    ``out/inputs.fingerprint`` records the inputs of what the folder holds from now on."""
    from i3cl_core.engine.train import checkpoint_dir  # deferred: the engine imports torch

    out = Path(out)
    ckpt_dir = checkpoint_dir(out)
    stamp = out / "inputs.fingerprint"
    same_inputs = stamp.exists() and stamp.read_text() == inputs_fingerprint
    finished = trained_checkpoint(out) is not None
    if same_inputs and finished and _world_size(out) == world_size:
        return TrainingStart("done", False)
    resume = same_inputs and not finished and (ckpt_dir / "latest.pth").exists()
    how = "resume" if resume else "fresh"
    if same_inputs and slurm:
        from i3cl_core.engine.launch import SlurmJob  # deferred: pydantic; `i3cl runs` imports this module

        if SlurmJob.recorded(out) is not None:
            how = "attach"
    if how == "fresh":
        for f in ckpt_dir.glob("*.pth") if ckpt_dir.exists() else []:
            f.unlink()
        (out / "metrics.json").unlink(missing_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(inputs_fingerprint)
    return TrainingStart(how, resume)


def _world_size(out: Path) -> int:
    """The number of processes a finished training ran on (metrics.json; 1 where an early version left it
    out)."""
    try:
        return int(json.loads((out / "metrics.json").read_text())["summary"].get("world_size", 1))
    except (OSError, ValueError, KeyError, TypeError):
        return -1  # unreadable: not reused


def trained_checkpoint(work_dir: Path) -> Path | None:
    """``latest.pth`` of a finished training (metrics.json written at the end), else None."""
    from i3cl_core.engine.train import checkpoint_dir  # deferred: the engine imports torch

    ckpt = checkpoint_dir(work_dir) / "latest.pth"
    return ckpt if ckpt.exists() and (Path(work_dir) / "metrics.json").exists() else None
