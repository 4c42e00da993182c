"""Text-detection annotations as datasets and tools ship them -> our COCO layout (``i3cl convert-dataset``).

Output: ``{"images": [{id, file_name, width, height}], "annotations": [{id, image_id, category_id: 1,
segmentation: [[x0, y0, ...], ...], bbox, area, iscrowd, transcription}], "categories": [{id: 1, name:
"text"}]}`` with ``file_name`` relative to ``--img-root`` and the size read from the image header (Pillow,
lazily).

Input formats (``--ann``):

* ``art`` / ``lsvt``: one json ``{"gt_<n>": [{"points", "transcription", "illegibility", ...}]}``; image
  ``gt_<n>.jpg``; image id ``n``. Do-not-care (``iscrowd: 1``): ``illegibility`` true or transcription
  ``###``.
* ``totaltext``: a folder of ``poly_gt_img<N>.txt`` files (or one such file) with records
  ``x: [[x0 x1 ...]], y: [[y0 y1 ...]], ornt: [u'c'], transcriptions: [u'TEXT']`` (a record may wrap over
  several lines); image ``img<N>.<ext>``. Do-not-care: orientation ``#`` (or transcription ``#``).
* ``ctw1500``: a folder of per-image ``.txt`` files (or one file), each line either the 2017 label format
  (32 integers: ``xmin, ymin, xmax, ymax`` then 14 ``(dx, dy)`` offsets from ``(xmin, ymin)``) or the 2020
  test format ``x1,y1,...,xn,yn,####text`` (do-not-care when the text is ``###``); or the 2020 XML train
  labels (``<image file=...><box ...><label>text</label><segs>x1,y1,...</segs></box></image>``, ``###``
  labels do-not-care). The image is ``<stem>.<ext>`` (``.txt``/``.xml`` stem), also trying the integer
  stem without zero padding.

* ``plain``: a folder of per-image ``.txt`` files (or one file), one polygon per line
  ``x1,y1,...,xn,yn[,text]`` (the way many repositories ship CTW1500 and Total-Text). The text is whatever
  follows the coordinates; ``###``, ``#`` and ``DONTCARE`` mark do-not-care, CTW1500's trailing ``CARE``
  means care (no text). The image is the label file's stem without a ``gt_``/``poly_gt_`` prefix (and
  ``img1.jpg.txt`` names ``img1.jpg``). ``ctw1500`` and ``totaltext`` read such files too.
* ``icdar2015``: per-image ``gt_img_<n>.txt``, lines ``x1,y1,...,x4,y4,transcription`` (the text may hold
  commas; ``###`` = do-not-care); image ``img_<n>``. ``mlt2017``: the same with a script column before the
  text (``x1,...,y4,Latin,text``). ``rctw17``: a difficulty column before the text (``x1,...,y4,1,"text"``,
  difficulty 1 = do-not-care); image ``<stem>``.
* ``mmocr``: an mmocr 1.x text-detection json ``{"metainfo", "data_list": [{"img_path", "height",
  "width", "instances": [{"polygon", "bbox", "ignore", "text"}]}]}`` (``img_path`` relative to
  ``--img-root``, else its base name); sizes come from the json.
* ``paddleocr``: PPOCRLabel's ``Label.txt``, lines ``path<TAB>[{"transcription", "points", "difficult"}]``
  (do-not-care: ``###`` or ``difficult``); ``path`` relative to ``--img-root``, else without its first
  folder, else its base name.

Image sizes are read from each file's header (Pillow opens lazily; no pixel is decoded). ``--no-images``
converts the annotations alone: file names follow the rules above with ``--image-ext`` (default
``.jpg``), sizes come from ``--sizes`` (a json ``{file_name: [width, height]}`` or a COCO json with
``images``), from the annotation file itself (mmocr), or are left out with one warning (training needs
them: convert again with the images).

Self-intersecting polygons are repaired (``shapely.make_valid``, keeping every polygonal part: the
segmentation then lists several polygons); polygons with fewer than 3 points, non-finite coordinates or zero
area are skipped. The counts are printed, by reason. Polygons with a point more than one image size outside
their image (where the size is known: coordinates of another scale or file) are kept and counted in a warning
(training drops them, evaluation counts them).

Label files are decoded as UTF-8 (``encoding``, ``--encoding``: another encoding, e.g. ``latin-1``); a byte
that does not decode is an error naming the file and the line. The output is strict JSON.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from i3cl_core.data.errors import DatasetError
from i3cl_core.data.image_io import IMAGE_EXTENSIONS, header
from i3cl_core.data.validate import (
    coco_images,
    far_outside,
    read_json,
    read_lines,
    read_tab_json_lines,
    read_text,
    text_encoding,
)
from i3cl_core.utils import safe_join

FORMATS = (
    "art",
    "lsvt",
    "totaltext",
    "ctw1500",
    "plain",
    "icdar2015",
    "mlt2017",
    "rctw17",
    "mmocr",
    "paddleocr",
)


@dataclass
class ConvertStats:
    images: int = 0
    annotations: int = 0
    dontcare: int = 0
    repaired: int = 0
    skipped: int = 0
    skipped_reasons: Counter = field(default_factory=Counter)  # reason -> count
    skipped_where: list = field(default_factory=list)
    far_outside: int = 0  # kept polygons with a point more than one image size outside their image
    far_outside_where: list = field(default_factory=list)
    without_size: int = 0
    oriented: int = 0  # images with an EXIF orientation tag (sizes written in the stored frame)
    warnings: list = field(default_factory=list)

    def summary(self) -> str:
        s = (
            f"{self.images} images, {self.annotations} annotations ({self.dontcare} do-not-care); "
            f"repaired {self.repaired} self-intersecting polygons; skipped {self.skipped} polygons"
        )
        if self.skipped_reasons:
            s += (
                " ("
                + ", ".join(f"{n} with {reason}" for reason, n in self.skipped_reasons.most_common())
                + ")"
            )
        if self.skipped_where:
            s += " (first: " + "; ".join(self.skipped_where[:5]) + ")"
        if self.oriented:
            s += (
                f"; {self.oriented} image(s) carry an EXIF orientation tag: "
                "sizes are those of the stored pixels, "
                f"as the official annotations assume"
            )
        return s


# ------------------------------------------------------------------ core
@dataclass
class _Images:
    """Where image files are looked up (``root``), or, with ``root`` None, how their names are made up."""

    root: Path | None
    ext: str = ".jpg"

    def find(self, stems: list[str], where: str) -> str:
        if self.root is None:
            return f"{stems[0]}{self.ext}"
        return _find_image(self.root, stems, where)

    def resolve(self, name: str, where: str) -> str:
        """A file name given by the annotations: as is, else without its first folder, else its base name."""
        if self.root is None:
            return name
        parts = Path(name).parts
        for cand in (name, str(Path(*parts[1:])) if len(parts) > 1 else None, Path(name).name):
            if cand and (self.root / cand).is_file():
                return Path(cand).as_posix()
        raise DatasetError(f"{where}: image {name!r} not found under {self.root} (also tried its base name)")


def convert(
    fmt: str,
    ann,
    img_root=None,
    *,
    no_images: bool = False,
    sizes=None,
    image_ext: str = ".jpg",
    encoding: str = "utf-8",
) -> tuple[dict, ConvertStats]:
    """Convert and return ``(coco_dataset, stats)``. Raises DatasetError / FileNotFoundError on bad input.

    ``no_images``: read no image (names derived with ``image_ext``; sizes from ``sizes``, a json path or
    a ``{file_name: (width, height)}`` dict, or from the annotations, or left out with a warning).
    ``encoding``: of the annotation files (txt, json, xml), by :func:`i3cl_core.data.validate.read_text`."""
    ann = Path(ann)
    if not ann.exists():
        raise FileNotFoundError(f"{ann}: no such file or folder")
    text_encoding(encoding)  # an unknown encoding name fails here, before any work
    if no_images:
        images = _Images(None, image_ext if image_ext.startswith(".") else f".{image_ext}")
    else:
        if img_root is None:
            raise DatasetError("an image root is needed to read image sizes (or convert with no_images)")
        img_root = Path(img_root)
        if not img_root.is_dir():
            raise FileNotFoundError(f"{img_root}: image root is not a folder")
        images = _Images(img_root)
    readers = {
        "art": _read_art,
        "lsvt": _read_art,
        "totaltext": _read_totaltext,
        "ctw1500": _read_ctw1500,
        "plain": _read_plain,
        "icdar2015": _read_quads,
        "mlt2017": _read_quads,
        "rctw17": _read_quads,
        "mmocr": _read_mmocr,
        "paddleocr": _read_paddleocr,
    }
    if fmt not in readers:
        raise DatasetError(f"unknown format {fmt!r}; choose from {FORMATS}")
    if fmt in ("art", "lsvt"):
        records = _read_art(ann, encoding)
    elif fmt in ("icdar2015", "mlt2017", "rctw17"):
        records = _read_quads(ann, images, fmt, encoding)
    else:
        records = readers[fmt](ann, images, encoding)
    size_table = _load_sizes(sizes) if sizes is not None else {}
    return _build(records, images.root, size_table)


def _load_sizes(sizes) -> dict:
    """``{file_name: (width, height)}`` from a dict or a json file (mapping, or COCO ``images``)."""
    if isinstance(sizes, dict):
        data = sizes
    else:
        data = read_json(sizes)
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        data = {
            im["file_name"]: (im["width"], im["height"])
            for im in coco_images(data, str(sizes), ids="optional", unique_file_names=True)
        }
    if not isinstance(data, dict):
        raise DatasetError(f"{sizes}: expected {{file_name: [width, height]}} or a COCO json with 'images'")
    out = {}
    for name, wh in data.items():
        try:
            w, h = (int(wh["width"]), int(wh["height"])) if isinstance(wh, dict) else (int(wh[0]), int(wh[1]))
        except (TypeError, ValueError, KeyError, IndexError):
            raise DatasetError(f"{sizes}: size of {name!r} must be [width, height], got {wh!r}") from None
        if w <= 0 or h <= 0:
            raise DatasetError(f"{sizes}: size of {name!r} must be positive, got {wh!r}")
        out[str(name)] = (w, h)
    return out


# each record: (image_id or None, file_name relative to img_root, source description,
#               [(points, text, dontcare)], (width, height) from the annotations or None)
def _build(records, img_root: Path | None, size_table: dict | None = None) -> tuple[dict, ConvertStats]:
    # deferred: i3cl --help imports this module (for FORMATS)
    from i3cl_core.data.polygons import coco_bbox, instance_area

    stats = ConvertStats()
    images, annotations = [], []
    used_ids = set()
    next_id = 1
    size_table = size_table or {}
    for record in records:
        image_id, file_name, where, items = record[:4]
        known_size = record[4] if len(record) > 4 else None
        if image_id is None or image_id in used_ids:
            while next_id in used_ids:
                next_id += 1
            image_id = next_id
        used_ids.add(image_id)
        try:
            path = safe_join(img_root if img_root is not None else ".", file_name)
        except ValueError as e:
            raise DatasetError(f"{where}: {e}") from e
        entry = {"id": image_id, "file_name": file_name}
        if img_root is not None:
            entry["width"], entry["height"], orientation = _image_size(path, where)
            stats.oriented += orientation not in (0, 1)
        elif file_name in size_table or known_size is not None:
            entry["width"], entry["height"] = size_table.get(file_name) or known_size
        else:
            stats.without_size += 1
        images.append(entry)
        for k, (points, text, dc) in enumerate(items):
            polys, repaired, reason = _clean_polygon(points)
            if not polys:
                stats.skipped += 1
                stats.skipped_reasons[reason] += 1
                stats.skipped_where.append(f"{where} #{k}: {reason}")
                continue
            stats.repaired += repaired
            if any(far_outside(p, entry.get("width"), entry.get("height")) for p in polys):
                stats.far_outside += 1
                stats.far_outside_where.append(f"{where} #{k}")
            flat = [[round(float(v), 2) for v in p.ravel()] for p in polys]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": flat,
                    "bbox": coco_bbox(polys),
                    "area": instance_area(polys),
                    "iscrowd": int(bool(dc)),
                    "transcription": text,
                }
            )
            stats.dontcare += int(bool(dc))
    stats.images = len(images)
    stats.annotations = len(annotations)
    if stats.far_outside:
        stats.warnings.append(
            f"{stats.far_outside} polygons have points more than one image size outside their image "
            f"(first: {'; '.join(stats.far_outside_where[:5])}); kept, but training drops them and "
            "evaluation counts them: check the coordinate scale"
        )
    if stats.without_size:
        stats.warnings.append(
            f"{stats.without_size} of {stats.images} images have no width/height (no image read, "
            "not in --sizes); training and --coco-map need them: convert with the images or "
            "give --sizes"
        )
    dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "text"}]}
    return dataset, stats


def _clean_polygon(points):
    """-> (list of (N, 2) float64 arrays, repaired flag, why it is skipped) by the project's one polygon rule
    (:func:`i3cl_core.data.polygons.repair_polygon`, every part of a repaired polygon kept). Empty list =
    skip."""
    # deferred: i3cl --help imports this module (for FORMATS)
    from i3cl_core.data.polygons import REPAIR_REASONS, repair_polygon

    try:
        arr = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        return [], False, "points that are not (x, y) numbers"
    res = repair_polygon(arr, keep="all", dtype=np.float64)
    return res.parts, res.status == "repaired", REPAIR_REASONS.get(res.status, "")


def _image_size(path: Path, where: str) -> tuple[int, int, int]:
    """``(width, height, EXIF orientation)`` from the header, by the image reader's rule."""
    if not path.is_file():
        raise DatasetError(f"{where}: image {path} not found")
    return header(path, f"{where}: image {path}")


def _find_image(img_root: Path, stems: list[str], where: str) -> str:
    for stem in stems:
        for ext in IMAGE_EXTENSIONS:
            for e in (ext, ext.upper()):
                if (img_root / f"{stem}{e}").is_file():
                    return f"{stem}{e}"
    raise DatasetError(f"{where}: no image {stems[0]}.jpg (or .png, ...) under {img_root}")


def _label_files(ann: Path, exts: tuple[str, ...]) -> list[Path]:
    if ann.is_file():
        return [ann]
    files = sorted(p for p in ann.iterdir() if p.suffix.lower() in exts)
    if not files:
        raise DatasetError(f"{ann}: no {'/'.join(exts)} label files in this folder")
    return files


def _natural_key(p: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


# ------------------------------------------------------------------ ArT / LSVT
def _read_art(ann: Path, encoding: str = "utf-8"):
    if ann.is_dir():
        raise DatasetError(f"{ann}: art/lsvt --ann must be the json file")
    data = read_json(ann, encoding)
    if not isinstance(data, dict):
        raise DatasetError(f"{ann}: expected an object {{'gt_<n>': [...]}}")

    def order(k):
        tok = k.rsplit("_", 1)[-1]
        return (0, int(tok), k) if tok.isdigit() else (1, 0, k)

    records = []
    for key in sorted(data, key=order):
        items = data[key]
        where = f"{ann}: {key}"
        if not isinstance(items, list):
            raise DatasetError(f"{where}: expected a list of annotations")
        out = []
        for k, item in enumerate(items):
            if not isinstance(item, dict) or "points" not in item:
                raise DatasetError(f"{where}[{k}]: expected an object with 'points'")
            text = str(item.get("transcription", ""))
            dc = bool(item.get("illegibility", False)) or text.strip() == "###"
            out.append((item["points"], text, dc))
        tok = key.rsplit("_", 1)[-1]
        records.append((int(tok) if tok.isdigit() else None, f"{key}.jpg", where, out))
    return records


# ------------------------------------------------------------------ Total-Text
_TT_RECORD = re.compile(
    r"x:\s*\[\[(?P<x>[^\]]*)\]\]\s*,\s*y:\s*\[\[(?P<y>[^\]]*)\]\]\s*,\s*ornt:\s*\[\s*u?(?P<q1>['\"])(?P<o>.*?)(?P=q1)\s*\]"
    r"\s*,\s*transcriptions:\s*\[\s*u?(?P<q2>['\"])(?P<t>.*?)(?P=q2)\s*\]",
    re.S,
)
_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def _read_totaltext(ann: Path, images: _Images, encoding: str = "utf-8"):
    records = []
    for f in sorted(_label_files(ann, (".txt",)), key=_natural_key):
        lines = read_lines(f, encoding)
        text = "\n".join(lines)
        where = str(f)
        if "x:" not in text and _looks_plain(lines):  # the comma-separated variant many repositories ship
            records.append(_plain_record(f, lines, images))
            continue
        items = []
        matched = 0
        for m in _TT_RECORD.finditer(text):
            matched += 1
            xs = [float(v) for v in _NUM.findall(m["x"])]
            ys = [float(v) for v in _NUM.findall(m["y"])]
            if len(xs) != len(ys):
                raise DatasetError(f"{where}: record {matched}: {len(xs)} x values but {len(ys)} y values")
            ornt, trans = m["o"], m["t"]
            items.append((list(zip(xs, ys)), trans, ornt.strip() == "#" or trans.strip() == "#"))
        if not matched and text.strip():
            raise DatasetError(
                f"{where}: no 'x: [[...]], y: [[...]], ornt: [...], transcriptions: [...]' records"
            )
        stem = f.stem
        img_stem = stem[len("poly_gt_") :] if stem.startswith("poly_gt_") else stem
        records.append((_int_suffix(img_stem), images.find([img_stem], where), where, items))
    return records


def _int_suffix(stem: str):
    m = re.search(r"(\d+)$", stem)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------ CTW1500
def _read_ctw1500(ann: Path, images: _Images, encoding: str = "utf-8"):
    files = sorted(_label_files(ann, (".txt", ".xml")), key=_natural_key)
    records = []
    for f in files:
        if f.suffix.lower() == ".xml":
            records.extend(_read_ctw_xml(f, images, encoding))
            continue
        where = str(f)
        items = []
        for n, line in enumerate(read_lines(f, encoding), start=1):
            line = line.strip()
            if not line:
                continue
            items.append(_ctw_line(line, f"{where} line {n}"))
        stems = [f.stem] + ([str(int(f.stem)), f"{int(f.stem):04d}"] if f.stem.isdigit() else [])
        records.append((_int_suffix(f.stem), images.find(stems, where), where, items))
    return records


def _ctw_line(line: str, where: str):
    if "####" in line:
        coords, text = line.split("####", 1)
        dc = text.strip() == "###"
    else:
        coords, text, dc = line, "", False
    try:
        vals = [float(v) for v in coords.strip().strip(",").split(",") if v.strip()]
    except ValueError:  # a trailing text or CARE flag: the plain comma-separated variant
        return _plain_line(line, where)
    if "####" not in line and len(vals) == 32:  # 2017 label: box + 14 offsets from (xmin, ymin)
        xmin, ymin = vals[0], vals[1]
        pts = [(xmin + vals[4 + 2 * i], ymin + vals[5 + 2 * i]) for i in range(14)]
        return pts, text, dc
    if len(vals) % 2:
        if "####" in line:
            raise DatasetError(f"{where}: odd number of coordinates ({len(vals)})")
        return _plain_line(line, where)  # a numeric text after the coordinates
    return list(zip(vals[0::2], vals[1::2])), text, dc


def _read_ctw_xml(f: Path, images: _Images, encoding: str = "utf-8"):
    import xml.etree.ElementTree as ET  # deferred: i3cl --help imports this module (for FORMATS)

    try:  # decoded by the one text rule (an encoding declaration in the file is not used)
        root = ET.fromstring(read_text(f, encoding))
    except ET.ParseError as e:
        raise DatasetError(f"{f}: not valid XML ({e})") from e
    records = []
    for image in root.iter("image"):
        name = image.get("file")
        where = f"{f}: image {name!r}"
        if not name:
            raise DatasetError(f"{f}: <image> without a 'file' attribute")
        items = []
        for k, b in enumerate(image.iter("box")):
            segs = b.findtext("segs")
            label = (b.findtext("label") or "").strip()
            if segs is None:
                raise DatasetError(f"{where} box {k}: no <segs>")
            try:
                vals = [float(v) for v in segs.split(",") if v.strip()]
            except ValueError as e:
                raise DatasetError(f"{where} box {k}: <segs> must be numbers ({e})") from e
            if len(vals) % 2:
                raise DatasetError(f"{where} box {k}: odd number of coordinates in <segs>")
            items.append((list(zip(vals[0::2], vals[1::2])), label, label == "###"))
        if images.root is not None and not (images.root / name).is_file():
            stem = Path(name).stem
            name = images.find([stem] + ([str(int(stem))] if stem.isdigit() else []), where)
        records.append((_int_suffix(Path(name).stem), name, where, items))
    return records


# ------------------------------------------------------------------ plain comma-separated polygons
_DONTCARE_TEXT = {"###", "#", "DONTCARE", "DONT CARE", "NOT CARE"}


def _is_number(tok: str) -> bool:
    try:
        float(tok)
    except ValueError:
        return False
    return True


def _looks_plain(lines: list[str]) -> bool:
    first = next((ln for ln in lines if ln.strip()), "")
    toks = first.split(",")
    return len(toks) >= 6 and all(_is_number(t) for t in toks[:6])


def _plain_line(line: str, where: str):
    """``x1,y1,...,xn,yn[,text]`` -> (points, text, dontcare). The text is everything after the last of an
    even number of leading numbers (so a numeric text such as ``2019`` after the coordinates stays text)."""
    toks = line.split(",")
    n = 0
    while n < len(toks) and _is_number(toks[n].strip()):
        n += 1
    if n % 2:
        n -= 1
    if n < 6:
        raise DatasetError(
            f"{where}: expected x1,y1,...,xn,yn[,text] with at least 3 points, got {line[:80]!r}"
        )
    vals = [float(t) for t in toks[:n]]
    text = ",".join(toks[n:]).strip()
    if text.startswith("####"):  # CTW1500 2020: ####text
        text = text[4:]
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    dc = text.upper() in _DONTCARE_TEXT
    if text.upper() == "CARE":
        text = ""
    return list(zip(vals[0::2], vals[1::2])), text, dc


def _label_stem(f: Path) -> str:
    """Image stem of a label file: without ``poly_gt_`` / ``gt_``; ``img1.jpg.txt`` -> ``img1.jpg``."""
    stem = f.stem
    for prefix in ("poly_gt_", "gt_"):
        if stem.startswith(prefix) and len(stem) > len(prefix):
            return stem[len(prefix) :]
    return stem


def _plain_record(f: Path, lines: list[str], images: _Images):
    where = str(f)
    items = [
        _plain_line(line.strip(), f"{where} line {n}")
        for n, line in enumerate(lines, start=1)
        if line.strip()
    ]
    stem = _label_stem(f)
    if Path(stem).suffix.lower() in IMAGE_EXTENSIONS:  # img1.jpg.txt
        name = stem if images.root is None else images.resolve(stem, where)
        return _int_suffix(Path(stem).stem), name, where, items
    stems = [stem] + ([str(int(stem)), f"{int(stem):04d}"] if stem.isdigit() else [])
    return _int_suffix(stem), images.find(stems, where), where, items


def _read_plain(ann: Path, images: _Images, encoding: str = "utf-8"):
    return [
        _plain_record(f, read_lines(f, encoding), images)
        for f in sorted(_label_files(ann, (".txt",)), key=_natural_key)
    ]


# ------------------------------------------------------------------ ICDAR2015 / MLT 2017 / RCTW-17
def _read_quads(ann: Path, images: _Images, fmt: str, encoding: str = "utf-8"):
    """Four points and a text per line; MLT 2017 adds a script column, RCTW-17 a difficulty column."""
    records = []
    for f in sorted(_label_files(ann, (".txt",)), key=_natural_key):
        where = str(f)
        items = []
        for n, raw in enumerate(read_lines(f, encoding), start=1):
            line = raw.strip()
            if not line:
                continue
            toks = line.split(",")
            lw = f"{where} line {n}"
            extra = 0 if fmt == "icdar2015" else 1
            if len(toks) < 8 + extra:
                raise DatasetError(
                    f"{lw}: expected x1,y1,...,x4,y4,"
                    f"{'' if not extra else 'script,' if fmt == 'mlt2017' else 'difficulty,'}"
                    f"text, got {line[:80]!r}"
                )
            try:
                vals = [float(t) for t in toks[:8]]
            except ValueError:
                raise DatasetError(f"{lw}: the first 8 values must be numbers, got {line[:80]!r}") from None
            text = ",".join(toks[8 + extra :]).strip()
            if len(text) >= 2 and text[0] == text[-1] == '"':
                text = text[1:-1]
            dc = text == "###"
            if fmt == "rctw17":
                flag = toks[8].strip()
                if flag not in ("0", "1"):
                    raise DatasetError(f"{lw}: the difficulty column must be 0 or 1, got {flag!r}")
                dc = dc or flag == "1"
            items.append((list(zip(vals[0::2], vals[1::2])), text, dc))
        stem = _label_stem(f)
        records.append((_int_suffix(stem), images.find([stem], where), where, items))
    return records


# ------------------------------------------------------------------ mmocr 1.x textdet json
def _read_mmocr(ann: Path, images: _Images, encoding: str = "utf-8"):
    if ann.is_dir():
        raise DatasetError(f"{ann}: mmocr --ann must be the json file (e.g. textdet_test.json)")
    data = read_json(ann, encoding)
    if not isinstance(data, dict) or not isinstance(data.get("data_list"), list):
        raise DatasetError(f"{ann}: expected an mmocr 1.x json with 'metainfo' and a 'data_list' list")
    records = []
    for i, entry in enumerate(data["data_list"]):
        where = f"{ann}: data_list[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("img_path"), str):
            raise DatasetError(f"{where}: expected an object with 'img_path'")
        size = None
        if entry.get("width") is not None and entry.get("height") is not None:
            try:
                size = (int(entry["width"]), int(entry["height"]))
            except (TypeError, ValueError):
                raise DatasetError(f"{where}: width/height must be integers") from None
        items = []
        for k, inst in enumerate(entry.get("instances", [])):
            if not isinstance(inst, dict):
                raise DatasetError(f"{where}.instances[{k}]: expected an object")
            pts = inst.get("polygon")
            if not pts and inst.get("bbox"):
                try:
                    x0, y0, x1, y1 = (float(v) for v in inst["bbox"])
                except (TypeError, ValueError):
                    raise DatasetError(f"{where}.instances[{k}]: bbox must be [x1, y1, x2, y2]") from None
                pts = [x0, y0, x1, y0, x1, y1, x0, y1]
            if pts is None:
                raise DatasetError(f"{where}.instances[{k}]: no 'polygon' or 'bbox'")
            text = str(inst.get("text", ""))
            items.append((pts, text, bool(inst.get("ignore", False)) or text == "###"))
        name = images.resolve(entry["img_path"], where)
        records.append((_int_suffix(Path(name).stem), name, where, items, size))
    return records


# ------------------------------------------------------------------ PaddleOCR (PPOCRLabel Label.txt)
def _read_paddleocr(ann: Path, images: _Images, encoding: str = "utf-8"):
    records = []
    for f in _label_files(ann, (".txt",)):
        for where, path, entries in read_tab_json_lines(f, encoding):
            if not isinstance(entries, list):
                raise DatasetError(f"{where}: expected a list of annotations after the TAB")
            items = []
            for k, e in enumerate(entries):
                if not isinstance(e, dict) or "points" not in e:
                    raise DatasetError(f"{where}[{k}]: expected an object with 'points'")
                text = str(e.get("transcription", ""))
                items.append((e["points"], text, text == "###" or bool(e.get("difficult", False))))
            name = images.resolve(path, where)
            records.append((_int_suffix(Path(name).stem), name, where, items))
    return records
