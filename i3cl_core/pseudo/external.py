"""Predictions of detectors people already run, as COCO results that the ensemble can fuse.

``to_coco_results(fmt, path, images)`` reads one detector's output and returns COCO results
(``image_id``, ``category_id`` 1, ``segmentation``, ``bbox``, ``score``) for the images of ``images``
(a COCO ``images`` list), matched by file name: the full ``file_name``, else its base name, else its
stem. Formats:

* ``paddleocr`` (also RapidOCR): a json ``{image name: result}`` where a result is the list that
  ``PaddleOCR.ocr(img)`` returns for one image (``[[points, [text, score]], ...]``, optionally wrapped in
  a one-page list) or that RapidOCR returns (``[[points, text, score], ...]``) or a list of
  ``{"points", "score"}``; or PaddleOCR's ``system_results.txt`` (``name<TAB>[{"transcription",
  "points", "score"}]``, a missing score is 1); or a folder of PaddleOCR 3 ``save_to_json`` files
  (``input_path``, ``dt_polys``, ``dt_scores`` or ``rec_scores``).
* ``doctr``: docTR's ``Document.export()`` json of one image, as a folder of ``<image stem>.json`` files
  or a json ``{image name: export}``. Every word is a detection: its relative ``geometry`` (two corners or
  four points) scaled by the page ``dimensions`` (height, width); its score is ``objectness_score`` where
  docTR gives one, else the word's ``confidence``.
* ``mmocr``: the prediction json of mmocr's inferencer (``{"det_polygons": [[x1, y1, ...]],
  "det_scores": [...]}``), as a folder of ``<image stem>.json`` files or a json ``{image name: prediction}``.

Scores follow the rule of evaluate and fuse (:func:`~i3cl_core.data.validate.score_value`: a number in
[0, 1], not a string). A detection with a non-finite coordinate (NaN, inf) is skipped and counted. Input
files are decoded as UTF-8, or with ``encoding`` (``--encoding``), by the one text rule of
:func:`~i3cl_core.data.validate.read_text`; the results are written as strict JSON.

``i3cl ensemble --extra FORMAT:PATH`` and the pipeline's ``infer.extra_members`` convert with this module
into ``<out>/extra/`` before fusing; ``i3cl convert-predictions`` writes the COCO results file alone.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path

from i3cl_core.data.errors import DatasetError
from i3cl_core.data.validate import (
    coco_images,
    read_json,
    read_tab_json_lines,
    score_value,
    text_encoding,
    write_json,
)

EXTERNAL_FORMATS = ("paddleocr", "rapidocr", "doctr", "mmocr")


def parse_extra(spec: str) -> tuple[str | None, str]:
    """``"paddleocr:out/res.json"`` -> ``("paddleocr", "out/res.json")``; a plain path (a COCO results or
    ArT json) -> ``(None, path)``."""
    head, sep, tail = str(spec).partition(":")
    if sep and head.lower() in EXTERNAL_FORMATS:
        return head.lower(), tail
    return None, str(spec)


class _ImageIndex:
    def __init__(self, images: list[dict]):
        self.full, self.base, self.stem = {}, {}, {}
        self.ambiguous: set[str] = set()
        for im in images:
            name = str(im["file_name"]).replace("\\", "/")
            for table, key in ((self.full, name), (self.base, Path(name).name), (self.stem, Path(name).stem)):
                if key in table and table[key] != im["id"]:
                    self.ambiguous.add(key)
                table.setdefault(key, im["id"])

    def lookup(self, name: str):
        name = str(name).replace("\\", "/")
        for table, key in ((self.full, name), (self.base, Path(name).name), (self.stem, Path(name).stem)):
            if key in table:
                if key in self.ambiguous and table is not self.full:
                    raise DatasetError(
                        f"prediction for {name!r}: several images are named {key!r}; give full names"
                    )
                return table[key]
        return None


def _result(image_id, flat: list[float], score: float) -> dict:
    xs, ys = flat[0::2], flat[1::2]
    return {
        "image_id": image_id,
        "category_id": 1,
        "segmentation": [[round(float(v), 2) for v in flat]],
        "bbox": [
            round(min(xs), 2),
            round(min(ys), 2),
            round(max(xs) - min(xs), 2),
            round(max(ys) - min(ys), 2),
        ],
        "score": float(score),
    }


def _flat(points, where: str) -> list[float]:
    try:
        vals = [float(v) for p in points for v in (p if isinstance(p, (list, tuple)) else [p])]
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: points must be numbers, got {str(points)[:80]}") from None
    if len(vals) % 2 or len(vals) < 6:
        raise DatasetError(f"{where}: expected at least 3 (x, y) points, got {len(vals)} values")
    return vals


def _score(value, where: str) -> float:
    return score_value(value, where)  # the rule of evaluate, fuse and browse


# ------------------------------------------------------------------ PaddleOCR / RapidOCR
def _paddle_entries(result, where: str):
    """(flat points, score) of one image's OCR result, whichever of the shapes above it has."""
    if (
        isinstance(result, list)
        and len(result) == 1
        and isinstance(result[0], list)
        and result[0]
        and isinstance(result[0][0], list)
        and result[0][0]
        and isinstance(result[0][0][0], list)
        and result[0][0][0]
        and isinstance(result[0][0][0][0], (list, tuple))
    ):
        result = result[0]  # PaddleOCR's one-page wrapper
    if result is None or result == [None]:  # PaddleOCR: nothing found
        return []
    if not isinstance(result, list):
        raise DatasetError(f"{where}: expected a list of detections")
    out = []
    for k, e in enumerate(result):
        w = f"{where}[{k}]"
        if isinstance(e, dict):
            if "points" not in e:
                raise DatasetError(f"{w}: expected 'points'")
            out.append((_flat(e["points"], w), _score(e.get("score", e.get("confidence", 1.0)), w)))
        elif isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[1], (list, tuple)):
            out.append((_flat(e[0], w), _score(e[1][1], w)))  # [points, [text, score]]
        elif isinstance(e, (list, tuple)) and len(e) == 3:
            out.append((_flat(e[0], w), _score(e[2], w)))  # [points, text, score]
        else:
            raise DatasetError(
                f"{w}: expected [points, [text, score]], [points, text, score] or {{'points', 'score'}}"
            )
    return out


def _read_paddle(path: Path, encoding: str = "utf-8"):
    if path.is_dir():  # PaddleOCR 3 save_to_json files
        for f in sorted(path.glob("*.json")):
            d = read_json(f, encoding)
            if not isinstance(d, dict) or "dt_polys" not in d:
                raise DatasetError(f"{f}: expected a PaddleOCR result with 'input_path' and 'dt_polys'")
            polys = d["dt_polys"]
            scores = d.get("dt_scores") or d.get("rec_scores") or [1.0] * len(polys)
            if len(scores) != len(polys):
                raise DatasetError(f"{f}: {len(polys)} dt_polys but {len(scores)} scores")
            name = d.get("input_path") or f.stem
            yield (
                name,
                [
                    (_flat(p, f"{f}: dt_polys[{k}]"), _score(s, f"{f}: score {k}"))
                    for k, (p, s) in enumerate(zip(polys, scores))
                ],
            )
        return
    if path.suffix.lower() == ".txt":
        for where, name, entries in read_tab_json_lines(path, encoding):
            yield name, _paddle_entries(entries, where)
        return
    data = read_json(path, encoding)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected {{image name: OCR result}} (or a system_results.txt)")
    for name, result in data.items():
        yield name, _paddle_entries(result, f"{path}: {name}")


# ------------------------------------------------------------------ docTR
def _doctr_entries(export, where: str):
    if not isinstance(export, dict) or not isinstance(export.get("pages"), list):
        raise DatasetError(f"{where}: expected docTR's export with a 'pages' list")
    out = []
    for p, page in enumerate(export["pages"]):
        try:
            h, w = (float(v) for v in page["dimensions"])
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{where}: pages[{p}] needs 'dimensions': [height, width]") from None
        for b, block in enumerate(page.get("blocks", [])):
            for ln, line in enumerate(block.get("lines", [])):
                for k, word in enumerate(line.get("words", [])):
                    wh = f"{where}: pages[{p}].blocks[{b}].lines[{ln}].words[{k}]"
                    geom = word.get("geometry")
                    if not isinstance(geom, (list, tuple)) or len(geom) not in (2, 4):
                        raise DatasetError(f"{wh}: geometry must be 2 corners or 4 points")
                    try:
                        pts = [(float(x) * w, float(y) * h) for x, y in geom]
                    except (TypeError, ValueError):
                        raise DatasetError(f"{wh}: geometry must be numbers") from None
                    if len(pts) == 2:
                        (x0, y0), (x1, y1) = pts
                        pts = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
                    score = word.get("objectness_score", word.get("confidence", 1.0))
                    out.append(([v for xy in pts for v in xy], _score(score, wh)))
    return out


def _per_image_files_or_mapping(path: Path, encoding: str = "utf-8"):
    if path.is_dir():
        for f in sorted(path.glob("*.json")):
            yield f.stem, read_json(f, encoding), str(f)
        return
    data = read_json(path, encoding)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a folder of per-image json files or {{image name: prediction}}")
    for name, value in data.items():
        yield name, value, f"{path}: {name}"


# ------------------------------------------------------------------ mmocr
def _mmocr_entries(pred, where: str):
    if not isinstance(pred, dict) or "det_polygons" not in pred:
        raise DatasetError(f"{where}: expected mmocr's prediction with 'det_polygons' and 'det_scores'")
    polys, scores = pred["det_polygons"], pred.get("det_scores", [1.0] * len(pred["det_polygons"]))
    if len(polys) != len(scores):
        raise DatasetError(f"{where}: {len(polys)} det_polygons but {len(scores)} det_scores")
    return [
        (_flat(p, f"{where}: det_polygons[{k}]"), _score(s, f"{where}: det_scores[{k}]"))
        for k, (p, s) in enumerate(zip(polys, scores))
    ]


def _finite(flat: list[float]) -> bool:
    """All coordinates finite, and so are the box's width and height (1e308 - -1e308 is not)."""
    xs, ys = flat[0::2], flat[1::2]
    return (
        all(math.isfinite(v) for v in flat)
        and math.isfinite(max(xs) - min(xs))
        and math.isfinite(max(ys) - min(ys))
    )


def to_coco_results(fmt: str, path, images: list[dict], encoding: str = "utf-8") -> tuple[list[dict], dict]:
    """COCO results of one external detector on ``images``; stats count images matched and unknown, and
    detections skipped for non-finite coordinates (``non_finite``, ``non_finite_examples``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    text_encoding(encoding)  # an unknown encoding name fails before any file is read
    if fmt in ("paddleocr", "rapidocr"):
        per_image = ((name, entries) for name, entries in _read_paddle(path, encoding))
    elif fmt == "doctr":
        per_image = (
            (name, _doctr_entries(v, w)) for name, v, w in _per_image_files_or_mapping(path, encoding)
        )
    elif fmt == "mmocr":
        per_image = (
            (name, _mmocr_entries(v, w)) for name, v, w in _per_image_files_or_mapping(path, encoding)
        )
    else:
        raise DatasetError(f"unknown detector output format {fmt!r}; choose from {EXTERNAL_FORMATS}")
    index = _ImageIndex(images)
    results, stats, unknown, non_finite = [], Counter(), [], []
    for name, entries in per_image:
        image_id = index.lookup(name)
        if image_id is None:
            stats["unknown_images"] += 1
            if len(unknown) < 5:
                unknown.append(name)
            continue
        stats["images"] += 1
        for k, (flat, score) in enumerate(entries):
            if not _finite(flat):  # NaN / inf: not a polygon (and not valid JSON)
                stats["non_finite"] += 1
                if len(non_finite) < 5:
                    non_finite.append(f"{name} #{k}")
                continue
            results.append(_result(image_id, flat, score))
    stats["detections"] = len(results)
    if not stats["images"]:
        raise DatasetError(
            f"{path}: none of its {stats['unknown_images']} images is in the image list "
            f"(e.g. {unknown}); names are matched by file name, base name or stem"
        )
    return results, {**stats, "unknown_examples": unknown, "non_finite_examples": non_finite}


def skipped_message(stats: dict) -> str | None:
    """The warning for detections skipped for non-finite coordinates, or None."""
    if not stats.get("non_finite"):
        return None
    return (
        f"{stats['non_finite']} detections with non-finite coordinates (NaN or inf) were skipped "
        f"(e.g. {', '.join(stats['non_finite_examples'])})"
    )


def prepare_extra(spec: str, images: list[dict], out_dir, index: int) -> str:
    """A member path for fusion: ``spec`` itself, or ``FORMAT:PATH`` converted into ``out_dir``."""
    fmt, path = parse_extra(spec)
    if fmt is None:
        return path
    results, stats = to_coco_results(fmt, path, images)
    if stats.get("unknown_images"):
        logging.getLogger(__name__).warning(
            "%s: %d images not in the image list were ignored (e.g. %s)",
            spec,
            stats["unknown_images"],
            stats["unknown_examples"],
        )
    if skipped_message(stats):
        logging.getLogger(__name__).warning("%s: %s", spec, skipped_message(stats))
    out = Path(out_dir) / f"extra{index}_{fmt}_{Path(path).stem}.json"
    write_json(out, results)
    return str(out)


def convert_predictions(fmt: str, pred_path, images_json, out, encoding: str = "utf-8") -> dict:
    """Convert one detector's output ``pred_path`` (format ``fmt``) for the images of the COCO json
    ``images_json`` and write the COCO results to ``out`` (``i3cl convert-predictions``); returns the stats
    of :func:`to_coco_results`."""
    images = coco_images(read_json(images_json), str(images_json), size="optional", non_empty=True)
    results, stats = to_coco_results(fmt, pred_path, images, encoding=encoding)
    write_json(out, results)
    return stats
