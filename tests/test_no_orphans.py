"""``kill -9`` of a command leaves no process behind: training's DataLoader workers and torchrun's trainers
die with their parent (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc's parent links)."""
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parents[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - out
        out |= frontier
    return out


def alive(pids: set[int]) -> set[int]:
    left = set()
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            left.add(p)
    return left


def kill_and_check(proc: subprocess.Popen, min_children: int, ready, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    kids: set[int] = set()
    while time.time() < deadline and proc.poll() is None:
        kids = descendants(proc.pid)
        if len(kids) >= min_children and ready():
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the command ended before it could be killed"
    assert len(kids) >= min_children, f"expected >= {min_children} child processes, found {kids}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while alive(kids) and time.time() < deadline:
        time.sleep(0.2)
    left = alive(kids)
    for p in left:  # do not leave them to the next test
        os.kill(p, signal.SIGKILL)
    assert not left, f"processes left after kill -9 of their parent: {left}"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from i3cl_core.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("orphans")
    return generate_dataset(root / "data", 6, seed=21, size=(160, 160), progress=False, cjk=False)


def _tiny_checkpoint(path: Path) -> Path:
    from i3cl_core.config import load_config
    from i3cl_core.model.checkpoint import save_checkpoint
    from i3cl_core.model.detector import build_model

    cfg = load_config(REPO / "configs" / "demo" / "tiny_model.yaml", ["model.test_short_side=160"])
    return Path(save_checkpoint(path, build_model(cfg).eval(), cfg))


def test_kill_9_of_infer_leaves_no_process(tmp_path, images):
    """``i3cl infer`` decodes in threads (the one inference loop): whatever it starts dies with it."""
    ckpt = _tiny_checkpoint(tmp_path / "m.pth")
    # the same images many times over, so that the run is still busy when it is killed
    lst = tmp_path / "list.txt"
    files = sorted(Path(images["img_root"]).iterdir())
    copies = tmp_path / "copies"
    copies.mkdir()
    for k in range(200):
        (copies / f"c{k}.jpg").symlink_to(files[k % len(files)])
    lst.write_text("\n".join(str(p) for p in sorted(copies.iterdir())))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            PY,
            "-m",
            "i3cl_core.cli",
            "infer",
            "--checkpoint",
            str(ckpt),
            "--images",
            str(lst),
            "--out",
            str(out),
            "--workers",
            "2",
            "--no-vis",
            "--no-progress",
            "--device",
            "cpu",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    kill_and_check(proc, 0, lambda: any((out / "per_image").glob("*.json")))


def test_kill_9_of_train_and_of_torchrun_leaves_no_process(tmp_path, images):
    import yaml

    cfg = {
        "_base_": str(REPO / "configs" / "demo" / "tiny_model.yaml"),
        "data": {
            "train": [{"ann_file": images["ann_file"], "img_root": images["img_root"]}],
            "num_workers": 2,
            "augment": {"scales": [[128, 160]]},
        },
        "model": {"test_short_side": 160, "test_long_side": 160},
        "train": {
            "epochs": 50,
            "batch_size": 1,
            "lr": 0.001,
            "warmup_iters": 0,
            "lr_steps": [49],
            "log_interval": 1,
            "eval_interval": 0,
        },
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = tmp_path / "train.log"

    def started():
        return log.exists() and "iter" in log.read_text(errors="replace")

    with open(log, "w") as f:
        proc = subprocess.Popen(
            [PY, "-m", "i3cl_core.cli", "train", str(path), "--work-dir", str(tmp_path / "w1")],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
        kill_and_check(proc, 2, started)
    # the training task's launcher: torchrun -> trainer -> DataLoader workers, started as the flow does
    from i3cl_core.pipeline.stages import train_command
    from i3cl_core.utils import terminate_with_parent

    log2 = tmp_path / "torchrun.log"

    def started2():
        return log2.exists() and "iter" in log2.read_text(errors="replace")

    with open(log2, "w") as f:
        proc = subprocess.Popen(
            train_command(path, tmp_path / "w2"),
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
            start_new_session=True,
            preexec_fn=terminate_with_parent,
        )
        kill_and_check(proc, 3, started2)
