"""The synthetic curved-text generator: determinism, geometry, ink coverage, fallbacks, demo layout, CLI."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from shapely.geometry import Polygon

from i3cl_core.cli import main
from i3cl_core.data import synth

SIZE = (256, 256)
CJK_RE = re.compile(r"[\u4e00-\u9fff]")


def _gen(path, n=10, seed=0, workers=1, **kw):
    return synth.generate_dataset(
        path, n, seed=seed, size=kw.pop("size", SIZE), workers=workers, progress=False, **kw
    )


def _poly(ann) -> np.ndarray:
    return np.asarray(ann["segmentation"][0], dtype=np.float64).reshape(-1, 2)


def _shoelace_y_down(p: np.ndarray) -> float:
    """Positive for clockwise-on-screen vertex order in image coordinates (y down)."""
    x, y = p[:, 0], p[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


@pytest.fixture(scope="module")
def ten_images(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth10")
    summary = _gen(out, n=10, seed=0, workers=1)
    return out, summary


def test_same_seed_same_json_across_runs_and_workers(ten_images, tmp_path, monkeypatch):
    out, summary = ten_images
    first = (out / "annotations.json").read_bytes()
    again = _gen(tmp_path / "again", n=10, seed=0, workers=1)
    monkeypatch.setattr(synth.dataset, "POOL_MIN_IMAGES_PER_WORKER", 1)  # ten images through the pool
    two = _gen(tmp_path / "two", n=10, seed=0, workers=2)
    assert (tmp_path / "again" / "annotations.json").read_bytes() == first
    assert (tmp_path / "two" / "annotations.json").read_bytes() == first
    assert again["num_instances"] == two["num_instances"] == summary["num_instances"]


def test_different_seed_gives_different_json(ten_images, tmp_path):
    out, _ = ten_images
    _gen(tmp_path / "s1", n=10, seed=1)
    assert (tmp_path / "s1" / "annotations.json").read_bytes() != (out / "annotations.json").read_bytes()


def test_layout_and_coco_fields(ten_images):
    out, summary = ten_images
    coco = json.loads((out / "annotations.json").read_text(encoding="utf-8"))
    assert summary["num_images"] == 10 and summary["ann_file"].endswith("annotations.json")
    assert coco["categories"] == [{"id": 1, "name": "text"}]
    assert coco["info"]["seed"] == 0 and coco["info"]["size"] == list(SIZE)
    latin = [Path(f).name for f in synth.find_latin_fonts()]
    assert coco["info"]["fonts"][: len(latin)] == latin  # then the CJK font, where one was found
    assert len(coco["info"]["fonts"]) == len(latin) + coco["info"]["cjk"]
    assert [im["id"] for im in coco["images"]] == list(range(1, 11))
    for im in coco["images"]:
        path = out / "images" / im["file_name"]
        assert path.is_file()
        img = cv2.imread(str(path))
        assert img.shape[:2] == (im["height"], im["width"]) == (SIZE[1], SIZE[0])
    ann_ids = [a["id"] for a in coco["annotations"]]
    assert ann_ids == list(range(1, len(ann_ids) + 1))
    per_image = {im["id"]: 0 for im in coco["images"]}
    for a in coco["annotations"]:
        per_image[a["image_id"]] += 1
    assert all(synth.MIN_INSTANCES - 1 <= n <= synth.MAX_INSTANCES for n in per_image.values())
    assert sum(per_image.values()) == summary["num_instances"] >= 20


def test_polygons_valid_inside_and_consistent(ten_images):
    out, _ = ten_images
    coco = json.loads((out / "annotations.json").read_text(encoding="utf-8"))
    by_image: dict[int, list] = {}
    for a in coco["annotations"]:
        assert a["category_id"] == 1 and a["iscrowd"] in (0, 1)
        assert len(a["segmentation"]) == 1
        p = _poly(a)
        assert len(p) in (4, 14)
        assert all(round(v, 2) == v for v in a["segmentation"][0])
        shape = Polygon(p)
        assert shape.is_valid, a
        assert (p >= 0).all() and (p[:, 0] <= SIZE[0]).all() and (p[:, 1] <= SIZE[1]).all()
        x, y, w, h = a["bbox"]
        assert x == pytest.approx(p[:, 0].min(), abs=0.011) and y == pytest.approx(p[:, 1].min(), abs=0.011)
        assert x + w == pytest.approx(p[:, 0].max(), abs=0.02) and y + h == pytest.approx(
            p[:, 1].max(), abs=0.02
        )
        assert a["area"] == pytest.approx(shape.area, abs=0.02)
        assert _shoelace_y_down(p) > 0  # clockwise on screen: top edge left->right, bottom edge back
        assert (a["transcription"] == "###") == (a["iscrowd"] == 1)
        by_image.setdefault(a["image_id"], []).append(shape)
    for shapes in by_image.values():  # instances barely overlap
        for i, s in enumerate(shapes):
            for o in shapes[i + 1 :]:
                assert s.intersection(o).area <= 0.05 * min(s.area, o.area)


def test_polygon_holds_the_text_ink():
    n_checked = 0
    cjk_font = synth.find_cjk_font()
    for index in range(1, 9):
        img, anns, debug = synth.render_sample(5, index, SIZE, cjk_font=cjk_font, return_debug=True)
        assert img.shape == (SIZE[1], SIZE[0], 3) and img.dtype == np.uint8
        assert len(debug["ink"]) == len(anns)
        union = np.zeros(img.shape[:2], np.uint8)
        for ann, ink in zip(anns, debug["ink"]):
            filled = np.zeros(img.shape[:2], np.uint8)
            cv2.fillPoly(filled, [np.round(_poly(ann) * 16).astype(np.int32)], 1, shift=4)
            union |= filled
            if ink.sum() < 10:
                continue
            inside = (ink & (filled > 0)).sum() / ink.sum()
            assert inside >= 0.97, (index, ann["transcription"], inside)
            if not ann["iscrowd"]:  # hugs the text: not grossly larger than the ink
                assert ann["area"] <= 15 * ink.sum(), (index, ann["transcription"])
            n_checked += 1
        layer = debug["text_layer"]
        assert (layer & (union > 0)).sum() >= 0.97 * layer.sum()
    assert n_checked >= 15


def test_some_unreadable_instances_are_dontcare():
    anns = []
    for index in range(1, 41):
        anns += synth.render_sample(11, index, (128, 128))[1]
    crowd = [a for a in anns if a["iscrowd"] == 1]
    assert crowd and all(a["transcription"] == "###" for a in crowd)
    assert 0.02 <= len(crowd) / len(anns) <= 0.25
    assert all(a["transcription"] != "###" for a in anns if a["iscrowd"] == 0)


def test_latin_fallback_warns_once(tmp_path, monkeypatch):
    monkeypatch.setattr(synth.fonts, "find_cjk_font", lambda: None)
    monkeypatch.setattr(synth.fonts, "_CJK_WARNED", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s1 = _gen(tmp_path / "a", n=6, seed=2)
        s2 = _gen(tmp_path / "b", n=2, seed=3, cjk=True)
    cjk_warnings = [w for w in caught if "CJK" in str(w.message)]
    assert len(cjk_warnings) == 1
    assert not s1["cjk"] and not s2["cjk"]
    coco = json.loads((tmp_path / "a" / "annotations.json").read_text(encoding="utf-8"))
    assert coco["info"]["cjk"] is False
    assert not any(CJK_RE.search(a["transcription"]) for a in coco["annotations"])


def test_cjk_false_is_latin_without_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(synth.fonts, "_CJK_WARNED", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = _gen(tmp_path, n=6, seed=2, cjk=False)
    assert not [w for w in caught if "CJK" in str(w.message)]
    assert summary["cjk"] is False
    coco = json.loads((tmp_path / "annotations.json").read_text(encoding="utf-8"))
    assert not any(CJK_RE.search(a["transcription"]) for a in coco["annotations"])


@pytest.mark.skipif(synth.find_cjk_font() is None, reason="no CJK font installed")
def test_chinese_text_when_a_cjk_font_exists():
    texts = []
    for index in range(1, 16):
        texts += [
            a["transcription"] for a in synth.render_sample(0, index, SIZE, cjk_font=synth.find_cjk_font())[1]
        ]
    assert any(CJK_RE.search(t) for t in texts)
    assert any(re.search(r"[A-Za-z]", t) for t in texts)


def test_user_backgrounds(tmp_path):
    bg = tmp_path / "bg"
    bg.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        cv2.imwrite(str(bg / f"photo{k}.png"), rng.integers(0, 255, size=(300, 400, 3), dtype=np.uint8))
    (bg / "broken.jpg").write_bytes(b"not an image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = _gen(tmp_path / "out", n=6, seed=0, backgrounds_dir=bg, cjk=False)
    assert summary["num_images"] == 6
    coco = json.loads((tmp_path / "out" / "annotations.json").read_text(encoding="utf-8"))
    assert coco["info"]["backgrounds"] == "skimage+3 user images"
    with pytest.raises(FileNotFoundError, match="nope"):
        _gen(tmp_path / "x", n=1, backgrounds_dir=tmp_path / "nope")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_images"):
        _gen(tmp_path, n=0)
    with pytest.raises(ValueError, match="size"):
        _gen(tmp_path, n=1, size=(10, 10))
    with pytest.raises(ValueError, match="workers"):
        _gen(tmp_path, n=1, workers=0)


def test_demo_preset_layout(tmp_path):
    summary = synth.generate_demo(
        tmp_path, seed=4, num_train=3, num_unlabeled=3, num_test=2, size=(128, 128), progress=False, cjk=False
    )
    assert set(summary) == {"train", "unlabeled", "test"}
    train = json.loads((tmp_path / "train" / "annotations.json").read_text(encoding="utf-8"))
    test = json.loads((tmp_path / "test" / "annotations.json").read_text(encoding="utf-8"))
    images = json.loads((tmp_path / "unlabeled" / "images.json").read_text(encoding="utf-8"))
    gt = json.loads((tmp_path / "unlabeled" / "gt.json").read_text(encoding="utf-8"))
    assert len(train["images"]) == 3 and len(test["images"]) == 2 and len(gt["images"]) == 3
    assert images["annotations"] == [] and images["images"] == gt["images"]
    assert images["categories"] == gt["categories"] == [{"id": 1, "name": "text"}]
    assert gt["annotations"] and {a["image_id"] for a in gt["annotations"]} <= {
        im["id"] for im in gt["images"]
    }
    for split, coco in (("train", train), ("unlabeled", gt), ("test", test)):
        for im in coco["images"]:
            assert (tmp_path / split / "images" / im["file_name"]).is_file()
    seeds = {train["info"]["seed"], gt["info"]["seed"], test["info"]["seed"]}
    assert len(seeds) == 3  # each split has its own seed
    assert train["annotations"] != gt["annotations"][: len(train["annotations"])]


def test_cli_synth(tmp_path, capsys):
    rc = main(
        [
            "synth",
            "--out",
            str(tmp_path / "d"),
            "--num-images",
            "3",
            "--size",
            "128",
            "96",
            "--seed",
            "7",
            "--no-progress",
            "--no-cjk",
        ]
    )
    assert rc == 0
    coco = json.loads((tmp_path / "d" / "annotations.json").read_text(encoding="utf-8"))
    assert [(im["width"], im["height"]) for im in coco["images"]] == [(128, 96)] * 3
    assert "3 images" in capsys.readouterr().out
    rc = main(
        [
            "synth",
            "--preset",
            "demo",
            "--out",
            str(tmp_path / "demo"),
            "--num-images",
            "2",
            "--num-unlabeled",
            "2",
            "--num-test",
            "1",
            "--size",
            "96",
            "96",
            "--no-progress",
            "--no-cjk",
        ]
    )
    assert rc == 0
    assert (tmp_path / "demo" / "unlabeled" / "images.json").is_file()
    assert (
        main(
            [
                "synth",
                "--out",
                str(tmp_path / "e"),
                "--num-images",
                "1",
                "--backgrounds",
                str(tmp_path / "missing"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "missing" in capsys.readouterr().err
