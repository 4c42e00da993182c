"""Run one training as a torchrun subprocess or a Slurm batch job: its output into ``train.log`` and to an
observer (the flows' run logs), its progress to a callback (their progress artifact), and a stop (the whole
process group, or ``scancel``) within seconds of a cancellation. The flows and the SSL benchmark launch
their trainings through :func:`run_training`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from i3cl_core.engine.launch import SlurmJob, SlurmLauncher, TorchrunLauncher, sbatch_script, torchrun_command
from i3cl_core.pipeline.training import TrainingStart, trained_checkpoint
from i3cl_core.utils import terminate_with_parent

PROGRESS = re.compile(r"epoch (\d+)/(\d+) iter (\d+)/(\d+)")


def progress_fraction(line: str) -> float | None:
    """The share of the training done, from a trainer's ``epoch e/E iter i/I`` log line."""
    m = PROGRESS.search(line)
    if not m:
        return None
    e, ne, i, ni = map(int, m.groups())
    return ((e - 1) * ni + i) / max(ne * ni, 1)


def kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run_streaming(
    cmd: list[str], log_line, cancelled=None, on_progress=None, env=None, poll: float = 2.0
) -> int:
    """Run ``cmd`` in its own process group; every output line goes to ``log_line(str)``;
    ``cancelled()`` is polled every ``poll`` seconds and ends the group when it returns True;
    ``on_progress(fraction)`` gets the training progress parsed from the output."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
        preexec_fn=terminate_with_parent,
        env=env,
    )
    stop = threading.Event()
    state = {"cancelled": False}

    def watch() -> None:
        while not stop.wait(poll):
            try:
                if cancelled is not None and cancelled():
                    state["cancelled"] = True
                    kill_group(proc)
                    return
            except Exception:  # a failed state query must not kill the training
                continue

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    last = 0.0
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                log_line(line)
            fraction = progress_fraction(line)
            if fraction is not None and on_progress is not None and time.time() - last > 2.0:
                on_progress(fraction)
                last = time.time()
        rc = proc.wait()
    finally:
        stop.set()
        kill_group(proc)  # whatever happened to us (exception, cancellation), leave no orphans
    if state["cancelled"]:
        raise RuntimeError("training stopped: the flow run was cancelled")
    return rc


def run_slurm(
    name: str,
    config_path,
    out_dir,
    launcher,
    nproc_per_node: int,
    resume: bool,
    attach: bool,
    log_line,
    cancelled=None,
    on_progress=None,
) -> int:
    """One training as a Slurm job. ``attach``: a job this work_dir submitted earlier for the same
    inputs that is still queued or running is followed instead of submitting another; otherwise such
    a job is cancelled first. Returns the job's exit code."""
    job = SlurmJob.recorded(out_dir)
    if job is not None and not attach:
        log_line(f"cancelling slurm job {job.job_id}: it trains on earlier inputs")
        job.cancel()
        job = None
    if job is None:
        job = SlurmJob.submit(
            sbatch_script(name, config_path, out_dir, launcher, nproc_per_node, resume), out_dir
        )
        log_line(f"submitted slurm job {job.job_id} ({launcher.nodes} node(s)); log {job.log_path}")
    else:
        log_line(f"following slurm job {job.job_id}, still {job.state()[0].lower()} from an earlier attempt")
    last = {"t": 0.0}

    def on_line(line: str) -> None:
        log_line(line)
        fraction = progress_fraction(line)
        if fraction is not None and on_progress is not None and time.time() - last["t"] > 2.0:
            on_progress(fraction)
            last["t"] = time.time()

    return job.follow(on_line, cancelled, poll=launcher.poll_s)


def run_training(
    name: str,
    config_path: str | Path,
    out: Path,
    start: TrainingStart,
    *,
    nproc_per_node: int = 1,
    launcher: TorchrunLauncher | SlurmLauncher | None = None,
    on_line: Callable[[str], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    on_progress: Callable[[float], None] | None = None,
) -> Path:
    """Launch the training of ``config_path`` into ``out`` as ``start`` says
    (:func:`~i3cl_core.pipeline.training.training_start`: resume, attach to a Slurm job, or afresh; not
    called for ``done``) and return its final checkpoint. Every output line is appended to
    ``out/train.log`` and passed to ``on_line``; ``on_note`` gets what the launch itself has to say (the
    command, the Slurm job). A failed or checkpoint-less training raises RuntimeError naming the log."""
    if start.how == "done":
        raise ValueError("run_training: a 'done' training has nothing to launch; use its checkpoint")
    launcher = launcher or TorchrunLauncher()
    note = on_note or (lambda _: None)
    out = Path(out)
    with open(out / "train.log", "a", encoding="utf-8") as log_file:

        def log_line(line: str) -> None:
            log_file.write(line + "\n")
            log_file.flush()
            if on_line is not None:
                on_line(line)

        resuming = " (resuming)" if start.resume else ""
        if isinstance(launcher, SlurmLauncher):
            note(f"Slurm job, {launcher.nodes} node(s) x {nproc_per_node} process(es){resuming}")
            rc = run_slurm(
                name,
                config_path,
                out,
                launcher,
                nproc_per_node,
                start.resume,
                start.how == "attach",
                log_line,
                cancelled=cancelled,
                on_progress=on_progress,
            )
        else:
            cmd = torchrun_command(Path(config_path), out, nproc_per_node, start.resume, launcher)
            note(" ".join(cmd) + resuming)
            if launcher.nnodes > 1:
                note(
                    f"start the same command on the other {launcher.nnodes - 1} node(s), each with its "
                    "--node_rank"
                )
            rc = run_streaming(cmd, log_line, cancelled=cancelled, on_progress=on_progress)
    if rc != 0:
        raise RuntimeError(f"training {name} failed with exit code {rc}; see {out / 'train.log'}")
    ckpt = trained_checkpoint(out)
    if ckpt is None:
        raise RuntimeError(f"training {name} ended without a final checkpoint in {out}")
    return ckpt
