"""A full disk: every write error names the file and the size and ends the command with a one-line error;
atomic writes leave no partial or temporary file; ``i3cl infer`` with new settings leaves the previous
run's outputs consistent until the new ones are complete; a checkpoint that failed does not leave
``metrics.jsonl`` with two rows of one step or evaluation after ``--resume``.

The full disks are small tmpfs mounts (root only; the tests that need one are skipped, saying why, where
mounting is not allowed)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from i3cl_core.utils import WriteError, append_text, atomic_write_bytes, atomic_write_json

REPO = Path(__file__).resolve().parents[1]
ENOSPC = os.strerror(errno.ENOSPC)  # "No space left on device"


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted at ``tmp_path/disk``, unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("no mount/umount command: cannot make a small full file system")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs (needs root and permission to mount): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(mnt: Path, leave: int = 0) -> Path:
    """Take every free byte of the file system at ``mnt`` but ``leave`` with one file; its path."""
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for chunk in (b"\0" * 65536, b"\0" * 512, b"\0"):
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    break
    finally:
        os.close(fd)
    assert shutil.disk_usage(mnt).free < 4096
    if leave:
        os.truncate(filler, filler.stat().st_size - leave)
    return filler


def snapshot(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part in skip for part in p.relative_to(folder).parts)
    }


# ------------------------------------------------------------------------------------ the write helpers
def test_atomic_write_that_does_not_fit_names_file_and_size_and_leaves_nothing(small_disk):
    old = atomic_write_bytes(small_disk / "results.json", b"[]")
    with pytest.raises(WriteError) as info:
        atomic_write_bytes(old, b"x" * 3_000_000)
    e = info.value
    assert str(e).startswith(f"cannot write {old} (3.0 MB): {ENOSPC}"), str(e)
    assert (
        isinstance(e, OSError) and e.errno == errno.ENOSPC and e.filename == str(old) and e.size == 3_000_000
    )
    assert (
        os.listdir(small_disk) == ["results.json"] and old.read_bytes() == b"[]"
    )  # old file kept, no temp file
    # a new file (json) that does not fit: not there afterwards, nor its temporary file
    with pytest.raises(
        WriteError, match=rf"cannot write {small_disk / 'sub' / 'big.json'} \(2\.\d MB\): {ENOSPC}"
    ):
        atomic_write_json(small_disk / "sub" / "big.json", ["y" * 1_000_000, "z" * 1_200_000])
    assert os.listdir(small_disk / "sub") == []
    # an append that does not fit is cut off again: the file holds what it held
    log = small_disk / "metrics.jsonl"
    append_text(log, '{"iter": 1}\n')
    with pytest.raises(WriteError, match=rf"cannot write {log} \(3\.0 MB\): {ENOSPC}"):
        append_text(log, "w" * 3_000_000)
    assert log.read_text() == '{"iter": 1}\n'
    assert sorted(os.listdir(small_disk)) == ["metrics.jsonl", "results.json", "sub"]


def test_checkpoint_that_does_not_fit_names_file_and_size(small_disk):
    from i3cl_core.config import load_config
    from i3cl_core.model.checkpoint import save_checkpoint
    from i3cl_core.model.detector import build_model

    cfg = load_config(REPO / "configs" / "demo" / "tiny_model.yaml", [])
    path = small_disk / "checkpoints" / "epoch_1.pth"
    with pytest.raises(WriteError, match=rf"cannot write {path} \(\d+\.\d MB\): {ENOSPC}"):
        save_checkpoint(path, build_model(cfg), cfg)
    assert os.listdir(path.parent) == []


def test_fuse_into_a_full_disk_is_a_one_line_error(small_disk, tmp_path, capsys):
    from i3cl_core.cli import main

    images = [{"id": i, "file_name": f"u_{i}.jpg", "width": 320, "height": 240} for i in (1, 2)]
    (tmp_path / "images.json").write_text(json.dumps({"images": images, "annotations": []}))
    preds = [
        {
            "image_id": i,
            "category_id": 1,
            "score": 0.9,
            "segmentation": [[10 + i, 10, 110, 10, 110, 40, 10 + i, 40]],
        }
        for i in (1, 2)
    ]
    (tmp_path / "a.json").write_text(json.dumps(preds))
    out = small_disk / "pseudo" / "train_lossweight.json"
    out.parent.mkdir()
    fill(small_disk)
    rc = main(
        [
            "fuse",
            "--predictions",
            str(tmp_path / "a.json"),
            str(tmp_path / "a.json"),
            "--images",
            str(tmp_path / "images.json"),
            "--out",
            str(out),
            "--no-progress",
            "--set",
            "fuse.auto_keep_thr=false",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and f"i3cl fuse: error: cannot write {out} (" in err and ENOSPC in err, err
    assert "Traceback" not in err and os.listdir(out.parent) == []


# ------------------------------------------------------------------------------------ infer
def test_infer_into_a_full_disk_keeps_the_previous_run_consistent(small_disk, tmp_path, capsys):
    import cv2
    from conftest import random_teachers

    from i3cl_core.cli import main

    ckpt = random_teachers(tmp_path / "t", side=128, seeds=(0,))["teacher_0"]
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        cv2.imwrite(str(folder / f"gt_{k + 1}.jpg"), rng.integers(0, 255, (128, 128, 3), dtype=np.uint8))
    out = small_disk / "out"
    args = [
        "infer",
        "--checkpoint",
        ckpt,
        "--images",
        str(folder),
        "--out",
        str(out),
        "--no-progress",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-vis",
        "--precision",
        "fp32",
    ]
    assert main(args + ["--score-thr", "0.0"]) == 0
    capsys.readouterr()
    before = snapshot(out)
    assert json.loads(before["run.json"])["score_thr"] == 0.0 and "results.json" in before

    def consistent(thr: float) -> list:
        """run.json says ``thr``; results.json is the per-image files' results, every one scored >= thr."""
        assert json.loads((out / "run.json").read_text())["score_thr"] == thr
        results = json.loads((out / "results.json").read_text())
        records = [json.loads(f.read_text()) for f in sorted((out / "per_image").glob("*.json"))]
        per_image = [r for rec in records for r in rec["results"]]
        assert sorted(map(json.dumps, results)) == sorted(map(json.dumps, per_image))
        assert all(r["score"] >= thr for r in results)
        return results

    consistent(0.0)
    # room for the lock file of --out (i3cl_core/workdir_lock.py) and a page or two of the new run's files
    filler = fill(small_disk, leave=3 * 4096)
    rc = main(args + ["--score-thr", "0.7"])
    err = capsys.readouterr().err
    assert rc == 2 and f"i3cl infer: error: cannot write {out}/" in err and ENOSPC in err, err
    assert "Traceback" not in err
    assert snapshot(out, skip=(".infer-next",)) == before  # the previous complete run, untouched
    consistent(0.0)
    # with space again, the same command completes (going on from what it had staged) and replaces the outputs
    filler.unlink()
    assert main(args + ["--score-thr", "0.7"]) == 0
    consistent(0.7)
    assert not (out / ".infer-next").exists()
    # and a third run with those settings finds every image done
    capsys.readouterr()
    assert main(args + ["--score-thr", "0.7"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped_done"] == 2


# ------------------------------------------------------------------------------------ train
def test_failed_checkpoint_then_resume_leaves_one_metrics_row_per_step(tmp_path, monkeypatch, capsys):
    """The checkpoint of epoch 2 fails (ENOSPC at fsync, through the real atomic write): the command ends
    with a one-line error naming it; --resume redoes epoch 2 and metrics.jsonl holds each step and each
    evaluation once."""
    from i3cl_core.cli import main
    from i3cl_core.data.synth import generate_dataset

    train = generate_dataset(tmp_path / "train", 2, seed=11, size=(128, 128), progress=False, cjk=False)
    val = generate_dataset(tmp_path / "val", 1, seed=12, size=(128, 128), progress=False, cjk=False)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "_base_": str(REPO / "configs" / "demo" / "tiny_model.yaml"),
                "data": {
                    "train": [{"ann_file": train["ann_file"], "img_root": train["img_root"]}],
                    "val": {"ann_file": val["ann_file"], "img_root": val["img_root"]},
                    "num_workers": 0,
                    "augment": {"scales": [[128, 128]], "flip": "none"},
                },
                "model": {"test_short_side": 128, "test_long_side": 128},
                "train": {
                    "epochs": 2,
                    "batch_size": 2,
                    "lr": 0.001,
                    "warmup_iters": 0,
                    "lr_steps": [2],
                    "log_interval": 1,
                    "eval_interval": 1,
                    "seed": 3,
                    "device": "cpu",
                },
            }
        )
    )
    wd = tmp_path / "w"
    real_fsync, failed = os.fsync, []

    def fsync(fd):
        if not failed and ".epoch_2.pth." in os.readlink(f"/proc/self/fd/{fd}"):
            failed.append(fd)
            raise OSError(errno.ENOSPC, ENOSPC)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    command = ["train", str(cfg), "--work-dir", str(wd), "--no-progress"]
    assert main(command) == 2 and failed
    err = capsys.readouterr().err
    ckpt = wd / "checkpoints" / "epoch_2.pth"
    assert f"i3cl train: error: cannot write {ckpt} (" in err and f"MB): {ENOSPC}" in err, err
    names = sorted(os.listdir(wd / "checkpoints"))
    assert (
        "epoch_1.pth" in names and "epoch_2.pth" not in names and not [n for n in names if n.startswith(".")]
    ), names

    def rows() -> list[dict]:
        return [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]

    assert [r["epoch"] for r in rows()] == [1, 1, 2, 2]  # epoch 2's rows, logged before its checkpoint failed
    monkeypatch.undo()
    assert main(command + ["--resume"]) == 0
    logged = rows()
    keys = [(bool(r.get("eval")), r["epoch"], r["iter"]) for r in logged]
    assert len(keys) == len(set(keys)), keys
    assert keys == [(False, 1, 1), (True, 1, 1), (False, 2, 2), (True, 2, 2)]
