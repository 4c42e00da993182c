"""How a training is launched: ``torchrun`` on this machine (one node, or one node of a static
multi-node run) or a Slurm batch job.

Both run the same command, ``python -m torch.distributed.run ... -m i3cl_core.cli train CONFIG
--work-dir DIR``; the trainer resumes from ``DIR/checkpoints/latest.pth`` with ``--resume``.

Slurm: :func:`sbatch_script` writes a batch script (one ``srun`` task per node, each a torchrun
with ``--nproc_per_node`` processes; rendezvous on the job's first node, ``c10d`` backend, the job id
as rendezvous id). :class:`SlurmJob` submits it with ``sbatch --parsable``, follows its state with
``squeue`` (then ``sacct`` or ``scontrol`` once it has left the queue), follows the job's log file
and cancels it with ``scancel``. Nothing here imports Prefect; ``flows/`` streams the log into the
run's logs and cancels the job when the flow run is cancelled.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from i3cl_core.utils import atomic_write_json, atomic_write_text


class _Launcher(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TorchrunLauncher(_Launcher):
    """torchrun on the machine that runs the task. ``nnodes > 1``: a static multi-node run; start the
    same command (printed in the log) on the other nodes with their ``node_rank``."""

    kind: Literal["torchrun"] = "torchrun"
    nnodes: int = Field(
        1, ge=1, le=1024, description="nodes of the run (1: this machine, rendezvous on 127.0.0.1)"
    )
    node_rank: int = Field(
        0, ge=0, description="rank of this machine's node (0 for the node that runs the task)"
    )
    rdzv_endpoint: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5}$",
        description="host:port of the rendezvous (a node every node reaches); needed when nnodes > 1",
    )
    rdzv_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.\-]+$", description="a name shared by all nodes of one run"
    )

    @model_validator(mode="after")
    def _multi_node(self):
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(
                "train.launcher.rdzv_endpoint: a multi-node torchrun (nnodes > 1) needs host:port of "
                "the rendezvous, e.g. node01:29500"
            )
        if self.node_rank >= self.nnodes:
            raise ValueError(f"train.launcher.node_rank: {self.node_rank} is not below nnodes={self.nnodes}")
        return self


class SlurmLauncher(_Launcher):
    """A Slurm batch job per training: ``nodes`` x ``nproc_per_node`` processes."""

    kind: Literal["slurm"] = "slurm"
    nodes: int = Field(1, ge=1, le=1024)
    gpus_per_node: int = Field(
        0, ge=0, le=64, description="GPUs per node (--gpus-per-node); 0: a CPU job (gloo)"
    )
    cpus_per_task: int | None = Field(None, ge=1, le=1024, description="CPUs of each node's torchrun task")
    mem: str | None = Field(None, pattern=r"^[0-9]+[KMGT]?$", description="memory per node, e.g. 64G")
    time: str = Field(
        "24:00:00", pattern=r"^([0-9]+-)?[0-9]{1,2}(:[0-9]{2}){0,2}$", description="wall-time limit"
    )
    partition: str | None = Field(None, pattern=r"^[A-Za-z0-9_.,\-]+$")
    account: str | None = Field(None, pattern=r"^[A-Za-z0-9_.\-]+$")
    rdzv_port: int = Field(29500, ge=1024, le=65535, description="rendezvous port on the job's first node")
    sbatch_args: list[str] = Field(
        default_factory=list, description="more sbatch options, e.g. ['--qos=high']"
    )
    setup: list[str] = Field(
        default_factory=list,
        description="shell lines run first in the job (module load, source a venv, export NCCL_...)",
    )
    python: str | None = Field(
        None,
        description="python of the job (default: the flow's own, which the nodes must see at the same path)",
    )
    poll_s: float = Field(5.0, gt=0.0, le=300.0, description="seconds between job-state queries")

    @model_validator(mode="after")
    def _options(self):
        for a in self.sbatch_args:
            if not a.startswith("--") or "\n" in a:
                raise ValueError(f"train.launcher.sbatch_args: {a!r} is not one --option[=value]")
        return self


Launcher = TorchrunLauncher | SlurmLauncher


def trainer_args(
    config_path: str | os.PathLike, work_dir: str | os.PathLike, resume: bool = False
) -> list[str]:
    args = ["-m", "i3cl_core.cli", "train", str(config_path), "--work-dir", str(work_dir), "--no-progress"]
    return args + (["--resume"] if resume else [])


def torchrun_command(
    config_path,
    work_dir,
    nproc_per_node: int = 1,
    resume: bool = False,
    launcher: TorchrunLauncher | None = None,
    python: str | None = None,
) -> list[str]:
    """The command line of one training: on one node the project's launcher, whose rendezvous listens on
    127.0.0.1 only (``torchrun --standalone`` binds its stores to every interface; see
    :mod:`i3cl_core.engine.local_launch`); on several nodes torchrun with c10d rendezvous on the endpoint the
    user gives."""
    launcher = launcher or TorchrunLauncher()
    if launcher.nnodes == 1:
        cmd = [python or sys.executable, "-m", "i3cl_core.engine.local_launch"]
    else:
        cmd = [
            python or sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={launcher.nnodes}",
            f"--node_rank={launcher.node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={launcher.rdzv_endpoint}",
            f"--rdzv-id={launcher.rdzv_id or 'i3cl'}",
        ]
    return cmd + [f"--nproc_per_node={nproc_per_node}", *trainer_args(config_path, work_dir, resume)]


def sbatch_script(
    name: str, config_path, work_dir, launcher: SlurmLauncher, nproc_per_node: int = 1, resume: bool = False
) -> str:
    """The batch script of one training; its log goes to ``work_dir/slurm-<jobid>.log``."""
    work_dir = Path(work_dir).resolve()
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=i3cl-{name}",
        f"#SBATCH --nodes={launcher.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --time={launcher.time}",
        f"#SBATCH --output={work_dir}/slurm-%j.log",
        "#SBATCH --open-mode=append",
    ]
    if launcher.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={launcher.gpus_per_node}")
    for opt, value in (
        ("cpus-per-task", launcher.cpus_per_task),
        ("mem", launcher.mem),
        ("partition", launcher.partition),
        ("account", launcher.account),
    ):
        if value is not None:
            lines.append(f"#SBATCH --{opt}={value}")
    lines += [f"#SBATCH {a}" for a in launcher.sbatch_args]
    python = launcher.python or sys.executable
    torchrun = [
        python,
        "-m",
        "torch.distributed.run",
        "--nnodes=$SLURM_JOB_NUM_NODES",
        f"--nproc_per_node={nproc_per_node}",
        "--rdzv-backend=c10d",
        f'--rdzv-endpoint="$head:{launcher.rdzv_port}"',
        '--rdzv-id="$SLURM_JOB_ID"',
        *[shlex.quote(a) for a in trainer_args(config_path, work_dir, resume)],
    ]
    lines += [
        "set -euo pipefail",
        *launcher.setup,
        f"cd {shlex.quote(str(Path.cwd()))}",
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        (
            'echo "i3cl: job $SLURM_JOB_ID on $SLURM_JOB_NUM_NODES node(s): $SLURM_JOB_NODELIST, '
            'rendezvous $head"'
        ),
        "srun --kill-on-bad-exit=1 " + " ".join(torchrun[:1]) + " " + " ".join(torchrun[1:]),
    ]
    return "\n".join(lines) + "\n"


class SlurmError(RuntimeError):
    """sbatch, squeue or scancel failed, or the job ended in a failed state; the message says which."""


TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


def _run(cmd: list[str], what: str) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SlurmError(f"{cmd[0]} not found: {what} needs the Slurm client commands on PATH") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(cmd)} did not answer within 120 s") from None
    if res.returncode != 0:
        raise SlurmError(
            f"{' '.join(cmd)} failed ({res.returncode}): {(res.stderr or res.stdout).strip()[:500]}"
        )
    return res.stdout


class SlurmJob:
    """One batch job: ``job.json`` beside the script records its id, so that a re-run of the task
    attaches to a job that is still queued or running instead of submitting it twice."""

    def __init__(self, job_id: str, work_dir: str | os.PathLike):
        self.job_id = job_id
        self.work_dir = Path(work_dir)

    @property
    def log_path(self) -> Path:
        return self.work_dir / f"slurm-{self.job_id}.log"

    @classmethod
    def submit(cls, script: str, work_dir: str | os.PathLike) -> SlurmJob:
        work_dir = Path(work_dir)
        path = atomic_write_text(work_dir / "train.sbatch", script)
        out = _run(["sbatch", "--parsable", str(path)], "the slurm launcher").strip()
        job = cls(out.split(";")[0], work_dir)
        atomic_write_json(
            work_dir / "slurm_job.json",
            {"job_id": job.job_id, "script": str(path), "submitted": time.strftime("%Y-%m-%d %H:%M:%S")},
        )
        return job

    @classmethod
    def recorded(cls, work_dir: str | os.PathLike) -> SlurmJob | None:
        """The job this work_dir submitted last, if it is still queued or running."""
        path = Path(work_dir) / "slurm_job.json"
        if not path.exists():
            return None
        job = cls(json.loads(path.read_text())["job_id"], work_dir)
        try:
            return job if job.state()[0] not in TERMINAL else None
        except SlurmError:
            return None

    def state(self) -> tuple[str, int | None]:
        """(state, exit code once it has ended): squeue while it is queued or running, then sacct
        (or scontrol where no accounting storage is configured)."""
        out = _run(["squeue", "-h", "-j", self.job_id, "-o", "%T"], "the slurm launcher").strip()
        if out and out.split()[0] not in TERMINAL:
            return out.split()[0], None
        try:
            acct = _run(
                ["sacct", "-n", "-X", "-P", "-j", self.job_id, "-o", "State,ExitCode"], "sacct"
            ).strip()
        except SlurmError:
            acct = ""
        first = acct.splitlines()[0] if acct else ""
        if "|" in first:
            state, code = first.split("|")[:2]
            return state.split()[0], int(code.split(":")[0] or 0)
        info = _run(["scontrol", "-o", "show", "job", self.job_id], "the slurm launcher")
        fields = dict(f.split("=", 1) for f in info.split() if "=" in f)
        return fields.get("JobState", "UNKNOWN"), int(fields.get("ExitCode", "0:0").split(":")[0])

    def cancel(self) -> None:
        _run(["scancel", self.job_id], "cancelling the job")

    def follow(
        self,
        on_line: Callable[[str], None],
        cancelled: Callable[[], bool] | None = None,
        poll: float = 5.0,
        timeout: float | None = None,
    ) -> int:
        """Stream the job's log lines to ``on_line`` until the job ends; its exit code (0: COMPLETED).
        ``cancelled()`` returning True cancels the job (``scancel``) and raises SlurmError."""
        pos, t0, state, code = 0, time.time(), "PENDING", None
        while True:
            state, code = self.state()
            pos = self._read_new(pos, on_line)
            if state in TERMINAL:
                time.sleep(min(poll, 1.0))  # the last lines may land after the state changed
                self._read_new(pos, on_line)
                break
            if cancelled is not None:
                try:
                    stop = cancelled()
                except Exception:  # a failed state query must not cancel a training
                    stop = False
                if stop:
                    self.cancel()
                    raise SlurmError(f"training stopped: the flow run was cancelled (scancel {self.job_id})")
            if timeout is not None and time.time() - t0 > timeout:
                self.cancel()
                raise SlurmError(f"job {self.job_id} did not end within {timeout:.0f} s; cancelled")
            time.sleep(poll)
        if state != "COMPLETED":
            return code or 1
        return code or 0

    def _read_new(self, pos: int, on_line) -> int:
        if not self.log_path.exists():
            return pos
        with open(self.log_path, "rb") as f:
            f.seek(pos)
            data = f.read()
        end = data.rfind(b"\n") + 1  # whole lines only; the rest comes with the next read
        for line in data[:end].decode("utf-8", "replace").splitlines():
            if line.strip():
                on_line(line.rstrip())
        return pos + end
