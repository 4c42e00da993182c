"""Typed configs: inheritance, overrides, and error messages that name key, file and range."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from i3cl_core.config import ConfigError, I3CLConfig, load_config, save_config

REPO = Path(__file__).resolve().parents[2]


def _w(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_match_the_paper():
    cfg = I3CLConfig()
    assert cfg.model.nms_thr == 0.35 and cfg.model.score_thr == 0.05 and cfg.model.max_detections == 100
    assert cfg.infer.score_thr == 0.45 and cfg.model.fpn_channels == 256


def test_inheritance_chain_and_overrides(tmp_path):
    _w(
        tmp_path / "base.yaml",
        "train:\n  lr: 0.01\n  epochs: 20\n"
        "model:\n  intra_cl: false\n  backbone: {name: resnet50, frozen_stages: 1}\n",
    )
    _w(
        tmp_path / "mid.yaml",
        "_base_: base.yaml\ntrain:\n  lr: 0.001\nmodel:\n  backbone: {frozen_stages: 0}\n",
    )
    leaf = _w(tmp_path / "sub" / "leaf.yaml", "_base_: ../mid.yaml\nmodel:\n  intra_cl: true\n")
    cfg = load_config(leaf)
    assert cfg.train.lr == 0.001 and cfg.train.epochs == 20
    assert cfg.model.intra_cl is True
    assert (
        cfg.model.backbone.name == "resnet50" and cfg.model.backbone.frozen_stages == 0
    )  # dicts merge key by key
    cfg = load_config(
        leaf, ["train.lr=0.5", "model.inter_cl=false", "train.lr_steps=[2, 3]", "fuse.conf_type=max"]
    )
    assert cfg.train.lr == 0.5 and cfg.model.inter_cl is False and cfg.train.lr_steps == [2, 3]
    assert cfg.fuse.conf_type == "max"


def test_bad_value_names_key_file_and_range(tmp_path):
    leaf = _w(tmp_path / "leaf.yaml", "_base_: base.yaml\n")
    _w(tmp_path / "base.yaml", "fuse:\n  iou_thr: 1.7\n")
    with pytest.raises(ConfigError) as e:
        load_config(leaf)
    msg = str(e.value)
    assert "fuse.iou_thr" in msg and "base.yaml" in msg and "<= 1" in msg and "1.7" in msg


def test_override_error_names_the_override():
    with pytest.raises(
        ConfigError, match=r"train\.lr: .*greater than 0 .*from --set train\.lr=-1.*allowed: > 0"
    ):
        load_config(None, ["train.lr=-1"])


def test_unknown_key_lists_allowed_keys(tmp_path):
    p = _w(tmp_path / "c.yaml", "model:\n  intra_cll: true\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert (
        "model.intra_cll: unknown key" in msg
        and str(p) in msg
        and "intra_cl" in msg.split("allowed keys here:")[1]
    )


def test_bad_literal_and_type():
    with pytest.raises(ConfigError, match=r"fuse.conf_type: Input should be 'avg', 'max'"):
        load_config(None, ["fuse.conf_type=mean"])
    with pytest.raises(ConfigError, match=r"train.epochs: .*integer"):
        load_config(None, ["train.epochs=many"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = _w(tmp_path / "bad.yaml", "train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    cyc = _w(tmp_path / "a.yaml", "_base_: b.yaml\n")
    _w(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="inheritance cycle"):
        load_config(cyc)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["train.lr"])


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["train.lr=0.02", "model.fpn_channels=64"])
    out = save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(out) == cfg


def test_every_shipped_config_validates():
    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert files, "configs/ ships at least one recipe"
    for f in files:
        load_config(f)


def test_the_long_student_recipe_is_the_first_teachers_with_twice_the_iterations():
    teacher = load_config(REPO / "configs/demo/teacher_a.yaml").train
    student = load_config(REPO / "configs/demo/student_long.yaml").train
    assert student.iters_per_epoch == 2 * teacher.iters_per_epoch
    same = ("epochs", "lr_steps", "lr", "optimizer", "batch_size", "warmup_iters", "weight_decay")
    assert [getattr(student, k) for k in same] == [getattr(teacher, k) for k in same]


def test_stage_recipes_chain_through_the_trainers_checkpoint_layout():
    """Each stage's load_from is where `i3cl train configs/<family>/<previous stage>.yaml` (default work
    dir) leaves its latest checkpoint (``<work_dir>/checkpoints/latest.pth``)."""
    from i3cl_core.engine.train import checkpoint_dir, default_work_dir

    chained = 0
    for family in ("i3cl_r50", "i3cl_r50_regioncl"):
        for f in sorted((REPO / "configs" / family).glob("*.yaml")):
            path = load_config(f).train.load_from
            if path is None:
                continue
            work_dir = Path(path).parent.parent
            assert Path(path) == checkpoint_dir(work_dir) / "latest.pth", f
            assert work_dir.parent == Path("work_dirs") and work_dir.name.startswith(family + "_"), f
            stage = work_dir.name[len(family) + 1 :]
            previous = REPO / "configs" / family / f"{stage}.yaml"
            assert previous.exists(), f"{f}: no stage {stage!r} to load from"
            assert default_work_dir(str(previous)) == work_dir
            chained += 1
    assert chained == 8
    assert default_work_dir("my_experiment.yaml") == Path("work_dirs/my_experiment")


def test_cli_config_command(capsys):
    from i3cl_core.cli import main

    assert main(["config", "--set", "train.lr=0.123"]) == 0
    assert "lr: 0.123" in capsys.readouterr().out
    assert main(["config", "--set", "train.lr=abc"]) == 2
    assert "train.lr" in capsys.readouterr().err


def test_a_training_fingerprint_follows_what_training_reads(tmp_path):
    """Changing a fuse setting (never read by training) or the YAML's layout keeps a finished training;
    a training setting or a changed annotation file does not."""
    from i3cl_core.pipeline.stages import training_fingerprint, write_train_config

    ann = tmp_path / "a.json"
    ann.write_text('{"images": [], "annotations": []}')
    sets = [{"ann_file": str(ann), "img_root": str(tmp_path)}]
    base = str(REPO / "configs" / "demo" / "teacher_a.yaml")

    def fp(*overrides):
        return training_fingerprint(write_train_config(base, tmp_path / "run", sets, list(overrides)), sets)

    ref = fp()
    assert fp("fuse.keep_thr=0.3", "fuse.lossweight_formula=one") == ref
    # a config.yaml written before four unread fields were removed: the same training
    cfg_path = tmp_path / "run" / "config.yaml"
    old = yaml.safe_load(cfg_path.read_text())
    old["train"]["nproc_per_node"] = 1
    old["infer"].update(device="auto", tta_flips=[], tta_scales=[])
    cfg_path.write_text(yaml.safe_dump(old))
    assert training_fingerprint(cfg_path, sets) == ref
    assert fp("train.lr=0.001") != ref
    ann.write_text('{"images": [], "annotations": [], "info": {}}')
    assert fp() != ref


def test_configs_written_by_earlier_versions_still_load(tmp_path, caplog, monkeypatch):
    """A resolved config.yaml of an earlier version (a 'pipeline' section, fuse.lossweight) loads, with a
    note."""
    p = tmp_path / "old.yaml"
    p.write_text(
        "fuse: {lossweight: votes}\n"
        "pipeline: {work_dir: runs/demo, teacher_configs: [], student_config: null, "
        "shard_size: 64}\n"
    )
    cfg = load_config(p)
    assert cfg.fuse.lossweight_formula == "votes"
    monkeypatch.setattr("i3cl_core.config.schema._LOGGED", set())  # each note is logged once per process
    p.write_text(
        "train: {nproc_per_node: 4}\ninfer: {device: cuda, tta_flips: [h], tta_scales: [], score_thr: 0.3}\n"
    )
    with caplog.at_level(logging.WARNING, logger="i3cl.config"):
        cfg = load_config(p)
    assert cfg.infer.score_thr == 0.3 and "infer.tta_flips is no longer read" in caplog.text
    assert "train.nproc_per_node is no longer read" in caplog.text
    with pytest.raises(ConfigError, match="give only lossweight_formula"):
        load_config(None, ["fuse.lossweight=one", "fuse.lossweight_formula=one"])
