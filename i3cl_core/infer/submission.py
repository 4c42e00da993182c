"""Predictions -> the input files of the official evaluation scripts (``i3cl export-submission``).

Reads predictions (a COCO results list, or an ArT submission json) and the image list they belong to (a
COCO json with ``images``: the ground truth, or the ``images.json`` that ``i3cl infer`` writes), and
writes, for ``--format``:

* ``totaltext``: ``OUT/<image stem>.txt`` per image, lines ``y1,x1,...,yn,xn`` (Total-Text's
  ``Deteval.py``: integers, y first);
* ``ctw1500``: ``OUT/<image stem>.txt`` per image, lines ``x1,y1,...,xn,yn`` (the CTW1500 2020 kit);
* ``art``: ``OUT/submission.json``, ``{"res_<n>": [{"points", "confidence"}]}``.

Every image of the list gets a file, empty when it has no detection, so that the official scripts (which
iterate over result files) see the same images as ``i3cl evaluate``. Coordinates are rounded to
integers (consecutive duplicate points dropped, polygons left with fewer than 3 points skipped); a
multi-part instance is written as its largest part. Predictions with a score below ``--score-thr`` are
dropped. Neither torch nor an image is needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from i3cl_core.data.errors import DatasetError
from i3cl_core.utils import atomic_write_json, atomic_write_text

FORMATS = ("totaltext", "ctw1500", "art")


def _largest_part(instance):
    # deferred: i3cl --help imports this module (for FORMATS)
    from i3cl_core.data.polygons import polygon_area

    parts = instance if isinstance(instance, list) else [instance]
    parts = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in parts]
    return max(parts, key=polygon_area) if parts else np.zeros((0, 2))


def export_submission(fmt: str, pred_path, images_path, out, score_thr: float = 0.0) -> dict:
    """Write the files; returns ``{"images", "detections", "skipped", "unknown_images", "out"}``."""
    # deferred: i3cl --help imports this module (for FORMATS)
    from i3cl_core.evaluation.io import load_ground_truth, load_predictions
    from i3cl_core.infer.export import art_entries, art_key, ctw1500_lines, totaltext_lines

    if fmt not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r}; choose from {FORMATS}")
    gt = load_ground_truth(images_path)
    preds = load_predictions(pred_path, gt)
    out = Path(out)
    n_det = n_skipped = 0
    stems: dict[str, object] = {}
    per_image = []
    for key, img in gt.images.items():
        polys, scores = preds.by_image.get(key, ([], []))
        results = [
            {"segmentation": [_largest_part(p).reshape(-1).tolist()], "score": s}
            for p, s in zip(polys, scores)
            if s >= score_thr
        ]
        stem = Path(img.file_name).stem
        if fmt != "art":
            if stem in stems:
                raise DatasetError(
                    f"{images_path}: images {stems[stem]!r} and {key!r} share the file stem {stem!r}; "
                    "their result files would overwrite each other"
                )
            stems[stem] = key
        per_image.append((img, stem, results))
    submission = {}
    for img, stem, results in per_image:
        if fmt == "art":
            entries = art_entries(results)
            submission[art_key(img.file_name)] = entries
            n_written = len(entries)
        else:
            text = totaltext_lines(results) if fmt == "totaltext" else ctw1500_lines(results)
            atomic_write_text(out / f"{stem}.txt", text)
            n_written = len(text.splitlines())
        n_det += n_written
        n_skipped += len(results) - n_written
    if fmt == "art":
        atomic_write_json(out / "submission.json", submission)
    return {
        "images": len(per_image),
        "detections": n_det,
        "skipped": n_skipped,
        "unknown_images": len(preds.unknown_image_ids),
        "out": str(out),
    }
