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

Layout: the flows are here, the tasks in :mod:`flows.tasks`, the UI artifacts in :mod:`flows.artifacts`,
the typed parameters in :mod:`flows.params`, subprocess streaming in :mod:`flows.runner`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from prefect import flow
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from flows.artifacts import pseudo_label_artifacts, summary_artifact
from flows.params import DataParams, EvalParams, FuseConfig, InferParams, RoundParams, TrainParams
from flows.tasks import (
    evaluate_task,
    flow_run_id,
    fuse_task,
    infer_shard,
    result_storage,
    run_cached,
    train_spec,
)
from i3cl_core import stages, variants, workdir_lock
from i3cl_core.stages import PipelineError, fingerprint
from i3cl_core.utils import atomic_write_json

# ------------------------------------------------------------------------------------ helpers
_LOCKED_BY: dict[str, str] = {}  # flow run id -> the work dir whose lock it took


def _open_work_dir(work_dir: str, create: bool = True) -> Path:
    """:func:`stages.check_work_dir` plus the work dir's lock (one writer at a time: a second run on the same work
    dir refuses at once, naming this one), held until the flow run ends (:func:`_unlock`); the ssl-pipeline and
    the stage flows it calls share it."""
    from prefect.runtime import flow_run

    holder = f"flow run {flow_run.flow_name}/{flow_run.name} ({flow_run.id})"
    if str(flow_run.id) in _LOCKED_BY:  # this flow run holds it already
        return stages.check_work_dir(work_dir, create=create)
    if create:
        workdir_lock.acquire(work_dir, holder)
        try:
            wd = stages.check_work_dir(work_dir, create=True)
        except BaseException:
            workdir_lock.release(work_dir)
            raise
    else:
        wd = stages.check_work_dir(work_dir, create=False)
        workdir_lock.acquire(wd, holder)
    _LOCKED_BY[str(flow_run.id)] = str(wd)
    return wd


def _unlock(flow, flow_run, state) -> None:  # noqa: ARG001  (Prefect's state-hook signature)
    wd = _LOCKED_BY.pop(str(flow_run.id), None)
    if wd is not None:
        workdir_lock.release(wd)


LOCK_HOOKS = dict(
    on_completion=[_unlock], on_failure=[_unlock], on_cancellation=[_unlock], on_crashed=[_unlock]
)


def _data(data: DataParams, wd: Path) -> dict:
    """Resolved data paths: explicit ones, else the synthetic demo splits (generated when missing).
    A stage run with the default ``data`` on an existing work_dir uses the data it was made with
    (``work_dir/data.json``), so ``fuse-pseudo-labels/default -p work_dir=...`` needs no data paths."""
    saved = wd / "data.json"
    if data == DataParams() and saved.exists():
        return json.loads(saved.read_text())
    resolved = _resolve_data(data)
    atomic_write_json(saved, resolved, indent=2)
    return resolved


def _resolve_data(data: DataParams) -> dict:
    demo = None
    if data.uses_demo():
        demo_dir = Path(data.demo_dir)
        if not demo_dir.is_absolute():
            demo_dir = Path.cwd() / demo_dir
        demo = stages.ensure_demo_data(
            demo_dir,
            data.demo_seed,
            data.demo_train,
            data.demo_unlabeled,
            data.demo_test,
            data.demo_size,
            num_val=data.demo_val,
        )
    return {
        "labeled": [d.model_dump() for d in data.labeled] if data.labeled else demo["labeled"],
        "unlabeled_images": data.unlabeled_images or demo["unlabeled_images"],
        "unlabeled_root": data.unlabeled_root or demo["unlabeled_root"],
        "unlabeled_gt": data.unlabeled_gt
        if data.unlabeled_images
        else (data.unlabeled_gt or demo["unlabeled_gt"]),
        "test": data.test.model_dump() if data.test else demo["test"],
        "val": data.val.model_dump() if data.val else (demo["val"] if demo and not data.labeled else None),
    }


# ------------------------------------------------------------------------------------ flows
@flow(name="train-teachers", **LOCK_HOOKS, log_prints=True, persist_result=True, result_serializer="json")
def train_teachers(
    work_dir: str = "runs/demo", data: DataParams = DataParams(), train: TrainParams = TrainParams()
) -> dict:
    """Train every teacher (one after the other: trainings use all cores or GPUs themselves)."""
    wd = _open_work_dir(work_dir)
    d = _data(data, wd)
    names = [t.name for t in train.teachers]
    if len(set(names)) != len(names):
        raise PipelineError(f"train.teachers: names must be unique, got {names}")
    checkpoints = {
        spec.name: train_spec(spec, wd / "teachers" / spec.name, wd, d, train) for spec in train.teachers
    }
    atomic_write_json(wd / "teachers" / "teachers.json", checkpoints, indent=2)
    return checkpoints


def _teachers(wd: Path) -> dict:
    listing = stages.require(
        wd / "teachers" / "teachers.json", "train-teachers", "run train-teachers (or ssl-pipeline)"
    )
    teachers = json.loads(listing.read_text())
    for name, ckpt in teachers.items():
        stages.require(
            Path(ckpt), "train-teachers", f"re-run train-teachers: teacher {name}'s checkpoint has gone"
        )
    return teachers


def _round_dir(wd: Path, ssl_round: int) -> Path:
    """Round 1 lives in the work_dir itself; round r > 1 in ``rounds/r<r>/`` (predictions, pseudo, student)."""
    return wd if ssl_round == 1 else wd / "rounds" / f"r{ssl_round}"


def _student_checkpoint(wd: Path, ssl_round: int) -> str:
    folder = _round_dir(wd, ssl_round) / "student"
    done = [stages.trained_checkpoint(d) for _, d in variants.model_runs(folder)]
    done = [c for c in done if c is not None]
    if not done:
        raise PipelineError(
            f"{folder}: round {ssl_round} has no trained student yet; run train-student with "
            f"ssl_round={ssl_round} first"
        )
    return str(done[0])


def _ensemble_models(wd: Path, ssl_round: int, with_teachers: bool) -> dict:
    """Round 1: the teachers. Round r > 1: round r-1's student (plus the teachers with ``with_teachers``)."""
    if ssl_round == 1:
        return _teachers(wd)
    models = {f"student-r{ssl_round - 1}": _student_checkpoint(wd, ssl_round - 1)}
    return {**models, **_teachers(wd)} if with_teachers else models


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
    import contextlib

    from i3cl_core.pseudo.ensemble import Shard

    storage = result_storage(Path(wd))
    resources = contextlib.nullcontext()
    if (infer.dask_address or infer.dask_workers) and infer.dask_resource:
        import dask

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
                    score_thr=infer.score_thr,
                    devices=infer.devices,
                    flips=list(infer.tta_flips),
                    scales=list(infer.tta_scales),
                    batch_size=infer.batch_size,
                    precision=infer.precision,
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
        from i3cl_core.devices import resolve_devices

        try:
            devices = resolve_devices(infer.devices)
        except ValueError as e:
            raise PipelineError(str(e)) from None
        return ThreadPoolTaskRunner(max_workers=len(devices)), devices
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise PipelineError(
            "infer.dask_address / infer.dask_workers need prefect-dask: pip install 'i3cl[dask]'"
        ) from None
    if infer.dask_address:
        _check_dask_cluster(infer.dask_address, infer.dask_resource)
        return DaskTaskRunner(address=infer.dask_address), None
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs=local_dask_cluster_kwargs(infer.dask_workers, infer.dask_resource),
    ), None


def local_dask_cluster_kwargs(workers: int, resource: str | None = None) -> dict:
    """``distributed.LocalCluster`` arguments of the pipeline's own cluster: every listener (scheduler, workers,
    nannies, the scheduler's HTTP server) on 127.0.0.1, no dashboard. ``dashboard_address=None`` alone still
    starts the scheduler's HTTP server on port 8787."""
    kwargs = {
        "n_workers": workers,
        "threads_per_worker": 1,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": None,
        "scheduler_kwargs": {"dashboard": False, "dashboard_address": "127.0.0.1:0"},
    }
    if resource:
        kwargs["resources"] = {resource: 1}
    return kwargs


def _check_dask_cluster(address: str, resource: str | None) -> None:
    """Refuse a scheduler that cannot be reached, has no workers, or whose workers offer no
    ``resource`` (the shard tasks would wait for ever)."""
    from distributed import Client

    try:
        with Client(address, timeout=30) as client:
            workers = client.scheduler_info(n_workers=-1)["workers"]
    except OSError as e:
        raise PipelineError(f"infer.dask_address: no Dask scheduler reachable at {address} ({e})") from None
    if not workers:
        raise PipelineError(
            f"infer.dask_address: the scheduler at {address} has no workers; start some with "
            f"`dask worker {address} --nworkers 1 --nthreads 1 --resources {resource or 'GPU'}=1`"
        )
    if resource and not any(w.get("resources", {}).get(resource) for w in workers.values()):
        raise PipelineError(
            f"infer.dask_address: no worker of {address} offers the resource {resource!r} that shard "
            f"tasks request; start workers with `--resources {resource}=1` (one per GPU) or set "
            "infer.dask_resource to null"
        )


@flow(
    name="ensemble-inference",
    **LOCK_HOOKS,
    log_prints=True,
    persist_result=True,
    result_serializer="json",
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
    if ssl_round < 1:
        raise PipelineError(f"ssl_round: must be >= 1, got {ssl_round}")
    wd = _open_work_dir(work_dir, create=False)
    d = _data(data, wd)
    rd = _round_dir(wd, ssl_round)
    models = {
        **_ensemble_models(wd, ssl_round, with_teachers),
        **stages.exported_members(infer.exported_members),
    }
    runner, devices = _task_runner(infer)
    if devices:
        print(f"ensemble inference: {len(devices)} worker(s) on {', '.join(devices)}")
    splits = {"unlabeled": (d["unlabeled_images"], d["unlabeled_root"], rd / "predictions")}
    if d.get("val") and len(infer.extra_members) != len(infer.extra_val_members):
        raise PipelineError(
            "infer.extra_members: with a validation split, give the same detectors' predictions on it "
            "in infer.extra_val_members (same order), so that keep_thr is chosen on the same ensemble"
        )
    if d.get("val"):
        splits["val"] = (d["val"]["ann_file"], d["val"]["img_root"], rd / "predictions_val")
    result = {}
    for split, (images, root, pred_root) in splits.items():
        shards = stages.plan_inference(images, root, infer.shard_size)
        atomic_write_json(
            pred_root / "plan.json", {"shards": len(shards), "images": sum(len(x) for x in shards)}
        )
        try:
            detections = _infer_all.with_options(
                task_runner=runner, flow_run_name=f"ensemble-inference-shards-{split}"
            )(
                str(wd),
                str(pred_root),
                models,
                shards,
                infer,
                split,
                "" if ssl_round == 1 else f"r{ssl_round}-",
                dask_local=bool(infer.dask_workers),
            )
        finally:  # the models the thread-pool workers kept: free them (and the GPUs) for the trainings
            from i3cl_core.pseudo.ensemble import release_device_workers

            release_device_workers()
        members = [stages.finish_model_predictions(pred_root / name, shards) for name in models]
        members += stages.extra_members(
            infer.extra_members if split == "unlabeled" else infer.extra_val_members,
            shards,
            pred_root / "extra",
        )
        atomic_write_json(pred_root / "members.json", members, indent=2)
        result[split] = {"members": members, "shards": len(shards), "detections": detections}
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
    **LOCK_HOOKS,
    log_prints=True,
    persist_result=True,
    result_serializer="json",
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
    wd = _open_work_dir(work_dir, create=False)
    d = _data(data, wd)
    rd = _round_dir(wd, ssl_round)
    members_file = stages.require(
        rd / "predictions" / "members.json", "ensemble-inference", "run ensemble-inference first"
    )
    members = json.loads(members_file.read_text())
    val_file = rd / "predictions_val" / "members.json"
    val_members = json.loads(val_file.read_text()) if d.get("val") and val_file.exists() else None
    if val_members is not None and len(val_members) != len(members):
        raise PipelineError(
            f"{members_file} lists {len(members)} members but {val_file} {len(val_members)}: re-run "
            "ensemble-inference (infer.extra_members and infer.extra_val_members pair up)"
        )
    if fuse.auto_keep_thr and d.get("val") and val_members is None:
        raise PipelineError(
            f"missing {val_file}: re-run ensemble-inference (it also runs the ensemble over the "
            "validation split, on which fuse.auto_keep_thr chooses keep_thr)"
        )
    members_fp = fingerprint(*members, *(val_members or []))
    # keep_thr_beta at its default (F) is left out: pseudo labels fused before it existed keep their key and cache
    fuse_params = fuse.model_dump(
        mode="json", exclude={"keep_thr_beta"} if fuse.keep_thr_beta == 1.0 else None
    )
    # every variant of the pseudo labels in its own folder, keyed by what it is made from; current.json
    # names the one the student uses. Re-fusing with other parameters adds a variant, nothing is overwritten.
    key = variants.variant_key(
        members=members_fp,
        fuse=fuse_params,
        images=fingerprint(d["unlabeled_images"]),
        val=fingerprint(d["val"]["ann_file"]) if val_members else None,
    )
    out = rd / "pseudo" / key / "train_lossweight.json"
    summary = run_cached(
        fuse_task.with_options(result_storage=result_storage(wd)),
        out.exists(),
        ssl_round=ssl_round,
        members=members,
        members_fingerprint=members_fp,
        images_json=d["unlabeled_images"],
        fuse=fuse_params,
        out=str(out),
        gt=d["unlabeled_gt"],
        img_root=d["unlabeled_root"],
        val_members=val_members,
        val_ann_file=d["val"]["ann_file"] if val_members else None,
    )
    variants.set_current(
        rd / "pseudo", key, {"path": str(out), "fuse": fuse_params, "flow_run_id": flow_run_id()}
    )
    pseudo_label_artifacts(out.parent, summary, ssl_round)
    suffix = "" if ssl_round == 1 else f"-r{ssl_round}"
    rows = [
        {
            "variant": r["variant"] + (" (current)" if r["current"] else ""),
            "keep_thr": r["keep_thr"],
            "min_votes": r["fuse"].get("min_votes"),
            "conf_type": r["fuse"].get("conf_type"),
            "iou_thr": r["fuse"].get("iou_thr"),
            "pseudo_labels": r["pseudo_labels"],
            "F_vs_hidden_GT": (r["quality"] or {}).get("hmean"),
            "models": ", ".join(m for m, _ in r["models"]) or "-",
        }
        for r in variants.compare(wd)
        if r["stage"] == str((rd / "pseudo").relative_to(wd))
    ]
    create_table_artifact(
        rows,
        key=f"pseudo-variants{suffix}",
        description="every fused variant of this work dir's pseudo labels and the models trained on each",
    )
    return {**{k: v for k, v in summary.items() if k != "model_stats"}, "variant": key}


@flow(
    name="train-student",
    **LOCK_HOOKS,
    log_prints=True,
    persist_result=True,
    result_serializer="json",
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
    wd = _open_work_dir(work_dir, create=False)
    d = _data(data, wd)
    if train.pseudo_augment == "online":  # the student and its control are both saved as a weight average
        extra_overrides = [*(extra_overrides or []), "train.mean_teacher.enabled=true"]
    rd = _round_dir(wd, ssl_round)
    pseudo = variants.pseudo_file(rd / "pseudo")
    if pseudo is None:
        raise PipelineError(f"{rd / 'pseudo'}: no pseudo labels; run fuse-pseudo-labels first")
    load_from = None
    if ssl_round > 1:
        load_from = _student_checkpoint(wd, ssl_round - 1)
    elif train.student_init == "first_teacher":
        load_from = _teachers(wd)[train.teachers[0].name]
    extra = [
        {
            "ann_file": str(pseudo),
            "img_root": d["unlabeled_root"],
            "fraction": train.pseudo_fraction,
            "augment": train.pseudo_augment,
            "background_weight": train.pseudo_background_weight,
        }
    ]
    name = train.student.name if ssl_round == 1 else f"{train.student.name}-r{ssl_round}"
    lineage_pseudo = {
        "variant": variants.current_variant(rd / "pseudo"),
        "path": str(pseudo),
        "fingerprint": fingerprint(pseudo),
        "fuse": json.loads(pseudo.read_text()).get("info", {}).get("fuse"),
    }
    # each student in its own folder, keyed by what it starts from: re-training after a re-fusion keeps the
    # earlier student (and its lineage and score); current.json names the one evaluate and round r+1 use
    spec = {
        "spec": train.student.model_dump(),
        "overrides": [*train.overrides, *(extra_overrides or [])],
        "load_from": fingerprint(load_from) if load_from else None,
    }
    root = rd / "student" / train.student.name
    noise = {
        k: v
        for k, v in (("augment", train.pseudo_augment), ("background_weight", train.pseudo_background_weight))
        if v != TrainParams.model_fields[f"pseudo_{k}"].default
    }  # non-default only: earlier keys stay valid
    key = variants.variant_key(
        pseudo=lineage_pseudo["fingerprint"], fraction=train.pseudo_fraction, **noise, **spec
    )
    student = train_spec(
        train.student,
        root / key,
        wd,
        d,
        train,
        extra,
        load_from,
        extra_overrides,
        name=name,
        pseudo=lineage_pseudo,
    )
    variants.set_current(root, key, {"pseudo_variant": lineage_pseudo["variant"], "checkpoint": student})
    result = {"student": student}
    if train.control and ssl_round == 1:
        iters = stages.iterations_per_epoch(Path(student).parents[1])
        croot = wd / "control" / train.student.name
        ckey = variants.variant_key(iters_per_epoch=iters, **spec)
        result["control"] = train_spec(
            train.student,
            croot / ckey,
            wd,
            d,
            train,
            None,
            load_from,
            [*(extra_overrides or []), f"train.iters_per_epoch={iters}"],
            name=f"control-{train.student.name}",
        )
        variants.set_current(croot, ckey, {"checkpoint": result["control"]})
    return result


@flow(name="evaluate", **LOCK_HOOKS, log_prints=True, persist_result=True, result_serializer="json")
def evaluate(
    work_dir: str = "runs/demo", data: DataParams = DataParams(), evaluation: EvalParams = EvalParams()
) -> dict:
    """Every trained model of the work_dir on the test split -> eval/<model>.json and a table:
    ``teacher:<name>``, ``control:<name>``, ``student:<name>`` (round 1) and ``student-r<r>:<name>``. Each model
    is scored at its best-F threshold on the labeled validation split when the run has one (``hmean``; the test
    split's own best threshold is ``best_hmean``, an upper bound no user could choose)."""
    wd = _open_work_dir(work_dir, create=False)
    d = _data(data, wd)
    models = {}
    folders = [("teacher", wd / "teachers"), ("control", wd / "control"), ("student", wd / "student")]
    rounds = (
        sorted((wd / "rounds").glob("r*"), key=lambda p: int(p.name[1:])) if (wd / "rounds").exists() else []
    )
    folders += [(f"student-{r.name}", r / "student") for r in rounds if r.name[1:].isdigit()]
    for role, folder in folders:
        for name, out in variants.model_runs(folder):  # students and controls: their current variant
            ckpt = stages.trained_checkpoint(out)
            if ckpt is not None:
                models[f"{role}:{name}"] = str(ckpt)
    if not models:
        raise PipelineError(f"{wd}: no trained model to evaluate; run train-teachers first")
    split_fp = fingerprint(d["test"]["ann_file"])
    on_val = evaluation.score_thr is None and evaluation.threshold == "val" and bool(d.get("val"))
    results = {}
    for name, ckpt in models.items():
        stem = name.replace(":", "_")
        cached = evaluate_task.with_options(result_storage=result_storage(wd))
        thr, chosen_on = evaluation.score_thr, "parameter" if evaluation.score_thr is not None else "config"
        if on_val:  # the model's best-F threshold on the labeled validation split
            val_json = wd / "eval" / f"{stem}.val.json"
            val = run_cached(
                cached,
                val_json.exists(),
                model=f"{name}@val",
                checkpoint=ckpt,
                checkpoint_fingerprint=fingerprint(ckpt),
                split=d["val"],
                split_fingerprint=fingerprint(d["val"]["ann_file"]),
                out_json=str(val_json),
                protocol=evaluation.protocol,
                score_thr=None,
            )
            thr, chosen_on = float(val["best_thr"]), "val"
        out_json = wd / "eval" / f"{stem}.json"
        results[name] = run_cached(
            cached,
            out_json.exists(),
            model=name,
            checkpoint=ckpt,
            checkpoint_fingerprint=fingerprint(ckpt),
            split=d["test"],
            split_fingerprint=split_fp,
            out_json=str(out_json),
            protocol=evaluation.protocol,
            score_thr=thr,
        )
        results[name]["threshold_chosen_on"] = chosen_on
        atomic_write_json(
            Path(ckpt).parents[1] / "test_eval.json", results[name], indent=2
        )  # kept with the variant
    rows = [
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
    create_table_artifact(
        rows, key="model-metrics", description=f"models on the test split ({evaluation.protocol})"
    )
    return {
        n: {
            k: r[k]
            for k in (
                "precision",
                "recall",
                "hmean",
                "best_hmean",
                "best_thr",
                "score_thr",
                "threshold_chosen_on",
            )
        }
        for n, r in results.items()
    }


def _best_teacher_on_unlabeled(report: dict) -> dict | None:
    """The best ensemble member on the unlabeled split at its own best threshold (what the pseudo
    labels must beat), from the fusion report's quality section."""
    models = (report.get("quality") or {}).get("models") or []
    if not models:
        return None
    best = max(models, key=lambda m: m["hmean"])
    return {"name": Path(best["source"]).name, "hmean": best["hmean"], "thr": best["best_threshold"]}


@flow(name="ssl-pipeline", **LOCK_HOOKS, log_prints=True, persist_result=True, result_serializer="json")
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
    wd = _open_work_dir(work_dir)
    checked = stages.preflight(_data(data, wd))  # every image of every split, before hours of training
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
        report = json.loads(
            (variants.pseudo_file(_round_dir(wd, r) / "pseudo").parent / "report.json").read_text()
        )
        per_round.append(
            {
                "round": r,
                "student": trained["student"],
                "control": trained.get("control"),
                "pseudo_labels": pseudo["pseudo_labels"],
                "keep_thr": pseudo.get("keep_thr"),
                "pseudo_quality": (report.get("quality") or {}).get("fused"),
                "best_teacher_on_unlabeled": _best_teacher_on_unlabeled(report),
            }
        )
    scores = evaluate(str(wd), data, evaluation)
    first = per_round[0]
    summary = {
        "work_dir": str(wd),
        "teachers": teachers,
        "student": first["student"],
        "control": first["control"],
        "scores": scores,
        "pseudo_labels": first["pseudo_labels"],
        "keep_thr": first["keep_thr"],
        "pseudo_quality": first["pseudo_quality"],
        "best_teacher_on_unlabeled": first["best_teacher_on_unlabeled"],
        "rounds": per_round,
        "lineage": {
            "pseudo_variant": variants.current_variant(wd / "pseudo"),
            "pseudo_labels_file": str(variants.pseudo_file(wd / "pseudo")),
            "data": {k: v for k, v in _data(data, wd).items()},
            "code": variants.code_version(),
            "flow_run_id": flow_run_id(),
        },
    }
    atomic_write_json(wd / "summary.json", summary, indent=2)
    summary_artifact(wd, summary)
    return summary


ALL_FLOWS = [ssl_pipeline, train_teachers, ensemble_inference, fuse_pseudo_labels, train_student, evaluate]
