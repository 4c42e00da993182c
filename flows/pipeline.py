"""The ssl-pipeline flow and its stage subflows.

    ssl-pipeline
      ├─ train-teachers        one task per teacher: torchrun subprocess, streamed logs, progress
      ├─ ensemble-inference    one task per (teacher, shard) on a thread pool or a Dask cluster
      ├─ fuse-pseudo-labels    Weighted Polygon Fusion -> pseudo/train_lossweight.json + report
      ├─ train-student         labeled data + pseudo labels, each pseudo instance weighted
      └─ evaluate              every model on the test split -> table

Caching: the expensive tasks are cached on their inputs plus content fingerprints of the files they
read (configs, annotation files, checkpoints, predictions), with results persisted under
``work_dir/.prefect-results``. Re-running the pipeline with another fusion parameter therefore
recomputes fusion and what follows only. Before using a cache entry the flow checks that the task's
output files still exist; if they are gone the task runs again (``refresh_cache``).

Layout: the ssl-pipeline flow is here, the stage flows in :mod:`flows.stages`, their tasks in
:mod:`flows.tasks`, the work dir's lock in :mod:`flows.locking`, the UI artifacts in :mod:`flows.artifacts`;
what each stage does, without Prefect, in :mod:`i3cl_core.pipeline` (typed parameters in
:mod:`i3cl_core.pipeline.params`, launching a training and streaming its output in
:mod:`i3cl_core.pipeline.runner`).
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from pydantic import Field

from flows.artifacts import summary_artifact
from flows.locking import FLOW_OPTIONS, open_work_dir
from flows.stages import ensemble_inference, evaluate, fuse_pseudo_labels, train_student, train_teachers
from flows.tasks import flow_run_id
from i3cl_core.pipeline import stages
from i3cl_core.pipeline.data import resolve_data
from i3cl_core.pipeline.params import (
    DataParams,
    EvalParams,
    FuseConfig,
    InferParams,
    RoundParams,
    TrainParams,
)
from i3cl_core.pipeline.results import round_record, run_summary
from i3cl_core.pipeline.workdir import WorkDir
from i3cl_core.utils import atomic_write_json


@flow(name="ssl-pipeline", **FLOW_OPTIONS)
def ssl_pipeline(
    work_dir: str = "runs/demo",
    data: DataParams = DataParams(),
    train: TrainParams = TrainParams(),
    infer: InferParams = InferParams(),
    fuse: FuseConfig = FuseConfig(),
    evaluation: EvalParams = EvalParams(),
    rounds: Annotated[
        int,
        Field(
            ge=1,
            le=10,
            description="rounds of self-training; round r > 1 labels the unlabeled "
            "set again with round r-1's student (and the teachers)",
        ),
    ] = 1,
    later_rounds: RoundParams = RoundParams(),
) -> dict:
    """The whole semi-supervised loop on one work_dir, ``rounds`` times."""
    wd = open_work_dir(work_dir)
    layout = WorkDir(wd)
    checked = stages.preflight(resolve_data(data, wd))  # every image of every split, before hours of training
    print(f"pre-flight: {checked['images']} images checked in {checked['seconds']} s")
    teachers = train_teachers(str(wd), data, train)
    per_round = []
    for r in range(1, rounds + 1):
        later = r > 1
        ensemble_inference(str(wd), data, infer, ssl_round=r, with_teachers=later_rounds.with_teachers)
        pseudo = fuse_pseudo_labels(
            str(wd), data, (later_rounds.fuse or fuse) if later else fuse, ssl_round=r
        )
        trained = train_student(
            str(wd),
            data,
            train,
            ssl_round=r,
            extra_overrides=list(later_rounds.student_overrides) if later else None,
        )
        per_round.append(round_record(layout, r, trained, pseudo))
    scores = evaluate(str(wd), data, evaluation)
    summary = run_summary(layout, teachers, per_round, scores, resolve_data(data, wd), flow_run_id())
    atomic_write_json(layout.summary_json, summary, indent=2)
    summary_artifact(wd, summary)
    return summary


# the stage flows are also reachable here (deployments made before they moved to flows/stages.py name this
# file)
ALL_FLOWS = [ssl_pipeline, train_teachers, ensemble_inference, fuse_pseudo_labels, train_student, evaluate]
