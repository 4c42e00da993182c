"""Launching a training (i3cl_core/pipeline/runner.py), as the flows and the SSL benchmark do: output
streamed line by line, a cancellation that ends the whole process group, a failure that names its log."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import descendants

from i3cl_core.pipeline.runner import run_streaming, run_training
from i3cl_core.pipeline.training import TrainingStart, training_start


def test_run_streaming_streams_and_cancels_the_whole_group(tmp_path):
    script = (
        "import subprocess, sys, time\n"
        "kids = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])"
        " for _ in range(2)]\n"
        "print('epoch 1/2 iter 1/4 loss 1.0', flush=True)\n"
        "time.sleep(300)\n"
    )
    lines, progress = [], []
    flag = {"cancel": False}
    start = time.time()
    before = set(descendants(os.getpid()))  # this session's Prefect server, if a test started it
    threading.Timer(2.0, lambda: flag.__setitem__("cancel", True)).start()
    pids_seen = []

    def log_line(line):
        lines.append(line)

    def cancelled():
        if not pids_seen:  # the run's processes only
            pids_seen.extend(p for p in descendants(os.getpid()) if p not in before)
        return flag["cancel"]

    with pytest.raises(RuntimeError, match="cancelled"):
        run_streaming(
            [sys.executable, "-c", script],
            log_line,
            cancelled=cancelled,
            on_progress=progress.append,
            poll=0.5,
        )
    assert time.time() - start < 15
    assert lines == ["epoch 1/2 iter 1/4 loss 1.0"] and progress == [pytest.approx(1 / 8)]
    time.sleep(0.5)
    alive = [
        p
        for p in pids_seen
        if Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]
    ]
    assert len(pids_seen) >= 3 and alive == []


def test_a_failed_training_raises_naming_its_log_and_the_log_keeps_every_attempt(tmp_path):
    out = tmp_path / "run"
    start = training_start(out, "inputs-1")
    assert start == TrainingStart("fresh", False)
    (out / "train.log").write_text("an earlier attempt\n")
    lines, notes = [], []
    with pytest.raises(RuntimeError, match=r"training t failed with exit code \d+; see .*train\.log"):
        run_training(
            "t", tmp_path / "no_such_config.yaml", out, start, on_line=lines.append, on_note=notes.append
        )
    log = (out / "train.log").read_text()
    assert log.startswith("an earlier attempt\n") and "no_such_config.yaml" in log
    assert lines and all(line in log for line in lines)  # the observer saw what the log holds
    assert "no_such_config.yaml" in notes[0]  # the launch command
    with pytest.raises(ValueError, match="nothing to launch"):
        run_training("t", tmp_path / "c.yaml", out, TrainingStart("done", False))
