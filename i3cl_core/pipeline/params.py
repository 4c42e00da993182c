"""Typed flow parameters (the Prefect UI renders them as forms; bad values are refused before a run
is created, naming the field)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from i3cl_core.config import DatasetSource, FuseConfig  # noqa: F401  (FuseConfig re-exported: the fuse stage's)
from i3cl_core.config.schema import renamed_key
from i3cl_core.engine.launch import SlurmLauncher, TorchrunLauncher
from i3cl_core.evaluation.protocols import Protocol
from i3cl_core.infer.loop import is_exported
from i3cl_core.infer.shards import ShardSettings

DEMO_CONFIGS = "configs/demo"


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataParams(_Params):
    """Where the labeled, unlabeled and test data are. Unset paths mean the built-in synthetic demo
    data under ``demo_dir`` (generated when missing)."""

    demo_dir: str = Field("data/demo", description="folder of the synthetic demo data")
    demo_seed: int = Field(0, ge=0)
    demo_size: int = Field(320, ge=64, le=2048, description="side of the square demo images")
    demo_train: int = Field(
        25, ge=1, le=100000, description="labeled demo images (scarce: where pseudo labels help)"
    )
    demo_unlabeled: int = Field(300, ge=1, le=100000)
    demo_val: int = Field(
        25, ge=0, le=100000, description="labeled demo validation images (fusion threshold)"
    )
    demo_test: int = Field(100, ge=1, le=100000)
    labeled: list[DatasetSource] | None = Field(
        None, description="labeled training sets (default: demo train split)"
    )
    val: DatasetSource | None = Field(
        None,
        description="labeled validation split on which fuse.auto_keep_thr chooses the "
        "fusion threshold (default: the demo's val split; none for your own data unless given)",
    )
    unlabeled_images: str | None = Field(None, description="IMAGES.json of the unlabeled set")
    unlabeled_root: str | None = Field(None, description="image root of the unlabeled set")
    unlabeled_gt: str | None = Field(
        None, description="hidden ground truth of the unlabeled set (quality report only)"
    )
    test: DatasetSource | None = Field(None, description="test split for the final table")

    def uses_demo(self) -> bool:
        return self.labeled is None or self.unlabeled_images is None or self.test is None

    @model_validator(mode="after")
    def _splits_have_no_training_fields(self):
        for name in ("val", "test"):
            split = getattr(self, name)
            fields = DatasetSource.model_fields
            extra = [
                k
                for k in fields
                if k not in ("ann_file", "img_root") and split and getattr(split, k) != fields[k].default
            ]
            if extra:
                raise ValueError(
                    f"data.{name}: {', '.join(extra)}: only training sets (data.labeled) take these"
                )
        return self


class ModelSpec(_Params):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="folder name under teachers/ or student/"
    )
    config: str = Field(description="training config (YAML)")
    overrides: list[str] = Field(
        default_factory=list, description="--set style overrides, e.g. train.epochs=3"
    )


def _demo_teachers() -> list[ModelSpec]:
    # two different detectors (I3CL and plain Mask R-CNN): teacher_b (IntraCL only) is a third member where
    # time allows
    return [ModelSpec(name=n, config=f"{DEMO_CONFIGS}/{n}.yaml") for n in ("teacher_a", "teacher_c")]


class TrainParams(_Params):
    teachers: list[ModelSpec] = Field(default_factory=_demo_teachers, min_length=1)
    student: ModelSpec = Field(
        default_factory=lambda: ModelSpec(name="student", config=f"{DEMO_CONFIGS}/student.yaml")
    )
    student_init: Literal["first_teacher", "scratch"] = Field(
        "first_teacher",
        description="initialise the student from the first teacher (as the paper's ssl stage starts "
        "from the mixtrain model) or from scratch",
    )
    pseudo_fraction: float | None = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="share of every student batch drawn from the pseudo-labelled images, the "
        "rest from the labeled sets (null: all images alike, so scarce labels are drowned out)",
    )
    pseudo_augment: Literal["default", "strong", "online"] = Field(
        "strong",
        description="augmentation of the pseudo-labelled images in the student's training: default (the "
        "config's policies), strong (data.augment.strong: scale, shift, rotation, shear, colour, blur/noise, "
        "cutout; with soft background, +2.9 F over the control on 3 seeds of bench_ssl) or online "
        "(a mean teacher, train.mean_teacher in the config, relabels them as the student "
        "learns on a strongly coloured, blurred and cut-out view; the control keeps the same weight average)",
    )
    pseudo_background_weight: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="weight of the negatives on pseudo-labelled images (below 1: text no "
        "teacher found is not taught as confident background; 0.25 cost precision in bench_ssl)",
    )
    control: bool = Field(
        True,
        description="also train a control: the student's config, start and number of "
        "iterations on the labeled data only (what the pseudo labels are measured against)",
    )
    nproc_per_node: int = Field(1, ge=1, le=64, description="torchrun processes per training (per node)")
    launcher: TorchrunLauncher | SlurmLauncher = Field(
        default_factory=TorchrunLauncher,
        discriminator="kind",
        description="how trainings start: torchrun on this machine "
        "(kind: torchrun; nnodes, rdzv_endpoint for a static multi-node run) "
        "or a Slurm batch job per training (kind: slurm; nodes, gpus_per_node, time, partition, account)",
    )
    overrides: list[str] = Field(
        default_factory=list, description="--set overrides applied to every training"
    )


class InferParams(_Params):
    shard_size: int = Field(64, ge=1, le=100000, description="images per inference shard (one task each)")
    min_score: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="the ensemble keeps each member's detections with score >= this as candidates for "
        "fusion (low on purpose; fuse.skip_thr and keep_thr decide later; not the config's infer.score_thr, "
        "a model's output filter)",
    )
    score_thr: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        exclude=True,
        description="the earlier name of min_score, read as min_score (kept so that saved runs and scripts "
        "still validate; give min_score)",
    )
    devices: Literal["auto"] | list[Annotated[str, Field(pattern=r"^(cpu|cuda(:[0-9]+)?)$")]] = Field(
        "auto",
        description="inference workers, one per entry: 'auto' (every visible GPU, else the CPU) or a list "
        "such as ['cuda:0', 'cuda:1'] or ['cpu', 'cpu']",
    )
    batch_size: int = Field(4, ge=1, le=256, description="images per forward pass")
    loader_workers: int = Field(2, ge=0, le=64, description="image-decoding threads per inference worker")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="precision of backbone, FPN and IntraCL (heads stay float32) - auto: float16 on CUDA, "
        "bfloat16 on CPUs that compute it natively, else float32",
    )
    dask_address: str | None = Field(
        None, description="tcp://host:8786 of a running Dask scheduler to run shards on"
    )
    dask_workers: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="start a local Dask cluster of this many "
        "worker processes (one device each) for this stage, and stop it after",
    )
    dask_resource: str | None = Field(
        "GPU",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Dask worker resource "
        "each shard task requests one unit of (workers started with --resources GPU=1 "
        "run one shard at a time); null: no resource request",
    )
    tta_flips: list[Literal["h", "v"]] = Field(default_factory=list)
    tta_scales: list[int] = Field(default_factory=list)
    extra_members: list[str] = Field(
        default_factory=list,
        description="predictions of other detectors on the unlabeled images, fused next to the teachers: "
        "a COCO results or ArT json, or FORMAT:PATH with FORMAT paddleocr, rapidocr, doctr or mmocr",
    )
    exported_members: list[str] = Field(
        default_factory=list,
        description="exported models (.onnx files from `i3cl export`) run over the unlabeled images (and the "
        "validation split) next to the teachers, by onnxruntime on the CPU",
    )
    extra_val_members: list[str] = Field(
        default_factory=list,
        description="the same detectors on the labeled validation split, in the same order (needed when a "
        "validation split chooses keep_thr)",
    )

    def shard_settings(self) -> ShardSettings:
        """What this stage's shard files depend on besides their images and models."""
        return ShardSettings(
            score_thr=self.min_score,
            flips=tuple(self.tta_flips),
            scales=tuple(self.tta_scales),
            batch_size=self.batch_size,
            precision=self.precision,
        )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        data = renamed_key(  # saved deployments and scripts of earlier versions
            data,
            "infer",
            "score_thr",
            "min_score",
            "the ensemble's candidate threshold; a model's output filter is the config's infer.score_thr",
        )
        if isinstance(data, dict):
            if "device" in data:
                raise ValueError(
                    "infer.device was replaced by infer.devices: "
                    "'auto' or a list such as ['cuda:0', 'cuda:1']"
                )
            if "workers" in data:
                raise ValueError(
                    "infer.workers was replaced by infer.devices: one inference worker per listed device "
                    "(['cpu', 'cpu'] for two on the CPU)"
                )
        return data

    @model_validator(mode="after")
    def _extras_pair(self):
        if self.dask_address and self.dask_workers:
            raise ValueError(
                "infer.dask_address and infer.dask_workers: give one (an existing scheduler, or a local "
                "cluster the stage starts), not both"
            )
        if isinstance(self.devices, list) and not self.devices:
            raise ValueError("infer.devices: the list is empty; give 'auto' or at least one device")
        bad = [m for m in self.exported_members if not is_exported(m)]
        if bad:
            raise ValueError(
                f"infer.exported_members: {bad[0]} is not an .onnx file (export a checkpoint with "
                "`i3cl export CHECKPOINT --out MODEL.onnx`)"
            )
        if self.exported_members and (self.tta_flips or self.tta_scales):
            raise ValueError(
                "infer.exported_members: test-time augmentation (tta_flips, tta_scales) is not available "
                "for exported models; leave it empty or use checkpoints"
            )
        if self.extra_val_members and len(self.extra_val_members) != len(self.extra_members):
            raise ValueError(
                f"extra_val_members: {len(self.extra_val_members)} entries for "
                f"{len(self.extra_members)} extra_members; give one per extra member, same order"
            )
        return self


class RoundParams(_Params):
    """Rounds 2, 3, ... of iterated self-training: the previous round's student (plus, optionally, the
    teachers) is the ensemble that labels the unlabeled set again."""

    with_teachers: bool = Field(
        True, description="keep the teachers in the ensemble next to the previous student"
    )
    fuse: FuseConfig | None = Field(
        None, description="fusion settings for these rounds (default: the first round's)"
    )
    student_overrides: list[str] = Field(
        default_factory=list, description="--set overrides for these rounds' students"
    )


class EvalParams(_Params):
    protocol: Protocol = "art"
    score_thr: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="one threshold for every model (default: chosen per model, see threshold)",
    )
    threshold: Literal["val", "config"] = Field(
        "val",
        description="val: each model's best-F threshold on the labeled validation split "
        "(when the run has one; as a user would choose it, never on the test or unlabeled labels); "
        "config: each model's infer.score_thr",
    )
