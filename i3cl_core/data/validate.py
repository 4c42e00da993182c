"""One set of rules for the fields every command reads (datasets, image lists, predictions), with one
message per rule, so that train, infer, ensemble, fuse, evaluate, browse and the flows agree on the
same input.

* image ids are unique; ``width`` and ``height``, where given, are positive integers;
* a score is a number (not a string, not a boolean) in [0, 1]; a missing score counts as 1;
* a ``bbox`` (used where an annotation has no segmentation) is four numbers ``[x, y, width, height]``
  with ``width`` and ``height`` >= 0 (:func:`bbox_value`);
* coordinates are finite; a polygon with a point more than one image size outside its image
  (:func:`far_outside`) is not a detection of that image: it is dropped from training data and fusion,
  and counted by evaluation.

What cannot be used raises :class:`DatasetError` naming the file, the entry and the field.

Text files of other tools (the converters' label files and detector outputs) are decoded by one rule,
:func:`read_text`: UTF-8 by default (a BOM is dropped), another encoding where the user names it
(``--encoding``); bytes that do not decode raise a DatasetError naming the file and the line. The json
those commands write is strict (:func:`write_json`: no ``NaN`` or ``Infinity``).
"""

from __future__ import annotations

import codecs
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from i3cl_core.data.errors import DatasetError
from i3cl_core.utils import atomic_write_text, parse_json


def score_value(value, where: str, missing: float = 1.0) -> float:
    """A prediction's score: a number in [0, 1] (``None`` -> ``missing``)."""
    if value is None:
        return missing
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DatasetError(
            f"{where}: score must be a number in [0, 1], got {value!r} ({type(value).__name__})"
        )
    s = float(value)
    if not math.isfinite(s) or not 0.0 <= s <= 1.0:
        raise DatasetError(f"{where}: score must be a number in [0, 1], got {value!r}")
    return s


def bbox_value(bbox, where: str) -> tuple[float, float, float, float]:
    """A COCO ``bbox``: four numbers ``[x, y, width, height]``, width and height >= 0 (non-finite values pass:
    geometry checks count them later)."""
    if (
        not isinstance(bbox, (list, tuple))
        or len(bbox) != 4
        or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in bbox)
    ):
        raise DatasetError(f"{where}: bbox must be [x, y, width, height] numbers, got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        raise DatasetError(
            f"{where}: bbox width and height must be >= 0, got {bbox!r} "
            "(COCO boxes are [x, y, width, height], not [x1, y1, x2, y2])"
        )
    return x, y, w, h


def image_size(width, height, where: str, required: bool = True) -> tuple[int, int] | None:
    """``(width, height)`` as positive integers; ``None`` when both are absent and not ``required``."""
    if width is None and height is None and not required:
        return None
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height))
    if not ok:
        raise DatasetError(f"{where}: width and height must be positive integers, got {width!r} x {height!r}")
    return width, height


def coco_images(
    data,
    where: str,
    *,
    size: str = "required",
    file_name: str = "required",
    ids: str = "required",
    unique_file_names: bool = False,
    non_empty: bool = False,
) -> list[dict]:
    """The one parser of a COCO ``images`` list (datasets, IMAGES.json, image lists for inference).

    ``data`` is the loaded json (a dict with an ``images`` list); ``where`` names it in errors. Each entry
    must be an object with an ``id`` (unique); ``file_name`` is a string (``file_name="optional"``: may be
    absent, ``None`` is returned for it); ``width`` and ``height`` are positive integers (``size="optional"``:
    both may be absent); ``ids="optional"`` (a table of image sizes): ``id`` may be absent. Returns
    ``[{"id", "file_name", "width", "height"}]`` in json order."""
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
                raise DatasetError(
                    f"{where}: images[{seen_ids[key]}] and images[{k}] have the same id {key!r}"
                )
            seen_ids[key] = k
        else:
            key = f"#{k}"
        name = im.get("file_name")
        if not isinstance(name, str) or not name:
            if name is not None or file_name == "required":
                raise DatasetError(
                    f"{where}: image {key!r} (images[{k}]): "
                    f"file_name must be a non-empty string, got {name!r}"
                )
        if unique_file_names and name is not None:
            if name in seen_names:
                raise DatasetError(
                    f"{where}: images {seen_names[name]!r} and {key!r} have the same file_name {name!r}"
                )
            seen_names[name] = key
        wh = image_size(
            im.get("width"), im.get("height"), f"{where}: image {key!r}", required=size == "required"
        )
        out.append({"id": im.get("id"), "file_name": name, "width": wh and wh[0], "height": wh and wh[1]})
    if non_empty and not out:
        raise DatasetError(f"{where}: the images list is empty")
    return out


def far_outside(points, width: int | None, height: int | None) -> bool:
    """True when a point of ``points`` ((N, 2)) lies more than one image size outside the image."""
    if not width or not height:
        return False
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if not len(pts):
        return False
    tol = float(max(width, height))
    x, y = pts[:, 0], pts[:, 1]
    return bool((x < -tol).any() or (y < -tol).any() or (x > width + tol).any() or (y > height + tol).any())


def text_encoding(encoding: str) -> str:
    """The codec that decodes input text named ``encoding`` (``utf-8`` drops a leading BOM); an unknown name
    is a DatasetError."""
    try:
        codec = codecs.lookup(encoding).name
    except (LookupError, TypeError):
        raise DatasetError(
            f"unknown text encoding {encoding!r} (--encoding); e.g. utf-8, latin-1, cp1252, gbk"
        ) from None
    return "utf-8-sig" if codec == "utf-8" else codec


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    """The text of an input file, decoded with ``encoding`` (``utf-8``: a leading BOM is dropped).

    Bytes that are not valid in that encoding raise DatasetError naming the file, the line and the byte
    (never replacement characters in the data); an unknown encoding name is a DatasetError too."""
    codec = text_encoding(encoding)
    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"{path}: is a folder; expected a file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        return data.decode(codec)
    except UnicodeDecodeError as e:
        breaks = list(_LINE_BREAK_BYTES.finditer(data, 0, e.start))  # lines counted as read_lines counts them
        line = len(breaks) + 1
        column = e.start - (breaks[-1].end() if breaks else 0) + 1
        raise DatasetError(
            f"{path} line {line}: not valid {encoding} text (byte 0x{data[e.start]:02x} at byte column "
            f"{column}); if the file is in another encoding, name it with --encoding "
            "(e.g. --encoding latin-1)"
        ) from None


_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_LINE_BREAK_BYTES = re.compile(rb"\r\n|\r|\n")


def read_lines(path: str | os.PathLike, encoding: str = "utf-8") -> list[str]:
    """The lines of an input text file (:func:`read_text`), split at ``\\n``, ``\\r\\n`` or ``\\r`` only (not
    at the other characters ``str.splitlines`` takes for line ends, such as U+0085, which may occur in text),
    so that line ``n`` of the list is line ``n`` of the file in a decoding error."""
    return _LINE_BREAK.split(read_text(path, encoding))


def read_tab_json_lines(path: str | os.PathLike, encoding: str = "utf-8"):
    """PaddleOCR's line format, for its labels (PPOCRLabel's ``Label.txt``) and its predictions
    (``system_results.txt``) alike: ``(where, name, value)`` of each non-empty line ``name<TAB>JSON``."""
    for n, line in enumerate(read_lines(path, encoding), start=1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        if "\t" not in line:
            raise DatasetError(f'{where}: expected \'name<TAB>[{{"transcription", "points"}}, ...]\'')
        name, payload = line.split("\t", 1)
        try:
            value = json.loads(payload)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: not valid JSON after the TAB ({e.msg})") from None
        yield where, name.strip(), value


def read_json(path: str | os.PathLike, encoding: str = "utf-8"):
    """A json input file decoded by :func:`read_text`; malformed json raises DatasetError with its
    position."""
    return parse_json(read_text(path, encoding), path)


def write_json(path: str | os.PathLike, obj, indent: int | None = None) -> Path:
    """Write ``obj`` as strict JSON (atomically): a NaN or infinity, which other json readers refuse, is a
    DatasetError instead of a bare ``NaN`` in the file."""
    try:
        text = json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False)
    except ValueError as e:
        raise DatasetError(f"{path}: not written: a value is not a finite number ({e})") from None
    return atomic_write_text(path, text)
