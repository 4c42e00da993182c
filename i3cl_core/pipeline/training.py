"""What a pipeline training does with its output folder before it launches: reuse a finished training of the
same inputs, resume an interrupted one, follow a Slurm job still running, or start afresh."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

Start = Literal["done", "attach", "resume", "fresh"]


def training_start(out: Path, inputs_fingerprint: str, slurm: bool = False) -> Start:
    """How the training into ``out`` starts, given the fingerprint of its inputs (resolved config, annotation
    files, start checkpoint: :func:`i3cl_core.pipeline.stages.training_fingerprint`):

    - ``done``: a finished training of the same inputs is there; nothing to do (its checkpoint is the result);
    - ``attach``: a Slurm job of an earlier attempt on the same inputs still runs: follow it, touch nothing;
    - ``resume``: an interrupted training of the same inputs left ``latest.pth``: continue from it;
    - ``fresh``: anything else; the checkpoints and metrics of other inputs are removed first.

    ``out/inputs.fingerprint`` records the inputs of what the folder holds from now on."""
    from i3cl_core.engine.train import checkpoint_dir
    from i3cl_core.pipeline.stages import trained_checkpoint

    out = Path(out)
    ckpt_dir = checkpoint_dir(out)
    stamp = out / "inputs.fingerprint"
    same_inputs = stamp.exists() and stamp.read_text() == inputs_fingerprint
    if same_inputs and trained_checkpoint(out) is not None:
        return "done"
    start: Start = "fresh"
    if same_inputs and slurm:
        from i3cl_core.engine.launch import SlurmJob

        if SlurmJob.recorded(out) is not None:
            start = "attach"
    if start == "fresh" and same_inputs and (ckpt_dir / "latest.pth").exists():
        start = "resume"
    if start == "fresh":
        for f in ckpt_dir.glob("*.pth") if ckpt_dir.exists() else []:
            f.unlink()
        (out / "metrics.json").unlink(missing_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(inputs_fingerprint)
    return start
