"""The pipeline's tasks: one training (torchrun or Slurm, streamed logs, progress), one inference shard,
one fusion, one evaluation. Each is cached on its inputs plus content fingerprints of the files it reads;
results are persisted as JSON under ``work_dir/.prefect-results``."""

from __future__ import annotations

import re
from pathlib import Path

from prefect import get_client, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.runtime import flow_run

from flows.artifacts import slug, training_curve_artifact
from i3cl_core.engine.launch import SlurmLauncher, TorchrunLauncher
from i3cl_core.infer.shards import ShardSettings
from i3cl_core.pipeline import stages, variants
from i3cl_core.pipeline.errors import PipelineError
from i3cl_core.pipeline.params import FuseConfig, ModelSpec, TrainParams
from i3cl_core.pipeline.runner import run_training
from i3cl_core.pipeline.training import training_start
from i3cl_core.pipeline.workdir import WorkDir

REPO = Path(__file__).resolve().parents[1]
CACHE = INPUTS + TASK_SOURCE


def result_storage(wd: Path) -> Path:
    """Task results (and cache records) of a run live in its work_dir."""
    return WorkDir(wd).results_dir  # checked by stages.check_work_dir before any task reads it


def config_path_of(p: str) -> str:
    path = Path(p)
    if not path.is_absolute() and not path.exists() and (REPO / path).exists():
        path = REPO / path
    if not path.exists():
        raise PipelineError(f"config {p} not found")
    return str(path.resolve())


def cancelled_checker():
    """A function that tells whether the root flow run is being cancelled (read the run id here, in
    the task's thread, where Prefect's context is available)."""
    root = flow_run.root_flow_run_id
    if not root:
        return None

    def cancelled() -> bool:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(root).state
            return bool(state and (state.is_cancelling() or state.is_cancelled()))

    return cancelled


def flow_run_id() -> str | None:
    return str(flow_run.id) if flow_run.id else None


EPOCH = re.compile(r"epoch (\d+)/(\d+) iter")


@task(
    cache_policy=(INPUTS - "launcher") + TASK_SOURCE,
    persist_result=True,
    result_serializer="json",
    task_run_name="train-{name}",
    cache_result_in_memory=False,
)
def train_model(
    name: str,
    config_path: str,
    out_dir: str,
    nproc_per_node: int,
    inputs_fingerprint: str,
    launcher: dict | None = None,
) -> str:
    """One training, launched by ``launcher`` (torchrun here, or a Slurm job); returns the checkpoint
    path. How it is launched is not part of the cache key: the same inputs give the same model."""
    launch = (
        SlurmLauncher(**launcher)
        if (launcher or {}).get("kind") == "slurm"
        else TorchrunLauncher(**(launcher or {}))
    )
    logger = get_run_logger()
    out = Path(out_dir)
    slurm = isinstance(launch, SlurmLauncher)
    world_size = nproc_per_node * (launch.nodes if slurm else launch.nnodes)
    start = training_start(out, inputs_fingerprint, world_size, slurm=slurm)
    if start.how == "done":
        logger.info("%s: a finished training of the same inputs is in %s; reused", name, out)
        return str(stages.trained_checkpoint(out))
    progress_id = create_progress_artifact(0.0, key=f"train-{slug(name)}", description=f"training {name}")
    epoch = {"seen": 0}

    def on_line(line: str) -> None:
        logger.info("[%s] %s", name, line)
        m = EPOCH.search(line)
        if m and int(m.group(1)) > epoch["seen"]:  # a new epoch began: publish the curve so far
            if epoch["seen"]:
                training_curve_artifact(name, out, f"epoch {epoch['seen']}/{m.group(2)}")
            epoch["seen"] = int(m.group(1))

    ckpt = run_training(
        name,
        config_path,
        out,
        start,
        nproc_per_node=nproc_per_node,
        launcher=launch,
        on_line=on_line,
        on_note=lambda note: logger.info("%s: %s", name, note),
        cancelled=cancelled_checker(),
        on_progress=lambda f: update_progress_artifact(progress_id, 100.0 * f),
    )
    update_progress_artifact(progress_id, 100.0)
    training_curve_artifact(name, out, "finished")
    return str(ckpt)


@task(
    cache_policy=(INPUTS - "loader_workers" - "dask_local") + TASK_SOURCE,
    persist_result=True,
    result_serializer="json",
    task_run_name="infer-{teacher}-{shard_index}",
)
def infer_shard(
    teacher: str,
    checkpoint: str,
    checkpoint_fingerprint: str,
    shard_index: int,
    shard: list[dict],
    out_dir: str,
    settings: ShardSettings,
    devices: str | list[str],
    loader_workers: int,
    dask_local: bool,
) -> dict:
    """One model on one shard. Cached on what the shard file depends on (the devices included: ``precision:
    auto`` resolves per device), not on the decoding threads or where Dask runs it."""
    return stages.infer_shard(
        checkpoint, shard_index, shard, out_dir, settings, devices, loader_workers, dask_local
    )


@task(cache_policy=CACHE, persist_result=True, result_serializer="json", task_run_name="fuse-r{ssl_round}")
def fuse_task(
    ssl_round: int,
    members: list[str],
    members_fingerprint: str,
    images_json: str,
    fuse: dict,
    out: str,
    gt: str | None,
    img_root: str,
    val_members: list[str] | None,
    val_ann_file: str | None,
) -> dict:
    return stages.fuse_stage(
        members, images_json, out, FuseConfig(**fuse), gt, img_root, val_members, val_ann_file
    )


@task(cache_policy=CACHE, persist_result=True, result_serializer="json", task_run_name="evaluate-{model}")
def evaluate_task(
    model: str,
    checkpoint: str,
    checkpoint_fingerprint: str,
    split: dict,
    split_fingerprint: str,
    out_json: str,
    protocol: str,
    score_thr: float | None,
) -> dict:
    return stages.evaluate_checkpoint(
        checkpoint, split["ann_file"], split["img_root"], out_json, protocol, score_thr
    )


def run_cached(t, outputs_exist: bool, **kwargs):
    """Call a cached task, forcing a recompute when its output files have gone."""
    return (t if outputs_exist else t.with_options(refresh_cache=True))(**kwargs)


def train_spec(
    spec: ModelSpec,
    out: Path,
    wd: Path,
    data: dict,
    train: TrainParams,
    extra_sets: list[dict] | None = None,
    load_from: str | None = None,
    extra_overrides: list[str] | None = None,
    name: str | None = None,
    pseudo: dict | None = None,
) -> str:
    """Train ``spec`` into ``out`` on the labeled sets plus ``extra_sets`` (cached on the resolved
    config and the content of its inputs; task results stored in the work_dir ``wd``)."""
    sets = data["labeled"] + (extra_sets or [])
    overrides = [*train.overrides, *spec.overrides, *(extra_overrides or [])]
    cfg_path = stages.write_train_config(config_path_of(spec.config), out, sets, overrides, load_from)
    fp = stages.training_fingerprint(cfg_path, sets, load_from)
    ckpt = run_cached(
        train_model.with_options(result_storage=result_storage(wd)),
        stages.trained_checkpoint(out) is not None,
        name=name or spec.name,
        config_path=str(cfg_path),
        out_dir=str(out),
        nproc_per_node=train.nproc_per_node,
        inputs_fingerprint=fp,
        launcher=train.launcher.model_dump(mode="json"),
    )
    variants.write_lineage(
        out,
        data_sets=sets,
        load_from=load_from,
        config=str(cfg_path),
        pseudo=pseudo,
        flow_run_id=flow_run_id(),
    )
    return ckpt
