"""Evaluation protocols against hand-made cases, plus I/O and CLI.

Geometry is built here from the case descriptions. Expected numbers are the table's RRC-style columns
(``curved`` / ``mm-van``) for art/ctw1500/icdar2015 and ``dtv.7/.6`` for totaltext, except where our
documented choices differ (see the comments on cases 06 and 07, and docs/evaluation.md).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from i3cl_core.data.errors import DatasetError
from i3cl_core.evaluation import (
    evaluate,
    evaluate_polygons,
    load_ground_truth,
    load_predictions,
    prepare_polygons,
    sweep,
)

IOU = ("art", "ctw1500", "icdar2015")
ALL = IOU + ("totaltext",)


def box(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


def arc(cx=150.0, cy=150.0, r_out=100.0, r_in=70.0, n=7):
    """A 14-point curved text polygon: outer arc left to right, inner arc back."""
    t = np.linspace(0, np.pi, n)
    outer = np.stack([cx - r_out * np.cos(t), cy - r_out * np.sin(t)], 1)
    inner = np.stack([cx - r_in * np.cos(t), cy - r_in * np.sin(t)], 1)[::-1]
    return np.vstack([outer, inner])


def pr(gt, pred, protocol, **kw):
    r = evaluate_polygons(gt, pred, protocol, **kw)
    return round(r["precision"], 2), round(r["recall"], 2)


def check(gt, pred, expected_iou, expected_dtv):
    for p in IOU:
        assert pr(gt, pred, p) == expected_iou, p
    assert pr(gt, pred, "totaltext") == expected_dtv


# ---------------------------------------------------------------- section 7 cases
def test_case01_perfect():
    g = [box(0, 0, 100, 20), box(0, 50, 80, 70), box(200, 0, 300, 40)]
    check({1: [(b, False) for b in g]}, {1: [(b, 0.9) for b in g]}, (1, 1), (1, 1))


def test_case02_split():
    gt = {1: [(box(0, 0, 100, 20), False)], 2: [(box(0, 0, 100, 20), False)]}
    pred = {
        1: [(box(0, 0, 50, 20), 0.9), (box(50, 0, 100, 20), 0.9)],
        2: [(box(0, 0, 60, 20), 0.9), (box(60, 0, 100, 20), 0.9)],
    }
    check(gt, pred, (0.25, 0.5), (0.8, 0.8))
    r = evaluate_polygons(gt, pred, "totaltext")
    assert (
        r["num_split"] == 2
        and r["recall_credit"] == pytest.approx(1.6)
        and r["precision_credit"] == pytest.approx(3.2)
    )


def test_case03_merge():
    gt = {1: [(box(0, 0, 100, 20), False), (box(120, 0, 220, 20), False)]}
    pred = {1: [(box(0, 0, 220, 20), 0.9)]}
    check(gt, pred, (0, 0), (0.8, 0.8))
    assert evaluate_polygons(gt, pred, "totaltext")["num_merge"] == 1


def test_case04_dontcare_detections():
    gt = {1: [(box(0, 0, 100, 20), False), (box(0, 100, 400, 300), True)]}
    pred = {
        1: [
            (box(0, 0, 100, 20), 0.9),  # exact care
            (box(0, 100, 400, 300), 0.9),  # exact DC -> DC
            (box(10, 110, 30, 130), 0.9),  # small box inside DC -> DC
            (box(360, 150, 460, 200), 0.9),
        ]
    }  # 40 % inside DC -> care false positive
    check(gt, pred, (0.5, 1), (0.5, 1))
    for p in ALL:
        r = evaluate_polygons(gt, pred, p)
        assert (r["num_det_dontcare"], r["num_det_care"], r["num_gt_dontcare"]) == (2, 2, 1), p


def test_case05_tiny_boxes():
    g = [box(0, 0, 1, 1), box(10, 10, 13, 13)]
    check({1: [(b, False) for b in g]}, {1: [(b, 0.9) for b in g]}, (1, 1), (1, 1))


def test_case06_bowtie_repaired_counts_as_false_positive():
    # GT A is 100x30; the bow-tie uses A's corners in crossing order. make_valid turns it into two triangles
    # (area 1500 = half of A), so IoU(A) = 1500/3000 = 0.5, not > 0.5: a false positive that stays in the
    # denominator. The 'curved' column (1/.50) drops the invalid detection instead; mm-van (.50/.50) agrees
    # with us. DetEval: sigma = 0.5 < tr, so no match either (the official Deteval.py crashes here).
    bowtie = np.array([[0, 0], [100, 30], [100, 0], [0, 30]], dtype=float)
    gt = {1: [(box(0, 0, 100, 30), False), (box(200, 0, 300, 30), False)]}
    pred = {1: [(bowtie, 0.9), (box(200, 0, 300, 30), 0.9)]}
    check(gt, pred, (0.5, 0.5), (0.5, 0.5))
    r = evaluate_polygons(gt, pred, "art")
    assert r["num_repaired_det"] == 1 and r["num_invalid_det"] == 0


def test_case07_two_point_detection_is_false_positive():
    # 'curved' drops the 2-point detection (1/.50); we count it as an invalid detection = false positive.
    gt = {1: [(box(0, 0, 100, 20), False), (box(200, 0, 300, 20), False)]}
    pred = {1: [(np.array([[0, 0], [100, 20]], float), 0.9), (box(200, 0, 300, 20), 0.9)]}
    check(gt, pred, (0.5, 0.5), (0.5, 0.5))
    for p in ALL:
        assert evaluate_polygons(gt, pred, p)["num_invalid_det"] == 1


def _case08(first):
    a, b = box(0, 0, 100, 20), box(0, 5, 100, 25)
    d1, d2 = (
        box(0, 2.5, 100, 22.5),
        box(0, 0, 100, 15),
    )  # d1: IoU .78 with A and B; d2: .75 with A, .40 with B
    gt = {1: [(a, False), (b, False)]}
    return gt, d1, d2


def test_case08_greedy_order_by_confidence():
    gt, d1, d2 = _case08(1)
    # 08: d1 first (higher confidence) -> A takes d1, B has nothing left
    check(gt, {1: [(d1, 0.9), (d2, 0.8)]}, (0.5, 0.5), (0.8, 0.4))
    # 08b: d2 first -> A takes d2, B takes d1
    check(gt, {1: [(d2, 0.9), (d1, 0.8)]}, (1, 1), (0.8, 0.4))
    # confidence, not file order, decides (our documented choice); equal confidences fall back to file order
    assert pr(gt, {1: [(d2, 0.8), (d1, 0.9)]}, "icdar2015") == (0.5, 0.5)
    assert pr(gt, {1: [(d1, 0.5), (d2, 0.5)]}, "art") == (0.5, 0.5)
    assert pr(gt, {1: [(d2, 0.5), (d1, 0.5)]}, "art") == (1, 1)
    # best-IoU variant is order independent
    for order in ([(d1, 0.9), (d2, 0.8)], [(d2, 0.9), (d1, 0.8)]):
        assert pr(gt, {1: order}, "art", match="best_iou") == (0.5, 0.5)


def test_case09_duplicate_and_low_score():
    gt = {1: [(box(0, 0, 100, 20), False), (box(200, 0, 300, 20), False)]}
    pred = {
        1: [
            (box(0, 0, 100, 20), 0.9),
            (box(200, 0, 300, 20), 0.9),
            (box(2, 0, 102, 20), 0.8),
            (box(500, 500, 600, 520), 0.35),
        ]
    }
    check(gt, pred, (0.5, 1), (0.65, 0.9))
    # a threshold above 0.35 removes the false positive (mmocr sweep column: .67/1)
    assert pr(gt, pred, "art", score_thr=0.4) == (0.67, 1)


def _case10_files(tmp_path):
    curved, quad, illegible = arc(), box(300, 50, 400, 80), box(10, 300, 100, 330)
    gt = {
        "gt_1": [
            {
                "points": curved.tolist(),
                "transcription": "CURVED",
                "language": "Latin",
                "illegibility": False,
            },
            {"points": quad.tolist(), "transcription": "WORD", "language": "Latin", "illegibility": False},
            {"points": illegible.tolist(), "transcription": "###", "language": "Latin", "illegibility": True},
        ]
    }
    res = {
        "res_1": [
            {"points": curved.tolist(), "confidence": 0.9},
            {"points": quad.tolist(), "confidence": 0.8},
            {"points": curved.tolist(), "confidence": 0.2},
        ]
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(res))
    return tmp_path / "gt.json", tmp_path / "res.json"


def test_case10_art_native_round_trip(tmp_path):
    g, r = _case10_files(tmp_path)
    gt = load_ground_truth(g)
    preds = load_predictions(r, gt)
    assert gt.format == "art" and preds.format == "art"
    for p in IOU:
        res = evaluate(gt, preds, p)
        assert (round(res["precision"], 2), round(res["recall"], 2)) == (0.67, 1), p
        assert res["num_gt_care"] == 2 and res["num_gt_dontcare"] == 1
    res = evaluate(gt, preds, "totaltext")
    assert (round(res["precision"], 2), round(res["recall"], 2)) == (0.87, 0.9)
    best = [row for row in sweep(gt, preds, "art", thresholds=[0.1, 0.3, 0.5]) if row["best"]]
    assert len(best) == 1 and best[0]["score_thr"] == 0.3 and best[0]["hmean"] == 1


def test_case11_only_dontcare_image():
    gt = {1: [(box(0, 0, 100, 20), False)], 2: [(box(0, 0, 100, 20), True)]}
    pred = {1: [(box(0, 0, 100, 20), 0.9)], 2: [(box(200, 200, 250, 220), 0.9)]}
    check(gt, pred, (0.5, 1), (0.5, 1))


def test_case12_image_missing_from_predictions():
    gt = {1: [(box(0, 0, 100, 20), False)], 2: [(box(0, 0, 100, 20), False)]}
    pred = {1: [(box(0, 0, 100, 20), 0.9)]}
    check(gt, pred, (1, 0.5), (1, 0.5))
    assert evaluate_polygons(gt, pred, "art")["num_images_without_predictions"] == 1


def test_case13_iou_exactly_half_is_not_a_match():
    gt = {1: [(box(0, 0, 100, 100), False)]}
    pred = {1: [(box(0, 0, 100, 50), 0.9)]}
    check(gt, pred, (0, 0), (0, 0))


# ---------------------------------------------------------------- robustness
def test_invalid_detections_are_false_positives():
    gt = {1: [(box(0, 0, 100, 20), False)]}
    nan_box = box(0, 0, 100, 20)
    nan_box[1, 0] = math.nan
    pred = {
        1: [
            (box(0, 0, 100, 20), 0.9),
            (np.array([[0.0, 0.0], [5.0, 5.0]]), 0.9),
            (nan_box, 0.9),
            (np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]), 0.9),
            (np.zeros((0, 2)), 0.9),
        ]
    }
    for p in ALL:
        r = evaluate_polygons(gt, pred, p)
        assert r["num_invalid_det"] == 4 and r["num_det_care"] == 5, p
        assert r["recall"] == 1 and r["precision"] == pytest.approx(0.2), p


def test_invalid_gt_is_skipped_and_reported():
    gt = {1: [(box(0, 0, 100, 20), False), (np.array([[0.0, 0.0], [3.0, 3.0]]), False)]}
    pred = {1: [(box(0, 0, 100, 20), 0.9)]}
    r = evaluate_polygons(gt, pred, "art")
    assert r["num_invalid_gt"] == 1 and r["num_gt_care"] == 1 and r["hmean"] == 1


def test_unknown_images_reported():
    gt = {1: [(box(0, 0, 10, 10), False)]}
    pred = {1: [(box(0, 0, 10, 10), 0.9)], 7: [(box(0, 0, 10, 10), 0.9)] * 3, 8: [(box(0, 0, 1, 1), 0.1)]}
    r = evaluate_polygons(gt, pred, "art")
    assert (
        r["num_unknown_images"] == 2
        and r["num_unknown_predictions"] == 4
        and r["unknown_image_ids"] == [7, 8]
    )
    assert r["precision"] == 1 and r["recall"] == 1


def test_empty_inputs_give_zero_not_crash():
    for p in ALL:
        assert evaluate_polygons({}, {}, p)["hmean"] == 0
        r = evaluate_polygons({1: [(box(0, 0, 5, 5), False)]}, {}, p)
        assert (r["precision"], r["recall"], r["hmean"]) == (0, 0, 0)


def test_multipart_instance_is_union():
    # a COCO segmentation with two polygons is one instance; a prediction covering both parts matches it
    gt = {1: [([box(0, 0, 10, 10), box(20, 0, 30, 10)], False)]}
    pred = {1: [([box(0, 0, 10, 10), box(20, 0, 30, 10)], 0.9)]}
    assert pr(gt, pred, "art") == (1, 1)


def test_sweep_monotonic():
    rng = np.random.default_rng(0)
    gt, pred = {}, {}
    for i in range(20):
        boxes = [box(x, y, x + 40, y + 15) for x, y in rng.uniform(0, 500, (8, 2))]
        gt[i] = [(b, bool(k == 0)) for k, b in enumerate(boxes)]
        pred[i] = [(b + rng.normal(0, 3, b.shape), float(rng.uniform())) for b in boxes]
        pred[i] += [(box(x, y, x + 30, y + 10), float(rng.uniform())) for x, y in rng.uniform(0, 500, (4, 2))]
    prep = prepare_polygons(gt, pred)
    for p in ALL:
        rows = prep.sweep(p)
        assert [r["score_thr"] for r in rows] == pytest.approx([0.05 * k for k in range(1, 20)])
        dets = [r["num_det_care"] + r["num_det_dontcare"] for r in rows]
        assert dets == sorted(dets, reverse=True)
        recalls = [r["recall"] for r in rows]
        assert all(b <= a + 1e-12 for a, b in zip(recalls, recalls[1:])), p
        assert sum(r["best"] for r in rows) == 1
        best = next(r for r in rows if r["best"])
        assert best["hmean"] == max(r["hmean"] for r in rows)


def _naive_rrc(gt, pred, thr=0.5):
    """Plain double loop reference for the IoU protocols (no prefilter)."""
    import shapely

    m = ng = nd = 0
    for key, gts in gt.items():
        gpolys = [(shapely.Polygon(p), dc) for p, dc in gts]
        dets = sorted(pred.get(key, []), key=lambda t: -t[1])
        dpolys = [shapely.Polygon(p) for p, _ in dets]
        care_d = [
            d for d in dpolys if not any(dc and d.intersection(g).area / d.area > thr for g, dc in gpolys)
        ]
        used = [False] * len(care_d)
        ng += sum(not dc for _, dc in gpolys)
        nd += len(care_d)
        for g, dc in gpolys:
            if dc:
                continue
            for j, d in enumerate(care_d):
                inter = g.intersection(d).area
                if not used[j] and inter / (g.area + d.area - inter) > thr:
                    used[j] = True
                    m += 1
                    break
    return m, ng, nd


def test_matches_naive_double_loop():
    rng = np.random.default_rng(1)
    gt, pred = {}, {}
    for i in range(15):
        boxes = [box(x, y, x + rng.uniform(20, 60), y + 15) for x, y in rng.uniform(0, 300, (10, 2))]
        gt[i] = [(b, bool(rng.uniform() < 0.2)) for b in boxes]
        pred[i] = [(b + rng.normal(0, 6, 2), float(rng.uniform())) for b in boxes]
    r = evaluate_polygons(gt, pred, "art")
    assert (r["num_matched"], r["num_gt_care"], r["num_det_care"]) == _naive_rrc(gt, pred)


# ---------------------------------------------------------------- file formats
def _coco_gt(tmp_path):
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((20, 40), np.uint8), ((10, 70), (100, 60)))))
    rle["counts"] = rle["counts"].decode("ascii")
    data = {
        "images": [
            {"id": 5, "file_name": "train/gt_5.jpg", "width": 200, "height": 100},
            {"id": 9, "file_name": "train/gt_9.jpg", "width": 200, "height": 100},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 5,
                "category_id": 1,
                "segmentation": [box(0, 0, 50, 20).ravel().tolist()],
                "bbox": [0, 0, 50, 20],
                "iscrowd": 0,
                "area": 1000,
            },
            {
                "id": 2,
                "image_id": 5,
                "category_id": 1,
                "segmentation": [box(0, 50, 80, 90).ravel().tolist()],
                "bbox": [0, 50, 80, 40],
                "iscrowd": 0,
                "ignore": True,
                "area": 3200,
            },
            {
                "id": 3,
                "image_id": 9,
                "category_id": 1,
                "segmentation": rle,
                "bbox": [100, 10, 40, 20],
                "iscrowd": 0,
                "area": 800,
            },
            {
                "id": 4,
                "image_id": 9,
                "category_id": 1,
                "segmentation": [box(0, 50, 30, 60).ravel().tolist()],
                "bbox": [0, 50, 30, 10],
                "iscrowd": 1,
                "area": 300,
            },
        ],
        "categories": [{"id": 1, "name": "text"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_gt_and_coco_results(tmp_path):
    gpath = _coco_gt(tmp_path)
    results = [
        {"image_id": 5, "category_id": 1, "segmentation": [box(0, 0, 50, 20).ravel().tolist()], "score": 0.9},
        {
            "image_id": 5,
            "category_id": 1,
            "segmentation": [box(5, 55, 70, 85).ravel().tolist()],
            "score": 0.9,
        },
        {"image_id": 9, "category_id": 1, "bbox": [100, 10, 40, 20], "score": 0.8},
        {
            "image_id": 9,
            "category_id": 1,
            "segmentation": [box(150, 60, 190, 90).ravel().tolist()],
            "score": 0.3,
        },
        {"image_id": 42, "category_id": 1, "segmentation": [box(0, 0, 5, 5).ravel().tolist()], "score": 0.3},
    ]
    ppath = tmp_path / "res.json"
    ppath.write_text(json.dumps(results))
    gt = load_ground_truth(gpath)
    preds = load_predictions(ppath, gt)
    r = evaluate(gt, preds, "art")
    # care GT: ann 1 and the RLE ann 3 (traced to exactly its 40x20 pixel box); DC: ann 2 (ignore), ann 4
    # (iscrowd)
    assert (r["num_gt_care"], r["num_gt_dontcare"], r["num_det_dontcare"]) == (2, 2, 1)
    assert (r["num_matched"], r["num_det_care"]) == (2, 3)
    assert r["unknown_image_ids"] == [42] and r["num_unknown_predictions"] == 1
    assert evaluate(gt, preds, "art", score_thr=0.5)["precision"] == 1

    from i3cl_core.evaluation import coco_map

    m = coco_map(gt, preds)
    assert 0 < m["segm_AP50"] <= 1 and 0 < m["bbox_AP50"] <= 1


def test_coco_gt_with_art_predictions(tmp_path):
    gpath = _coco_gt(tmp_path)
    res = {
        "res_5": [{"points": box(0, 0, 50, 20).tolist(), "confidence": 0.9}],
        "res_009": [{"points": box(100, 10, 140, 30).tolist(), "confidence": 0.9}],
        "res_77": [],
    }
    ppath = tmp_path / "res.json"
    ppath.write_text(json.dumps(res))
    gt = load_ground_truth(gpath)
    r = evaluate(gt, load_predictions(ppath, gt), "art")
    assert (r["precision"], r["recall"]) == (1, 1)
    assert r["unknown_image_ids"] == ["res_77"] and r["num_unknown_predictions"] == 0


def test_art_gt_with_coco_results(tmp_path):
    g, _ = _case10_files(tmp_path)
    gt = load_ground_truth(g)
    ppath = tmp_path / "coco_res.json"
    ppath.write_text(
        json.dumps(
            [
                {"image_id": 1, "segmentation": [arc().ravel().tolist()], "score": 1.0},
                {"image_id": 1, "bbox": [300, 50, 100, 30], "score": 1.0},
            ]
        )
    )
    r = evaluate(gt, load_predictions(ppath, gt), "art")
    assert (r["precision"], r["recall"]) == (1, 1)


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "malformed JSON at line 1"),
        ('{"foo": 1}', "not a COCO dataset"),
        ('{"gt_1": [{"points": [["a", 1], [2, 3], [4, 5]]}]}', "gt_1[0]"),
        ('{"gt_1": [{"transcription": "x"}]}', "gt_1[0]"),
        (
            '{"images": [{"id": 1}], "annotations": [{"id": 3, "image_id": 2, "bbox": [0, 0, 1, 1]}]}',
            "annotation 3",
        ),
    ],
)
def test_malformed_gt_names_file_and_entry(tmp_path, content, needle):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DatasetError) as e:
        load_ground_truth(path)
    assert needle in str(e.value) and "bad.json" in str(e.value)


def test_malformed_predictions(tmp_path):
    g, _ = _case10_files(tmp_path)
    gt = load_ground_truth(g)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"res_1": [{"points": [[0, 0], [1, 1], [2, 0]], "confidence": "high"}]}))
    with pytest.raises(DatasetError, match=r"res_1\[0\]"):
        load_predictions(bad, gt)
    bad.write_text(json.dumps([{"segmentation": [[0, 0, 1, 1, 2, 0]]}]))
    with pytest.raises(DatasetError, match="result #0"):
        load_predictions(bad, gt)
    with pytest.raises(FileNotFoundError):
        load_predictions(tmp_path / "missing.json", gt)


def test_nan_in_json_is_invalid_detection(tmp_path):
    g, _ = _case10_files(tmp_path)
    gt = load_ground_truth(g)
    p = tmp_path / "res.json"
    p.write_text('{"res_1": [{"points": [[0, 0], [NaN, 1], [2, 0]], "confidence": 0.5}]}')
    r = evaluate(gt, load_predictions(p, gt), "art")
    assert r["num_invalid_det"] == 1 and r["num_det_care"] == 1 and r["precision"] == 0


# ---------------------------------------------------------------- CLI
def test_cli_json_output_parses(tmp_path, capsys):
    from i3cl_core.cli import main

    g, r = _case10_files(tmp_path)
    out = tmp_path / "eval" / "metrics.json"
    assert (
        main(["evaluate", "--gt", str(g), "--pred", str(r), "--protocol", "all", "--json", "--out", str(out)])
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [o["protocol"] for o in lines] == ["art", "totaltext", "ctw1500", "icdar2015"]
    assert round(lines[0]["hmean"], 4) == 0.8
    assert json.loads(out.read_text()) == lines

    assert (
        main(["evaluate", "--gt", str(g), "--pred", str(r), "--protocol", "totaltext", "--json", "--sweep"])
        == 0
    )
    obj = json.loads(capsys.readouterr().out)
    assert obj["best"]["best"] is True and len(obj["sweep"]) == 19

    assert main(["evaluate", "--gt", str(g), "--pred", str(r), "--score-thr", "0.5"]) == 0
    table = capsys.readouterr().out
    assert "art" in table and "1.0000" in table


def test_cli_reports_bad_input(tmp_path, capsys):
    from i3cl_core.cli import main

    bad = tmp_path / "gt.json"
    bad.write_text("[1, 2]")
    assert main(["evaluate", "--gt", str(bad), "--pred", str(bad)]) == 2
    assert "gt.json" in capsys.readouterr().err


def test_rle_tracing_matches_pixel_boundary():
    from pycocotools import mask as mask_utils

    from i3cl_core.evaluation.io import rle_to_parts

    m = np.zeros((100, 200), np.uint8)
    m[10:30, 100:140] = 1
    m[50, 5] = 1  # a single pixel becomes a 1x1 square
    parts = rle_to_parts(mask_utils.encode(np.asfortranarray(m)), "test")
    boxes = sorted((p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()) for p in parts)
    assert boxes == [(5, 50, 6, 51), (100, 10, 140, 30)]


def test_intersection_areas_in_threads_equal_one_vectorised_call():
    """The threaded, intersects-prefiltered areas are the plain shapely numbers, pair for pair."""
    import shapely

    from i3cl_core.evaluation.geometry import PARALLEL_PAIRS, intersection_areas

    rng = np.random.default_rng(3)
    n = 2 * PARALLEL_PAIRS + 17
    centres = rng.uniform(0, 100, (n, 2, 2))
    a = shapely.buffer(shapely.points(centres[:, 0]), rng.uniform(1, 6, n), quad_segs=3)
    b = shapely.buffer(shapely.points(centres[:, 1]), rng.uniform(1, 6, n), quad_segs=3)
    want = shapely.area(shapely.intersection(a, b))
    assert (want == 0).any() and (want > 0).any()
    assert np.array_equal(intersection_areas(a, b, workers=3), want)
    assert np.array_equal(intersection_areas(a, b, workers=1), want)


def test_cli_warns_when_one_file_name_has_two_ids(tmp_path, capsys):
    """One picture listed twice (same file_name, two ids) is scored twice: evaluate says so, naming both
    ids."""
    from i3cl_core.cli import main

    g = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 200, "height": 100},
            {"id": 7, "file_name": "a.jpg", "width": 200, "height": 100},
            {"id": 8, "file_name": "b.jpg", "width": 200, "height": 100},
        ],
        "annotations": [
            {
                "id": k,
                "image_id": i,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": [box(0, 0, 50, 20).ravel().tolist()],
            }
            for k, i in ((1, 1), (2, 7), (3, 8))
        ],
        "categories": [{"id": 1, "name": "text"}],
    }
    (tmp_path / "gt.json").write_text(json.dumps(g))
    (tmp_path / "res.json").write_text(
        json.dumps(
            [
                {"image_id": i, "segmentation": [box(0, 0, 50, 20).ravel().tolist()], "score": 0.9}
                for i in (1, 8)
            ]
        )
    )
    assert load_ground_truth(tmp_path / "gt.json").duplicate_file_names == [("a.jpg", 1, 7)]
    assert main(["evaluate", "--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "res.json")]) == 0
    err = capsys.readouterr().err
    assert "1 image(s) listed twice under two ids ('a.jpg' has ids 1 and 7)" in err and "gt.json" in err
    art_gt, art_res = _case10_files(
        tmp_path
    )  # ArT ground truth: names come from unique keys, nothing to warn about
    assert main(["evaluate", "--gt", str(art_gt), "--pred", str(art_res)]) == 0
    assert "listed twice" not in capsys.readouterr().err
