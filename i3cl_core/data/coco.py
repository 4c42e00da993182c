"""COCO polygon datasets for text detection.

One :class:`CocoTextDataset` concatenates one or more (annotation file, image root) pairs. It reads
these fields: ``segmentation`` (polygon list or RLE), ``bbox``, ``iscrowd`` or
``ignore`` (do-not-care regions), and an optional per-annotation ``lossweight`` (default 1.0). The
original release's files (``data/art/train.json`` + ``train_images/``, ``*_lossweight.json``) load
unchanged.

Problems are handled in two ways:

* structural errors (malformed json, missing fields, an annotation whose image id is unknown, a
  ``file_name`` that escapes its image root, a bad ``lossweight``, a missing image) raise
  :class:`DatasetError` naming the file and the image or annotation id;
* geometric problems (a polygon with fewer than 3 points, a self-intersecting or zero-area polygon)
  are repaired when possible and dropped otherwise, counted in :class:`LoadReport` and logged once
  per dataset.

Each sample is ``(image, target)``: a float tensor [3, H, W] in [0, 1] (RGB) and a dict with
``instances`` (an :class:`~i3cl_core.structures.Instances` of the text instances: ``boxes`` [N, 4]
(x1, y1, x2, y2), ``labels`` [N] (1 = text), ``polygons`` (N lists of (K, 2) arrays), ``lossweight`` [N],
``ann_id`` [N]), ``dontcare`` (``boxes`` [M, 4] and ``polygons`` of the do-not-care regions),
``image_id``, ``file_name``, ``orig_size`` (H, W), ``seed`` (of the model's anchor and RoI sampling for
this image) and ``index``. The fields of an instance travel together, so a weight can never shift
against its box.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from i3cl_core.data.errors import DatasetError
from i3cl_core.data.image_io import read_image as decode_image
from i3cl_core.data.polygons import (
    flat_to_polygon,
    instance_area,
    instance_box,
    mask_to_instance,
    repair_polygon,
)
from i3cl_core.data.validate import bbox_value, coco_images, far_outside
from i3cl_core.structures import Instances
from i3cl_core.utils import get_logger, read_json, safe_join

if TYPE_CHECKING:
    from i3cl_core.data.transforms import Sample

log = get_logger("data")


@dataclass
class TextInstance:
    """One ground-truth text instance of a dataset image, as the loader keeps it (the model sees the image's
    instances together as :class:`~i3cl_core.structures.Instances`)."""

    parts: list  # list of (K, 2) float32 polygons
    iscrowd: bool
    lossweight: float
    ann_id: int


@dataclass
class ImageRecord:
    image_id: int
    path: Path
    file_name: str
    width: int
    height: int
    instances: list[TextInstance]
    source: int  # index of the (ann_file, img_root) pair


@dataclass
class LoadReport:
    """What loading one annotation file kept, repaired and dropped."""

    ann_file: str
    images: int = 0
    images_kept: int = 0
    images_too_small: int = 0
    images_without_text: int = 0
    annotations: int = 0
    care: int = 0
    dontcare: int = 0
    repaired: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict = field(default_factory=dict)  # reason -> first few annotation ids ("repaired" too)

    def note(self, reason: str, ann_id) -> None:
        if reason != "repaired":
            self.dropped[reason] += 1
        ids = self.examples.setdefault(reason, [])
        if len(ids) < 5:
            ids.append(ann_id)

    def summary(self) -> str:
        dropped = ", ".join(
            f"{n} {reason.replace('_', ' ')} "
            f"(annotation ids {', '.join(map(str, self.examples.get(reason, [])))}"
            + (", ..." if n > len(self.examples.get(reason, [])) else "")
            + ")"
            for reason, n in sorted(self.dropped.items())
        )
        return (
            f"{self.ann_file}: {self.images_kept}/{self.images} images kept "
            f"({self.images_too_small} too small, {self.images_without_text} without text), "
            f"{self.annotations} annotations: {self.care} text, {self.dontcare} do-not-care, "
            f"{self.repaired} repaired"
            + (f" (annotation ids {', '.join(map(str, self.examples['repaired']))})" if self.repaired else "")
            + (f"; dropped: {dropped}" if dropped else "")
        )


def _load_json(path: Path) -> dict:
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read annotation file ({e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a COCO json object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: missing or non-list '{key}'")
    return data


def _parse_segmentation(seg, ann_id, ann_file, height, width) -> list[np.ndarray]:
    """Polygon parts of one annotation's segmentation (polygon list or RLE)."""
    if isinstance(seg, list):
        parts = []
        for i, flat in enumerate(seg):
            if not isinstance(flat, (list, tuple)) or not all(isinstance(v, (int, float)) for v in flat):
                raise DatasetError(
                    f"{ann_file}: annotation {ann_id}: segmentation[{i}] is not a list of numbers"
                )
            if len(flat) % 2:
                raise DatasetError(
                    f"{ann_file}: annotation {ann_id}: segmentation[{i}] has an odd number of values"
                )
            parts.append(flat_to_polygon(flat))
        return parts
    if isinstance(seg, dict) and "counts" in seg:
        from pycocotools import mask as mask_utils  # deferred: only RLE segmentations need pycocotools

        try:
            rle = seg
            if isinstance(seg["counts"], list):  # uncompressed RLE
                h, w = seg.get("size", (height, width))
                rle = mask_utils.frPyObjects(seg, h, w)
            mask = mask_utils.decode(rle)
        except Exception as e:  # pycocotools raises plain Exceptions on bad RLE
            raise DatasetError(
                f"{ann_file}: annotation {ann_id}: unreadable RLE segmentation ({e})"
            ) from None
        return mask_to_instance(mask)
    raise DatasetError(f"{ann_file}: annotation {ann_id}: segmentation must be a polygon list or an RLE dict")


def _bbox_parts(bbox, ann_id, ann_file) -> list[np.ndarray]:
    x, y, w, h = bbox_value(bbox, f"{ann_file}: annotation {ann_id}")  # the rule of every reader
    return [np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], dtype=np.float32)]


def load_coco_records(
    ann_file: str | os.PathLike,
    img_root: str | os.PathLike,
    source: int = 0,
    min_image_size: int = 32,
    keep_empty: bool = False,
    dontcare: bool = True,
    check_files: bool = True,
) -> tuple[list[ImageRecord], LoadReport]:
    """Parse one COCO file into image records (see the module docstring for the error policy)."""
    ann_file = Path(ann_file)
    data = _load_json(ann_file)
    report = LoadReport(ann_file=str(ann_file))
    images: dict[int, ImageRecord] = {}
    for im in coco_images(data, str(ann_file)):
        image_id = im["id"]
        try:
            path = safe_join(img_root, im["file_name"])
        except ValueError as e:
            raise DatasetError(f"{ann_file}: image {image_id}: refused: {e}") from None
        images[image_id] = ImageRecord(image_id, path, im["file_name"], im["width"], im["height"], [], source)
    report.images = len(images)

    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DatasetError(f"{ann_file}: annotations[{i}] is not an object")
        ann_id = ann.get("id", f"#{i}")
        image_id = ann.get("image_id")
        record = images.get(image_id)
        if record is None:
            raise DatasetError(f"{ann_file}: annotation {ann_id} points to unknown image id {image_id!r}")
        report.annotations += 1
        weight = ann.get("lossweight", 1.0)
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not math.isfinite(weight)
            or weight < 0
        ):
            raise DatasetError(
                f"{ann_file}: annotation {ann_id}: lossweight must be a finite number >= 0 (got {weight!r})"
            )
        is_dontcare = bool(ann.get("iscrowd", 0)) or bool(ann.get("ignore", False))
        if is_dontcare and not dontcare:
            report.note("do_not_care_disabled", ann_id)
            continue
        seg = ann.get("segmentation")
        raw_parts = (
            _parse_segmentation(seg, ann_id, ann_file, record.height, record.width)
            if seg
            else _bbox_parts(ann.get("bbox"), ann_id, ann_file)
        )
        if any(
            np.isfinite(poly).all() and far_outside(poly, record.width, record.height) for poly in raw_parts
        ):
            # before the repair: in float32, points far out (1e12) merge and would read as "zero area"
            report.note("far_outside_image", ann_id)  # e.g. coordinates of another scale or file
            continue
        parts, repaired, reasons = [], False, []
        for poly in raw_parts:
            res = repair_polygon(poly)
            if res.parts:
                parts.extend(res.parts)
                repaired |= res.status == "repaired"
            else:
                reasons.append(res.status)
        if not parts:
            report.note(reasons[0] if reasons else "empty_segmentation", ann_id)
            continue
        box = instance_box(parts)
        if box[2] <= 0 or box[3] <= 0 or box[0] >= record.width or box[1] >= record.height:
            report.note("outside_image", ann_id)
            continue
        if box[2] - box[0] < 1 or box[3] - box[1] < 1 or instance_area(parts) <= 0:
            report.note("zero_area", ann_id)
            continue
        if repaired:
            report.repaired += 1
            report.note("repaired", ann_id)
        record.instances.append(
            TextInstance(parts, is_dontcare, float(weight), int(ann_id) if isinstance(ann_id, int) else -1)
        )
        if is_dontcare:
            report.dontcare += 1
        else:
            report.care += 1

    kept = []
    for record in images.values():
        if min(record.width, record.height) < min_image_size:
            report.images_too_small += 1
            continue
        if not keep_empty and not any(not inst.iscrowd for inst in record.instances):
            report.images_without_text += 1
            continue
        kept.append(record)
    if check_files:
        missing = [r for r in kept if not r.path.is_file()]
        if missing:
            first = ", ".join(f"{r.path} (image {r.image_id})" for r in missing[:3])
            raise DatasetError(f"{ann_file}: {len(missing)} image file(s) missing, e.g. {first}")
    report.images_kept = len(kept)
    return kept, report


def read_image(record: ImageRecord) -> np.ndarray:
    """RGB uint8 image (H, W, 3); a missing or unreadable file raises DatasetError."""
    return decode_image(record.path, f"image {record.image_id}")


class CocoTextDataset:
    """Concatenation of COCO text datasets; a ``torch.utils.data.Dataset`` (map style).

    ``transform(sample, rng) -> sample`` is applied in training; the random generator of item ``i``
    is seeded from ``(seed, epoch, i)``, so runs are reproducible whatever the worker layout.
    """

    def __init__(
        self,
        sources: Sequence[tuple[str | os.PathLike, str | os.PathLike]],
        transform: Callable | None = None,
        train: bool = True,
        min_image_size: int = 32,
        dontcare: bool = True,
        seed: int = 0,
        background_weights: Sequence[float] | None = None,
    ):
        if not sources:
            raise DatasetError("no datasets given: need at least one (ann_file, img_root) pair")
        self.records: list[ImageRecord] = []
        self.reports: list[LoadReport] = []
        for k, (ann_file, img_root) in enumerate(sources):
            records, report = load_coco_records(
                ann_file,
                img_root,
                source=k,
                min_image_size=min_image_size,
                keep_empty=not train,
                dontcare=dontcare,
            )
            log.info(report.summary())
            self.records.extend(records)
            self.reports.append(report)
        if not self.records:
            names = ", ".join(str(a) for a, _ in sources)
            raise DatasetError(f"{names}: no usable images after filtering (see the counts logged above)")
        if isinstance(transform, (list, tuple)) and len(transform) != len(sources):
            raise ValueError(f"{len(transform)} transforms for {len(sources)} datasets")
        if background_weights is not None and len(background_weights) != len(sources):
            raise ValueError(f"{len(background_weights)} background weights for {len(sources)} datasets")
        self.transform = (
            transform  # one callable, or one per dataset (e.g. strong augmentation on pseudo labels)
        )
        self.background_weights = (
            list(background_weights) if background_weights is not None else [1.0] * len(sources)
        )
        self.train = train
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def load_sample(self, idx: int) -> Sample:
        from i3cl_core.data.transforms import Sample  # deferred: pulls OpenCV (loading records stays light)

        record = self.records[idx]
        image = read_image(record)
        h, w = image.shape[:2]
        inst = record.instances
        sample = Sample(
            image=image,
            instances=Instances(
                polygons=[i.parts for i in inst],
                iscrowd=np.array([i.iscrowd for i in inst], dtype=bool),
                lossweight=np.array([i.lossweight for i in inst], dtype=np.float32),
                ann_id=np.array([i.ann_id for i in inst], dtype=np.int64),
            ),
            image_id=record.image_id,
            file_name=record.file_name,
            orig_size=(h, w),
        )
        if (h, w) != (record.height, record.width):
            sx, sy = w / record.width, h / record.height
            log.warning(
                "%s: image %s is %dx%d but the json says %dx%d; polygons rescaled",
                record.path,
                record.image_id,
                w,
                h,
                record.width,
                record.height,
            )
            scale = np.array([sx, sy], dtype=np.float32)
            sample = sample.with_polygons([[p * scale for p in parts] for parts in sample.instances.polygons])
        return sample

    def __getitem__(self, idx: int):
        sample = self.load_sample(idx)
        rng = np.random.default_rng([self.seed, self.epoch, idx])
        sample_seed = int(rng.integers(2**62))  # seeds the model's anchor/RoI sampling for this image
        source = self.records[idx].source
        transform = self.transform[source] if isinstance(self.transform, (list, tuple)) else self.transform
        if transform is not None:
            sample = transform(sample, rng)
        image, target = sample.to_tensors()
        target["seed"] = sample_seed
        target["index"] = idx
        target["background_weight"] = float(self.background_weights[source])
        return image, target


def collate(batch):
    """Keep images and targets as lists (detection models take variable-size images)."""
    images, targets = zip(*batch)
    return list(images), list(targets)
