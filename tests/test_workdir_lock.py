"""One writer per work dir (i3cl_core/workdir_lock.py): a second writer refuses at once naming the holder; a
dead holder's lock is taken over with a note; the CLI commands that write into a folder take it."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from i3cl_core.workdir_lock import LOCK_NAME, WorkDirLocked, acquire, holds, release

REPO = Path(__file__).resolve().parents[1]


def _holder(wd: Path, name: str = "flow run ssl-pipeline/brave-otter (1234)") -> subprocess.Popen:
    """Another process that takes the lock and keeps it until killed."""
    code = (
        "import sys, time; from i3cl_core.workdir_lock import acquire; acquire(sys.argv[1], sys.argv[2]); "
        "print('held', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(wd), name], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_refuses_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path, caplog):
    wd = tmp_path / "run"
    proc = _holder(wd)
    try:
        t0 = time.time()
        with pytest.raises(WorkDirLocked) as e:
            acquire(wd, "i3cl train x.yaml")
        assert time.time() - t0 < 2  # at once, no waiting
        msg = str(e.value)
        assert str(wd.resolve()) in msg and "flow run ssl-pipeline/brave-otter (1234)" in msg
        assert f"pid {proc.pid} on {socket.gethostname()}" in msg and "since 20" in msg
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the holder died without releasing: the next writer takes over, with a note naming it
    with caplog.at_level(logging.WARNING, logger="i3cl"):
        acquire(wd, "i3cl train x.yaml")
    assert any(
        "taking over the lock of flow run ssl-pipeline/brave-otter (1234)" in r.getMessage()
        and f"pid {proc.pid}" in r.getMessage()
        for r in caplog.records
    )
    info = json.loads((wd / LOCK_NAME).read_text())
    assert info["holder"] == "i3cl train x.yaml" and info["pid"] == os.getpid()
    # re-entrant within a process: the last release unlocks and leaves an empty file (no note for the next
    # one)
    acquire(wd, "nested")
    release(wd)
    assert holds(wd)
    release(wd)
    assert not holds(wd) and (wd / LOCK_NAME).read_text() == ""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="i3cl"):
        acquire(wd, "again")
    release(wd)
    assert not any("taking over" in r.getMessage() for r in caplog.records)


def test_two_trainings_on_one_work_dir_and_an_ensemble_into_a_locked_folder(tmp_path):
    """`i3cl train` twice on one work dir: the second refuses at once (exit 2), naming the first; kill -9 of
    the first, then `--resume` takes the lock over. `i3cl ensemble --out` into a folder another writer holds:
    refused."""
    from i3cl_core.data.synth import generate_dataset

    data = generate_dataset(tmp_path / "d", 4, seed=3, size=(128, 128), progress=False, cjk=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""_base_: {REPO}/configs/demo/tiny_model.yaml
data: {{train: [{{ann_file: {data["ann_file"]}, img_root: {data["img_root"]}}}], num_workers: 0,
        augment: {{scales: [[96, 128]]}}}}
model: {{backbone: {{name: resnet18}}}}
train: {{epochs: 50, batch_size: 1, lr: 0.001, warmup_iters: 0, log_interval: 1, eval_interval: 0}}
""")
    wd = tmp_path / "w"
    cmd = [sys.executable, "-m", "i3cl_core.cli", "train", str(cfg), "--work-dir", str(wd), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (wd / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.5)
        assert (wd / "metrics.jsonl").exists()
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert (
            f"is being written by i3cl train {cfg} (pid {first.pid} on {socket.gethostname()}"
            in second.stderr
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    resumed = subprocess.run(
        cmd + ["--resume", "--set", "train.epochs=1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"taking over the lock of i3cl train {cfg} (pid {first.pid}" in resumed.stderr + resumed.stdout
    # a folder held by another writer: the ensemble refuses before reading anything
    out = tmp_path / "ens"
    holder = _holder(out, "i3cl ensemble --out elsewhere")
    try:
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "i3cl_core.cli",
                "ensemble",
                "--checkpoints",
                "none.pth",
                "--images",
                str(data["ann_file"]),
                "--out",
                str(out),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 2 and "is being written by i3cl ensemble --out elsewhere" in res.stderr
    finally:
        holder.kill()
        holder.wait()
