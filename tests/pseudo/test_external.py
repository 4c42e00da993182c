"""Other detectors' outputs (PaddleOCR / RapidOCR, docTR, mmocr) as ensemble members."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from i3cl_core.data.errors import DatasetError
from i3cl_core.pseudo.external import parse_extra, to_coco_results

IMAGES = [{"id": 3, "file_name": "sub/a.jpg"}, {"id": 4, "file_name": "b.png"}]
QUAD = [[10, 20], [110, 20], [110, 50], [10, 50]]
FLAT = [10.0, 20.0, 110.0, 20.0, 110.0, 50.0, 10.0, 50.0]


def _by_image(results):
    return sorted((r["image_id"], r["segmentation"][0], r["score"]) for r in results)


def test_paddleocr_and_rapidocr_shapes(tmp_path):
    data = {
        "a.jpg": [
            [[QUAD, ["hello", 0.93]], [[[0, 0], [5, 0], [5, 5], [0, 5]], ["x", 0.5]]]
        ],  # PaddleOCR 2 (one page)
        "b.png": [[QUAD, "world", 0.8]],  # RapidOCR
        "c.jpg": [[QUAD, ["not listed", 0.9]]],
    }
    (tmp_path / "paddle.json").write_text(json.dumps(data))
    results, stats = to_coco_results("paddleocr", tmp_path / "paddle.json", IMAGES)
    assert _by_image(results) == [
        (3, [0.0, 0.0, 5.0, 0.0, 5.0, 5.0, 0.0, 5.0], 0.5),
        (3, FLAT, 0.93),
        (4, FLAT, 0.8),
    ]
    assert results[0]["bbox"] == [10, 20, 100, 30] and results[0]["category_id"] == 1
    assert (stats["images"], stats["unknown_images"], stats["detections"]) == (2, 1, 3)
    # PaddleOCR's predict_system output: name<TAB>[{"transcription", "points", "score"}]
    (tmp_path / "system_results.txt").write_text(
        "a.jpg\t" + json.dumps([{"transcription": "hi", "points": QUAD, "score": 0.7}]) + "\n"
        "b.png\t" + json.dumps([{"transcription": "no score", "points": QUAD}]) + "\n"
    )
    results, _ = to_coco_results("paddleocr", tmp_path / "system_results.txt", IMAGES)
    assert _by_image(results) == [(3, FLAT, 0.7), (4, FLAT, 1.0)]
    # the line format is read by the one reader of PaddleOCR's labels too: the same errors for the same faults
    from i3cl_core.data.convert import convert

    for bad, match in (
        ("a.jpg [1, 2]", "line 1: expected 'name<TAB>"),
        ("a.jpg\t[{", "line 1: not valid JSON"),
    ):
        (tmp_path / "system_results.txt").write_text(bad + "\n")
        with pytest.raises(DatasetError, match=match):
            to_coco_results("paddleocr", tmp_path / "system_results.txt", IMAGES)
        with pytest.raises(DatasetError, match=match):
            convert("paddleocr", tmp_path / "system_results.txt", tmp_path)
    # PaddleOCR 3 save_to_json folder
    (tmp_path / "p3").mkdir()
    (tmp_path / "p3" / "a_res.json").write_text(
        json.dumps({"input_path": "/data/x/a.jpg", "dt_polys": [QUAD], "rec_scores": [0.66]})
    )
    results, _ = to_coco_results("paddleocr", tmp_path / "p3", IMAGES)
    assert _by_image(results) == [(3, FLAT, 0.66)]
    (tmp_path / "bad.json").write_text(json.dumps({"a.jpg": [[QUAD, ["t", 1.7]]]}))
    with pytest.raises(DatasetError, match=r"a\.jpg\[0\]: score must be a number in \[0, 1\], got 1\.7"):
        to_coco_results("rapidocr", tmp_path / "bad.json", IMAGES)


def test_doctr_export_folder(tmp_path):
    export = {
        "pages": [
            {
                "page_idx": 0,
                "dimensions": [100, 200],
                "blocks": [
                    {
                        "geometry": [[0, 0], [1, 1]],
                        "lines": [
                            {
                                "geometry": [[0, 0], [1, 1]],
                                "words": [
                                    {
                                        "value": "two",
                                        "confidence": 0.9,
                                        "geometry": [[0.05, 0.2], [0.55, 0.5]],
                                    },
                                    {
                                        "value": "four",
                                        "confidence": 0.4,
                                        "objectness_score": 0.8,
                                        "geometry": [[0.1, 0.1], [0.2, 0.1], [0.2, 0.3], [0.1, 0.3]],
                                    },
                                ],
                            }
                        ],
                    }
                ],
            }
        ]
    }
    (tmp_path / "doctr").mkdir()
    (tmp_path / "doctr" / "b.json").write_text(json.dumps(export))
    results, stats = to_coco_results("doctr", tmp_path / "doctr", IMAGES)
    got = _by_image(results)
    assert [g[0] for g in got] == [4, 4]
    assert got[0][1] == FLAT and got[0][2] == pytest.approx(0.9)
    assert np.allclose(got[1][1], [20, 10, 40, 10, 40, 30, 20, 30]) and got[1][2] == 0.8  # objectness wins


def test_mmocr_predictions_mapping_and_errors(tmp_path):
    (tmp_path / "mm.json").write_text(
        json.dumps({"sub/a.jpg": {"det_polygons": [FLAT], "det_scores": [0.75], "rec_texts": ["x"]}})
    )
    results, _ = to_coco_results("mmocr", tmp_path / "mm.json", IMAGES)
    assert _by_image(results) == [(3, FLAT, 0.75)]
    (tmp_path / "mm.json").write_text(json.dumps({"zzz.jpg": {"det_polygons": [FLAT], "det_scores": [0.75]}}))
    with pytest.raises(DatasetError, match="none of its 1 images is in the image list"):
        to_coco_results("mmocr", tmp_path / "mm.json", IMAGES)
    (tmp_path / "mm.json").write_text(json.dumps({"a.jpg": {"det_polygons": [FLAT], "det_scores": []}}))
    with pytest.raises(DatasetError, match="1 det_polygons but 0 det_scores"):
        to_coco_results("mmocr", tmp_path / "mm.json", IMAGES)


def test_parse_extra():
    assert parse_extra("paddleocr:out/r.json") == ("paddleocr", "out/r.json")
    assert parse_extra("DocTR:/abs/dir") == ("doctr", "/abs/dir")
    assert parse_extra("runs/x/results.json") == (None, "runs/x/results.json")
    assert parse_extra("C:/not/a/format.json") == (None, "C:/not/a/format.json")


def test_ensemble_extra_member_is_converted_and_fused(tmp_path):
    """``i3cl ensemble --extra paddleocr:FILE`` (no checkpoint needed) -> a COCO member that fuse reads."""
    from i3cl_core.config import load_config
    from i3cl_core.pseudo.ensemble import run_ensemble
    from i3cl_core.pseudo.fuse import fuse_predictions

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (160, 80)).save(imgs / name)
    (tmp_path / "p.json").write_text(json.dumps({"a.jpg": [[QUAD, "t", 0.9]], "b.jpg": [[QUAD, "t", 0.8]]}))
    (tmp_path / "r.json").write_text(json.dumps({"a": [[QUAD, "t", 0.95]], "b": [[QUAD, "t", 0.85]]}))
    out = tmp_path / "ens"
    summary = run_ensemble(
        [],
        str(imgs),
        out,
        extra=[f"rapidocr:{tmp_path / 'p.json'}", f"paddleocr:{tmp_path / 'r.json'}"],
        progress=False,
    )
    members = json.loads((out / "members.json").read_text())
    assert members == summary["members"] and len(members) == 2
    assert all(m.startswith(str(out / "extra")) for m in members)
    first = json.loads(open(members[0]).read())
    assert sorted((r["image_id"], r["score"]) for r in first) == [(1, 0.9), (2, 0.8)]
    cfg = load_config(None, ["fuse.auto_keep_thr=false", "fuse.keep_thr=0.5", "fuse.min_votes=2"]).fuse
    fused = fuse_predictions(
        members, str(out / "images.json"), str(tmp_path / "pseudo.json"), cfg, progress=False
    )
    assert fused["pseudo_labels"] == 2


def test_flow_params_pair_extra_members():
    from i3cl_core.pipeline.params import InferParams

    InferParams(extra_members=["paddleocr:a.json"], extra_val_members=["paddleocr:v.json"])
    with pytest.raises(ValueError, match="extra_val_members: 1 entries for 2 extra_members"):
        InferParams(extra_members=["a.json", "b.json"], extra_val_members=["v.json"])


def _convert_predictions(tmp_path, pred, *extra):
    from i3cl_core.cli import main

    (tmp_path / "images.json").write_text(json.dumps({"images": IMAGES}))
    return main(
        [
            "convert-predictions",
            "--format",
            "paddleocr",
            "--pred",
            str(pred),
            "--images",
            str(tmp_path / "images.json"),
            "--out",
            str(tmp_path / "out.json"),
            *extra,
        ]
    )


def test_latin1_predictions_are_a_named_error_or_decoded_with_encoding(tmp_path, capsys):
    """A latin-1 system_results.txt: a clear error naming the file and line, not a UnicodeDecodeError
    traceback."""
    pred = tmp_path / "system_results.txt"
    pred.write_bytes(
        (
            "a.jpg\t" + json.dumps([{"transcription": "ok", "points": QUAD, "score": 0.7}]) + "\n"
            "b.png\t"
            + json.dumps([{"transcription": "caf\xe9", "points": QUAD, "score": 0.6}], ensure_ascii=False)
            + "\n"
        ).encode("latin-1")
    )
    assert _convert_predictions(tmp_path, pred) == 2
    err = capsys.readouterr().err
    assert (
        f"i3cl convert-predictions: error: {pred} line 2: not valid utf-8 text" in err and "--encoding" in err
    )
    assert _convert_predictions(tmp_path, pred, "--encoding", "latin-1") == 0
    assert _by_image(json.loads((tmp_path / "out.json").read_text())) == [(3, FLAT, 0.7), (4, FLAT, 0.6)]
    # the json inputs go through the same decoding
    (tmp_path / "p.json").write_bytes(
        ('{"a.jpg": [[' + json.dumps(QUAD) + ', "caf\xe9", 0.5]]}').encode("latin-1")
    )
    with pytest.raises(DatasetError, match=r"p\.json line 1: not valid utf-8 text"):
        to_coco_results("paddleocr", tmp_path / "p.json", IMAGES)
    assert _by_image(to_coco_results("paddleocr", tmp_path / "p.json", IMAGES, encoding="latin-1")[0]) == [
        (3, FLAT, 0.5)
    ]


def test_non_finite_coordinates_are_skipped_and_output_is_strict_json(tmp_path, capsys):
    nan_quad = [[10, 20], [float("nan"), 20], [110, 50], [10, 50]]
    inf_quad = [[10, 20], [float("inf"), 20], [110, 50], [10, 50]]
    (tmp_path / "p.json").write_text(
        json.dumps({"a.jpg": [[QUAD, "t", 0.9], [nan_quad, "t", 0.8]], "b.png": [[inf_quad, "t", 0.7]]})
    )  # json.dumps writes NaN
    results, stats = to_coco_results("paddleocr", tmp_path / "p.json", IMAGES)
    assert _by_image(results) == [(3, FLAT, 0.9)]
    assert stats["non_finite"] == 2 and stats["non_finite_examples"] == ["a.jpg #1", "b.png #0"]
    assert _convert_predictions(tmp_path, tmp_path / "p.json") == 0
    captured = capsys.readouterr()
    assert (
        "2 detections with non-finite coordinates (NaN or inf) were skipped (e.g. a.jpg #1, b.png #0)"
        in captured.err
    )
    assert "1 detections on 2 images; skipped 2 with non-finite coordinates" in captured.out

    def refuse(name):
        raise ValueError(name)

    assert len(json.loads((tmp_path / "out.json").read_text(), parse_constant=refuse)) == 1


def test_string_score_is_refused_as_by_evaluate_and_fuse(tmp_path):
    """One score rule: "0.9" is refused by convert-predictions with evaluate's message."""
    for fmt, data in (
        ("paddleocr", {"a.jpg": [[QUAD, ["t", "0.9"]]]}),
        ("mmocr", {"a.jpg": {"det_polygons": [FLAT], "det_scores": ["0.9"]}}),
    ):
        (tmp_path / "p.json").write_text(json.dumps(data))
        with pytest.raises(DatasetError, match=r"score must be a number in \[0, 1\], got '0\.9' \(str\)"):
            to_coco_results(fmt, tmp_path / "p.json", IMAGES)
    (tmp_path / "p.json").write_text(json.dumps({"a.jpg": [[QUAD, "t", True]]}))
    with pytest.raises(DatasetError, match=r"score must be a number in \[0, 1\], got True \(bool\)"):
        to_coco_results("rapidocr", tmp_path / "p.json", IMAGES)
