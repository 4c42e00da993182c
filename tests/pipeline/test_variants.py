"""Pseudo-label variants: current pointer, legacy work dirs, compare and gc (without Prefect)."""

from __future__ import annotations

import json
import time

from i3cl_core.pipeline import variants


def _variant(stage, key, keep_thr, n):
    d = stage / key
    d.mkdir(parents=True)
    (d / "train_lossweight.json").write_text(
        json.dumps({"info": {"fuse": {"keep_thr": keep_thr}}, "images": [], "annotations": []})
    )
    (d / "report.json").write_text(
        json.dumps(
            {
                "fuse": {"keep_thr": keep_thr, "min_votes": 2, "conf_type": "max"},
                "pseudo_labels": n,
                "quality": {"fused": {"hmean": 0.5 + n / 100}},
            }
        )
    )
    time.sleep(0.01)  # distinct modification times: variants are listed oldest first
    return d


def test_current_legacy_compare_and_gc(tmp_path):
    wd = tmp_path / "run"
    stage = wd / "pseudo"
    stage.mkdir(parents=True)
    # a legacy work dir: the labels directly in pseudo/
    (stage / "train_lossweight.json").write_text(
        json.dumps({"info": {"fuse": {"keep_thr": 0.6}}, "annotations": []})
    )
    assert variants.current_variant(stage) == variants.LEGACY
    assert variants.pseudo_file(stage) == stage / "train_lossweight.json"
    a = _variant(stage, "aaaaaaaaaaaa", 0.3, 10)
    b = _variant(stage, "bbbbbbbbbbbb", 0.5, 7)
    c = _variant(stage, "cccccccccccc", 0.7, 4)
    variants.set_current(stage, "cccccccccccc", {})
    assert variants.pseudo_file(stage) == c / "train_lossweight.json"
    assert variants.pseudo_file(stage, "aaaaaaaaaaaa") == a / "train_lossweight.json"
    # a model trained on variant a records it
    (wd / "student" / "s").mkdir(parents=True)
    (wd / "student" / "s" / "lineage.json").write_text(
        json.dumps({"pseudo": {"path": str(a / "train_lossweight.json")}})
    )
    rows = variants.compare(wd)
    assert [r["variant"] for r in rows] == ["legacy", "aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc"]
    assert [r["current"] for r in rows] == [False, False, False, True]
    assert rows[1]["models"] == [("student/s", None)] and rows[3]["pseudo_labels"] == 4
    # gc: only b may go (a is needed by a lineage, c is current, legacy is never removed)
    assert variants.gc(wd, keep=0, dry_run=True) == [b]
    assert b.exists()
    assert variants.gc(wd, keep=1) == [b] and not b.exists() and a.exists() and c.exists()
    assert (
        variants.variant_key(x=1, y=[1, 2])
        == variants.variant_key(y=[1, 2], x=1)
        != variants.variant_key(x=2, y=[1, 2])
    )


def test_runs_cli(tmp_path, capsys):
    from i3cl_core.cli import main

    stage = tmp_path / "run" / "pseudo"
    _variant(stage, "aaaaaaaaaaaa", 0.3, 10)
    variants.set_current(stage, "aaaaaaaaaaaa", {})
    assert main(["runs", "compare", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "aaaaaaaaaaaa" in out and "*" in out and "0.6000" in out
    assert main(["runs", "gc", str(tmp_path / "run"), "--keep", "0", "--dry-run"]) == 0
    assert "0 variant(s) to remove" in capsys.readouterr().out


def test_students_are_kept_per_variant_and_old_layouts_still_load(tmp_path):
    from i3cl_core.pipeline.variants import set_current
    from i3cl_core.pipeline.workdir import current_model_dir, model_runs

    legacy = tmp_path / "student" / "old"
    (legacy / "checkpoints").mkdir(parents=True)  # trained before variants: the folder itself
    root = tmp_path / "student" / "student"
    for key in ("k1", "k2"):
        (root / key).mkdir(parents=True)
        (root / key / "train.log").write_text("epoch 1/1 iter 1/1 loss 1.0\n")
    (root / "k1" / "metrics.json").write_text("{}")
    set_current(root, "k1", {})
    assert current_model_dir(root) == root / "k1" and current_model_dir(legacy) == legacy
    assert model_runs(tmp_path / "student") == [("old", legacy), ("student", root / "k1")]
    # k2 is still training (no metrics.json): the progress display lists it too
    assert model_runs(tmp_path / "student", running=True)[-1] == ("student@k2", root / "k2")
    set_current(root, "k2", {})
    assert model_runs(tmp_path / "student", running=True) == [("old", legacy), ("student", root / "k2")]
    assert model_runs(tmp_path / "missing") == []
