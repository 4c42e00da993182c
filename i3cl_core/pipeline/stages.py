"""The semi-supervised pipeline's stages as plain functions (paths and configs in, paths and small
summaries out). ``flows/`` wraps them in Prefect flows and tasks; nothing here imports Prefect.

One run is one ``work_dir``::

    pipeline.json                              version marker of the layout
    teachers/<name>/config.yaml, checkpoints/latest.pth, metrics.json, train.log
    predictions/<teacher>/shard_NNNNN.json     COCO results, one file per shard (+ coverage.json)
    pseudo/<key>/train_lossweight.json, report.json, report.md, report_figures/; pseudo/current.json
    student/<name>/<key>/..., current.json     as teachers, one folder per variant
                                               (see i3cl_core.pipeline.variants)
    eval/<model>.json                          P/R/F on the test split
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from i3cl_core.config import load_config, save_config
from i3cl_core.config.schema import MeanTeacherConfig, StrongAugmentConfig
from i3cl_core.data.check import check_sources, raise_on_problems
from i3cl_core.data.coco import CocoTextDataset
from i3cl_core.data.synth import generate_demo
from i3cl_core.devices import resolve_device
from i3cl_core.engine.launch import torchrun_command
from i3cl_core.infer.evaluate import evaluate_model
from i3cl_core.infer.precision import load_inference_model
from i3cl_core.infer.run import ImageItem, collect_images
from i3cl_core.infer.shards import Shard, ShardSettings, plan_shards
from i3cl_core.infer.shards import infer_shard as run_infer_shard
from i3cl_core.infer.workers import worker_devices
from i3cl_core.pipeline.errors import PipelineError, require
from i3cl_core.pipeline.training import trained_checkpoint  # noqa: F401  (re-exported: the stages' callers use it)
from i3cl_core.pipeline.workdir import COVERAGE, MARKER, RESULTS_DIR
from i3cl_core.pseudo.external import prepare_extra
from i3cl_core.pseudo.fuse import fuse_predictions
from i3cl_core.pseudo.thresholds import choose_fusion, quality_at_keep_thr, with_keep_thr
from i3cl_core.utils import atomic_write_json, fingerprint, get_logger

log = get_logger("pipeline")
PIPELINE_VERSION = 1


# ------------------------------------------------------------------------------------ work_dir
def check_work_dir(work_dir: str | os.PathLike, create: bool = True) -> Path:
    """The work_dir, with its version marker checked (and written when new)."""
    wd = Path(work_dir).resolve()
    marker = wd / MARKER
    if marker.exists():
        try:
            version = json.loads(marker.read_text()).get("pipeline_version")
        except (json.JSONDecodeError, AttributeError):
            version = None
        if version != PIPELINE_VERSION:
            raise PipelineError(
                f"{wd}: made by pipeline version {version!r}, this is version {PIPELINE_VERSION}; "
                "use a new work_dir (or move the old one away)"
            )
    elif create:
        atomic_write_json(
            marker, {"pipeline_version": PIPELINE_VERSION, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        )
    else:
        raise PipelineError(
            f"{wd}: not a pipeline work_dir (no pipeline.json); run ssl-pipeline or train-teachers first"
        )
    check_result_records(wd)
    return wd


# what this pipeline's JSON result records name as their decoder; Prefect imports whatever a record names
JSON_DECODER = "prefect.serializers.prefect_json_object_decoder"


def check_result_records(wd: Path) -> int:
    """Refuse a work dir whose task-result cache holds a record this pipeline would not have written.

    Prefect decodes a cached result with the serializer the record itself names: a record planted in a
    copied or shared work dir that names ``pickle`` (or another decoder or class to import) would run code
    when a cached task is looked up. The pipeline writes JSON records of plain JSON values only, so
    anything else is an error, raised before any task runs. Returns the number of records checked."""
    folder = Path(wd) / RESULTS_DIR
    if not folder.is_dir():
        return 0
    n = 0
    for f in sorted(folder.rglob("*")):
        if not f.is_file() or f.name.startswith("."):
            continue
        n += 1
        problem = None
        try:
            rec = json.loads(f.read_bytes())
            ser = rec["metadata"]["serializer"]
            if ser.get("type") != "json":
                problem = f"its serializer is {ser.get('type')!r}, not 'json'"
            elif ser.get("object_decoder") != JSON_DECODER or ser.get("jsonlib", "json") != "json":
                problem = f"it names the decoder {ser.get('object_decoder')!r} / {ser.get('jsonlib')!r}"
            elif "__class__" in str(rec.get("result", "")):
                problem = "its result names a Python class to import"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            problem = f"it is not a JSON result record ({type(e).__name__}: {e})"
        if problem:
            raise PipelineError(
                f"{f}: a task-result record this pipeline did not write: {problem}; "
                "reading it could run code. "
                f"If this work dir came from elsewhere, delete {folder} (every stage then checks its outputs "
                "again and recomputes only what is missing or changed), or the one file if you know where it "
                "came from"
            )
    return n


# ------------------------------------------------------------------------------------ data
def ensure_demo_data(
    data_dir: str | os.PathLike,
    seed: int = 0,
    num_train: int = 200,
    num_unlabeled: int = 200,
    num_test: int = 100,
    size: int = 384,
    workers: int = 2,
    num_val: int = 0,
) -> dict:
    """Generate the synthetic demo splits unless they already exist with these settings."""
    d = Path(data_dir)
    stamp = d / "demo.json"
    settings = {
        "seed": seed,
        "num_train": num_train,
        "num_unlabeled": num_unlabeled,
        "num_test": num_test,
        "size": size,
        "num_val": num_val,
    }
    if not (stamp.exists() and json.loads(stamp.read_text()) == settings):
        generate_demo(
            d,
            seed=seed,
            num_train=num_train,
            num_unlabeled=num_unlabeled,
            num_test=num_test,
            size=(size, size),
            workers=workers,
            progress=False,
            num_val=num_val,
        )
        atomic_write_json(stamp, settings)
    return demo_paths(d, with_val=num_val > 0)


def demo_paths(d: str | os.PathLike, with_val: bool = False) -> dict:
    d = Path(d).resolve()
    val = (
        {"ann_file": str(d / "val" / "annotations.json"), "img_root": str(d / "val" / "images")}
        if with_val
        else None
    )
    return {
        "val": val,
        "labeled": [
            {"ann_file": str(d / "train" / "annotations.json"), "img_root": str(d / "train" / "images")}
        ],
        "unlabeled_images": str(d / "unlabeled" / "images.json"),
        "unlabeled_root": str(d / "unlabeled" / "images"),
        "unlabeled_gt": str(d / "unlabeled" / "gt.json"),
        "test": {"ann_file": str(d / "test" / "annotations.json"), "img_root": str(d / "test" / "images")},
    }


# ------------------------------------------------------------------------------------ training
def write_train_config(
    base_config: str,
    out_dir: Path,
    train_sets: list[dict],
    overrides: list[str] | None = None,
    load_from: str | None = None,
) -> Path:
    """Resolve ``base_config`` with the run's data and overrides into ``out_dir/config.yaml``."""
    keys = ("ann_file", "img_root", "fraction", "augment", "background_weight")  # DatasetSource's fields
    sets = [{k: s[k] for k in keys if s.get(k) is not None} for s in train_sets]
    extra = [f"data.train={json.dumps(sets)}", "data.val=null", "train.eval_interval=0"]
    if load_from:
        extra.append(f"train.load_from={load_from}")
    cfg = load_config(base_config, [*extra, *(overrides or [])])
    out_dir.mkdir(parents=True, exist_ok=True)
    return save_config(cfg, out_dir / "config.yaml")


def _as_first_fingerprinted(cfg: dict) -> dict:
    """``cfg`` (a dumped config) as trainings were first fingerprinted: without the fields added since, where
    they hold their defaults (which reproduce the earlier behaviour), and with the fields removed since:
    finished trainings of a work dir made before stay valid, and a field that is set changes the
    fingerprint."""
    model, data = cfg.get("model", {}), cfg.get("data", {})
    if model.get("mask_lossweight") is False:
        model.pop("mask_lossweight")
    if model.get("roi_align") == "auto":
        model.pop("roi_align")
    augment = data.get("augment", {})
    if augment.get("strong") == StrongAugmentConfig().model_dump(mode="json"):
        augment.pop("strong")
    train = cfg.get("train", {})
    if train.get("mean_teacher") == MeanTeacherConfig().model_dump(mode="json"):
        train.pop("mean_teacher")
    for source in data.get("train", []):
        if source.get("augment") == "default":
            source.pop("augment")
        if source.get("background_weight") == 1.0:
            source.pop("background_weight")
    # fields removed since (never read by anything), put back as every config held them then
    train["nproc_per_node"] = 1
    cfg.setdefault("infer", {}).update(device="auto", tta_flips=[], tta_scales=[])
    return cfg


def training_fingerprint(config_path: Path, train_sets: list[dict], load_from: str | None = None) -> str:
    """What a finished training depends on: its resolved config (every section but ``fuse``, which no training
    reads, as canonical JSON: comments and key order do not count) and the contents of its annotation files
    and start checkpoint (a rewritten pseudo-label file under the same name counts as new)."""
    cfg = _as_first_fingerprinted(load_config(config_path).model_dump(mode="json", exclude={"fuse"}))
    h = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode())
    h.update(fingerprint(*[s["ann_file"] for s in train_sets], *([load_from] if load_from else [])).encode())
    return h.hexdigest()


def train_command(
    config_path: Path, work_dir: Path, nproc_per_node: int = 1, resume: bool = False, launcher=None
) -> list[str]:
    """The torchrun command line of one training (127.0.0.1 rendezvous on one node unless ``launcher``,
    a :class:`~i3cl_core.engine.launch.TorchrunLauncher`, says ``nnodes > 1``)."""
    return torchrun_command(config_path, work_dir, nproc_per_node, resume, launcher)


def iterations_per_epoch(work_dir: Path) -> int:
    """Iterations per epoch (per process) of a finished training, from its metrics.json: what a
    control run is given (``train.iters_per_epoch``) to train exactly as long on less data."""
    path = require(
        Path(work_dir) / "metrics.json", "training", f"the training in {work_dir} has not finished"
    )
    summary = json.loads(path.read_text())["summary"]
    iters, epochs = int(summary["iterations"]), int(summary["epochs"])
    if epochs < 1 or iters < epochs or iters % epochs:
        raise PipelineError(
            f"{path}: {iters} iterations over {epochs} epochs is not a whole number per epoch"
        )
    return iters // epochs


# ------------------------------------------------------------------------------------ ensemble
def plan_inference(images_json: str, img_root: str, shard_size: int) -> list[list[dict]]:
    """Shards of the unlabeled set as lists of {id, path, file_name} (JSON-able, for task inputs)."""
    items = collect_images(images_json, img_root)
    if not items:
        raise PipelineError(f"{images_json}: the unlabeled image set is empty")
    return [
        [{"id": it.image_id, "path": str(it.path), "file_name": it.file_name} for it in s.items]
        for s in plan_shards(items, shard_size)
    ]


def preflight(d: dict, workers: int = 8) -> dict:
    """Check every image of a pipeline's data (labeled sets, validation and test splits, unlabeled images)
    before any stage runs; all problems are raised at once (DatasetError)."""
    sources = [(s["ann_file"], s["img_root"]) for s in d["labeled"]]
    sources += [(d[k]["ann_file"], d[k]["img_root"]) for k in ("val", "test") if d.get(k)]
    sources.append((d["unlabeled_images"], d["unlabeled_root"]))
    result = check_sources(sources, workers)
    raise_on_problems(result)
    return {"images": result.images, "seconds": round(result.seconds, 2)}


def exported_members(paths: list[str]) -> dict[str, str]:
    """``{"exported-<stem>": path}`` of the exported models (``infer.exported_members``) that join the
    ensemble next to the teachers; a missing file is refused before any inference."""
    out = {}
    for p in paths:
        if not Path(p).is_file():
            raise PipelineError(f"infer.exported_members: {p}: no such file")
        name, k = f"exported-{Path(p).stem}", 2
        while name in out:
            name, k = f"exported-{Path(p).stem}-{k}", k + 1
        out[name] = str(Path(p).resolve())
    return out


def extra_members(specs: list[str], shards: list[list[dict]], out_dir) -> list[str]:
    """Member paths of other detectors' predictions (``infer.extra_members``) on the images of ``shards``;
    ``FORMAT:PATH`` entries are converted to COCO results in ``out_dir``."""
    images = [{"id": d["id"], "file_name": d["file_name"]} for shard in shards for d in shard]
    return [prepare_extra(spec, images, out_dir, k) for k, spec in enumerate(specs)]


def infer_shard(
    checkpoint: str,
    shard_index: int,
    shard: list[dict],
    out_dir: str,
    settings: ShardSettings,
    devices: str | list[str] = "auto",
    loader_workers: int = 2,
    dask_local: bool = False,
) -> dict:
    """One teacher on one shard -> ``out_dir/shard_NNNNN.json`` (atomic), on a free inference worker
    of this process (see :func:`i3cl_core.infer.workers.worker_devices`)."""
    s = Shard(shard_index, [ImageItem(d["id"], Path(d["path"]), d["file_name"]) for d in shard])
    return run_infer_shard(
        checkpoint, s, out_dir, settings, worker_devices(devices, dask_local), loader_workers
    )


def finish_model_predictions(pred_dir: Path, shards: list[list[dict]]) -> str:
    """Write coverage.json once every shard file of a model exists; returns the folder."""
    missing = [i for i in range(len(shards)) if not (pred_dir / Shard(i, []).name).exists()]
    if missing:
        raise PipelineError(f"{pred_dir}: shards {missing[:5]} are missing")
    atomic_write_json(pred_dir / COVERAGE, {"images": [d["id"] for s in shards for d in s]})
    return str(pred_dir)


# ------------------------------------------------------------------------------------ fusion
def fuse_stage(
    members: list[str],
    images_json: str,
    out: str,
    cfg,
    gt: str | None,
    img_root: str,
    val_members: list[str] | None = None,
    val_ann_file: str | None = None,
) -> dict:
    """Weighted Polygon Fusion into ``out``. With ``cfg.auto_keep_thr`` and the teachers' predictions
    on a labeled validation split (``val_members`` over ``val_ann_file``), ``keep_thr`` is chosen
    there first; ``gt`` (the unlabeled set's hidden ground truth) only measures the result. With a
    validation split, the selection's ``val`` is the fused labels' P/R/F there at the final ``keep_thr``
    (chosen or fixed): the pipeline's validation gate compares it with the models' F on that split."""
    chosen, val = None, None
    if cfg.auto_keep_thr and val_members and val_ann_file:
        chosen = choose_fusion(val_members, val_ann_file, cfg)
        cfg = with_keep_thr(cfg.model_copy(update={"min_votes": chosen["min_votes"]}), chosen["keep_thr"])
        val = chosen["val"]
    elif val_members and val_ann_file:
        val = quality_at_keep_thr(val_members, val_ann_file, cfg)
    selection = {
        "keep_thr": cfg.keep_thr,
        "min_votes": cfg.min_votes,
        "chosen_on": val_ann_file if chosen else None,
        "val": val,
        "val_sweep": chosen["sweep"] if chosen else None,
        # keys as JSON writes them (report.json, the flow's persisted result): strings
        "val_by_min_votes": {str(k): v for k, v in chosen["by_min_votes"].items()} if chosen else None,
    }
    summary = fuse_predictions(
        members,
        images_json,
        out,
        cfg,
        gt=gt,
        img_root=img_root,
        progress=False,
        report_extra={"keep_thr_selection": selection},
    )
    return {
        **summary,
        "keep_thr": cfg.keep_thr,
        "min_votes": cfg.min_votes,
        "keep_thr_chosen_on": selection["chosen_on"],
        "keep_thr_selection": selection,
    }


# ------------------------------------------------------------------------------------ evaluation
def evaluate_checkpoint(
    checkpoint: str,
    ann_file: str,
    img_root: str,
    out_json: str,
    protocol: str = "art",
    score_thr: float | None = None,
    device: str = "auto",
    precision: str = "auto",
) -> dict:
    """P/R/F of a checkpoint on a labeled split (at ``score_thr``, default the checkpoint's
    ``infer.score_thr``, plus the best threshold of a sweep) -> ``out_json``; in the precision that
    ``i3cl infer`` and the ensemble use (:mod:`i3cl_core.infer.precision`), so the score is the outputs'."""
    dev = resolve_device(device)
    model, cfg, prec = load_inference_model(checkpoint, dev, precision)
    ds = CocoTextDataset([(ann_file, img_root)], train=False)
    thr = cfg.infer.score_thr if score_thr is None else score_thr
    res = evaluate_model(model, ds, dev, protocol, thr)
    res.update(checkpoint=str(checkpoint), split=str(ann_file), inference_precision=prec)
    atomic_write_json(out_json, res, indent=2)
    return res
