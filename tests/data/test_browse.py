"""``i3cl browse``: polygons drawn on the images, do-not-care and predictions in their own colours."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from i3cl_core.cli import main
from i3cl_core.data import browse, synth
from i3cl_core.data.errors import DatasetError

RED = np.array(browse.DONTCARE_COLOUR)  # BGR
GREEN = np.array(browse.CARE_COLOUR)
BLUE = np.array(browse.PRED_COLOUR)


@pytest.fixture()
def dataset(tmp_path):
    """A tiny generated dataset whose first annotation of each image is turned into do-not-care."""
    out = tmp_path / "data"
    synth.generate_dataset(out, 3, seed=1, size=(192, 160), progress=False, cjk=False)
    coco = json.loads((out / "annotations.json").read_text(encoding="utf-8"))
    seen = set()
    for ann in coco["annotations"]:
        if ann["image_id"] not in seen:
            seen.add(ann["image_id"])
            ann["iscrowd"], ann["transcription"] = 1, "###"
        else:
            ann["iscrowd"] = 0
    coco["annotations"][-1]["lossweight"] = 0.5
    ann_file = out / "edited.json"
    ann_file.write_text(json.dumps(coco), encoding="utf-8")
    return ann_file, out / "images", coco


def _edge_points(poly: np.ndarray, step: float = 1.0) -> np.ndarray:
    pts = []
    for a, b in zip(poly, np.roll(poly, -1, axis=0)):
        n = max(2, int(np.hypot(*(b - a)) / step))
        pts.append(a + (b - a) * np.linspace(0, 1, n, endpoint=False)[:, None])
    return np.concatenate(pts)


def _colour_near(img: np.ndarray, pts: np.ndarray, colour: np.ndarray) -> float:
    """Share of the points with a pixel of exactly ``colour`` within one pixel."""
    h, w = img.shape[:2]
    hits = 0
    for x, y in np.round(pts).astype(int):
        win = img[max(y - 1, 0) : min(y + 2, h), max(x - 1, 0) : min(x + 2, w)]
        hits += bool((win == colour).all(axis=-1).any())
    return hits / len(pts)


def test_browse_draws_every_image_with_dontcare_in_red(dataset, tmp_path):
    ann_file, img_root, coco = dataset
    written = browse.browse_dataset(ann_file, img_root, tmp_path / "viz")
    assert [p.name for p in written] == [im["file_name"].replace(".jpg", ".png") for im in coco["images"]]
    for im, path in zip(coco["images"], written):
        img = cv2.imread(str(path))
        assert img.shape[:2] == (im["height"], im["width"])
        anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        crowd = [a for a in anns if a["iscrowd"]]
        care = [a for a in anns if not a["iscrowd"]]
        assert crowd
        for a in crowd:
            poly = np.asarray(a["segmentation"][0]).reshape(-1, 2)
            assert _colour_near(img, _edge_points(poly), RED) >= 0.8
        for a in care:
            poly = np.asarray(a["segmentation"][0]).reshape(-1, 2)
            assert _colour_near(img, _edge_points(poly), GREEN) >= 0.5


def test_browse_limit_ids_and_predictions(dataset, tmp_path):
    ann_file, img_root, coco = dataset
    ann = next(a for a in coco["annotations"] if a["image_id"] == 2)
    preds = [
        {"image_id": 2, "category_id": 1, "segmentation": [[10, 10, 60, 10, 60, 40, 10, 40]], "score": 0.87},
        {"image_id": 2, "category_id": 1, "segmentation": ann["segmentation"], "score": 0.01},
    ]
    pred_file = tmp_path / "preds.json"
    pred_file.write_text(json.dumps(preds), encoding="utf-8")
    assert len(browse.browse_dataset(ann_file, img_root, tmp_path / "lim", limit=2)) == 2
    written = browse.browse_dataset(ann_file, img_root, tmp_path / "ids", pred_file=pred_file, ids=[2])
    assert [p.name for p in written] == ["synth_000002.png"]
    img = cv2.imread(str(written[0]))
    square = np.array([[10, 10], [60, 10], [60, 40], [10, 40]], float)
    assert _colour_near(img, _edge_points(square), BLUE) >= 0.5


def test_browse_rle_and_ignore(tmp_path):
    from pycocotools import mask as mask_utils

    img_root = tmp_path / "imgs"
    img_root.mkdir()
    cv2.imwrite(str(img_root / "a.png"), np.full((64, 80, 3), 128, np.uint8))
    m = np.zeros((64, 80), np.uint8, order="F")
    m[20:40, 30:60] = 1
    rle = mask_utils.encode(m)
    rle["counts"] = rle["counts"].decode("ascii")
    coco = {
        "images": [{"id": 5, "file_name": "a.png", "width": 80, "height": 64}],
        "annotations": [{"id": 1, "image_id": 5, "segmentation": rle, "iscrowd": 0, "ignore": True}],
    }
    ann_file = tmp_path / "rle.json"
    ann_file.write_text(json.dumps(coco), encoding="utf-8")
    (png,) = browse.browse_dataset(ann_file, img_root, tmp_path / "out")
    img = cv2.imread(str(png))
    assert (img[20, 35:55] == RED).all(axis=-1).all()


def test_browse_refuses_escaping_paths_and_skips_missing(dataset, tmp_path, capsys):
    ann_file, img_root, coco = dataset
    coco["images"][1]["file_name"] = "gone.jpg"
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps(coco), encoding="utf-8")
    written = browse.browse_dataset(missing, img_root, tmp_path / "m")
    assert len(written) == 2 and "gone.jpg" in capsys.readouterr().err

    coco["images"][0]["file_name"] = "../../outside.jpg"
    escaping = tmp_path / "escaping.json"
    escaping.write_text(json.dumps(coco), encoding="utf-8")
    with pytest.raises(DatasetError, match="escaping.json"):
        browse.browse_dataset(escaping, img_root, tmp_path / "e")

    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(DatasetError, match="bad.json"):
        browse.browse_dataset(bad, img_root, tmp_path / "b")


def test_cli_browse(dataset, tmp_path, capsys):
    ann_file, img_root, _ = dataset
    rc = main(
        [
            "browse",
            "--ann",
            str(ann_file),
            "--img-root",
            str(img_root),
            "--out",
            str(tmp_path / "v"),
            "--limit",
            "1",
        ]
    )
    assert rc == 0 and [p.name for p in (tmp_path / "v").iterdir()] == ["synth_000001.png"]
    rc = main(
        [
            "browse",
            "--ann",
            str(tmp_path / "nope.json"),
            "--img-root",
            str(img_root),
            "--out",
            str(tmp_path / "w"),
        ]
    )
    assert rc == 2 and "nope.json" in capsys.readouterr().err
