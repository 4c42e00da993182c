"""Loading ground truth and predictions for evaluation.

Ground truth (``load_ground_truth``):

* COCO dataset json (``images``/``annotations``): polygon or RLE ``segmentation`` (bbox rectangle when the
  segmentation is missing or empty; a negative bbox width or height is an error, as in every reader);
  do-not-care = ``iscrowd: 1`` or ``ignore: true``. Image key = image id. Two ids with the same ``file_name``
  (one picture scored twice) are listed in ``GroundTruth.duplicate_file_names``; ``i3cl evaluate`` warns.
* ArT/LSVT native json ``{"gt_<n>": [{"points": [[x, y], ...], "transcription", "illegibility"}]}``:
  do-not-care if ``illegibility`` is true or the transcription is ``###``. Image key = ``"gt_<n>"``,
  ``file_name`` = ``"gt_<n>.jpg"``.

Predictions (``load_predictions``):

* COCO results list (``image_id``, ``segmentation`` polygon list or RLE, ``bbox``, ``score``) or a COCO
  dataset json whose annotations carry ``score`` (default 1.0). Matched by image id; against ArT-native GT an
  ``image_id`` ``n`` matches ``gt_<n>``.
* ArT submission json ``{"res_<n>": [{"points": [[x, y], ...], "confidence": c}]}``: ``res_<n>`` matches the
  GT image whose file-name stem ends with ``_<n>`` (the last ``_``-separated token of the stem:
  ``gt_123.jpg`` -> ``123``; a stem without ``_`` is its own token). Numeric tokens compare as integers
  (``007`` == ``7``).

Malformed files raise :class:`~i3cl_core.data.errors.DatasetError` naming the file and the entry. Geometry
problems (fewer than 3 points, NaN, self-intersections) are *not* errors: they are handled and counted at
evaluation time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from i3cl_core.data.errors import DatasetError
from i3cl_core.data.polygons import mask_to_parts
from i3cl_core.data.validate import bbox_value, coco_images, far_outside, score_value
from i3cl_core.utils import read_json


@dataclass
class GtImage:
    key: Any
    file_name: str
    polygons: list = field(default_factory=list)  # each: (N, 2) array or list of (N, 2) arrays
    dontcare: list = field(default_factory=list)
    width: int | None = None
    height: int | None = None


@dataclass
class GroundTruth:
    images: dict  # key -> GtImage, in file order
    format: str  # "coco" | "art" | "memory"
    source: str = "<memory>"
    categories: list = field(default_factory=list)
    num_outside_image: int = (
        0  # ground-truth polygons with a point more than one image size outside their image
    )
    duplicate_file_names: list = field(default_factory=list)  # (file_name, first id, other id): scored twice
    _token_index: dict | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.images)

    def token_index(self) -> dict:
        """Map from the last ``_``-separated token of each file-name stem to the image key."""
        if self._token_index is None:
            index: dict = {}
            for key, img in self.images.items():
                tok = art_token(img.file_name)
                if tok in index and index[tok] != key:
                    raise DatasetError(
                        f"{self.source}: images {self.images[index[tok]].file_name!r} "
                        f"and {img.file_name!r} share the "
                        f"token {tok!r}; ArT-style predictions (res_<n>) cannot be matched unambiguously"
                    )
                index[tok] = key
            self._token_index = index
        return self._token_index


@dataclass
class Predictions:
    by_image: dict  # GT key -> (list of instances, list of scores)
    format: str  # "coco" | "art" | "memory"
    source: str = "<memory>"
    unknown_image_ids: list = field(default_factory=list)  # unique, first seen first
    num_unknown_predictions: int = 0
    num_outside_image: int = 0  # predictions with a point more than one image size outside their image
    _cache: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return sum(len(v[1]) for v in self.by_image.values())


def name_token(name: str) -> str:
    """The last ``_``-separated token of a file name's stem:
    ``gt_123.jpg`` -> '123', ``img_0042.png`` -> '0042'."""
    stem = Path(str(name)).name
    if "." in stem:
        stem = stem.rsplit(".", 1)[0]
    return stem.rsplit("_", 1)[-1]


def art_token(name: str):
    """What ArT keys match on:
    ``gt_123.jpg`` -> 123, ``res_7`` -> 7, ``img_0042.png`` -> 42, ``foo.jpg`` -> 'foo'."""
    tok = name_token(name)
    return int(tok) if tok.isdigit() else tok


def _points(value, where: str) -> np.ndarray:
    """``[[x, y], ...]`` or a flat ``[x0, y0, ...]`` list -> (N, 2) float array (NaN kept, checked later)."""
    if not isinstance(value, (list, tuple)):
        raise DatasetError(f"{where}: points must be a list, got {type(value).__name__}")
    if not value:
        return np.zeros((0, 2))
    try:
        if all(isinstance(p, (list, tuple)) for p in value):
            if any(len(p) != 2 for p in value):
                raise DatasetError(f"{where}: every point must be [x, y]")
            arr = np.asarray(value, dtype=np.float64)
        else:
            arr = np.asarray(value, dtype=np.float64)
            if arr.ndim != 1 or arr.size % 2:
                raise DatasetError(
                    f"{where}: a flat coordinate list must have an even length, got {arr.size}"
                )
            arr = arr.reshape(-1, 2)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{where}: coordinates must be numbers ({e})") from e
    return arr


def _segmentation(seg, bbox, where: str, size: tuple[int, int] | None = None):
    """COCO segmentation (polygon list or RLE) or bbox -> instance (list of (N, 2) arrays)."""
    if isinstance(seg, dict):
        return rle_to_parts(seg, where, size)
    if isinstance(seg, list) and seg:
        if all(isinstance(v, (int, float)) or v is None for v in seg):  # a single flat polygon, not nested
            return [_points(seg, where)]
        return [_points(p, f"{where} polygon {k}") for k, p in enumerate(seg)]
    if seg not in (None, []):
        raise DatasetError(f"{where}: segmentation must be a polygon list or an RLE dict")
    if bbox is None:
        return [np.zeros((0, 2))] if seg == [] else _missing(where)
    return [_bbox_points(bbox, where)]


def _missing(where):
    raise DatasetError(f"{where}: neither segmentation nor bbox")


def _bbox_points(bbox, where: str) -> np.ndarray:
    x, y, w, h = bbox_value(bbox, where)  # the rule of every reader: numbers, width and height >= 0
    return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], dtype=np.float64)


def rle_to_parts(rle: dict, where: str, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Trace an RLE mask into polygons (outer boundaries of each blob; holes dropped).

    Pixel ``(x, y)`` covers ``[x, x+1) x [y, y+1)`` (the convention of :mod:`i3cl_core.data.polygons`). OpenCV
    contours run through pixel centres; we offset them outwards by half a pixel (mitre joins, square caps), so
    a rectilinear blob becomes exactly its pixel boundary (a 40x20 block at column 100, row 10 -> the box
    [100, 140] x [10, 30]).
    """
    from pycocotools import mask as mask_utils  # deferred: only RLE predictions need pycocotools

    try:
        if isinstance(rle.get("counts"), list):
            h, w = rle["size"]
            rle = mask_utils.frPyObjects(rle, h, w)
        elif isinstance(rle.get("counts"), str):
            rle = dict(rle, counts=rle["counts"].encode("ascii"))
        m = mask_utils.decode(rle)
    except Exception as e:  # pycocotools raises assorted types on bad RLE
        raise DatasetError(f"{where}: unreadable RLE segmentation ({e})") from e
    if m.ndim == 3:
        m = m.max(axis=2)
    return mask_to_parts(m) or [np.zeros((0, 2))]


def _is_art_dict(data: Any, prefix: str) -> bool:
    return (
        isinstance(data, dict)
        and all(isinstance(k, str) and k.startswith(prefix) for k in data)
        and all(isinstance(v, list) for v in data.values())
    )


def _is_dontcare(ann: dict) -> bool:
    return bool(ann.get("iscrowd", 0)) or bool(ann.get("ignore", False))


def load_ground_truth(path) -> GroundTruth:
    """Read a COCO dataset json or an ArT-native json (see the module docstring)."""
    data = read_json(path)
    src = str(path)
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        return _gt_from_coco(data, src)
    if _is_art_dict(data, "gt_") or data == {}:
        return _gt_from_art(data, src)
    raise DatasetError(
        f"{src}: not a COCO dataset (images/annotations) nor an ArT json ({{'gt_<n>': [...]}})"
    )


def _gt_from_coco(data: dict, src: str) -> GroundTruth:
    if not isinstance(data["annotations"], list):
        raise DatasetError(f"{src}: 'annotations' must be a list")
    images: dict = {}
    first_id: dict = {}
    duplicates = []
    for img in coco_images(data, src, size="optional", file_name="optional"):
        key = img["id"]
        images[key] = GtImage(
            key=key, file_name=img["file_name"] or str(key), width=img["width"], height=img["height"]
        )
        if img["file_name"] is not None:
            if img["file_name"] in first_id:  # one picture under two ids: its text would be counted twice
                duplicates.append((img["file_name"], first_id[img["file_name"]], key))
            first_id.setdefault(img["file_name"], key)
    outside = 0
    for k, ann in enumerate(data["annotations"]):
        where = f"{src}: annotation {ann.get('id', f'#{k}') if isinstance(ann, dict) else f'#{k}'}"
        if not isinstance(ann, dict):
            raise DatasetError(f"{where}: must be an object")
        img = images.get(ann.get("image_id"))
        if img is None:
            raise DatasetError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        size = (img.height, img.width) if img.height and img.width else None
        instance = _segmentation(ann.get("segmentation"), ann.get("bbox"), where, size)
        if img.width and img.height and any(far_outside(part, img.width, img.height) for part in instance):
            outside += 1  # kept (a missed object unless matched), and reported: likely another scale
        img.polygons.append(instance)
        img.dontcare.append(_is_dontcare(ann))
    return GroundTruth(
        images=images,
        format="coco",
        source=src,
        categories=list(data.get("categories") or []),
        num_outside_image=outside,
        duplicate_file_names=duplicates,
    )


def _art_dontcare(item: dict) -> bool:
    return bool(item.get("illegibility", False)) or str(item.get("transcription", "")).strip() == "###"


def _gt_from_art(data: dict, src: str) -> GroundTruth:
    images: dict = {}
    for key, items in data.items():
        img = GtImage(key=key, file_name=f"{key}.jpg")
        for k, item in enumerate(items):
            where = f"{src}: {key}[{k}]"
            if not isinstance(item, dict) or "points" not in item:
                raise DatasetError(f"{where}: expected an object with 'points'")
            img.polygons.append([_points(item["points"], where)])
            img.dontcare.append(_art_dontcare(item))
        images[key] = img
    return GroundTruth(images=images, format="art", source=src)


def _score(value, where: str) -> float:
    return score_value(value, where)


class _Collector:
    def __init__(self, gt: GroundTruth, fmt: str, src: str):
        self.gt = gt
        self.by_image: dict = {}
        self.unknown: dict = {}
        self.num_unknown = 0
        self.num_outside = 0
        self.fmt = fmt
        self.src = src

    def add(self, key, raw_id, instance, score):
        if key is None:
            self.num_unknown += 1
            self.unknown.setdefault(raw_id, None)
            return
        img = self.gt.images[key]
        if any(far_outside(part, img.width, img.height) for part in instance):
            self.num_outside += 1
        polys, scores = self.by_image.setdefault(key, ([], []))
        polys.append(instance)
        scores.append(score)

    def result(self) -> Predictions:
        return Predictions(
            by_image=self.by_image,
            format=self.fmt,
            source=self.src,
            unknown_image_ids=list(self.unknown),
            num_unknown_predictions=self.num_unknown,
            num_outside_image=self.num_outside,
        )


def load_predictions(path, gt: GroundTruth) -> Predictions:
    """Read a COCO results list (or a COCO dataset json with scored annotations) or an ArT submission json."""
    return parse_predictions(read_json(path), gt, str(path))


def parse_predictions(data, gt: GroundTruth, src: str) -> Predictions:
    """:func:`load_predictions` on already loaded json ``data`` (``src`` names it in errors)."""
    if isinstance(data, dict) and "annotations" in data:
        data = data["annotations"]
        if not isinstance(data, list):
            raise DatasetError(f"{src}: 'annotations' must be a list")
    if isinstance(data, list):
        return _preds_from_coco(data, gt, src)
    if _is_art_dict(data, "res_") or data == {}:
        return _preds_from_art(data, gt, src)
    raise DatasetError(f"{src}: not a COCO results list nor an ArT submission json ({{'res_<n>': [...]}})")


def _coco_key(gt: GroundTruth, image_id):
    if image_id in gt.images:
        return image_id
    if gt.format == "art":  # image_id n <-> gt_n
        return gt.token_index().get(art_token(str(image_id)))
    return None


def _preds_from_coco(data: list, gt: GroundTruth, src: str) -> Predictions:
    col = _Collector(gt, "coco", src)
    sizes = {k: ((im.height, im.width) if im.height and im.width else None) for k, im in gt.images.items()}
    for k, det in enumerate(data):
        where = f"{src}: result #{k}"
        if not isinstance(det, dict) or "image_id" not in det:
            raise DatasetError(f"{where}: expected an object with 'image_id'")
        image_id = det["image_id"]
        try:
            key = _coco_key(gt, image_id)
        except TypeError:  # unhashable id
            raise DatasetError(f"{where}: image_id {image_id!r} is not a valid id") from None
        where = f"{where} (image_id {image_id!r})"
        instance = _segmentation(det.get("segmentation"), det.get("bbox"), where, sizes.get(key))
        col.add(key, image_id, instance, _score(det.get("score"), where))
    return col.result()


def _preds_from_art(data: dict, gt: GroundTruth, src: str) -> Predictions:
    col = _Collector(gt, "art", src)
    index = gt.token_index()
    for name, items in data.items():
        key = index.get(art_token(name))
        for k, item in enumerate(items):
            where = f"{src}: {name}[{k}]"
            if not isinstance(item, dict) or "points" not in item:
                raise DatasetError(f"{where}: expected an object with 'points'")
            col.add(key, name, [_points(item["points"], where)], _score(item.get("confidence"), where))
        if key is None and not items:
            col.unknown.setdefault(name, None)
    return col.result()
