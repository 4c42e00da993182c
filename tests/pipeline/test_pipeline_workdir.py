"""The work dir's layout (i3cl_core/pipeline/workdir.py): where each stage writes, and what the later stages
find there."""

from __future__ import annotations

import json

import pytest

from i3cl_core.pipeline.errors import PipelineError
from i3cl_core.pipeline.workdir import WorkDir


def _finished(folder):
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "latest.pth").write_bytes(b"")
    (folder / "metrics.json").write_text("{}")
    return folder / "checkpoints" / "latest.pth"


def test_rounds_live_under_rounds_in_numeric_order(tmp_path):
    wd = WorkDir(tmp_path)
    assert wd.round_dir(1) == tmp_path and wd.predictions(1, "val") == tmp_path / "predictions_val"
    assert wd.pseudo_dir(3) == tmp_path / "rounds" / "r3" / "pseudo"
    for r in ("r10", "r2", "rx", "r0", "r1", "r02"):
        (tmp_path / "rounds" / r).mkdir(parents=True)
    assert wd.later_rounds() == [2, 10]
    assert [role for role, _ in wd.model_folders()] == [
        "teacher",
        "control",
        "student",
        "student-r2",
        "student-r10",
    ]
    for folder in ("teacher_a", "extra"):
        (wd.predictions(1) / folder).mkdir(parents=True)
    (wd.predictions(1) / "plan.json").write_text("{}")
    (wd.predictions(10) / "student").mkdir(parents=True)
    assert wd.ensemble_folders() == [
        ("teacher_a", tmp_path / "predictions" / "teacher_a"),
        ("r10/student", tmp_path / "rounds" / "r10" / "predictions" / "student"),
    ]
    with pytest.raises(PipelineError, match="ssl_round: must be >= 1"):
        wd.round_dir(0)
    with pytest.raises(ValueError, match="split"):
        wd.predictions(1, "test")


def test_later_stages_find_the_teachers_and_students_or_say_which_stage_to_run(tmp_path):
    wd = WorkDir(tmp_path)
    with pytest.raises(PipelineError, match="run train-teachers"):
        wd.ensemble_models(1)
    ckpt = _finished(wd.teachers_dir / "teacher_a")
    wd.teachers_listing.write_text(json.dumps({"teacher_a": str(ckpt)}))
    assert wd.ensemble_models(1) == {"teacher_a": str(ckpt)}
    with pytest.raises(PipelineError, match="round 1 has no trained student yet"):
        wd.ensemble_models(2)
    student = _finished(wd.student_dir(1) / "student")
    assert wd.ensemble_models(2) == {"student-r1": str(student), "teacher_a": str(ckpt)}
    assert wd.ensemble_models(2, with_teachers=False) == {"student-r1": str(student)}
    assert wd.trained_models() == {"teacher:teacher_a": str(ckpt), "student:student": str(student)}
    ckpt.unlink()
    with pytest.raises(PipelineError, match="teacher teacher_a's checkpoint has gone"):
        wd.teachers()


def test_a_training_folder_is_reused_resumed_or_cleared_by_its_inputs(tmp_path):
    from i3cl_core.pipeline.training import TrainingStart, training_start

    out = tmp_path / "teacher_a"
    assert training_start(out, "a").how == "fresh" and (out / "inputs.fingerprint").read_text() == "a"
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "latest.pth").write_bytes(b"")
    assert training_start(out, "a") == TrainingStart("resume", True)  # interrupted: no metrics.json yet
    (out / "metrics.json").write_text(json.dumps({"summary": {"world_size": 1}}))
    assert training_start(out, "a").how == "done"  # finished on the same inputs: nothing removed
    assert (out / "checkpoints" / "latest.pth").exists()
    assert training_start(out, "a", world_size=4).how == "fresh"  # on 4 processes: another batch, retrained
    (out / "checkpoints" / "latest.pth").write_bytes(b"")
    (out / "metrics.json").write_text(json.dumps({"summary": {"world_size": 1}}))
    assert training_start(out, "b").how == "fresh"  # other inputs: the old training goes
    assert not (out / "checkpoints" / "latest.pth").exists() and not (out / "metrics.json").exists()
    assert (out / "inputs.fingerprint").read_text() == "b"


def test_the_students_folder_key_names_its_pseudo_images_augmentation_and_background_weight(tmp_path):
    """Students trained before the augmentation and background weight of the pseudo-labelled images were
    settings (default augmentation, weight 1) keep their folder; the current defaults (strong, 0.5) and any
    other setting get folders of their own, so a work dir made before the defaults changed never reuses the
    wrong student."""
    from i3cl_core.pipeline import variants
    from i3cl_core.pipeline.params import TrainParams
    from i3cl_core.pipeline.plans import plan_student
    from i3cl_core.utils import fingerprint

    wd = WorkDir(tmp_path)
    ckpt = _finished(wd.teachers_dir / "teacher_c")
    wd.teachers_listing.write_text(json.dumps({"teacher_c": str(ckpt)}))
    pseudo = wd.pseudo_file(1, "v1")
    pseudo.parent.mkdir(parents=True)
    pseudo.write_text(json.dumps({"images": [], "annotations": [], "info": {"fuse": {}}}))
    variants.set_current(wd.pseudo_dir(1), "v1", {})
    data = {"unlabeled_root": str(tmp_path / "u")}
    base = TrainParams().model_dump()
    base["teachers"] = [{"name": "teacher_c", "config": "configs/demo/teacher_c.yaml"}]

    def plan(**changes):
        return plan_student(wd, data, TrainParams(**{**base, **changes}))

    default = plan()
    assert (default.extra_sets[0]["augment"], default.extra_sets[0]["background_weight"]) == ("strong", 0.5)
    before = plan(pseudo_augment="default", pseudo_background_weight=1.0)
    keys = {
        default.key,
        before.key,
        plan(pseudo_background_weight=0.25).key,
        plan(pseudo_augment="default").key,
    }
    assert len(keys) == 4
    # the old settings make the key they always made: the fields left out
    spec = {"spec": base["student"], "overrides": [], "load_from": fingerprint(str(ckpt))}
    old_key = variants.variant_key(pseudo=fingerprint(pseudo), fraction=base["pseudo_fraction"], **spec)
    assert before.key == old_key and default.out.parent == before.out.parent
    # the longer recipe: from scratch on student_long.yaml, no start checkpoint, a folder of its own
    long = plan(
        student_init="scratch", student={"name": "student", "config": "configs/demo/student_long.yaml"}
    )
    assert default.load_from == str(ckpt) and long.load_from is None and long.key not in keys
