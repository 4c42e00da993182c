"""Converters for the formats in the wild: plain comma-separated polygons (CTW1500 / Total-Text as many
repositories ship them), ICDAR2015 / MLT 2017 / RCTW-17 txt, mmocr 1.x json, PaddleOCR Label.txt, and
conversion without images."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from i3cl_core.data.convert import convert
from i3cl_core.data.errors import DatasetError


def _img(path, size=(64, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size).save(path)


def _anns(ds):
    return [(a["segmentation"][0], a["transcription"], a["iscrowd"]) for a in ds["annotations"]]


def test_plain_ctw1500_and_totaltext_variants(tmp_path):
    _img(tmp_path / "img" / "1001.jpg", (200, 100))
    _img(tmp_path / "img" / "img11.jpg", (300, 200))
    gt = tmp_path / "gt"
    gt.mkdir()
    (gt / "1001.txt").write_text(
        "0,0,10,0,20,0,20,10,10,10,0,10,CARE\n"
        "5,5,15,5,15,15,5,15,###\n"
        "1,1,9,1,9,9,1,9,2019\n"
        "1,1,9,1,9,9,1,9,hello, world\n"
    )
    (gt / "poly_gt_img11.txt").write_text("\ufeff115,322,503,346,494,426,115,404,SALTED\n1,1,4,1,4,2,1,2,#\n")
    ds, stats = convert("plain", gt, tmp_path / "img")
    assert [(im["id"], im["file_name"], im["width"], im["height"]) for im in ds["images"]] == [
        (1001, "1001.jpg", 200, 100),
        (11, "img11.jpg", 300, 200),
    ]
    assert _anns(ds) == [
        ([0, 0, 10, 0, 20, 0, 20, 10, 10, 10, 0, 10], "", 0),
        ([5, 5, 15, 5, 15, 15, 5, 15], "###", 1),
        ([1, 1, 9, 1, 9, 9, 1, 9], "2019", 0),
        ([1, 1, 9, 1, 9, 9, 1, 9], "hello, world", 0),
        ([115, 322, 503, 346, 494, 426, 115, 404], "SALTED", 0),
        ([1, 1, 4, 1, 4, 2, 1, 2], "#", 1),
    ]
    assert stats.dontcare == 2
    # the dataset-named formats read the same files
    ds_ctw, _ = convert("ctw1500", gt / "1001.txt", tmp_path / "img")
    assert _anns(ds_ctw) == _anns(ds)[:4]
    ds_tt, _ = convert("totaltext", gt / "poly_gt_img11.txt", tmp_path / "img")
    assert _anns(ds_tt) == _anns(ds)[4:]


def test_plain_line_errors_name_the_line(tmp_path):
    _img(tmp_path / "img" / "a.jpg")
    (tmp_path / "a.txt").write_text("0,0,10,0,10,10,0,10,ok\n1,2,3,text\n")
    with pytest.raises(DatasetError, match=r"a\.txt line 2.*at least 3 points"):
        convert("plain", tmp_path / "a.txt", tmp_path / "img")


def test_icdar2015_mlt_rctw(tmp_path):
    _img(tmp_path / "img" / "img_1.jpg", (1280, 720))
    _img(tmp_path / "img" / "image_7.jpg", (100, 100))
    (tmp_path / "ic15").mkdir()
    (tmp_path / "ic15" / "gt_img_1.txt").write_text(
        "\ufeff377,117,463,117,465,130,378,130,Genaxis Theatre\n493,115,519,115,519,131,493,131,[06]\n"
        "374,155,409,155,409,170,374,170,###\n10,10,50,10,50,30,10,30,a,b\n"
    )
    ds, stats = convert("icdar2015", tmp_path / "ic15", tmp_path / "img")
    assert ds["images"] == [{"id": 1, "file_name": "img_1.jpg", "width": 1280, "height": 720}]
    assert [(t, dc) for _, t, dc in _anns(ds)] == [
        ("Genaxis Theatre", 0),
        ("[06]", 0),
        ("###", 1),
        ("a,b", 0),
    ]
    assert _anns(ds)[0][0] == [377, 117, 463, 117, 465, 130, 378, 130]

    (tmp_path / "mlt").mkdir()
    (tmp_path / "mlt" / "gt_img_1.txt").write_text(
        "1,1,20,1,20,10,1,10,Latin,Hello\n1,20,20,20,20,30,1,30,None,###\n"
    )
    ds, _ = convert("mlt2017", tmp_path / "mlt", tmp_path / "img")
    assert [(t, dc) for _, t, dc in _anns(ds)] == [("Hello", 0), ("###", 1)]

    (tmp_path / "rctw").mkdir()
    (tmp_path / "rctw" / "image_7.txt").write_text(
        '1,1,20,1,20,10,1,10,0,"中文"\n1,20,20,20,20,30,1,30,1,"模糊"\n'
    )
    ds, _ = convert("rctw17", tmp_path / "rctw", tmp_path / "img")
    assert ds["images"][0]["file_name"] == "image_7.jpg"
    assert [(t, dc) for _, t, dc in _anns(ds)] == [("中文", 0), ("模糊", 1)]
    (tmp_path / "rctw" / "image_7.txt").write_text('1,1,20,1,20,10,1,10,x,"a"\n')
    with pytest.raises(DatasetError, match="difficulty column must be 0 or 1"):
        convert("rctw17", tmp_path / "rctw", tmp_path / "img")


def test_mmocr_json(tmp_path):
    _img(tmp_path / "data" / "textdet_imgs" / "test" / "img_5.jpg", (64, 48))
    ann = {
        "metainfo": {
            "dataset_type": "TextDetDataset",
            "task_name": "textdet",
            "category": [{"id": 0, "name": "text"}],
        },
        "data_list": [
            {
                "img_path": "textdet_imgs/test/img_5.jpg",
                "height": 48,
                "width": 64,
                "seg_map": "x.txt",
                "instances": [
                    {
                        "polygon": [1, 1, 30, 1, 30, 10, 1, 10],
                        "bbox": [1, 1, 30, 10],
                        "bbox_label": 0,
                        "ignore": False,
                        "text": "abc",
                    },
                    {
                        "polygon": [1, 20, 30, 20, 30, 30, 1, 30],
                        "bbox": [1, 20, 30, 30],
                        "bbox_label": 0,
                        "ignore": True,
                    },
                    {"bbox": [40, 5, 60, 15], "bbox_label": 0, "ignore": False},
                ],
            }
        ],
    }
    (tmp_path / "textdet_test.json").write_text(json.dumps(ann))
    ds, stats = convert("mmocr", tmp_path / "textdet_test.json", tmp_path / "data")
    assert ds["images"] == [{"id": 5, "file_name": "textdet_imgs/test/img_5.jpg", "width": 64, "height": 48}]
    assert _anns(ds) == [
        ([1, 1, 30, 1, 30, 10, 1, 10], "abc", 0),
        ([1, 20, 30, 20, 30, 30, 1, 30], "", 1),
        ([40, 5, 60, 5, 60, 15, 40, 15], "", 0),
    ]
    # without images, the sizes come from the json
    ds2, stats2 = convert("mmocr", tmp_path / "textdet_test.json", no_images=True)
    assert ds2["images"] == ds["images"] and not stats2.warnings


def test_paddleocr_label_txt(tmp_path):
    _img(tmp_path / "train_data" / "crops" / "a.jpg", (64, 48))
    lines = [
        "crops/a.jpg\t"
        + json.dumps(
            [
                {"transcription": "你好", "points": [[1, 1], [30, 1], [30, 10], [1, 10]], "difficult": False},
                {
                    "transcription": "###",
                    "points": [[1, 20], [30, 20], [30, 30], [1, 30]],
                    "difficult": False,
                },
                {"transcription": "x", "points": [[40, 5], [60, 5], [60, 15], [40, 15]], "difficult": True},
            ],
            ensure_ascii=False,
        ),
    ]
    (tmp_path / "Label.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # PPOCRLabel writes the path with the image folder's name first: found under --img-root without it too
    ds, _ = convert("paddleocr", tmp_path / "Label.txt", tmp_path / "train_data")
    assert ds["images"][0]["file_name"] == "crops/a.jpg"
    assert [(t, dc) for _, t, dc in _anns(ds)] == [("你好", 0), ("###", 1), ("x", 1)]
    ds, _ = convert("paddleocr", tmp_path / "Label.txt", tmp_path / "train_data" / "crops")
    assert ds["images"][0]["file_name"] == "a.jpg" and ds["images"][0]["width"] == 64
    (tmp_path / "Label.txt").write_text("crops/a.jpg [1, 2]\n")
    with pytest.raises(DatasetError, match="TAB"):
        convert("paddleocr", tmp_path / "Label.txt", tmp_path / "train_data")


def test_no_images_sizes_and_warning(tmp_path, capsys):
    from i3cl_core.cli import main

    (tmp_path / "ic15").mkdir()
    (tmp_path / "ic15" / "gt_img_1.txt").write_text("1,1,20,1,20,10,1,10,a\n")
    (tmp_path / "ic15" / "gt_img_2.txt").write_text("1,1,20,1,20,10,1,10,###\n")
    ds, stats = convert("icdar2015", tmp_path / "ic15", no_images=True, sizes={"img_1.jpg": [1280, 720]})
    assert ds["images"] == [
        {"id": 1, "file_name": "img_1.jpg", "width": 1280, "height": 720},
        {"id": 2, "file_name": "img_2.jpg"},
    ]
    assert stats.without_size == 1 and len(stats.warnings) == 1 and "1 of 2 images" in stats.warnings[0]

    sizes = tmp_path / "sizes.json"
    sizes.write_text(
        json.dumps(
            {
                "images": [
                    {"file_name": "img_1.png", "width": 10, "height": 20},
                    {"file_name": "img_2.png", "width": 30, "height": 40},
                ]
            }
        )
    )
    out = tmp_path / "out.json"
    assert (
        main(
            [
                "convert-dataset",
                "--format",
                "icdar2015",
                "--ann",
                str(tmp_path / "ic15"),
                "--no-images",
                "--sizes",
                str(sizes),
                "--image-ext",
                "png",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "2 images, 2 annotations (1 do-not-care)" in captured.out
    assert [(im["file_name"], im["width"]) for im in json.loads(out.read_text())["images"]] == [
        ("img_1.png", 10),
        ("img_2.png", 30),
    ]
    # without --img-root and without --no-images: a clear error
    assert (
        main(["convert-dataset", "--format", "icdar2015", "--ann", str(tmp_path / "ic15"), "--out", str(out)])
        == 2
    )
    assert "--img-root is required" in capsys.readouterr().err
    sizes.write_text(json.dumps({"img_1.jpg": [0, 5]}))
    with pytest.raises(DatasetError, match="must be positive"):
        convert("icdar2015", tmp_path / "ic15", no_images=True, sizes=sizes)


def _strict_json(path):
    """Parse as strict JSON: a bare NaN / Infinity in the file fails."""

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


@pytest.mark.parametrize(
    "fmt, name, content",
    [
        ("icdar2015", "gt_img_1.txt", "1,1,20,1,20,10,1,10,ok\n1,20,30,20,30,30,1,30,caf\xe9\n"),
        ("plain", "gt_img_1.txt", "1,1,20,1,20,10,1,10,ok\n1,20,30,20,30,30,1,30,caf\xe9\n"),
        ("ctw1500", "img_1.txt", "1,1,20,1,20,10,1,10,####ok\n1,20,30,20,30,30,1,30,####caf\xe9\n"),
        (
            "totaltext",
            "poly_gt_img_1.txt",
            "x: [[1 20 20 1]], y: [[1 1 10 10]], ornt: [u'h'], transcriptions: [u'ok']\n"
            "x: [[1 30 30 1]], y: [[20 20 30 30]], ornt: [u'h'], transcriptions: [u'caf\xe9']\n",
        ),
        (
            "paddleocr",
            "Label.txt",
            'img_1.jpg\t[{"transcription": "ok", "points": [[1, 1], [20, 1], [20, 10], [1, 10]]}]\n'
            'img_1.jpg\t[{"transcription": "caf\xe9", "points": [[1, 20], [30, 20], [30, 30], [1, 30]]}]\n',
        ),
    ],
)
def test_latin1_labels_are_a_named_error_or_decoded_with_encoding(tmp_path, capsys, fmt, name, content):
    """Invalid UTF-8 is an error naming the file and the line (not U+FFFD in the data); --encoding decodes
    it."""
    from i3cl_core.cli import main

    _img(tmp_path / "img" / "img_1.jpg")
    (tmp_path / "gt").mkdir()
    (tmp_path / "gt" / name).write_bytes(content.encode("latin-1"))
    with pytest.raises(DatasetError, match=rf"{name} line 2: not valid utf-8 text .*--encoding"):
        convert(fmt, tmp_path / "gt", tmp_path / "img")
    ds, _ = convert(fmt, tmp_path / "gt", tmp_path / "img", encoding="latin-1")
    assert "café" in [a["transcription"] for a in ds["annotations"]]
    args = [
        "convert-dataset",
        "--format",
        fmt,
        "--ann",
        str(tmp_path / "gt"),
        "--img-root",
        str(tmp_path / "img"),
        "--out",
        str(tmp_path / "out.json"),
    ]
    assert main(args) == 2
    assert (
        f"i3cl convert-dataset: error: {tmp_path / 'gt' / name} line 2: not valid utf-8"
        in capsys.readouterr().err
    )
    assert main(args + ["--encoding", "latin-1"]) == 0
    assert "café" in [a["transcription"] for a in _strict_json(tmp_path / "out.json")["annotations"]]
    assert main(args + ["--encoding", "no-such-codec"]) == 2
    assert "unknown text encoding 'no-such-codec'" in capsys.readouterr().err


def test_skipped_polygons_are_counted_by_reason_and_output_is_strict_json(tmp_path, capsys):
    from i3cl_core.cli import main

    _img(tmp_path / "img" / "img_1.jpg", (64, 48))
    (tmp_path / "gt_img_1.txt").write_text(
        "1,1,20,1,20,10,1,10,ok\n"
        "1,1,nan,1,20,10,1,10,nan\n"
        "1,1,20,1,20,1,1,1,flat\n"
        "1.5e308,1,-1.5e308,1,-1.5e308,9,1.5e308,9,huge\n"
        "1e12,1e12,1e12,1e12,1e12,1e12,1e12,1e12,same\n"
        "1e12,1e12,1.0000000001e12,1e12,1.0000000001e12,1.0000000001e12,1e12,1.0000000001e12,far\n"
    )
    ds, stats = convert("icdar2015", tmp_path / "gt_img_1.txt", tmp_path / "img")
    assert [a["transcription"] for a in ds["annotations"]] == ["ok", "far"]
    assert ds["annotations"][1]["area"] == pytest.approx(1e4, rel=1e-3)  # 100 x 100 px at 1e12
    assert stats.skipped_reasons == {
        "non-finite coordinates": 1,
        "zero area": 2,
        "coordinates too large for a finite box or area": 1,
    }
    assert "gt_img_1.txt #1: non-finite coordinates" in stats.summary()
    assert stats.far_outside == 1 and "gt_img_1.txt #5" in stats.warnings[0]
    out = tmp_path / "out.json"
    assert (
        main(
            [
                "convert-dataset",
                "--format",
                "icdar2015",
                "--ann",
                str(tmp_path / "gt_img_1.txt"),
                "--img-root",
                str(tmp_path / "img"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "skipped 4 polygons (2 with zero area, 1 with non-finite coordinates" in captured.out
    assert "1 polygons have points more than one image size outside their image" in captured.err
    assert len(_strict_json(out)["annotations"]) == 2
