"""One set of rules for the fields every command reads (datasets, image lists, predictions), with one
message per rule, so that train, infer, ensemble, fuse, evaluate, browse and the flows agree on the
same input.

* image ids are unique; ``width`` and ``height``, where given, are positive integers;
* a score is a number (not a string, not a boolean) in [0, 1]; a missing score counts as 1;
* coordinates are finite; a polygon with a point more than one image size outside its image
  (:func:`far_outside`) is not a detection of that image: it is dropped from training data and fusion,
  and counted by evaluation.

What cannot be used raises :class:`DatasetError` naming the file, the entry and the field.
"""
from __future__ import annotations

import math

from i3cl_core.data.errors import DatasetError


def score_value(value, where: str, missing: float = 1.0) -> float:
    """A prediction's score: a number in [0, 1] (``None`` -> ``missing``)."""
    if value is None:
        return missing
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DatasetError(f"{where}: score must be a number in [0, 1], got {value!r} ({type(value).__name__})")
    s = float(value)
    if not math.isfinite(s) or not 0.0 <= s <= 1.0:
        raise DatasetError(f"{where}: score must be a number in [0, 1], got {value!r}")
    return s


def image_size(width, height, where: str, required: bool = True) -> tuple[int, int] | None:
    """``(width, height)`` as positive integers; ``None`` when both are absent and not ``required``."""
    if width is None and height is None and not required:
        return None
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height))
    if not ok:
        raise DatasetError(f"{where}: width and height must be positive integers, got {width!r} x {height!r}")
    return width, height


def coco_images(data, where: str, *, size: str = "required", file_name: str = "required", ids: str = "required",
                unique_file_names: bool = False, non_empty: bool = False) -> list[dict]:
    """The one parser of a COCO ``images`` list (datasets, IMAGES.json, image lists for inference).

    ``data`` is the loaded json (a dict with an ``images`` list); ``where`` names it in errors. Each entry
    must be an object with an ``id`` (unique); ``file_name`` is a string (``file_name="optional"``: may be
    absent, ``None`` is returned for it); ``width`` and ``height`` are positive integers (``size="optional"``:
    both may be absent); ``ids="optional"`` (a table of image sizes): ``id`` may be absent. Returns ``[{"id", "file_name", "width", "height"}]`` in json order."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{where}: not a COCO json (needs an 'images' list)")
    out: list[dict] = []
    seen_ids: dict = {}
    seen_names: dict = {}
    for k, im in enumerate(data["images"]):
        if not isinstance(im, dict):
            raise DatasetError(f"{where}: images[{k}] must be an object")
        if "id" not in im and ids == "required":
            raise DatasetError(f"{where}: images[{k}] has no 'id'")
        key = im.get("id")
        if "id" in im:
            if isinstance(key, (bool, float, list, dict)) or key is None:
                raise DatasetError(f"{where}: images[{k}]: id must be an integer or a string, got {key!r}")
            if key in seen_ids:
                raise DatasetError(f"{where}: images[{seen_ids[key]}] and images[{k}] have the same id {key!r}")
            seen_ids[key] = k
        else:
            key = f"#{k}"
        name = im.get("file_name")
        if not isinstance(name, str) or not name:
            if name is not None or file_name == "required":
                raise DatasetError(f"{where}: image {key!r} (images[{k}]): file_name must be a non-empty string, got {name!r}")
        if unique_file_names and name is not None:
            if name in seen_names:
                raise DatasetError(f"{where}: images {seen_names[name]!r} and {key!r} have the same file_name {name!r}")
            seen_names[name] = key
        wh = image_size(im.get("width"), im.get("height"), f"{where}: image {key!r}", required=size == "required")
        out.append({"id": im.get("id"), "file_name": name, "width": wh and wh[0], "height": wh and wh[1]})
    if non_empty and not out:
        raise DatasetError(f"{where}: the images list is empty")
    return out


def far_outside(points, width: int | None, height: int | None) -> bool:
    """True when a point of ``points`` ((N, 2)) lies more than one image size outside the image."""
    import numpy as np

    if not width or not height:
        return False
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if not len(pts):
        return False
    tol = float(max(width, height))
    x, y = pts[:, 0], pts[:, 1]
    return bool((x < -tol).any() or (y < -tol).any() or (x > width + tol).any() or (y > height + tol).any())
