"""The image reader's rule (i3cl_core/data/image_io.py): stored orientation, EXIF tag ignored unless asked;
one pixel limit, checked from the header before any pixel is decoded."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from i3cl_core.data.errors import DatasetError
from i3cl_core.data.image_io import EXIF_TRANSPOSE_ENV, MAX_PIXELS_ENV, header, read_image


def _oriented_jpeg(path, orientation=6, size=(320, 240)):
    """A JPEG whose stored pixels are ``size`` (w, h) with a left-right ramp and a red top-left block,
    tagged."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 1] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    arr[:40, :60] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, quality=98, exif=exif.tobytes())
    return arr


def _png_claiming(path, width, height):
    """A small PNG file whose header claims ``width`` x ``height`` (a decompression bomb's header)."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_exif_orientation_is_ignored_unless_asked(tmp_path, monkeypatch):
    monkeypatch.delenv(EXIF_TRANSPOSE_ENV, raising=False)
    stored = _oriented_jpeg(tmp_path / "a.jpg", orientation=6)
    img = read_image(tmp_path / "a.jpg")
    assert img.shape == (240, 320, 3)  # OpenCV's default would give (320, 240, 3)
    assert np.abs(img.astype(int) - stored).mean() < 3  # the stored pixels, not turned
    assert header(tmp_path / "a.jpg") == (320, 240, 6)
    # asked for: pixels and sizes turned alike (orientation 6 = turn 90 degrees clockwise to display)
    monkeypatch.setenv(EXIF_TRANSPOSE_ENV, "1")
    turned = read_image(tmp_path / "a.jpg")
    assert turned.shape == (320, 240, 3) and header(tmp_path / "a.jpg")[:2] == (240, 320)
    assert np.abs(turned.astype(int) - np.rot90(stored, k=-1)).mean() < 3
    monkeypatch.setenv(EXIF_TRANSPOSE_ENV, "sideways")
    with pytest.raises(DatasetError, match=f"{EXIF_TRANSPOSE_ENV}='sideways'"):
        read_image(tmp_path / "a.jpg")


def test_check_data_counts_oriented_images_and_convert_keeps_stored_sizes(tmp_path, monkeypatch, capsys):
    from i3cl_core.data.check import check_sources

    monkeypatch.delenv(EXIF_TRANSPOSE_ENV, raising=False)
    (tmp_path / "img").mkdir()
    _oriented_jpeg(tmp_path / "img" / "a.jpg", orientation=6)
    Image.new("RGB", (320, 240)).save(tmp_path / "img" / "b.jpg")
    images = [
        {"id": 1, "file_name": "a.jpg", "width": 320, "height": 240},
        {"id": 2, "file_name": "b.jpg", "width": 320, "height": 240},
    ]
    (tmp_path / "gt.json").write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    result = check_sources([(tmp_path / "gt.json", tmp_path / "img")], workers=2, decode=True)
    assert result.problems == [] and result.oriented == 1
    assert "1 image(s) carry an EXIF orientation tag" in result.summary()
    # the displayed frame is asked for: the json's stored-frame size of a.jpg no longer fits, and says so
    monkeypatch.setenv(EXIF_TRANSPOSE_ENV, "1")
    result = check_sources([(tmp_path / "gt.json", tmp_path / "img")], workers=2)
    assert len(result.problems) == 1 and "the json says 320x240, the file is 240x320" in result.problems[0]
    monkeypatch.delenv(EXIF_TRANSPOSE_ENV)
    # a converter writes stored sizes and counts the tagged image
    from i3cl_core.cli import main

    (tmp_path / "gt_txt").mkdir()
    for stem in ("a", "b"):
        (tmp_path / "gt_txt" / f"gt_{stem}.txt").write_text("10,10,100,10,100,40,10,40,word\n")
    rc = main(
        [
            "convert-dataset",
            "--format",
            "icdar2015",
            "--ann",
            str(tmp_path / "gt_txt"),
            "--img-root",
            str(tmp_path / "img"),
            "--out",
            str(tmp_path / "c.json"),
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    sizes = {
        im["file_name"]: (im["width"], im["height"])
        for im in json.loads((tmp_path / "c.json").read_text())["images"]
    }
    assert sizes == {"a.jpg": (320, 240), "b.jpg": (320, 240)}
    assert "1 image(s) carry an EXIF orientation tag" in out.out


def test_pixel_limit_refuses_from_the_header_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    from i3cl_core.cli import main

    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    (tmp_path / "img").mkdir()
    _png_claiming(tmp_path / "img" / "huge.png", 30000, 30000)  # 900 M pixels in a 100-byte file
    with pytest.raises(
        DatasetError,
        match=r"huge.png.* is 30000x30000 = 900,000,000 pixels, over the limit of "
        rf"150,000,000 \({MAX_PIXELS_ENV} raises it\)",
    ):
        read_image(tmp_path / "img" / "huge.png")
    Image.new("RGB", (160, 128), "white").save(tmp_path / "img" / "good.jpg")
    monkeypatch.setenv(MAX_PIXELS_ENV, "20000")  # the good image (20,480 pixels) is over this one
    with pytest.raises(DatasetError, match="over the limit of 20,000"):
        read_image(tmp_path / "img" / "good.jpg")
    monkeypatch.setenv(MAX_PIXELS_ENV, "-3")
    with pytest.raises(DatasetError, match=f"{MAX_PIXELS_ENV}='-3': expected a whole number of pixels >= 1"):
        read_image(tmp_path / "img" / "good.jpg")
    monkeypatch.delenv(MAX_PIXELS_ENV)
    # i3cl infer: the huge image is a named failure, the good one beside it is processed
    from conftest import random_teachers

    ckpt = random_teachers(tmp_path / "t", side=128, seeds=(0,))["teacher_0"]
    (tmp_path / "list.txt").write_text("img/huge.png\nimg/good.jpg\n")
    rc = main(
        [
            "infer",
            "--checkpoint",
            ckpt,
            "--images",
            str(tmp_path / "list.txt"),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--no-vis",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 0 and "huge.png: image 1 is 30000x30000" in err and "1 of 2 images failed" in err
    assert (tmp_path / "o" / "per_image" / "good.jpg.json").is_file()
    # the ensemble's size table names it too and goes on
    ens = [
        "ensemble",
        "--checkpoints",
        ckpt,
        "--images",
        str(tmp_path / "list.txt"),
        "--no-progress",
        "--devices",
        "cpu",
        "--loader-workers",
        "0",
        "--out",
        str(tmp_path / "e"),
    ]
    assert main(ens) == 0
    err = capsys.readouterr().err
    assert "1 of 2 images could not be read" in err and "over the limit" in err
