"""The pipeline's report: the validation gate and the models' F on the validation split."""

from __future__ import annotations

import json

from i3cl_core.pipeline.evaluation import ModelEvaluation, record_evaluation
from i3cl_core.pipeline.results import SCORE_KEYS, gate_text, validation_gate


def _scores(**val_f: float | None) -> dict:
    return {name.replace("_", ":", 1): {"hmean": 0.5, "val_hmean": f} for name, f in val_f.items()}


def test_the_gate_warns_when_the_student_scores_below_its_control_on_validation():
    scores = _scores(teacher_a=0.51, teacher_c=0.49, control_student=0.581, student_student=0.53)
    gate = validation_gate(scores, {"pseudo_quality_val": {"hmean": 0.554}, "keep_thr": 0.8})
    assert gate["best_teacher"] == {"name": "teacher:a", "hmean": 0.51}
    assert gate["control"] == {"name": "control:student", "hmean": 0.581}
    assert gate["pseudo_minus_control"] == -0.027 and gate["pseudo_minus_best_teacher"] == 0.044
    assert gate["student_minus_control"] == -0.051
    assert "below its labeled-only control" in gate["warning"] and "0.530 vs 0.581" in gate["warning"]
    text = gate_text(gate)
    assert "pseudo labels F 0.5540 (keep_thr 0.8)" in text and "WARNING" in text
    assert "best teacher 0.5100, control 0.5810, student 0.5300" in text

    # labels weaker than the control there, but the student does not lose: no warning
    scores["student:student"]["val_hmean"] = 0.5811
    level = validation_gate(scores, {"pseudo_quality_val": {"hmean": 0.554}, "keep_thr": 0.8})
    assert (
        level["pseudo_minus_control"] < 0 and level["warning"] is None and "WARNING" not in gate_text(level)
    )


def test_no_gate_without_a_validation_split_and_no_warning_without_a_control():
    assert validation_gate(_scores(teacher_a=None), {"pseudo_quality_val": {"hmean": 0.6}}) is None
    assert validation_gate(_scores(teacher_a=0.5), {"pseudo_quality_val": None}) is None
    assert gate_text(None) is None
    alone = validation_gate(
        _scores(teacher_a=0.5, student_s=0.3), {"pseudo_quality_val": {"hmean": 0.4}, "keep_thr": 0.5}
    )
    assert alone["control"] is None and alone["pseudo_minus_control"] is None
    assert alone["student_minus_control"] is None and alone["warning"] is None
    assert "control" not in gate_text(alone) and "student 0.3000" in gate_text(alone)


def test_a_models_validation_f_travels_with_its_test_scores(tmp_path):
    ckpt = tmp_path / "teachers" / "a" / "checkpoints" / "latest.pth"
    ckpt.parent.mkdir(parents=True)
    plan = ModelEvaluation("teacher:a", str(ckpt), None, None, "val")
    test = {k: 0.5 for k in ("precision", "recall", "hmean", "best_hmean", "best_thr", "score_thr")}
    recorded = record_evaluation(plan, test, {"best_hmean": 0.61, "best_thr": 0.7})
    assert recorded["val_hmean"] == 0.61 and set(SCORE_KEYS) <= set(recorded)
    assert json.loads((tmp_path / "teachers" / "a" / "test_eval.json").read_text())["val_hmean"] == 0.61
    assert record_evaluation(plan, test)["val_hmean"] is None
