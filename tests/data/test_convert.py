"""Dataset converters on tiny hand-written official-format files."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from i3cl_core.data.convert import convert
from i3cl_core.data.errors import DatasetError


def _img(path, size=(64, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size).save(path)


def test_art_json(tmp_path):
    _img(tmp_path / "img" / "gt_0.jpg", (100, 80))
    _img(tmp_path / "img" / "gt_12.jpg", (30, 40))
    ann = {
        "gt_12": [
            {"points": [[0, 0], [10, 0], [10, 5], [0, 5]], "transcription": "ab", "illegibility": False}
        ],
        "gt_0": [
            {
                "points": [[1, 1], [21, 1], [21, 11], [1, 11]],
                "transcription": "hello",
                "illegibility": False,
                "language": "Latin",
            },
            {"points": [[30, 30], [40, 30], [40, 40]], "transcription": "###", "illegibility": False},
            {"points": [[50, 50], [60, 50], [60, 60]], "transcription": "x", "illegibility": True},
            {"points": [[0, 0], [20, 20], [20, 0], [0, 20]], "transcription": "bow", "illegibility": False},
            {"points": [[1, 1], [2, 2]], "transcription": "line", "illegibility": False},
        ],
    }
    (tmp_path / "train.json").write_text(json.dumps(ann))
    ds, stats = convert("art", tmp_path / "train.json", tmp_path / "img")
    assert [(im["id"], im["file_name"], im["width"], im["height"]) for im in ds["images"]] == [
        (0, "gt_0.jpg", 100, 80),
        (12, "gt_12.jpg", 30, 40),
    ]
    anns = ds["annotations"]
    assert [a["iscrowd"] for a in anns] == [0, 1, 1, 0, 0]
    assert (
        anns[0]["bbox"] == [1, 1, 20, 10] and anns[0]["area"] == 200 and anns[0]["transcription"] == "hello"
    )
    assert len(anns[3]["segmentation"]) == 2 and anns[3]["area"] == 200  # bow-tie -> two triangles
    assert (stats.repaired, stats.skipped, stats.dontcare) == (1, 1, 2)
    assert ds["categories"] == [{"id": 1, "name": "text"}]


def test_totaltext_txt(tmp_path):
    _img(tmp_path / "img" / "img11.jpg")
    lines = (
        "x: [[115 503 494 115]], y: [[322 346 426 404]], ornt: [u'm'], transcriptions: [u'SALTED']\n"
        "x: [[ 10  20  30\n  30 20 10]], y: [[5 5 5 15 15 15]], ornt: [u'c'], transcriptions: [u\"it's\"]\n"
        "x: [[1 2 3 4]], y: [[1 1 2 2]], ornt: [u'#'], transcriptions: [u'#']\n"
    )
    (tmp_path / "gt").mkdir()
    (tmp_path / "gt" / "poly_gt_img11.txt").write_text(lines)
    ds, stats = convert("totaltext", tmp_path / "gt", tmp_path / "img")
    assert ds["images"][0]["file_name"] == "img11.jpg" and ds["images"][0]["id"] == 11
    anns = ds["annotations"]
    assert [a["transcription"] for a in anns] == ["SALTED", "it's", "#"]
    assert [a["iscrowd"] for a in anns] == [0, 0, 1]
    assert anns[1]["segmentation"] == [[10, 5, 20, 5, 30, 5, 30, 15, 20, 15, 10, 15]]


def test_ctw1500_label_and_2020_formats(tmp_path):
    _img(tmp_path / "img" / "0001.jpg")
    _img(tmp_path / "img" / "1001.jpg")
    offsets = []
    for i in range(7):
        offsets += [10 * i, 0]
    for i in range(7):
        offsets += [60 - 10 * i, 20]
    (tmp_path / "gt").mkdir()
    (tmp_path / "gt" / "0001.txt").write_text(",".join(map(str, [100, 200, 160, 220] + offsets)) + "\n")
    pts = ",".join(str(v) for v in [0, 0, 10, 0, 20, 0, 20, 10, 10, 10, 0, 10])
    (tmp_path / "gt" / "1001.txt").write_text(f"{pts},####HELLO\n{pts},#######\n")
    ds, stats = convert("ctw1500", tmp_path / "gt", tmp_path / "img")
    assert [im["file_name"] for im in ds["images"]] == ["0001.jpg", "1001.jpg"]
    first = ds["annotations"][0]
    assert first["segmentation"][0][:4] == [100, 200, 110, 200] and first["bbox"] == [100, 200, 60, 20]
    assert [(a["transcription"], a["iscrowd"]) for a in ds["annotations"][1:]] == [("HELLO", 0), ("###", 1)]


def test_ctw1500_xml(tmp_path):
    _img(tmp_path / "img" / "0005.jpg")
    (tmp_path / "0005.xml").write_text(
        '<Annotations><image file="0005.jpg">'
        '<box height="10" left="0" top="0" width="20"><label>ab</label><segs>0,0,20,0,20,10,0,10</segs></box>'
        '<box height="10" left="0" top="0" width="20"><label>###</label><segs>30,0,40,0,40,10</segs></box>'
        "</image></Annotations>"
    )
    ds, _ = convert("ctw1500", tmp_path / "0005.xml", tmp_path / "img")
    assert ds["images"][0]["id"] == 5
    assert [(a["transcription"], a["iscrowd"]) for a in ds["annotations"]] == [("ab", 0), ("###", 1)]


def test_missing_image_names_file(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "a.json").write_text(json.dumps({"gt_3": []}))
    with pytest.raises(DatasetError, match=r"gt_3.*gt_3\.jpg not found"):
        convert("art", tmp_path / "a.json", tmp_path / "img")
    (tmp_path / "gt.txt").write_text("1,2,3\n")
    with pytest.raises(DatasetError, match="gt.txt"):
        convert("ctw1500", tmp_path / "gt.txt", tmp_path / "img")


def test_cli_convert_writes_json(tmp_path, capsys):
    from i3cl_core.cli import main

    _img(tmp_path / "img" / "gt_1.jpg")
    (tmp_path / "a.json").write_text(
        json.dumps({"gt_1": [{"points": [[0, 0], [5, 0], [5, 5]], "transcription": "a"}]})
    )
    out = tmp_path / "out" / "coco.json"
    assert (
        main(
            [
                "convert-dataset",
                "--format",
                "lsvt",
                "--ann",
                str(tmp_path / "a.json"),
                "--img-root",
                str(tmp_path / "img"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "1 images, 1 annotations" in capsys.readouterr().out
    assert json.loads(out.read_text())["annotations"][0]["area"] == 12.5
    assert (
        main(
            [
                "convert-dataset",
                "--format",
                "art",
                "--ann",
                str(tmp_path / "nope.json"),
                "--img-root",
                str(tmp_path / "img"),
                "--out",
                str(out),
            ]
        )
        == 2
    )


def test_converted_dataset_evaluates(tmp_path):
    """The converter's output is valid evaluation GT (ArT json -> COCO -> evaluate with the ArT json as
    preds)."""
    from i3cl_core.evaluation import evaluate, load_ground_truth, load_predictions

    _img(tmp_path / "img" / "gt_7.jpg", (100, 100))
    box = [[10, 10], [50, 10], [50, 30], [10, 30]]
    (tmp_path / "a.json").write_text(json.dumps({"gt_7": [{"points": box, "transcription": "a"}]}))
    ds, _ = convert("art", tmp_path / "a.json", tmp_path / "img")
    (tmp_path / "coco.json").write_text(json.dumps(ds))
    (tmp_path / "res.json").write_text(json.dumps({"res_7": [{"points": box, "confidence": 0.9}]}))
    gt = load_ground_truth(tmp_path / "coco.json")
    assert evaluate(gt, load_predictions(tmp_path / "res.json", gt))["hmean"] == 1
