"""The layout of a pipeline work dir: this module knows it; the flows, the progress view, the run summary and
``i3cl runs`` ask it.

    <work_dir>/
      data.json                      the run's resolved data paths (a stage run without data
                                     parameters reuses them)
      teachers/<name>/               one training per teacher; teachers/teachers.json lists their checkpoints
      predictions/<model>/           round 1's ensemble over the unlabeled images (members.json lists them)
      predictions_val/<model>/       ... and over the labeled validation split (where keep_thr is chosen)
      pseudo/<variant>/              fused pseudo labels (train_lossweight.json, report.json), one folder per
                                     variant; pseudo/current.json names one
      student/<name>/<variant>/      round 1's student, one folder per variant; student/<name>/current.json
      control/<name>/<variant>/      its control: the labeled data alone
      rounds/r<k>/                   round k >= 2: its own predictions/, predictions_val/, pseudo/, student/
      eval/                          every model's scores on the test (and validation) split
      summary.json, summary.md, summary_figures/
      .prefect-results/              the persisted task results (JSON records)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from i3cl_core.pipeline.errors import PipelineError, require
from i3cl_core.pipeline.training import trained_checkpoint

CURRENT = "current.json"  # in a stage folder: names the variant the next stage uses
MARKER = "pipeline.json"  # the work dir's version marker
RESULTS_DIR = ".prefect-results"  # the persisted task results
PSEUDO_LABELS = "train_lossweight.json"  # in pseudo/<variant>/: the fused labels the student trains on
FUSION_REPORT = "report.json"  # ... beside them: the fusion's report (counts, quality, chosen keep_thr)
MEMBERS = "members.json"  # in predictions/ and predictions_val/: the ensemble's members, what fusion reads
PLAN = "plan.json"  # ... beside it: the number of shards and images planned
EXTRA = "extra"  # in predictions/: the external members' converted predictions
COVERAGE = "coverage.json"  # in predictions/<model>/: written once every shard of the model is there
TEST_EVAL = "test_eval.json"  # in a student's or control's variant folder: its scores on the test split


@dataclass(frozen=True)
class WorkDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # ------------------------------------------------------------------ fixed files and folders
    @property
    def data_file(self) -> Path:
        return self.root / "data.json"

    @property
    def teachers_dir(self) -> Path:
        return self.root / "teachers"

    @property
    def teachers_listing(self) -> Path:
        return self.teachers_dir / "teachers.json"

    @property
    def control_dir(self) -> Path:
        return self.root / "control"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def marker(self) -> Path:
        return self.root / MARKER

    @property
    def results_dir(self) -> Path:
        return self.root / RESULTS_DIR

    @property
    def summary_json(self) -> Path:
        return self.root / "summary.json"

    @property
    def summary_md(self) -> Path:
        return self.root / "summary.md"

    @property
    def summary_figures(self) -> Path:
        return self.root / "summary_figures"

    # ------------------------------------------------------------------ rounds
    def round_dir(self, ssl_round: int = 1) -> Path:
        """Round 1 lives in the work dir itself; round r > 1 in ``rounds/r<r>/``."""
        if ssl_round < 1:
            raise PipelineError(f"ssl_round: must be >= 1, got {ssl_round}")
        return self.root if ssl_round == 1 else self.root / "rounds" / f"r{ssl_round}"

    def later_rounds(self) -> list[int]:
        """The rounds >= 2 that have a folder (``rounds/r2``, ``rounds/r10``; stray names such as ``r0``,
        ``r1`` or ``r02`` are not rounds), in order."""
        folder = self.root / "rounds"
        found = [p.name[1:] for p in folder.glob("r*") if p.is_dir()] if folder.exists() else []
        return sorted(int(r) for r in found if r.isdigit() and int(r) >= 2 and r == str(int(r)))

    def predictions(self, ssl_round: int = 1, split: str = "unlabeled") -> Path:
        if split not in ("unlabeled", "val"):
            raise ValueError(f"split: 'unlabeled' or 'val', got {split!r}")
        return self.round_dir(ssl_round) / ("predictions" if split == "unlabeled" else "predictions_val")

    def members_file(self, ssl_round: int = 1, split: str = "unlabeled") -> Path:
        """The list of the ensemble's members of a round and split (what fusion reads)."""
        return self.predictions(ssl_round, split) / MEMBERS

    def pseudo_dir(self, ssl_round: int = 1) -> Path:
        return self.round_dir(ssl_round) / "pseudo"

    def pseudo_file(self, ssl_round: int, variant: str) -> Path:
        """The pseudo labels of one variant of a round (``pseudo/<variant>/train_lossweight.json``)."""
        return self.pseudo_dir(ssl_round) / variant / PSEUDO_LABELS

    def student_dir(self, ssl_round: int = 1) -> Path:
        return self.round_dir(ssl_round) / "student"

    def pseudo_dirs(self) -> list[Path]:
        """The pseudo-label folder of every round that has one."""
        return [self.pseudo_dir(r) for r in [1, *self.later_rounds()]]

    def ensemble_folders(self) -> list[tuple[str, Path]]:
        """``(label, folder)`` of every model's shard folder in every round's unlabeled predictions (the
        external members' ``extra/`` left out), labelled ``teacher_a`` in round 1 and ``r2/student`` in
        round 2; the round's :data:`PLAN` lies in the folder's parent."""
        out = []
        for r in [1, *self.later_rounds()]:
            root = self.predictions(r)
            if root.is_dir():
                prefix = "" if r == 1 else f"r{r}/"
                models = sorted(p for p in root.iterdir() if p.is_dir() and p.name != EXTRA)
                out += [(prefix + p.name, p) for p in models]
        return out

    def model_folders(self) -> list[tuple[str, Path]]:
        """``(role, folder)`` of every kind of trained model: ``teacher``, ``control``, ``student`` (round 1),
        ``student-r<k>`` (round k); each folder holds one sub-folder per model name."""
        return [
            ("teacher", self.teachers_dir),
            ("control", self.control_dir),
            ("student", self.student_dir(1)),
            *[(f"student-r{r}", self.student_dir(r)) for r in self.later_rounds()],
        ]

    # ------------------------------------------------------------------ what earlier stages left
    def teachers(self) -> dict[str, str]:
        """Teacher name -> checkpoint, as train-teachers listed them, each checkpoint still there."""
        listing = require(self.teachers_listing, "train-teachers", "run train-teachers (or ssl-pipeline)")
        teachers = json.loads(listing.read_text())
        for name, ckpt in teachers.items():
            require(
                Path(ckpt), "train-teachers", f"re-run train-teachers: teacher {name}'s checkpoint has gone"
            )
        return teachers

    def student_checkpoint(self, ssl_round: int) -> str:
        """The checkpoint of round ``ssl_round``'s (current) student."""
        folder = self.student_dir(ssl_round)
        done = [c for c in (trained_checkpoint(d) for _, d in model_runs(folder)) if c is not None]
        if not done:
            raise PipelineError(
                f"{folder}: round {ssl_round} has no trained student yet; run train-student with "
                f"ssl_round={ssl_round} first"
            )
        return str(done[0])

    def ensemble_models(self, ssl_round: int, with_teachers: bool = True) -> dict[str, str]:
        """Round 1: the teachers. Round r > 1: round r-1's student (plus the teachers with
        ``with_teachers``)."""
        if ssl_round == 1:
            return self.teachers()
        models = {f"student-r{ssl_round - 1}": self.student_checkpoint(ssl_round - 1)}
        return {**models, **self.teachers()} if with_teachers else models

    def trained_models(self) -> dict[str, str]:
        """``role:name`` -> checkpoint of every finished training (students and controls: their current
        variant), in the order of :meth:`model_folders`."""
        models = {}
        for role, folder in self.model_folders():
            for name, out in model_runs(folder):
                ckpt = trained_checkpoint(out)
                if ckpt is not None:
                    models[f"{role}:{name}"] = str(ckpt)
        return models


def current_model_dir(model_root: Path) -> Path:
    """The folder of the current variant of a student or control (``student/<name>/<key>/``, as
    ``current.json`` names it), or ``model_root`` itself for one trained before variants existed."""
    model_root = Path(model_root)
    f = model_root / CURRENT
    return model_root / json.loads(f.read_text())["variant"] if f.exists() else model_root


def model_runs(stage_dir: Path, running: bool = False) -> list[tuple[str, Path]]:
    """``(name, folder)`` of every model under ``stage_dir`` (``student/``, ``control/``, ``teachers/``):
    its current variant; with ``running`` also the variants that are still training."""
    stage_dir = Path(stage_dir)
    out = []
    for root in sorted(p for p in stage_dir.glob("*") if p.is_dir()) if stage_dir.exists() else []:
        current = current_model_dir(root)
        out.append((root.name, current))
        if running and (root / CURRENT).exists():
            out += [
                (f"{root.name}@{v.name}", v)
                for v in sorted(p for p in root.glob("*") if p.is_dir())
                if v != current and (v / "train.log").exists() and not (v / "metrics.json").exists()
            ]
    return out
