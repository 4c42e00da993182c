"""``i3cl convert-dataset``: official ArT / LSVT / Total-Text / CTW1500 annotations -> our COCO layout.

Output: ``{"images": [{id, file_name, width, height}], "annotations": [{id, image_id, category_id: 1,
segmentation: [[x0, y0, ...], ...], bbox, area, iscrowd, transcription}], "categories": [{id: 1, name: "text"}]}``
with ``file_name`` relative to ``--img-root`` and the size read from the image header (Pillow, lazily).

Input formats (``--ann``):

* ``art`` / ``lsvt``: one json ``{"gt_<n>": [{"points", "transcription", "illegibility", ...}]}``; image
  ``gt_<n>.jpg``; image id ``n``. Do-not-care (``iscrowd: 1``): ``illegibility`` true or transcription ``###``.
* ``totaltext``: a folder of ``poly_gt_img<N>.txt`` files (or one such file) with records
  ``x: [[x0 x1 ...]], y: [[y0 y1 ...]], ornt: [u'c'], transcriptions: [u'TEXT']`` (a record may wrap over
  several lines); image ``img<N>.<ext>``. Do-not-care: orientation ``#`` (or transcription ``#``).
* ``ctw1500``: a folder of per-image ``.txt`` files (or one file), each line either the 2017 label format
  (32 integers: ``xmin, ymin, xmax, ymax`` then 14 ``(dx, dy)`` offsets from ``(xmin, ymin)``) or the 2020
  test format ``x1,y1,...,xn,yn,####text`` (do-not-care when the text is ``###``); or the 2020 XML train
  labels (``<image file=...><box ...><label>text</label><segs>x1,y1,...</segs></box></image>``, ``###``
  labels do-not-care). The image is ``<stem>.<ext>`` (``.txt``/``.xml`` stem), also trying the integer
  stem without zero padding.

Self-intersecting polygons are repaired (``shapely.make_valid``, keeping every polygonal part: the
segmentation then lists several polygons); polygons with fewer than 3 points, non-finite coordinates or zero
area are skipped. The counts are printed.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

from i3cl_core.data.errors import DatasetError
from i3cl_core.utils import read_json

FORMATS = ("art", "lsvt", "totaltext", "ctw1500")
IMAGE_EXTS = (".jpg", ".JPG", ".jpeg", ".JPEG", ".png", ".PNG", ".bmp", ".gif")


@dataclass
class ConvertStats:
    images: int = 0
    annotations: int = 0
    dontcare: int = 0
    repaired: int = 0
    skipped: int = 0
    skipped_where: list = field(default_factory=list)

    def summary(self) -> str:
        s = (f"{self.images} images, {self.annotations} annotations ({self.dontcare} do-not-care); "
             f"repaired {self.repaired} self-intersecting polygons; skipped {self.skipped} polygons with < 3 points, "
             f"non-finite coordinates or zero area")
        if self.skipped_where:
            s += " (first: " + "; ".join(self.skipped_where[:5]) + ")"
        return s


# ------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", required=True, choices=FORMATS, help="annotation format")
    parser.add_argument("--ann", required=True, help="annotation json (art/lsvt), or a folder / file of txt or xml labels")
    parser.add_argument("--img-root", required=True, help="image folder; file_name is written relative to it")
    parser.add_argument("--out", required=True, help="output COCO json")


def run(args) -> int:
    from i3cl_core.utils import atomic_write_json

    dataset, stats = convert(args.format, args.ann, args.img_root)
    atomic_write_json(args.out, dataset)
    print(f"wrote {args.out}: {stats.summary()}")
    return 0


# ------------------------------------------------------------------ core
def convert(fmt: str, ann, img_root) -> tuple[dict, ConvertStats]:
    """Convert and return ``(coco_dataset, stats)``. Raises DatasetError / FileNotFoundError on bad input."""
    ann = Path(ann)
    img_root = Path(img_root)
    if not ann.exists():
        raise FileNotFoundError(f"{ann}: no such file or folder")
    if not img_root.is_dir():
        raise FileNotFoundError(f"{img_root}: image root is not a folder")
    if fmt in ("art", "lsvt"):
        records = _read_art(ann)
    elif fmt == "totaltext":
        records = _read_totaltext(ann, img_root)
    elif fmt == "ctw1500":
        records = _read_ctw1500(ann, img_root)
    else:
        raise DatasetError(f"unknown format {fmt!r}; choose from {FORMATS}")
    return _build(records, img_root)


# each record: (image_id or None, file_name relative to img_root, source description, [(points, text, dontcare)])
def _build(records, img_root: Path) -> tuple[dict, ConvertStats]:
    from i3cl_core.utils import safe_join

    stats = ConvertStats()
    images, annotations = [], []
    used_ids = set()
    next_id = 1
    for image_id, file_name, where, items in records:
        if image_id is None or image_id in used_ids:
            while next_id in used_ids:
                next_id += 1
            image_id = next_id
        used_ids.add(image_id)
        try:
            path = safe_join(img_root, file_name)
        except ValueError as e:
            raise DatasetError(f"{where}: {e}") from e
        width, height = _image_size(path, where)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for k, (points, text, dc) in enumerate(items):
            polys, repaired = _clean_polygon(points)
            if not polys:
                stats.skipped += 1
                stats.skipped_where.append(f"{where} #{k}")
                continue
            stats.repaired += repaired
            flat = [[round(float(v), 2) for v in p.ravel()] for p in polys]
            xy = _concat(polys)
            x0, y0 = xy.min(axis=0)
            x1, y1 = xy.max(axis=0)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "segmentation": flat,
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "area": float(sum(_area(p) for p in polys)), "iscrowd": int(bool(dc)), "transcription": text,
            })
            stats.dontcare += int(bool(dc))
    stats.images = len(images)
    stats.annotations = len(annotations)
    dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "text"}]}
    return dataset, stats


def _concat(polys):
    import numpy as np

    return np.concatenate(polys, axis=0)


def _area(p) -> float:
    import shapely

    return float(shapely.Polygon(p).area)


def _clean_polygon(points):
    """-> (list of (N, 2) arrays, repaired flag). Empty list = skip."""
    import numpy as np
    import shapely

    from i3cl_core.evaluation.geometry import STATUS_INVALID, STATUS_REPAIRED, build_geometries

    try:
        arr = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        return [], False
    geoms, status = build_geometries([arr])
    if status[0] == STATUS_INVALID:
        return [], False
    if status[0] != STATUS_REPAIRED:
        return [arr], False
    parts = [np.asarray(p.exterior.coords)[:-1] for p in shapely.get_parts(geoms[0])
             if p.geom_type == "Polygon" and p.area > 0]
    return parts, True


def _image_size(path: Path, where: str) -> tuple[int, int]:
    from PIL import Image

    if not path.is_file():
        raise DatasetError(f"{where}: image {path} not found")
    try:
        with Image.open(path) as im:  # reads the header only
            return int(im.size[0]), int(im.size[1])
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, ...
        raise DatasetError(f"{where}: cannot read image {path} ({e})") from e


def _find_image(img_root: Path, stems: list[str], where: str) -> str:
    for stem in stems:
        for ext in IMAGE_EXTS:
            if (img_root / f"{stem}{ext}").is_file():
                return f"{stem}{ext}"
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
def _read_art(ann: Path):
    if ann.is_dir():
        raise DatasetError(f"{ann}: art/lsvt --ann must be the json file")
    data = read_json(ann)
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
    r"\s*,\s*transcriptions:\s*\[\s*u?(?P<q2>['\"])(?P<t>.*?)(?P=q2)\s*\]", re.S)
_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def _read_totaltext(ann: Path, img_root: Path):
    records = []
    for f in sorted(_label_files(ann, (".txt",)), key=_natural_key):
        text = f.read_text(encoding="utf-8", errors="replace")
        where = str(f)
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
            raise DatasetError(f"{where}: no 'x: [[...]], y: [[...]], ornt: [...], transcriptions: [...]' records")
        stem = f.stem
        img_stem = stem[len("poly_gt_"):] if stem.startswith("poly_gt_") else stem
        records.append((_int_suffix(img_stem), _find_image(img_root, [img_stem], where), where, items))
    return records


def _int_suffix(stem: str):
    m = re.search(r"(\d+)$", stem)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------ CTW1500
def _read_ctw1500(ann: Path, img_root: Path):
    files = sorted(_label_files(ann, (".txt", ".xml")), key=_natural_key)
    records = []
    for f in files:
        if f.suffix.lower() == ".xml":
            records.extend(_read_ctw_xml(f, img_root))
            continue
        where = str(f)
        items = []
        for n, line in enumerate(f.read_text(encoding="utf-8-sig", errors="replace").splitlines(), start=1):
            line = line.strip()
            if not line:
                continue
            items.append(_ctw_line(line, f"{where} line {n}"))
        stems = [f.stem] + ([str(int(f.stem)), f"{int(f.stem):04d}"] if f.stem.isdigit() else [])
        records.append((_int_suffix(f.stem), _find_image(img_root, stems, where), where, items))
    return records


def _ctw_line(line: str, where: str):
    if "####" in line:
        coords, text = line.split("####", 1)
        dc = text.strip() == "###"
    else:
        coords, text, dc = line, "", False
    try:
        vals = [float(v) for v in coords.strip().strip(",").split(",") if v.strip()]
    except ValueError as e:
        raise DatasetError(f"{where}: coordinates must be numbers ({e})") from e
    if "####" not in line and len(vals) == 32:  # 2017 label: box + 14 offsets from (xmin, ymin)
        xmin, ymin = vals[0], vals[1]
        pts = [(xmin + vals[4 + 2 * i], ymin + vals[5 + 2 * i]) for i in range(14)]
        return pts, text, dc
    if len(vals) % 2:
        raise DatasetError(f"{where}: odd number of coordinates ({len(vals)})")
    return list(zip(vals[0::2], vals[1::2])), text, dc


def _read_ctw_xml(f: Path, img_root: Path):
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(f).getroot()
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
        if not (img_root / name).is_file():
            stem = Path(name).stem
            name = _find_image(img_root, [stem] + ([str(int(stem))] if stem.isdigit() else []), where)
        records.append((_int_suffix(Path(name).stem), name, where, items))
    return records
