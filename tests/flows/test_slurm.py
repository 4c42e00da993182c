"""Training through Slurm: the generated batch script, submit / follow / cancel with stand-in Slurm
commands (always), and the train-teachers flow on a real one-node Slurm (slurmctld + slurmd on
127.0.0.1, started by scripts/slurm_local.sh from Debian's slurm-wlm and munge): a training, a
cancelled flow run that scancels its job, and a re-run that resumes from the last checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from i3cl_core.engine.launch import (
    SlurmError,
    SlurmJob,
    SlurmLauncher,
    TorchrunLauncher,
    sbatch_script,
    torchrun_command,
)

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------ no Slurm needed
def test_batch_script_has_the_requested_resources_and_the_resume_flag(tmp_path):
    launcher = SlurmLauncher(
        nodes=2,
        gpus_per_node=4,
        cpus_per_task=16,
        time="2-00:00:00",
        partition="gpu",
        account="ocr",
        sbatch_args=["--qos=high"],
        setup=["module load cuda/12.4"],
    )
    script = sbatch_script(
        "teacher_a", tmp_path / "config.yaml", tmp_path, launcher, nproc_per_node=4, resume=True
    )
    lines = script.splitlines()
    for opt in (
        "--nodes=2",
        "--gpus-per-node=4",
        "--cpus-per-task=16",
        "--time=2-00:00:00",
        "--partition=gpu",
        "--account=ocr",
        "--qos=high",
        "--ntasks-per-node=1",
        f"--output={tmp_path}/slurm-%j.log",
    ):
        assert f"#SBATCH {opt}" in lines, opt
    assert lines.index("module load cuda/12.4") < next(
        i for i, ln in enumerate(lines) if ln.startswith("srun ")
    )
    run = next(ln for ln in lines if ln.startswith("srun "))
    for part in (
        "--nnodes=$SLURM_JOB_NUM_NODES",
        "--nproc_per_node=4",
        "--rdzv-backend=c10d",
        '--rdzv-endpoint="$head:29500"',
        f"train {tmp_path / 'config.yaml'} --work-dir {tmp_path}",
        "--resume",
    ):
        assert part in run, part
    assert "--resume" not in sbatch_script("t", "c.yaml", tmp_path, SlurmLauncher(), resume=False)
    assert "--gpus-per-node" not in sbatch_script("t", "c.yaml", tmp_path, SlurmLauncher())  # a CPU job


def test_launcher_settings_are_validated_with_the_field_named():
    with pytest.raises(ValidationError, match="rdzv_endpoint: a multi-node torchrun"):
        TorchrunLauncher(nnodes=2)
    with pytest.raises(ValidationError, match="node_rank"):
        TorchrunLauncher(nnodes=2, node_rank=2, rdzv_endpoint="node01:29500")
    with pytest.raises(ValidationError, match="time"):
        SlurmLauncher(time="two days")
    with pytest.raises(ValidationError, match="sbatch_args"):
        SlurmLauncher(sbatch_args=["-p gpu\n#SBATCH --x"])
    cmd = torchrun_command(
        "c.yaml", "w", 8, launcher=TorchrunLauncher(nnodes=2, rdzv_endpoint="node01:29500", rdzv_id="r1")
    )
    assert "--standalone" not in cmd and "--nnodes=2" in cmd and "--rdzv-endpoint=node01:29500" in cmd
    assert torchrun_command("c.yaml", "w")[1:3] == ["-m", "i3cl_core.engine.local_launch"]
    from i3cl_core.pipeline.params import TrainParams

    assert TrainParams(launcher={"kind": "slurm", "nodes": 2}).launcher.nodes == 2
    with pytest.raises(ValidationError, match="launcher"):
        TrainParams(launcher={"kind": "lsf"})


FAKE = {  # stand-ins for the Slurm commands: a job is a background bash process, its id the pid file's name
    "sbatch": """#!/bin/bash
script="${@: -1}"; dir=$(dirname "$script"); id=$((RANDOM + 1000))
log="$dir/slurm-$id.log"
(SLURM_JOB_ID=$id bash "$script" >>"$log" 2>&1; echo $? >"$FAKE_SLURM/$id.rc") </dev/null >/dev/null 2>&1 &
echo $! >"$FAKE_SLURM/$id.pid"; echo "$id"
""",
    "squeue": """#!/bin/bash
id=$3; pid=$(cat "$FAKE_SLURM/$id.pid" 2>/dev/null) || exit 0
if [ -f "$FAKE_SLURM/$id.cancelled" ]; then echo CANCELLED; \
elif kill -0 "$pid" 2>/dev/null; then echo RUNNING; fi
""",
    "scancel": """#!/bin/bash
touch "$FAKE_SLURM/$1.cancelled"; pkill -P "$(cat "$FAKE_SLURM/$1.pid")"; \
kill "$(cat "$FAKE_SLURM/$1.pid")" 2>/dev/null; exit 0
""",
    "sacct": "#!/bin/bash\nexit 1\n",
    "scontrol": """#!/bin/bash
id=${@: -1}
if [ -f "$FAKE_SLURM/$id.cancelled" ]; then echo "JobId=$id JobState=CANCELLED ExitCode=0:15"
elif [ "$(cat "$FAKE_SLURM/$id.rc")" = 0 ]; then echo "JobId=$id JobState=COMPLETED ExitCode=0:0"
else echo "JobId=$id JobState=FAILED ExitCode=$(cat "$FAKE_SLURM/$id.rc"):0"; fi
""",
}


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    for name, text in FAKE.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(tmp_path))
    return tmp_path


def test_submit_follows_the_log_and_the_exit_code(fake_slurm, tmp_path):
    job = SlurmJob.submit(
        "echo 'epoch 1/1 iter 1/2 loss 1.0'\nsleep 0.5\necho done\nexit 3\n", tmp_path / "run"
    )
    assert json.loads((tmp_path / "run" / "slurm_job.json").read_text())["job_id"] == job.job_id
    lines = []
    assert job.follow(lines.append, poll=0.1, timeout=60) == 3  # FAILED, its exit code
    assert lines == ["epoch 1/1 iter 1/2 loss 1.0", "done"]
    assert SlurmJob.recorded(tmp_path / "run") is None  # it has ended: nothing to attach to


def test_a_cancelled_run_scancels_its_job_and_a_rerun_attaches_to_a_running_one(fake_slurm, tmp_path):
    job = SlurmJob.submit("echo started\nsleep 300\n", tmp_path / "run")
    again = None
    for _ in range(100):
        again = SlurmJob.recorded(tmp_path / "run")
        if (tmp_path / "run" / f"slurm-{job.job_id}.log").exists():
            break
        time.sleep(0.05)
    assert again is not None and again.job_id == job.job_id  # still running: a re-run follows it
    seen = []
    t0 = time.time()
    with pytest.raises(SlurmError, match=f"cancelled \\(scancel {job.job_id}\\)"):
        job.follow(seen.append, cancelled=lambda: bool(seen), poll=0.1)
    assert seen == ["started"] and time.time() - t0 < 30
    assert (fake_slurm / f"{job.job_id}.cancelled").exists()
    assert job.state()[0] == "CANCELLED"


def test_missing_slurm_commands_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SlurmError, match="sbatch not found"):
        SlurmJob.submit("true\n", tmp_path / "run")


# ------------------------------------------------------------------------------------ real Slurm
@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node Slurm on 127.0.0.1; skipped, with the reason, where it cannot start."""
    d = tmp_path_factory.mktemp("slurm")
    res = subprocess.run(
        ["bash", str(REPO / "scripts" / "slurm_local.sh"), "start", str(d)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if res.returncode != 0:
        pytest.skip(f"no local Slurm here ({res.stderr.strip()[-300:]}); the stand-in tests above still ran")
    conf = res.stdout.strip().splitlines()[-1]
    os.environ["SLURM_CONF"] = conf
    try:
        yield conf
    finally:
        subprocess.run(["bash", str(REPO / "scripts" / "slurm_local.sh"), "stop", str(d)], timeout=60)
        os.environ.pop("SLURM_CONF", None)


RUN = """
import json, sys
from flows.stages import train_teachers
print(json.dumps(train_teachers(**json.loads(sys.argv[1]))), flush=True)
"""
TINY = [
    "train.batch_size=2",
    "train.warmup_iters=2",
    "train.log_interval=1",
    "data.num_workers=0",
    "model.test_short_side=128",
    "model.test_long_side=160",
    "data.augment.scales=[[112, 160]]",
]


def teachers_params(wd: Path, demo: Path, epochs: int, iters: int) -> dict:
    return {
        "work_dir": str(wd),
        "data": {
            "demo_dir": str(demo),
            "demo_size": 128,
            "demo_train": 4,
            "demo_unlabeled": 2,
            "demo_test": 2,
            "demo_val": 0,
        },
        "train": {
            "teachers": [{"name": "teacher_a", "config": "configs/demo/teacher_a.yaml"}],
            "overrides": [*TINY, f"train.epochs={epochs}", f"train.iters_per_epoch={iters}"],
            "launcher": {"kind": "slurm", "poll_s": 0.5, "time": "00:30:00"},
        },
    }


def start_flow(server, params: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RUN, json.dumps(params)],
        cwd=REPO,
        text=True,
        env={**server.env, "SLURM_CONF": os.environ["SLURM_CONF"], "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


CANCEL = """
from prefect import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.states import Cancelling
with get_client(sync_client=True) as client:
    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["train-teachers"])))
    run = sorted(runs, key=lambda r: r.created)[-1]
    client.set_flow_run_state(run.id, Cancelling(), force=True)
"""


def cancel_latest_train_teachers_run(server) -> None:
    """Ask the API to cancel the newest train-teachers run, from another process (Prefect is never
    imported into the test process: its settings would stay bound to the first server it saw)."""
    subprocess.run(
        [sys.executable, "-c", CANCEL], env=server.env, cwd=REPO, check=True, capture_output=True, timeout=120
    )


@pytest.mark.slow
def test_pipeline_training_on_a_real_slurm_cancel_and_resume(slurm, server, tmp_path):
    wd, demo = tmp_path / "run", tmp_path / "demo"
    params = teachers_params(wd, demo, epochs=3, iters=4)
    proc = start_flow(server, params)
    out = wd / "teachers" / "teacher_a"
    latest = out / "checkpoints" / "latest.pth"
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert latest.exists(), proc.communicate()[0][-3000:]
    job_id = json.loads((out / "slurm_job.json").read_text())["job_id"]
    cancel_latest_train_teachers_run(server)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "the flow run was cancelled" in text
    state = SlurmJob(job_id, out).state()[0]
    assert state in ("CANCELLED", "COMPLETING"), state
    assert not (out / "metrics.json").exists()  # it did not finish
    # the re-run resumes from latest.pth in a new job
    proc = start_flow(server, params)
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text[-3000:]
    assert json.loads((out / "slurm_job.json").read_text())["job_id"] != job_id
    assert "--resume" in (out / "train.sbatch").read_text()
    log = (out / "train.log").read_text()
    assert "submitted slurm job" in log and "resumed from" in log and "epoch 3/3" in log
    assert (out / "metrics.json").exists()
    assert json.loads(text.strip().splitlines()[-1])["teacher_a"] == str(latest)
