"""The stage flows of the ssl-pipeline, each runnable on its own
(``prefect deployment run train-student/default``):

    train-teachers        one task per teacher: torchrun subprocess, streamed logs, progress
    ensemble-inference    one task per (model, shard) on a thread pool or a Dask cluster
    fuse-pseudo-labels    Weighted Polygon Fusion -> pseudo/train_lossweight.json + report
    train-student         labeled data + pseudo labels, each pseudo instance weighted (and its control)
    evaluate              every model on the test split -> table

Each flow takes the work dir's lock, asks :mod:`i3cl_core.pipeline` what to do (its plans), runs the cached
tasks of :mod:`flows.tasks` and publishes artifacts (:mod:`flows.artifacts`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flows.artifacts import pseudo_label_artifacts, pseudo_variants_artifact
from flows.locking import FLOW_OPTIONS, open_work_dir
from flows.tasks import (
    evaluate_task,
    flow_run_id,
    fuse_task,
    infer_shard,
    result_storage,
    run_cached,
    train_spec,
)
from i3cl_core.devices import resolve_devices
from i3cl_core.infer.dask_cluster import check_dask_cluster, local_dask_cluster_kwargs
from i3cl_core.infer.shards import Shard
from i3cl_core.infer.workers import release_device_workers
from i3cl_core.pipeline import stages, variants
from i3cl_core.pipeline.data import resolve_data
from i3cl_core.pipeline.errors import PipelineError
from i3cl_core.pipeline.evaluation import metrics_rows, plan_evaluation, record_evaluation
from i3cl_core.pipeline.params import (
    DataParams,
    EvalParams,
    FuseConfig,
    InferParams,
    TrainParams,
)
from i3cl_core.pipeline.plans import finish_split, plan_control, plan_ensemble, plan_fusion, plan_student
from i3cl_core.pipeline.results import SCORE_KEYS
from i3cl_core.pipeline.workdir import WorkDir
from i3cl_core.utils import atomic_write_json, fingerprint


@flow(name="train-teachers", flow_run_name="train-teachers", **FLOW_OPTIONS)
def train_teachers(
    work_dir: str = "runs/demo", data: DataParams = DataParams(), train: TrainParams = TrainParams()
) -> dict:
    """Train every teacher (one after the other: trainings use all cores or GPUs themselves)."""
    wd = open_work_dir(work_dir)
    d = resolve_data(data, wd)
    names = [t.name for t in train.teachers]
    if len(set(names)) != len(names):
        raise PipelineError(f"train.teachers: names must be unique, got {names}")
    layout = WorkDir(wd)
    checkpoints = {
        spec.name: train_spec(spec, layout.teachers_dir / spec.name, wd, d, train) for spec in train.teachers
    }
    atomic_write_json(layout.teachers_listing, checkpoints, indent=2)
    return checkpoints


@flow(name="ensemble-inference-shards")
def _infer_all(
    wd: str,
    pred_root: str,
    models: dict,
    shards: list,
    infer: InferParams,
    split: str,
    prefix: str,
    dask_local: bool = False,
) -> dict:
    """One task per (model, shard), model by model, so that each inference worker loads a model once
    and keeps it for that model's shards; with Dask each task requests one ``infer.dask_resource``."""
    storage = result_storage(Path(wd))
    resources = contextlib.nullcontext()
    if (infer.dask_address or infer.dask_workers) and infer.dask_resource:
        import dask  # deferred: optional [dask] extra

        resources = dask.annotate(resources={infer.dask_resource: 1})
    futures = {}
    with resources:
        for name, ckpt in models.items():
            fp = fingerprint(ckpt)
            out_dir = Path(pred_root) / name
            for i, shard in enumerate(shards):
                exists = (out_dir / Shard(i, []).name).exists()
                t = infer_shard.with_options(result_storage=storage, refresh_cache=not exists)
                label = prefix + (name if split == "unlabeled" else f"{split}-{name}")
                futures[(name, i)] = t.submit(
                    teacher=label,
                    checkpoint=ckpt,
                    checkpoint_fingerprint=fp,
                    shard_index=i,
                    shard=shard,
                    out_dir=str(out_dir),
                    settings=infer.shard_settings(),
                    devices=infer.devices,
                    loader_workers=infer.loader_workers,
                    dask_local=dask_local,
                )
    progress_id = create_progress_artifact(
        0.0, key=f"ensemble-inference-{split}", description=f"{split} shards done"
    )
    detections = {name: 0 for name in models}
    for n, ((name, _), f) in enumerate(futures.items(), 1):
        detections[name] += f.result()["detections"]
        update_progress_artifact(progress_id, 100.0 * n / len(futures))
    return detections


def _task_runner(infer: InferParams):
    """The engine the shard tasks run on: a thread pool with one thread per inference worker (one per
    ``infer.devices`` entry), an existing Dask scheduler, or a local Dask cluster started for the stage."""
    if not (infer.dask_address or infer.dask_workers):
        try:
            devices = resolve_devices(infer.devices)
        except ValueError as e:
            raise PipelineError(str(e)) from None
        return ThreadPoolTaskRunner(max_workers=len(devices)), devices
    try:
        from prefect_dask import DaskTaskRunner  # deferred: optional [dask] extra
    except ImportError:
        raise PipelineError(
            "infer.dask_address / infer.dask_workers need prefect-dask: pip install 'i3cl[dask]'"
        ) from None
    if infer.dask_address:
        try:
            check_dask_cluster(infer.dask_address, infer.dask_resource)
        except ValueError as e:
            raise PipelineError(str(e)) from None
        return DaskTaskRunner(address=infer.dask_address), None
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs=local_dask_cluster_kwargs(infer.dask_workers, infer.dask_resource),
    ), None


@flow(
    name="ensemble-inference",
    **FLOW_OPTIONS,
    flow_run_name="ensemble-inference-r{ssl_round}",
)
def ensemble_inference(
    work_dir: str = "runs/demo",
    data: DataParams = DataParams(),
    infer: InferParams = InferParams(),
    ssl_round: int = 1,
    with_teachers: bool = True,
) -> dict:
    """Every ensemble model over the unlabeled set (and the labeled validation split, where one is
    given, for the fusion threshold), one task per (model, shard); finished shards are skipped.
    Round 1's ensemble is the teachers; a later round's is the previous round's student (and the
    teachers with ``with_teachers``)."""
    wd = open_work_dir(work_dir, create=False)
    plan = plan_ensemble(WorkDir(wd), resolve_data(data, wd), infer, ssl_round, with_teachers)
    models = plan.models
    runner, devices = _task_runner(infer)
    if devices:
        print(f"ensemble inference: {len(devices)} worker(s) on {', '.join(devices)}")
    result = {}
    for split in plan.splits:
        try:
            detections = _infer_all.with_options(
                task_runner=runner, flow_run_name=f"ensemble-inference-shards-{split.name}"
            )(
                str(wd),
                str(split.pred_root),
                models,
                split.shards,
                infer,
                split.name,
                "" if ssl_round == 1 else f"r{ssl_round}-",
                dask_local=bool(infer.dask_workers),
            )
        finally:  # the models the thread-pool workers kept: free them (and the GPUs) for the trainings
            release_device_workers()
        members = finish_split(split, models)
        result[split.name] = {"members": members, "shards": len(split.shards), "detections": detections}
    create_table_artifact(
        [
            {"model": n, "split": sp, "shards": r["shards"], "detections": r["detections"][n]}
            for sp, r in result.items()
            for n in models
        ],
        key=f"ensemble-detections-r{ssl_round}",
        description="detections per ensemble model",
    )
    return {
        "members": result["unlabeled"]["members"],
        "shards": result["unlabeled"]["shards"],
        "detections": result["unlabeled"]["detections"],
        "val_members": result.get("val", {}).get("members"),
    }


@flow(
    name="fuse-pseudo-labels",
    **FLOW_OPTIONS,
    flow_run_name="fuse-pseudo-labels-r{ssl_round}",
)
def fuse_pseudo_labels(
    work_dir: str = "runs/demo",
    data: DataParams = DataParams(),
    fuse: FuseConfig = FuseConfig(),
    ssl_round: int = 1,
) -> dict:
    """Weighted Polygon Fusion of the ensemble's predictions into pseudo/train_lossweight.json
    (``fuse.auto_keep_thr``: the threshold chosen on the labeled validation split, never on the
    unlabeled set's hidden ground truth, which only measures the result)."""
    wd = open_work_dir(work_dir, create=False)
    d = resolve_data(data, wd)
    plan = plan_fusion(WorkDir(wd), d, fuse, ssl_round)
    summary = run_cached(
        fuse_task.with_options(result_storage=result_storage(wd)),
        plan.out.exists(),
        ssl_round=ssl_round,
        members=plan.members,
        members_fingerprint=plan.members_fingerprint,
        images_json=d["unlabeled_images"],
        fuse=plan.fuse_params,
        out=str(plan.out),
        gt=d["unlabeled_gt"],
        img_root=d["unlabeled_root"],
        val_members=plan.val_members,
        val_ann_file=d["val"]["ann_file"] if plan.val_members else None,
    )
    variants.set_current(
        plan.pseudo_dir,
        plan.key,
        {"path": str(plan.out), "fuse": plan.fuse_params, "flow_run_id": flow_run_id()},
    )
    pseudo_label_artifacts(plan.out.parent, summary, ssl_round)
    pseudo_variants_artifact(wd, plan.pseudo_dir, ssl_round)
    return {**{k: v for k, v in summary.items() if k != "model_stats"}, "variant": plan.key}


@flow(
    name="train-student",
    **FLOW_OPTIONS,
    flow_run_name="train-student-r{ssl_round}",
)
def train_student(
    work_dir: str = "runs/demo",
    data: DataParams = DataParams(),
    train: TrainParams = TrainParams(),
    ssl_round: int = 1,
    extra_overrides: list[str] | None = None,
) -> dict:
    """Retrain on the labeled data plus the pseudo labels (each pseudo instance's losses scaled by
    its lossweight). Round 1 starts from the first teacher (``student_init``), a later round from the
    previous round's student. In round 1, with ``train.control``, a control model follows: the
    student's config, start and number of iterations, on the labeled data alone."""
    wd = open_work_dir(work_dir, create=False)
    d = resolve_data(data, wd)
    layout = WorkDir(wd)
    plan = plan_student(layout, d, train, ssl_round, extra_overrides)
    student = train_spec(
        train.student,
        plan.out,
        wd,
        d,
        train,
        plan.extra_sets,
        plan.load_from,
        plan.overrides,
        name=plan.name,
        pseudo=plan.pseudo,
    )
    variants.set_current(
        plan.root, plan.key, {"pseudo_variant": plan.pseudo["variant"], "checkpoint": student}
    )
    result = {"student": student}
    if train.control and ssl_round == 1:
        control = plan_control(layout, train, plan, stages.iterations_per_epoch(plan.out))
        result["control"] = train_spec(
            train.student,
            control.out,
            wd,
            d,
            train,
            None,
            plan.load_from,
            control.overrides,
            name=control.name,
        )
        variants.set_current(control.root, control.key, {"checkpoint": result["control"]})
    return result


@flow(name="evaluate", flow_run_name="evaluate", **FLOW_OPTIONS)
def evaluate(
    work_dir: str = "runs/demo", data: DataParams = DataParams(), evaluation: EvalParams = EvalParams()
) -> dict:
    """Every trained model of the work_dir on the test split -> eval/<model>.json and a table:
    ``teacher:<name>``, ``control:<name>``, ``student:<name>`` (round 1) and ``student-r<r>:<name>``. Each
    model is scored at its best-F threshold on the labeled validation split when the run has one (``hmean``;
    the test split's own best threshold is ``best_hmean``, an upper bound no user could choose)."""
    wd = open_work_dir(work_dir, create=False)
    d, layout = resolve_data(data, wd), WorkDir(wd)
    cached = evaluate_task.with_options(result_storage=result_storage(wd))
    results = {}
    for model in plan_evaluation(layout, d, evaluation):
        val = run_cached(cached, model.val.out_json.exists(), **model.val.inputs()) if model.val else None
        test = model.test(val, d, layout, evaluation.protocol)
        results[model.name] = record_evaluation(
            model, run_cached(cached, test.out_json.exists(), **test.inputs()), val
        )
    create_table_artifact(
        metrics_rows(results),
        key="model-metrics",
        description=f"models on the test split ({evaluation.protocol})",
    )
    return {n: {k: r[k] for k in SCORE_KEYS} for n, r in results.items()}
