"""What a pipeline run reports: one record per round of self-training and the run's summary.json."""

from __future__ import annotations

import json
from pathlib import Path

from i3cl_core.pipeline import variants
from i3cl_core.pipeline.workdir import FUSION_REPORT, WorkDir

# the keys of each model's scores that evaluate returns and summary.json keeps
SCORE_KEYS = ("precision", "recall", "hmean", "best_hmean", "best_thr", "score_thr", "threshold_chosen_on")


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
    }


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
        "rounds": rounds,
        "lineage": {
            "pseudo_variant": variants.current_variant(layout.pseudo_dir()),
            "pseudo_labels_file": str(variants.pseudo_file(layout.pseudo_dir())),
            "data": dict(data),
            "code": variants.code_version(),
            "flow_run_id": flow_run_id,
        },
    }
