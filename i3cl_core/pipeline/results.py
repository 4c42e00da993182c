"""What a pipeline run reports: one record per round of self-training and the run's summary.json."""

from __future__ import annotations

import json
from pathlib import Path

from i3cl_core.pipeline import variants
from i3cl_core.pipeline.workdir import FUSION_REPORT, WorkDir

# the keys of each model's scores that evaluate returns and summary.json keeps
SCORE_KEYS = (
    "precision",
    "recall",
    "hmean",
    "best_hmean",
    "best_thr",
    "score_thr",
    "threshold_chosen_on",
    "val_hmean",
)


def best_member_on_unlabeled(report: dict) -> dict | None:
    """The best ensemble member on the unlabeled split at its own best threshold (what the pseudo labels must
    beat), from the fusion report's quality section."""
    models = (report.get("quality") or {}).get("models") or []
    if not models:
        return None
    best = max(models, key=lambda m: m["hmean"])
    return {"name": Path(best["source"]).name, "hmean": best["hmean"], "thr": best["best_threshold"]}


def round_record(layout: WorkDir, ssl_round: int, trained: dict, fused: dict) -> dict:
    """Round ``ssl_round`` as summary.json lists it: its student (and control), its pseudo labels and their
    quality next to the best ensemble member's, from the current variant's fusion report."""
    report_file = variants.pseudo_file(layout.pseudo_dir(ssl_round)).parent / FUSION_REPORT
    report = json.loads(report_file.read_text())
    return {
        "round": ssl_round,
        "student": trained["student"],
        "control": trained.get("control"),
        "pseudo_labels": fused["pseudo_labels"],
        "keep_thr": fused.get("keep_thr"),
        "pseudo_quality": (report.get("quality") or {}).get("fused"),
        "best_teacher_on_unlabeled": best_member_on_unlabeled(report),
        # the fused labels on the labeled validation split at keep_thr (None without one)
        "pseudo_quality_val": (report.get("keep_thr_selection") or {}).get("val"),
    }


def validation_gate(scores: dict, first_round: dict) -> dict | None:
    """What a user can check without any hidden ground truth, on the labeled validation split: the fused
    pseudo labels' F (at keep_thr) next to the best teacher's, the labeled-only control's and the student's F
    (each model at its threshold chosen there). ``warning`` is set when the student scores below its
    control there. None without a validation split."""
    pseudo = first_round.get("pseudo_quality_val")

    def best_of(prefix: str) -> dict | None:
        found = [
            {"name": n, "hmean": round(s["val_hmean"], 4)}
            for n, s in scores.items()
            if n.startswith(prefix) and s.get("val_hmean") is not None
        ]
        return max(found, key=lambda t: t["hmean"]) if found else None

    teacher, control, student = best_of("teacher:"), best_of("control:"), best_of("student:")
    if not pseudo or teacher is None:
        return None

    def minus(a: float, b: dict | None) -> float | None:
        return round(a - b["hmean"], 4) if b else None

    gate = {
        "split": "val",
        "pseudo_labels": round(pseudo["hmean"], 4),
        "keep_thr": first_round.get("keep_thr"),
        "best_teacher": teacher,
        "control": control,
        "student": student,
        "pseudo_minus_best_teacher": minus(pseudo["hmean"], teacher),
        "pseudo_minus_control": minus(pseudo["hmean"], control),
        "student_minus_control": minus(student["hmean"], control) if student else None,
    }
    gate["warning"] = gate_warning(gate)
    return gate


def gate_warning(gate: dict) -> str | None:
    """One line for the user when the student scores below its control on the validation split."""
    d = gate["student_minus_control"]
    if d is None or d >= 0:
        return None
    return (
        f"the student scores below its labeled-only control on the validation split (F "
        f"{gate['student']['hmean']:.3f} vs {gate['control']['hmean']:.3f}): the pseudo labels did not help "
        "here. Train the teachers longer (until more iterations stop helping on validation) or add teachers, "
        "then train the student again"
    )


def gate_text(gate: dict | None) -> str | None:
    """The validation gate as the demo's terminal table and summary.md print it."""
    if not gate:
        return None
    models = [
        ("best teacher", gate["best_teacher"]),
        ("control", gate["control"]),
        ("student", gate["student"]),
    ]
    line = (
        f"validation split (each model at its threshold chosen there): pseudo labels F "
        f"{gate['pseudo_labels']:.4f} (keep_thr {gate['keep_thr']}), "
        + ", ".join(f"{label} {m['hmean']:.4f}" for label, m in models if m)
    )
    return line + (f"\nWARNING: {gate['warning']}" if gate["warning"] else "")


def run_summary(
    layout: WorkDir, teachers: dict, rounds: list[dict], scores: dict, data: dict, flow_run_id: str | None
) -> dict:
    """summary.json: round 1's results at the top level (the keys every earlier version wrote), every round
    under ``rounds``, the scores of every model and the lineage of the pseudo labels."""
    first = rounds[0]
    return {
        "work_dir": str(layout.root),
        "teachers": teachers,
        "student": first["student"],
        "control": first["control"],
        "scores": scores,
        "pseudo_labels": first["pseudo_labels"],
        "keep_thr": first["keep_thr"],
        "pseudo_quality": first["pseudo_quality"],
        "best_teacher_on_unlabeled": first["best_teacher_on_unlabeled"],
        "validation_gate": validation_gate(scores, first),
        "rounds": rounds,
        "lineage": {
            "pseudo_variant": variants.current_variant(layout.pseudo_dir()),
            "pseudo_labels_file": str(variants.pseudo_file(layout.pseudo_dir())),
            "data": dict(data),
            "code": variants.code_version(),
            "flow_run_id": flow_run_id,
        },
    }
