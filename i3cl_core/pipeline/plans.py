"""What the ensemble, fusion and student stages will do, decided from the work dir and the settings before
anything runs: their inputs, the folders and variant keys of their outputs, and the lineage they record. The
flows run these plans as cached tasks; a script can run them without Prefect."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from i3cl_core.config import FuseConfig
from i3cl_core.pipeline import variants
from i3cl_core.pipeline.errors import PipelineError, require
from i3cl_core.pipeline.params import InferParams, TrainParams
from i3cl_core.pipeline.stages import (
    exported_members,
    extra_members,
    finish_model_predictions,
    plan_inference,
)
from i3cl_core.pipeline.workdir import EXTRA, MEMBERS, PLAN, WorkDir
from i3cl_core.utils import atomic_write_json, fingerprint


@dataclass(frozen=True)
class SplitPlan:
    name: str  # "unlabeled", or "val" (the labeled validation split, where keep_thr is chosen)
    pred_root: Path  # predictions/ or predictions_val/ of the round
    shards: list[list[dict]]  # the split's images, cut into shards (one task per model and shard)
    extra: list[str]  # other detectors' predictions on this split (infer.extra_members / extra_val_members)


@dataclass(frozen=True)
class EnsemblePlan:
    models: dict[str, str]  # name -> checkpoint (or exported model) of every ensemble member
    splits: list[SplitPlan]


def plan_ensemble(
    layout: WorkDir, data: dict, infer: InferParams, ssl_round: int = 1, with_teachers: bool = True
) -> EnsemblePlan:
    """Round ``ssl_round``'s ensemble (round 1: the teachers; round r > 1: round r-1's student, plus the
    teachers with ``with_teachers``; then any exported members) over the unlabeled images and, where the run
    has one, the validation split; each split's shards recorded in its ``plan.json``."""
    models = {**layout.ensemble_models(ssl_round, with_teachers), **exported_members(infer.exported_members)}
    val = data.get("val")
    if val and len(infer.extra_members) != len(infer.extra_val_members):
        raise PipelineError(
            "infer.extra_members: with a validation split, give the same detectors' predictions on it "
            "in infer.extra_val_members (same order), so that keep_thr is chosen on the same ensemble"
        )
    sources = [("unlabeled", data["unlabeled_images"], data["unlabeled_root"], infer.extra_members)]
    if val:
        sources.append(("val", val["ann_file"], val["img_root"], infer.extra_val_members))
    splits = []
    for name, images, root, extra in sources:
        shards = plan_inference(images, root, infer.shard_size)
        pred_root = layout.predictions(ssl_round, name)
        atomic_write_json(pred_root / PLAN, {"shards": len(shards), "images": sum(len(x) for x in shards)})
        splits.append(SplitPlan(name, pred_root, shards, list(extra)))
    return EnsemblePlan(models, splits)


def finish_split(split: SplitPlan, models: dict[str, str]) -> list[str]:
    """The members of one split once its shards are done: each model's predictions checked complete and
    joined, the extra detectors' converted; listed in the split's ``members.json``, which fusion reads."""
    members = [finish_model_predictions(split.pred_root / name, split.shards) for name in models]
    members += extra_members(split.extra, split.shards, split.pred_root / EXTRA)
    atomic_write_json(split.pred_root / MEMBERS, members, indent=2)
    return members


@dataclass(frozen=True)
class FusionPlan:
    members: list[str]  # each ensemble member's predictions on the unlabeled images
    val_members: list[str] | None  # ... and on the validation split, where keep_thr is chosen
    members_fingerprint: str
    fuse_params: dict  # the FuseConfig as the variant key and the cache see it
    key: str  # the variant: pseudo/<key>/
    out: Path  # pseudo/<key>/train_lossweight.json

    @property
    def pseudo_dir(self) -> Path:
        return self.out.parents[1]


def plan_fusion(layout: WorkDir, data: dict, fuse: FuseConfig, ssl_round: int = 1) -> FusionPlan:
    """The ensemble's members of round ``ssl_round`` (and their validation predictions where the run has a
    validation split), checked against each other, and the variant their fusion with ``fuse`` makes: every
    variant of the pseudo labels has its own folder, keyed by what it is made from, so re-fusing with other
    parameters adds a variant and overwrites nothing."""
    members_file = require(
        layout.members_file(ssl_round), "ensemble-inference", "run ensemble-inference first"
    )
    members = json.loads(members_file.read_text())
    val_file = layout.members_file(ssl_round, "val")
    val_members = json.loads(val_file.read_text()) if data.get("val") and val_file.exists() else None
    if val_members is not None and len(val_members) != len(members):
        raise PipelineError(
            f"{members_file} lists {len(members)} members but {val_file} {len(val_members)}: re-run "
            "ensemble-inference (infer.extra_members and infer.extra_val_members pair up)"
        )
    if fuse.auto_keep_thr and data.get("val") and val_members is None:
        raise PipelineError(
            f"missing {val_file}: re-run ensemble-inference (it also runs the ensemble over the "
            "validation split, on which fuse.auto_keep_thr chooses keep_thr)"
        )
    members_fp = fingerprint(*members, *(val_members or []))
    # keep_thr_beta at its default (F) is left out: pseudo labels fused before it existed keep their key and
    # cache
    fuse_params = fuse.model_dump(
        mode="json", exclude={"keep_thr_beta"} if fuse.keep_thr_beta == 1.0 else None
    )
    key = variants.variant_key(
        members=members_fp,
        fuse=fuse_params,
        images=fingerprint(data["unlabeled_images"]),
        val=fingerprint(data["val"]["ann_file"]) if val_members else None,
    )
    out = layout.pseudo_file(ssl_round, key)
    return FusionPlan(members, val_members, members_fp, fuse_params, key, out)


# the pseudo-labelled images' augmentation and background weight of every student trained before the two
# were settings (and so left out of its key); the defaults have since changed to strong and 0.5
NOISE_BEFORE_KEYED = {"augment": "default", "background_weight": 1.0}


@dataclass(frozen=True)
class StudentPlan:
    name: str  # the training's name (round r > 1: <student>-r<r>)
    out: Path  # student/<name>/<key>/
    key: str
    extra_sets: list[dict]  # the pseudo-labelled set next to the labeled ones
    load_from: str | None
    overrides: list[str]  # --set overrides on top of the student's own
    pseudo: dict  # the pseudo labels' lineage: variant, path, fingerprint, fuse settings
    spec: dict  # what the student's key is made of (its control's key shares it)

    @property
    def root(self) -> Path:
        return self.out.parent


def plan_student(
    layout: WorkDir,
    data: dict,
    train: TrainParams,
    ssl_round: int = 1,
    extra_overrides: list[str] | None = None,
) -> StudentPlan:
    """Round ``ssl_round``'s student: the current pseudo labels of that round next to the labeled data,
    starting from the first teacher (round 1, ``train.student_init``) or the previous round's student. Each
    student has its own folder, keyed by what it is trained from and on: re-training after a re-fusion keeps
    the earlier student (and its lineage and score)."""
    overrides = list(extra_overrides or [])
    if train.pseudo_augment == "online":  # the student and its control are both saved as a weight average
        overrides.append("train.mean_teacher.enabled=true")
    pseudo_dir = layout.pseudo_dir(ssl_round)
    pseudo = variants.pseudo_file(pseudo_dir)
    if pseudo is None:
        raise PipelineError(f"{pseudo_dir}: no pseudo labels; run fuse-pseudo-labels first")
    load_from = None
    if ssl_round > 1:
        load_from = layout.student_checkpoint(ssl_round - 1)
    elif train.student_init == "first_teacher":
        load_from = layout.teachers()[train.teachers[0].name]
    extra_sets = [
        {
            "ann_file": str(pseudo),
            "img_root": data["unlabeled_root"],
            "fraction": train.pseudo_fraction,
            "augment": train.pseudo_augment,
            "background_weight": train.pseudo_background_weight,
        }
    ]
    lineage_pseudo = {
        "variant": variants.current_variant(pseudo_dir),
        "path": str(pseudo),
        "fingerprint": fingerprint(pseudo),
        "fuse": json.loads(pseudo.read_text()).get("info", {}).get("fuse"),
    }
    spec = {
        "spec": train.student.model_dump(),
        "overrides": [*train.overrides, *overrides],
        "load_from": fingerprint(load_from) if load_from else None,
    }
    noise = {
        k: v
        for k, v in (("augment", train.pseudo_augment), ("background_weight", train.pseudo_background_weight))
        if v != NOISE_BEFORE_KEYED[k]
    }  # only what differs from the settings of the students keyed before these existed: their keys stay valid
    key = variants.variant_key(
        pseudo=lineage_pseudo["fingerprint"], fraction=train.pseudo_fraction, **noise, **spec
    )
    name = train.student.name if ssl_round == 1 else f"{train.student.name}-r{ssl_round}"
    out = layout.student_dir(ssl_round) / train.student.name / key
    return StudentPlan(name, out, key, extra_sets, load_from, overrides, lineage_pseudo, spec)


@dataclass(frozen=True)
class ControlPlan:
    name: str
    out: Path  # control/<student name>/<key>/
    key: str
    overrides: list[str]

    @property
    def root(self) -> Path:
        return self.out.parent


def plan_control(
    layout: WorkDir, train: TrainParams, student: StudentPlan, iters_per_epoch: int
) -> ControlPlan:
    """The student's control: its config, start and number of iterations (``iters_per_epoch`` of the trained
    student), on the labeled data alone."""
    key = variants.variant_key(iters_per_epoch=iters_per_epoch, **student.spec)
    return ControlPlan(
        f"control-{train.student.name}",
        layout.control_dir / train.student.name / key,
        key,
        [*student.overrides, f"train.iters_per_epoch={iters_per_epoch}"],
    )
