"""make demo's live progress, read from a work dir: trainings and ensemble shards; bars on a terminal,
plain lines at most every N seconds otherwise."""

from __future__ import annotations

import io
import json

from flows.progress import ProgressView, scan


def _work_dir(tmp_path):
    wd = tmp_path / "run"
    t = wd / "teachers" / "teacher_a"
    t.mkdir(parents=True)
    (t / "train.log").write_text(
        "12:00:00 INFO i3cl.train: epoch 1/4 iter 25/25 loss 2.1000 lr 5e-04 2.10 img/s\n"
        "12:00:10 INFO i3cl.train: epoch 2/4 iter 10/25 loss 1.7321 lr 5e-04 2.05 img/s\n"
    )
    (wd / "teachers" / "teacher_c").mkdir()  # not started: no log yet
    pred = wd / "predictions"
    (pred / "teacher_a").mkdir(parents=True)
    (pred / "plan.json").write_text(json.dumps({"shards": 5, "images": 300}))
    for k in range(2):
        (pred / "teacher_a" / f"shard_{k:05d}.json").write_text("[]")
    return wd


def test_scan_reads_trainings_and_shards(tmp_path):
    acts = {a.key: a for a in scan(_work_dir(tmp_path))}
    assert set(acts) == {"train teacher:teacher_a", "ensemble teacher_a"}
    t = acts["train teacher:teacher_a"]
    assert (t.done, t.total, t.finished) == (35, 100, False)
    assert t.detail == "epoch 2/4 iter 10/25 loss 1.7321 2.05 img/s"
    e = acts["ensemble teacher_a"]
    assert (e.done, e.total, e.detail) == (2, 5, "2/5 shards")


def test_plain_lines_are_rate_limited_and_finished_ones_said_once(tmp_path):
    wd = _work_dir(tmp_path)
    out = io.StringIO()
    view = ProgressView(stream=out, plain_every=3600, force_plain=True)
    view.update(scan(wd))
    first = out.getvalue().splitlines()
    assert len(first) == 2 and "teacher:teacher_a:  35.0%  epoch 2/4 iter 10/25 loss 1.7321" in first[0]
    view.update(scan(wd))  # within plain_every: nothing more
    assert out.getvalue().splitlines() == first
    (wd / "teachers" / "teacher_a" / "metrics.json").write_text("{}")
    view.plain_every = 0
    view.update(scan(wd))
    view.update(scan(wd))
    lines = out.getvalue().splitlines()
    assert sum("teacher:teacher_a" in ln and "done" in ln for ln in lines) == 1
