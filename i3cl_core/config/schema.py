"""The configuration schema: one pydantic model per section (data, model, train, infer, fuse), every
field typed, with its range and a description."""

from __future__ import annotations

import logging
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from i3cl_core.evaluation.protocols import Protocol

_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logging.getLogger("i3cl.config").warning(message)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def renamed_key(data, section: str, old: str, new: str, meaning: str):
    """``data`` with the field ``old`` read as ``new`` (a note once per process; both at once are refused):
    the files, saved runs and scripts of earlier versions keep loading after a field is renamed."""
    if not isinstance(data, dict) or old not in data:
        return data
    if new in data:
        raise ValueError(f"{section}.{old} was renamed {section}.{new}; give only {new}")
    _log_once(
        f"{section}.{old} was renamed {section}.{new} ({meaning}); read as {new}, please rename the key"
    )
    return {(new if k == old else k): v for k, v in data.items()}


def _drop_removed(data, section: str, removed: dict[str, str]):
    """``data`` without the ``removed`` fields (name -> where the setting lives now), each dropped with a
    note: every run's resolved config.yaml written by an earlier version holds them, and it must still
    load."""
    if not isinstance(data, dict) or not removed.keys() & data.keys():
        return data
    for name in sorted(removed.keys() & data.keys()):
        _log_once(f"config: {section}.{name} is no longer read ({removed[name]}); ignored")
    return {k: v for k, v in data.items() if k not in removed}


# ----------------------------------------------------------------------------------------------
# data
class DatasetSource(_Strict):
    """One COCO annotation file and the folder its ``file_name`` entries are relative to."""

    ann_file: str = Field(description="COCO json with images, annotations (polygon/RLE), optional lossweight")
    img_root: str = Field(description="folder that the images' file_name entries are relative to")
    fraction: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="share of every training epoch drawn from this set, spread evenly over "
        "the batches (sets without one share the rest in proportion to their sizes); "
        "e.g. 0.5 for the pseudo labels",
    )
    augment: Literal["default", "strong", "online"] = Field(
        "default",
        description="default: data.augment's policies; strong: data.augment.strong (scale, translation, "
        "rotation, shear, colour, blur/noise, cutout), the noise a student needs on pseudo-labelled images; "
        "online: two views of each image, a weak one (flip, training resize) that train.mean_teacher labels "
        "and the same pixels under data.augment.strong's colour, blur/noise and cutout for the student",
    )
    background_weight: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="weight of the negative anchors and RoIs of this set's images in the "
        "classification losses: below 1 on pseudo-labelled images, where text no teacher found would "
        "otherwise be taught as confident background",
    )


class StrongAugmentConfig(_Strict):
    """The strong augmentation of sets with ``augment: strong`` (after the flip): one random affine map
    (scale, rotation, shear, translation) on the same canvas, then the training resize, colour operations,
    blur or noise, and cutout. Polygons follow the pixels exactly; instances that leave the image are
    dropped."""

    scale: tuple[float, float] = Field((0.5, 1.5), description="zoom range of the affine map")
    translate: float = Field(0.1, ge=0.0, le=0.5, description="largest shift, as a fraction of each side")
    rotate: float = Field(30.0, ge=0.0, le=180.0, description="largest rotation in degrees (either sign)")
    shear: float = Field(15.0, ge=0.0, le=45.0, description="largest shear in degrees (x and y, either sign)")
    affine_prob: float = Field(0.8, ge=0.0, le=1.0)
    color_prob: float = Field(
        0.8, ge=0.0, le=1.0, description="chance of random brightness/contrast/saturation"
    )
    color_strength: float = Field(0.4, ge=0.0, le=1.0, description="factors drawn from [1 - s, 1 + s]")
    blur_noise_prob: float = Field(
        0.3, ge=0.0, le=1.0, description="chance of a Gaussian blur or Gaussian noise"
    )
    cutout_prob: float = Field(0.5, ge=0.0, le=1.0)
    cutout_patches: tuple[int, int] = Field((1, 5), description="number of grey patches (min, max)")
    cutout_size: float = Field(
        0.2, ge=0.0, le=0.5, description="largest patch side as a fraction of the image side"
    )

    @field_validator("scale")
    @classmethod
    def _check_scale(cls, v):
        if not 0.05 <= v[0] <= v[1] <= 5.0:
            raise ValueError(f"needs 0.05 <= low <= high <= 5 (got {v})")
        return v

    @field_validator("cutout_patches")
    @classmethod
    def _check_patches(cls, v):
        if not 0 <= v[0] <= v[1] <= 32:
            raise ValueError(f"needs 0 <= min <= max <= 32 (got {v})")
        return v


class AugmentConfig(_Strict):
    """The training augmentations (docs/model.md)."""

    flip: Literal["original", "random", "none"] = Field(
        "original",
        description="original: every image is flipped, horizontally or vertically with p 0.5 each "
        "(the release's behaviour, docs/model.md); random: horizontal and vertical flips each with their "
        "own probability; none: no flips",
    )
    hflip_prob: float = Field(0.5, ge=0.0, le=1.0)
    vflip_prob: float = Field(0.5, ge=0.0, le=1.0)
    policies: Literal["r50", "vitae", "resize_only"] = Field(
        "r50",
        description="AutoAugment policy set: r50 (3 policies), vitae (4: adds resize only), resize_only",
    )
    rotate_prob: float = Field(0.5, ge=0.0, le=1.0)
    rotate_angles: tuple[float, float] = Field(
        (10.0, 15.0), description="rotation magnitude in degrees for policy 1 and policy 3"
    )
    rotate_fill: int = Field(128, ge=0, le=255)
    photometric_prob: float = Field(0.5, ge=0.0, le=1.0)
    photometric_factor: float = Field(1.54, gt=0.0, le=10.0)
    scales: list[tuple[int, int]] = Field(
        default_factory=lambda: [(800, 1800), (1000, 1800), (1200, 1800), (1400, 1800), (1600, 1800)],
        description="(short side, long-side cap) pairs; one is chosen uniformly per image",
    )
    min_instance_area: float = Field(
        4.0, ge=0.0, description="instances whose clipped polygon area (px^2) falls below this are dropped"
    )
    strong: StrongAugmentConfig = Field(
        default_factory=StrongAugmentConfig, description="the policy of training sets with augment: strong"
    )

    @field_validator("scales")
    @classmethod
    def _check_scales(cls, v: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if not v:
            raise ValueError("needs at least one (short, long_cap) pair")
        for short, cap in v:
            if short < 32 or cap < 32:
                raise ValueError(f"({short}, {cap}): both sides must be >= 32 pixels")
        return v


class DataConfig(_Strict):
    train: list[DatasetSource] = Field(default_factory=list, description="concatenated training sets")
    val: DatasetSource | None = None
    test: DatasetSource | None = None
    min_image_size: int = Field(32, ge=1, description="images whose shorter side is below this are dropped")
    dontcare: bool = Field(
        True, description="treat iscrowd/ignore annotations as do-not-care regions (False: drop them)"
    )
    num_workers: int = Field(2, ge=0, le=64)
    check_images: bool = Field(
        True,
        description="before training, check that every image exists, decodes its header and has the json's "
        "size (all problems listed at once; `i3cl check-data` runs the same check alone)",
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @model_validator(mode="after")
    def _check_fractions(self) -> DataConfig:
        given = [s.fraction for s in self.train if s.fraction is not None]
        total = sum(given)
        if total > 1.0 + 1e-9:
            raise ValueError(f"train: the fractions of the training sets add up to {total:.3f}, more than 1")
        if given and len(given) == len(self.train) and abs(total - 1.0) > 1e-6:
            raise ValueError(f"train: every set has a fraction but they add up to {total:.3f}, not 1")
        return self


# ----------------------------------------------------------------------------------------------
# model
class BackboneConfig(_Strict):
    name: str = Field(
        "resnet50",
        description="torchvision resnet18/34/50/101, 'timm:<model name>' for any timm features_only model, "
        "or vitaev2_s",
    )
    weights: str | None = Field(None, description="local path of pretrained weights (never downloaded)")
    frozen_stages: int = Field(1, ge=-1, le=4, description="-1: none; 0: stem; 1: stem + first stage; ...")
    norm_eval: bool = Field(
        True, description="keep BatchNorm running statistics frozen (affine stays trainable)"
    )
    drop_path_rate: float = Field(
        0.3, ge=0.0, lt=1.0, description="vitaev2_s only: stochastic depth of the last block"
    )
    grad_checkpointing: bool = Field(
        False, description="vitaev2_s only: recompute each cell in the backward pass (less memory, slower)"
    )


class InterCLConfig(_Strict):
    token_channels: int = Field(32, ge=1)
    token_pool: int = Field(3, ge=1)
    layers: int = Field(3, ge=1, le=24)
    heads: int = Field(4, ge=1)
    ffn_dim: int = Field(2048, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


class ModelConfig(_Strict):
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    fpn_channels: int = Field(256, ge=8, le=1024)
    intra_cl: bool = Field(True, description="IntraCL blocks on P2-P6")
    inter_cl: bool = Field(True, description="InterCL block on the mask branch")
    inter_cl_cfg: InterCLConfig = Field(default_factory=InterCLConfig)
    num_classes: int = Field(1, ge=1, description="foreground classes (1 = text)")
    representation_size: int = Field(1024, ge=8, description="width of the box head's two FC layers")
    mask_head_convs: int = Field(4, ge=1, le=8)
    bf16_features: bool | Literal["auto"] = Field(
        False,
        description="run backbone, FPN and IntraCL under bfloat16 autocast (heads, boxes and losses stay "
        "float32); 'auto': only where the device computes bfloat16 natively (CPUs with AVX512-BF16/AMX, "
        "CUDA with bf16 support), elsewhere it would be slower",
    )
    channels_last: bool = Field(
        False, description="NHWC memory format for the convolutions (faster with oneDNN on CPU)"
    )
    roi_align: Literal["auto", "torchvision", "sparse"] = Field(
        "auto",
        description="RoIAlign of the box and mask poolers: torchvision's kernel, or the same operation as "
        "one sparse matrix product (i3cl_core/model/roi_align.py; 2-5x faster on CPU with its "
        "backward); 'auto': sparse on CPU, torchvision elsewhere. Both give the same values",
    )
    # RPN
    anchor_sizes: list[int] = Field(default_factory=lambda: [32, 64, 128, 256, 512])
    anchor_ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_pre_nms_top_n_train: int = Field(2000, ge=1)
    rpn_pre_nms_top_n_test: int = Field(1000, ge=1)
    rpn_post_nms_top_n_train: int = Field(1000, ge=1)
    rpn_post_nms_top_n_test: int = Field(1000, ge=1)
    rpn_nms_thresh: float = Field(0.7, gt=0.0, le=1.0)
    rpn_batch_size_per_image: int = Field(256, ge=1)
    rpn_positive_fraction: float = Field(0.5, gt=0.0, le=1.0)
    # RoI heads
    box_batch_size_per_image: int = Field(512, ge=1)
    box_positive_fraction: float = Field(0.25, gt=0.0, le=1.0)
    dontcare_iof_thr: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="anchors/RoIs covered more than this by a do-not-care region are ignored",
    )
    ignore_dontcare: bool = Field(
        True, description="False reproduces the release (do-not-care is background)"
    )
    mask_lossweight: bool = Field(
        False,
        description="scale each positive's mask loss by its instance's lossweight too "
        "(the release weights only the classification and box terms)",
    )
    # test
    score_thr: float = Field(0.05, ge=0.0, le=1.0)
    nms_thr: float = Field(0.35, gt=0.0, le=1.0)
    max_detections: int = Field(100, ge=1)
    mask_thr: float = Field(0.5, gt=0.0, lt=1.0)
    test_short_side: int = Field(1185, ge=32)
    test_long_side: int = Field(1950, ge=32)
    size_divisible: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.inter_cl:
            d = self.inter_cl_cfg.token_channels * self.inter_cl_cfg.token_pool**2
            if d % self.inter_cl_cfg.heads:
                raise ValueError(
                    f"inter_cl_cfg: token_channels*token_pool^2 = {d} must be divisible by heads = "
                    f"{self.inter_cl_cfg.heads}"
                )
        if len(self.anchor_sizes) != 5:
            raise ValueError(
                f"anchor_sizes: needs 5 sizes, one per level P2-P6 (got {len(self.anchor_sizes)})"
            )
        return self


# ----------------------------------------------------------------------------------------------
# training, inference, fusion, pipeline
class MeanTeacherConfig(_Strict):
    """Online pseudo labels (a mean teacher, as in Unbiased Teacher): an exponential moving average of the
    student's weights labels the weak view of each image of the ``augment: online`` sets, and the student
    learns those labels on the strong view. Before ``burn_in_iters`` the sets' own (fused) labels are used.
    Without an online set it is a plain average of the weights (the model that is saved and evaluated): the
    fair control of an online run."""

    enabled: bool = False
    ema_decay: float = Field(
        0.99,
        gt=0.0,
        lt=1.0,
        description="weight of the old average at each step (0.99: about the last 100 steps)",
    )
    burn_in_iters: int = Field(
        300, ge=0, description="iterations on the sets' own labels before the teacher's replace them"
    )
    score_thr: float = Field(0.7, gt=0.0, le=1.0, description="teacher detections kept as pseudo labels")
    ignore_thr: float | None = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="teacher detections scored in [ignore_thr, score_thr) become "
        "do-not-care regions (neither text nor background); None: they are background",
    )

    @model_validator(mode="after")
    def _check_thresholds(self) -> MeanTeacherConfig:
        if self.ignore_thr is not None and self.ignore_thr > self.score_thr:
            raise ValueError(f"ignore_thr: needs <= score_thr ({self.ignore_thr} > {self.score_thr})")
        return self


class TrainConfig(_Strict):
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0)
    betas: tuple[float, float] = (0.9, 0.999)
    no_decay_keys: list[str] = Field(
        default_factory=list,
        description="parameter-name substrings excluded from weight decay (AdamW recipe)",
    )
    epochs: int = Field(12, ge=1, le=10000)
    lr_steps: list[int] = Field(default_factory=lambda: [8, 11], description="epochs after which lr x= gamma")
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    warmup_iters: int = Field(1000, ge=0)
    warmup_ratio: float = Field(0.001, gt=0.0, le=1.0)
    batch_size: int = Field(2, ge=1, le=1024, description="images per process")
    grad_clip: float | None = Field(None, gt=0.0)
    amp: bool = Field(False, description="mixed precision (CUDA only; ignored on CPU)")
    checkpoint_interval_iters: int = Field(0, ge=0, description="0: only at epoch ends")
    keep_last: int = Field(3, ge=1)
    load_from: str | None = Field(None, description="checkpoint to start from (non-strict)")
    eval_interval: int = Field(1, ge=0, description="epochs between evaluations on data.val (0: never)")
    eval_protocol: Protocol = "art"
    seed: int = Field(0, ge=0)
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N (under torchrun: cuda:LOCAL_RANK)")
    log_interval: int = Field(20, ge=1)
    sync_bn: bool = Field(
        False, description="SyncBatchNorm for the BN layers outside the backbone under DDP (CUDA)"
    )
    tensorboard: bool = Field(
        False, description="also write TensorBoard scalars to work_dir/tb (train/*, val/*)"
    )
    max_iters_per_epoch: int | None = Field(
        None, ge=1, description="cap on iterations per epoch (quick runs)"
    )
    iters_per_epoch: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="exact iterations per epoch, whatever the dataset size (further "
        "shuffled passes follow when one pass is shorter): equal training budgets on datasets of "
        "different sizes",
    )
    mean_teacher: MeanTeacherConfig = Field(default_factory=MeanTeacherConfig)

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data):
        return _drop_removed(
            data,
            "train",
            {"nproc_per_node": "the pipeline's train.nproc_per_node parameter, or torchrun's own"},
        )


class InferConfig(_Strict):
    score_thr: float = Field(0.45, ge=0.0, le=1.0, description="output filter on box score (ArT demo: 0.45)")
    batch_size: int = Field(1, ge=1, le=256)
    polygon_epsilon: float = Field(0.005, ge=0.0, le=0.5, description="approxPolyDP epsilon x perimeter")

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data):
        tta = "test-time augmentation is the pipeline's infer.tta_flips / infer.tta_scales parameters"
        return _drop_removed(
            data,
            "infer",
            {
                "device": "`i3cl infer --device`, the pipeline's infer.devices parameter",
                "tta_flips": tta,
                "tta_scales": tta,
            },
        )


class FuseConfig(_Strict):
    iou_thr: float = Field(0.55, gt=0.0, le=1.0)
    skip_thr: float = Field(0.05, ge=0.0, le=1.0)
    keep_thr: float = Field(0.6, ge=0.0, le=1.0, description="minimum fused score of a pseudo label")
    auto_keep_thr: bool = Field(
        True,
        description="with a labeled validation split, keep_thr is the fused score threshold with the best F "
        "on it (the teachers run over that split too); without one, keep_thr as given",
    )
    keep_thr_beta: float = Field(
        1.0,
        gt=0.0,
        le=4.0,
        description="auto_keep_thr maximises F-beta on the validation split: 1 is F; below 1 "
        "favours precision (0.5: precision counts twice as much as recall), as detection self-training "
        "keeps labels for precision",
    )
    min_votes: int = Field(
        2, ge=1, description="minimum number of models in a cluster (capped at the number of models)"
    )
    auto_min_votes: bool = Field(
        True,
        description="with auto_keep_thr and a labeled validation split, min_votes is chosen there too: every "
        "value from 1 to the number of models, each with its own best keep_thr, the best F-beta winning "
        "(ties: more votes); without a validation split, min_votes as given",
    )
    conf_type: Literal["avg", "max", "box_and_model_avg", "absent_model_aware_avg", "model_max_avg"] = Field(
        "max",
        description="fused score as in ensemble-boxes WBF; the defaults (max, min_votes 2, keep_thr 0.6) "
        "beat the best single teacher on the demo data, where avg needed keep_thr near 0.35; "
        "model_max_avg: the mean over the models of each one's best score in the cluster "
        "(agreement counts, a model's duplicates do not)",
    )
    model_weights: list[float] | None = None
    uncertain_band: tuple[float, float] | None = Field(
        (0.2, 0.6),
        description="(low, high): clusters not kept whose fused score is in [low, high), or >= low with "
        "too few votes, become do-not-care regions instead of being dropped (the student is not taught "
        "they are background); null drops them. With auto_keep_thr, high follows the chosen keep_thr",
    )
    lossweight_formula: Literal["score_x_votes", "score", "votes", "one"] = Field(
        "score_x_votes",
        description="each kept pseudo label's lossweight: fused score x votes / number of models, "
        "the fused score, votes / number of models, or 1",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        meaning = "the formula that gives each pseudo label its lossweight"
        return renamed_key(data, "fuse", "lossweight", "lossweight_formula", meaning)

    @model_validator(mode="after")
    def _check_band(self) -> FuseConfig:
        if self.model_weights is not None and any(
            (not math.isfinite(w)) or w <= 0 for w in self.model_weights
        ):
            raise ValueError("model_weights: every weight must be finite and > 0")
        if self.uncertain_band is not None:
            lo, hi = self.uncertain_band
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"uncertain_band: needs 0 <= low <= high <= 1 (got {self.uncertain_band})")
        return self


class I3CLConfig(_Strict):
    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data):
        # configs written by earlier versions (every run's resolved config.yaml) hold a pipeline section that
        # was never read: drop it with a note rather than refuse the file
        if isinstance(data, dict) and "pipeline" in data:
            _log_once(
                "config: the 'pipeline' section is no longer used (the pipeline takes its settings as flow "
                "parameters); ignored"
            )
            data = {k: v for k, v in data.items() if k != "pipeline"}
        return data

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    infer: InferConfig = Field(default_factory=InferConfig)
    fuse: FuseConfig = Field(default_factory=FuseConfig)
