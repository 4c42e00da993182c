"""One rule per field, the same in every command: string scores, sizes, far-outside coordinates, ids."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from i3cl_core.data.errors import DatasetError


def _files(tmp_path, score=0.9, width=320, coords=(10, 10, 110, 10, 110, 40, 10, 40)):
    (tmp_path / "img").mkdir(exist_ok=True)
    Image.new("RGB", (320, 240)).save(tmp_path / "img" / "a.jpg")
    images = [{"id": 1, "file_name": "a.jpg", "width": width, "height": 240}]
    gt = {
        "images": images,
        "categories": [{"id": 1, "name": "text"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "bbox": [10, 10, 100, 30],
                "segmentation": [list(coords)],
            }
        ],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "images.json").write_text(json.dumps({**gt, "annotations": []}))
    pred = [{"image_id": 1, "score": score, "segmentation": [list(coords)]}]
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    return tmp_path


def test_string_score_is_refused_by_evaluate_and_fuse_alike(tmp_path):
    from i3cl_core.config import FuseConfig
    from i3cl_core.evaluation import load_ground_truth, load_predictions
    from i3cl_core.pseudo.fuse import fuse_predictions

    d = _files(tmp_path, score="0.9")
    gt = load_ground_truth(d / "gt.json")
    with pytest.raises(
        DatasetError, match=r"pred.json: result #0 .*score must be a number in \[0, 1\], got '0.9' \(str\)"
    ):
        load_predictions(d / "pred.json", gt)
    with pytest.raises(
        DatasetError, match=r"pred.json: result #0 .*score must be a number in \[0, 1\], got .0.9. \(str\)"
    ):
        fuse_predictions(
            [str(d / "pred.json")], str(d / "images.json"), d / "o.json", FuseConfig(), progress=False
        )
    from i3cl_core.data.browse import read_results

    with pytest.raises(
        DatasetError, match=r"pred.json: result #0 .*score must be a number in \[0, 1\], got .0.9. \(str\)"
    ):
        read_results(d / "pred.json")  # browse --pred
    for bad in (True, 1.5, float("nan")):
        d = _files(tmp_path, score=bad)
        with pytest.raises(DatasetError, match="score must be a number in"):
            load_predictions(d / "pred.json", load_ground_truth(d / "gt.json"))


def test_negative_width_is_refused_by_evaluate_fuse_and_train_alike(tmp_path):
    from i3cl_core.config import FuseConfig
    from i3cl_core.data.coco import load_coco_records
    from i3cl_core.evaluation import load_ground_truth
    from i3cl_core.pseudo.fuse import fuse_predictions

    d = _files(tmp_path, width=-320)
    with pytest.raises(DatasetError, match="width and height must be positive integers"):
        load_ground_truth(d / "gt.json")
    with pytest.raises(DatasetError, match="width and height must be positive integers"):
        fuse_predictions(
            [str(d / "pred.json")], str(d / "images.json"), d / "o.json", FuseConfig(), progress=False
        )
    with pytest.raises(DatasetError, match="width and height must be positive integers"):
        load_coco_records(d / "gt.json", d / "img")


def test_far_outside_coordinates_are_counted_and_dropped(tmp_path, capsys):
    from i3cl_core.cli import main
    from i3cl_core.config import FuseConfig
    from i3cl_core.data.coco import load_coco_records
    from i3cl_core.pseudo.fuse import fuse_predictions

    d = _files(tmp_path, coords=(10, 10, 1e12, 10, 1e12, 40, 10, 40))
    records, report = load_coco_records(d / "gt.json", d / "img", keep_empty=True)
    assert report.dropped["far_outside_image"] == 1 and not records[0].instances
    assert main(["evaluate", "--gt", str(d / "gt.json"), "--pred", str(d / "pred.json")]) == 0
    err = capsys.readouterr().err
    assert "1 predictions have points more than one image size outside their image" in err
    assert "1 ground-truth polygons have points more than one image size outside their image" in err
    assert (
        main(
            [
                "browse",
                "--ann",
                str(d / "gt.json"),
                "--img-root",
                str(d / "img"),
                "--out",
                str(d / "v"),
                "--pred",
                str(d / "pred.json"),
            ]
        )
        == 0
    )
    assert (
        "2 polygons with points more than one image size outside their image were not drawn"
        in capsys.readouterr().err
    )
    cfg = FuseConfig(auto_keep_thr=False)
    with pytest.raises(DatasetError, match="no usable prediction"):
        fuse_predictions([str(d / "pred.json")], str(d / "images.json"), d / "o.json", cfg, progress=False)
    s = fuse_predictions(
        [str(d / "pred.json")], str(d / "images.json"), d / "o.json", cfg, progress=False, allow_empty=True
    )
    assert s["model_stats"][0]["outside_image"] == 1 and s["pseudo_labels"] == 0


def test_browse_refuses_duplicate_image_ids(tmp_path, capsys):
    from i3cl_core.cli import main

    d = _files(tmp_path)
    data = json.loads((d / "gt.json").read_text())
    data["images"].append(dict(data["images"][0], file_name="b.jpg"))
    (d / "dup.json").write_text(json.dumps(data))
    assert (
        main(["browse", "--ann", str(d / "dup.json"), "--img-root", str(d / "img"), "--out", str(d / "v")])
        == 2
    )
    assert "images[0] and images[1] have the same id 1" in capsys.readouterr().err


def test_one_image_reader_names_truncated_files_everywhere(tmp_path, capsys):
    """A truncated JPEG: infer's reader, the training reader and browse all refuse it, naming the file."""
    from i3cl_core.cli import main
    from i3cl_core.data.image_io import read_image

    d = _files(tmp_path)
    Image.new("RGB", (320, 240), "white").save(d / "img" / "full.jpg", quality=95)
    data = (d / "img" / "full.jpg").read_bytes()
    (d / "img" / "a.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"a\.jpg: image 1 is a truncated JPEG"):
        read_image(d / "img" / "a.jpg", "image 1")
    assert read_image(d / "img" / "full.jpg").shape == (240, 320, 3)
    from i3cl_core.data.coco import load_coco_records
    from i3cl_core.data.coco import read_image as read_record

    records, _ = load_coco_records(d / "gt.json", d / "img")
    with pytest.raises(DatasetError, match="truncated JPEG"):
        read_record(records[0])
    assert (
        main(["browse", "--ann", str(d / "gt.json"), "--img-root", str(d / "img"), "--out", str(d / "v")])
        == 0
    )
    assert "a.jpg: image id 1 is a truncated JPEG" in capsys.readouterr().err
    # i3cl infer itself (its DataLoader's reader): the image is a named failure, counted; nothing usable ->
    # exit 1
    from conftest import random_teachers

    ckpt = random_teachers(tmp_path / "t", side=128, seeds=(0,))["teacher_0"]
    (d / "list.txt").write_text("img/a.jpg\n")
    rc = main(
        [
            "infer",
            "--checkpoint",
            ckpt,
            "--images",
            str(d / "list.txt"),
            "--out",
            str(d / "o"),
            "--no-progress",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--no-vis",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "a.jpg: image 1 is a truncated JPEG" in err and "1 of 1 images failed" in err
    # i3cl ensemble alike: nothing readable -> exit 1; a partial failure -> exit 0 with the count on stderr
    ens = [
        "ensemble",
        "--checkpoints",
        ckpt,
        "--images",
        str(d / "list.txt"),
        "--no-progress",
        "--devices",
        "cpu",
        "--loader-workers",
        "0",
    ]
    assert main(ens + ["--out", str(d / "e1")]) == 1
    err = capsys.readouterr().err
    assert (
        "1 of 1 images could not be read" in err
        and "truncated JPEG" in err
        and "no image could be processed" in err
    )
    (d / "list.txt").write_text("img/a.jpg\nimg/full.jpg\n")
    assert main(ens + ["--out", str(d / "e2")]) == 0
    assert "1 of 2 images could not be read" in capsys.readouterr().err


@pytest.mark.parametrize(
    "images, message",
    [
        (
            [
                {"id": 1, "file_name": "a.jpg", "width": 320, "height": 240},
                {"id": 1, "file_name": "b.jpg", "width": 320, "height": 240},
            ],
            r"images\[0\] and images\[1\] have the same id 1",
        ),
        ([{"file_name": "a.jpg", "width": 320, "height": 240}], r"images\[0\] has no 'id'"),
        (["a.jpg"], r"images\[0\] must be an object"),
        (
            [{"id": 1, "file_name": 7, "width": 320, "height": 240}],
            r"image 1 \(images\[0\]\): file_name must be a non-empty string, got 7",
        ),
        (
            [{"id": 1.5, "file_name": "a.jpg", "width": 320, "height": 240}],
            r"images\[0\]: id must be an integer or a string",
        ),
    ],
)
def test_one_parser_of_coco_images_gives_every_reader_the_same_message(tmp_path, images, message):
    """train, evaluate, fuse, infer and browse read an ``images`` list through the same rules."""
    from i3cl_core.data.browse import read_dataset
    from i3cl_core.data.coco import load_coco_records
    from i3cl_core.evaluation import load_ground_truth
    from i3cl_core.infer.run import collect_images
    from i3cl_core.pseudo.fuse import load_images

    d = _files(tmp_path)
    p = d / "bad.json"
    p.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    readers = {
        "train": lambda: load_coco_records(p, d / "img"),
        "evaluate": lambda: load_ground_truth(p),
        "fuse": lambda: load_images(p),
        "infer": lambda: collect_images(str(p), str(d / "img")),
        "browse": lambda: read_dataset(p),
    }
    for read in readers.values():
        with pytest.raises(DatasetError, match=r"bad\.json: " + message):
            read()


def test_far_out_polygon_is_dropped_as_far_outside_not_as_too_few_points(tmp_path):
    """Every point at 1e12: float32 storage merges them, which used to read as "too few points" (train) or
    "fewer than 3 points, non-finite values or zero area" (fuse)."""
    from i3cl_core.config import FuseConfig
    from i3cl_core.data.coco import load_coco_records
    from i3cl_core.data.convert import convert
    from i3cl_core.pseudo.fuse import fuse_predictions

    far = (1e12, 1e12, 1e12 + 100, 1e12, 1e12 + 100, 1e12 + 30, 1e12, 1e12 + 30)
    d = _files(tmp_path, coords=far)
    records, report = load_coco_records(d / "gt.json", d / "img", keep_empty=True)
    assert dict(report.dropped) == {"far_outside_image": 1} and "too few points" not in report.summary()
    s = fuse_predictions(
        [str(d / "pred.json")],
        str(d / "images.json"),
        d / "o.json",
        FuseConfig(auto_keep_thr=False),
        progress=False,
        allow_empty=True,
    )
    assert (s["model_stats"][0]["outside_image"], s["model_stats"][0]["invalid_polygon"]) == (1, 0)
    (d / "gt").mkdir()
    (d / "gt" / "a.txt").write_text(",".join(map(repr, far)) + ",far\n")
    _, stats = convert(
        "plain", d / "gt", d / "img"
    )  # kept (a dataset converter drops nothing it can read), named
    assert (
        stats.far_outside == 1
        and not stats.skipped
        and "more than one image size outside" in stats.warnings[0]
    )


def test_negative_bbox_is_refused_by_evaluate_fuse_and_train_alike(tmp_path):
    """A bbox (used where there is no segmentation) with a negative width or height is not silently
    flipped."""
    from i3cl_core.config import FuseConfig
    from i3cl_core.data.coco import load_coco_records
    from i3cl_core.evaluation import load_ground_truth, load_predictions
    from i3cl_core.pseudo.fuse import fuse_predictions

    d = _files(tmp_path)
    gt = json.loads((d / "gt.json").read_text())
    gt["annotations"][0].pop("segmentation")
    gt["annotations"][0]["bbox"] = [110, 10, -100, 30]
    (d / "neg.json").write_text(json.dumps(gt))
    message = r"annotation 1: bbox width and height must be >= 0, got \[110, 10, -100, 30\]"
    with pytest.raises(DatasetError, match=r"neg\.json: " + message):
        load_ground_truth(d / "neg.json")
    with pytest.raises(DatasetError, match=r"neg\.json: " + message):
        load_coco_records(d / "neg.json", d / "img")
    (d / "neg_pred.json").write_text(json.dumps([{"image_id": 1, "score": 0.9, "bbox": [10, 40, 100, -30]}]))
    with pytest.raises(DatasetError, match=r"neg_pred\.json: result #0 .*bbox width and height must be >= 0"):
        load_predictions(d / "neg_pred.json", load_ground_truth(d / "gt.json"))
    with pytest.raises(DatasetError, match=r"neg_pred\.json: result #0 .*bbox width and height must be >= 0"):
        fuse_predictions(
            [str(d / "neg_pred.json")], str(d / "images.json"), d / "o.json", FuseConfig(), progress=False
        )
    gt["annotations"][0]["bbox"] = [10, 10, "100", 30]
    (d / "str.json").write_text(json.dumps(gt))
    for read in (
        lambda: load_ground_truth(d / "str.json"),
        lambda: load_coco_records(d / "str.json", d / "img"),
    ):
        with pytest.raises(DatasetError, match=r"annotation 1: bbox must be \[x, y, width, height\] numbers"):
            read()
