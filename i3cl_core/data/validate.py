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


def unique_ids(images: list[dict], where: str) -> None:
    seen: dict = {}
    for k, im in enumerate(images):
        key = im.get("id")
        if key in seen:
            raise DatasetError(f"{where}: images[{seen[key]}] and images[{k}] have the same id {key!r}")
        seen[key] = k


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
