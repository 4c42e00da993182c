"""Pre-flight check: every image of every set, all problems at once, before training starts."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def _dataset(root: Path) -> Path:
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (64, 48), "white").save(root / "img" / "ok.jpg")
    Image.new("RGB", (64, 48), "white").save(root / "img" / "wrong_size.jpg")
    (root / "img" / "not_an_image.jpg").write_bytes(b"hello")
    Image.new("RGB", (400, 300), "white").save(root / "img" / "full.jpg", quality=95)
    data = (root / "img" / "full.jpg").read_bytes()
    (root / "img" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    names = [
        ("ok.jpg", 64, 48),
        ("wrong_size.jpg", 100, 48),
        ("not_an_image.jpg", 64, 48),
        ("missing.jpg", 64, 48),
        ("truncated.jpg", 400, 300),
    ]
    images = [{"id": i + 1, "file_name": n, "width": w, "height": h} for i, (n, w, h) in enumerate(names)]
    anns = [
        {
            "id": i + 1,
            "image_id": i + 1,
            "category_id": 1,
            "iscrowd": 0,
            "bbox": [2, 2, 30, 10],
            "segmentation": [[2, 2, 32, 2, 32, 12, 2, 12]],
        }
        for i in range(len(names))
    ]
    ann = root / "train.json"
    ann.write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "text"}]})
    )
    return ann


def _config(tmp_path, ann: Path) -> Path:
    cfg = {
        "_base_": str(REPO / "configs" / "demo" / "tiny_model.yaml"),
        "data": {"train": [{"ann_file": str(ann), "img_root": str(ann.parent / "img")}], "num_workers": 0},
        "train": {"epochs": 1, "batch_size": 1, "eval_interval": 0},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_check_data_lists_every_problem(tmp_path, capsys):
    from i3cl_core.cli import main

    cfg = _config(tmp_path, _dataset(tmp_path / "d"))
    assert main(["check-data", str(cfg)]) == 1
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 4, lines
    assert any("image 2" in ln and "the json says 100x48, the file is 64x48" in ln for ln in lines)
    assert any("image 3" in ln and "is unreadable or not an image" in ln for ln in lines)
    assert any("image 4" in ln and "file missing" in ln for ln in lines)
    # a truncated file is found without decoding it (its header is fine; its end-of-image marker is missing)
    assert any("image 5" in ln and "truncated JPEG (no end-of-image marker)" in ln for ln in lines)
    assert "checked 5 images" in out.out and "4 problem(s)" in out.out and "per 1000 images" in out.out
    assert main(["check-data", str(cfg), "--decode"]) == 1
    err = capsys.readouterr().err
    assert "image 5" in err and "truncated" in err.lower()


def test_training_refuses_bad_images_before_it_starts(tmp_path, capsys):
    from i3cl_core.cli import main

    cfg = _config(tmp_path, _dataset(tmp_path / "d"))
    rc = main(["train", str(cfg), "--work-dir", str(tmp_path / "w"), "--no-progress"])
    err = capsys.readouterr().err
    assert (
        rc == 2 and "4 of 5 images cannot be used" in err and "missing.jpg" in err and "wrong_size.jpg" in err
    )
    assert "truncated.jpg" in err  # found before the first step, not when training reaches it
    assert not (tmp_path / "w" / "checkpoints" / "latest.pth").exists()


def test_the_pipelines_preflight_lists_bad_images_of_every_split_at_once(tmp_path):
    """The ssl-pipeline flow's first step (stages.preflight): a truncated unlabeled image and a missing
    test image are both named before any stage runs."""
    import pytest

    from i3cl_core.data.errors import DatasetError
    from i3cl_core.pipeline.stages import preflight

    root = tmp_path / "d"
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (400, 300), "white").save(root / "img" / "good.jpg", quality=95)
    data = (root / "img" / "good.jpg").read_bytes()
    (root / "img" / "cut.jpg").write_bytes(data[: len(data) // 2])

    def split(name, files):
        ann = root / f"{name}.json"
        ann.write_text(
            json.dumps(
                {
                    "images": [
                        {"id": i + 1, "file_name": f, "width": 400, "height": 300}
                        for i, f in enumerate(files)
                    ],
                    "annotations": [],
                    "categories": [{"id": 1, "name": "text"}],
                }
            )
        )
        return {"ann_file": str(ann), "img_root": str(root / "img")}

    d = {
        "labeled": [split("train", ["good.jpg"])],
        "val": None,
        "test": split("test", ["good.jpg", "gone.jpg"]),
        "unlabeled_images": split("unlabeled", ["good.jpg", "cut.jpg"])["ann_file"],
        "unlabeled_root": str(root / "img"),
    }
    with pytest.raises(DatasetError) as err:
        preflight(d)
    msg = str(err.value)
    assert "2 of 5 images cannot be used" in msg and "gone.jpg" in msg and "file missing" in msg
    assert "cut.jpg" in msg and "truncated JPEG" in msg
    d["test"] = split("test", ["good.jpg"])
    d["unlabeled_images"] = split("unlabeled", ["good.jpg"])["ann_file"]
    assert preflight(d)["images"] == 3


def test_file_truncation_reads_only_the_ends_and_agrees_with_the_readers_rule(tmp_path):
    """data.image_io.file_truncation (the pre-flight's) gives the reader's verdict on whole files,
    JPEG and PNG, cut at every kind of length (shorter than its 8 + 1024 bytes too)."""
    from i3cl_core.data.image_io import file_truncation, truncation

    for ext in ("jpg", "png"):
        Image.effect_noise((300, 200), 40).convert("RGB").save(tmp_path / f"full.{ext}")
        data = (tmp_path / f"full.{ext}").read_bytes()
        for cut in (0, 3, 7, 8, 9, 500, 1031, 1032, 1033, len(data) // 2, len(data) - 2, len(data)):
            p = tmp_path / f"cut_{cut}.{ext}"
            p.write_bytes(data[:cut])
            assert file_truncation(p) == truncation(data[:cut]), (ext, cut)
        assert file_truncation(tmp_path / f"full.{ext}") is None
        assert file_truncation(tmp_path / f"cut_{len(data) // 2}.{ext}") is not None
