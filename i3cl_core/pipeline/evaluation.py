"""The evaluate stage's plan: which models, on which split, at which threshold, and the table it reports.

Each model is scored on the test split at a threshold chosen as a user could choose it: its best-F threshold
on the labeled validation split (``evaluation.threshold: val``, where the run has one), else one given
threshold or each model's ``infer.score_thr``. The scoring itself is
:func:`i3cl_core.pipeline.stages.evaluate_checkpoint`; a flow caches it per (model, split).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from i3cl_core.pipeline.errors import PipelineError
from i3cl_core.pipeline.params import EvalParams
from i3cl_core.pipeline.workdir import TEST_EVAL, WorkDir
from i3cl_core.utils import atomic_write_json, fingerprint


@dataclass
class Scoring:
    """One model on one split: the inputs of :func:`~i3cl_core.pipeline.stages.evaluate_checkpoint` and the
    fingerprints its cache entry depends on."""

    model: str
    checkpoint: str
    split: dict
    out_json: Path
    protocol: str
    score_thr: float | None

    def inputs(self) -> dict:
        """Keyword arguments of a cached evaluation task (file contents as fingerprints)."""
        return {
            "model": self.model,
            "checkpoint": self.checkpoint,
            "checkpoint_fingerprint": fingerprint(self.checkpoint),
            "split": self.split,
            "split_fingerprint": fingerprint(self.split["ann_file"]),
            "out_json": str(self.out_json),
            "protocol": self.protocol,
            "score_thr": self.score_thr,
        }


@dataclass
class ModelEvaluation:
    """A model's evaluation: on validation first when its threshold is chosen there (``val``), then on test
    at ``fixed_thr`` or the validation's best threshold."""

    name: str
    checkpoint: str
    val: Scoring | None
    fixed_thr: float | None
    chosen_on: str  # "val", "parameter" or "config"

    def test(self, val_result: dict | None, d: dict, layout: WorkDir, protocol: str) -> Scoring:
        thr = float(val_result["best_thr"]) if self.val is not None else self.fixed_thr
        out = layout.eval_dir / f"{self.name.replace(':', '_')}.json"
        return Scoring(self.name, self.checkpoint, d["test"], out, protocol, thr)


def plan_evaluation(layout: WorkDir, d: dict, evaluation: EvalParams) -> list[ModelEvaluation]:
    """Every trained model of the work dir (students and controls: their current variant)."""
    models = layout.trained_models()
    if not models:
        raise PipelineError(f"{layout.root}: no trained model to evaluate; run train-teachers first")
    on_val = evaluation.score_thr is None and evaluation.threshold == "val" and bool(d.get("val"))
    chosen_on = "val" if on_val else ("parameter" if evaluation.score_thr is not None else "config")
    plans = []
    for name, ckpt in models.items():
        val = None
        if on_val:
            out = layout.eval_dir / f"{name.replace(':', '_')}.val.json"
            val = Scoring(f"{name}@val", ckpt, d["val"], out, evaluation.protocol, None)
        plans.append(ModelEvaluation(name, ckpt, val, evaluation.score_thr, chosen_on))
    return plans


def record_evaluation(plan: ModelEvaluation, result: dict, val_result: dict | None = None) -> dict:
    """The test result with how its threshold was chosen and the model's F on the validation split at that
    threshold (``val_hmean``, None without one), also kept beside the model (``test_eval.json`` in its
    variant's folder)."""
    val_hmean = float(val_result["best_hmean"]) if val_result is not None else None
    result = {**result, "threshold_chosen_on": plan.chosen_on, "val_hmean": val_hmean}
    atomic_write_json(Path(plan.checkpoint).parents[1] / TEST_EVAL, result, indent=2)
    return result


def metrics_rows(results: dict[str, dict]) -> list[dict]:
    """The models' table (rounded), as the UI shows it."""
    return [
        {
            "model": n,
            "protocol": r["protocol"],
            "threshold": r["score_thr"],
            "precision": round(r["precision"], 4),
            "recall": round(r["recall"], 4),
            "hmean": round(r["hmean"], 4),
            "best_hmean": round(r["best_hmean"], 4),
        }
        for n, r in results.items()
    ]
