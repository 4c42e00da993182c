"""DetEval ``official`` mode: the rules of Total-Text's published Deteval.py, against a literal loop.

``reference_official`` below restates the published script's three passes as plain loops over one image's
sigma/tau tables (written for this test, one statement per rule), and the vectorised implementation must
agree with it on many random, heavily overlapping tables. Hand-made cases show where ``strict`` (our
default) and ``official`` differ.
"""

from __future__ import annotations

import numpy as np
import pytest

from i3cl_core.evaluation import evaluate_polygons
from i3cl_core.evaluation.core import _deteval_image


def reference_official(sigma, tau, tr=0.7, tp=0.6, k=0.8):
    n_g, n_d = sigma.shape
    gt_used = [False] * n_g
    det_used = [False] * n_d
    rec = prec = 0.0
    # one-to-one: per GT, count sigma > tr and tau > tp in its row; count, in the column of each single
    # candidate, the GT that pass the same test
    for g in range(n_g):
        s_c = [d for d in range(n_d) if sigma[g, d] > tr]
        t_c = [d for d in range(n_d) if tau[g, d] > tp]
        if len(s_c) != 1 or len(t_c) != 1:
            continue
        if sum(1 for h in range(n_g) if sigma[h, s_c[0]] > tr) != 1:
            continue
        if sum(1 for h in range(n_g) if tau[h, t_c[0]] > tp) != 1:
            continue
        rec += 1
        prec += 1
        gt_used[g] = True
        det_used[s_c[0]] = True
    # one-to-many
    for g in range(n_g):
        if gt_used[g]:
            continue
        if sum(1 for d in range(n_d) if sigma[g, d] > 0) < 2:
            continue
        cand = [d for d in range(n_d) if tau[g, d] >= tp and not det_used[d]]
        if len(cand) == 1:
            if tau[g, cand[0]] >= tp and sigma[g, cand[0]] >= tr:
                rec += 1
                prec += 1
                gt_used[g] = True
                det_used[cand[0]] = True
        elif sum(sigma[g, d] for d in cand) >= tr:
            gt_used[g] = True
            for d in cand:
                det_used[d] = True
            rec += k
            prec += k * len(cand)
    # many-to-one
    for d in range(n_d):
        if det_used[d]:
            continue
        if sum(1 for g in range(n_g) if tau[g, d] > 0) < 2:
            continue
        cand = [g for g in range(n_g) if sigma[g, d] >= tp and not gt_used[g]]
        if len(cand) == 1:
            if tau[cand[0], d] >= tp and sigma[cand[0], d] >= tr:
                rec += 1
                prec += 1
                gt_used[cand[0]] = True
                det_used[d] = True
        elif sum(tau[g, d] for g in cand) >= tp:
            det_used[d] = True
            for g in cand:
                gt_used[g] = True
            rec += k * len(cand)
            prec += k
    return rec, prec


def random_tables(rng, n_g, n_d):
    """Overlap-heavy tables: values on the 0.01 grid, many above and near the thresholds, some exact 0."""
    sigma = np.round(
        rng.choice([0.0, 0.0, 0.3, 0.6, 0.65, 0.7, 0.71, 0.9, 1.0], size=(n_g, n_d))
        * rng.uniform(0.9, 1.1, size=(n_g, n_d)),
        2,
    ).clip(0, 1)
    tau = np.round(
        np.where(sigma > 0, rng.choice([0.2, 0.5, 0.6, 0.61, 0.8, 1.0], size=(n_g, n_d)), 0.0)
        * rng.uniform(0.95, 1.05, size=(n_g, n_d)),
        2,
    ).clip(0, 1)
    # a few rows/columns where sigma rounded to 0 but tau did not (tiny detection on a huge GT), and back
    mask = rng.random((n_g, n_d)) < 0.05
    tau = np.where(mask & (sigma == 0), 0.9, tau)
    mask = rng.random((n_g, n_d)) < 0.05
    sigma = np.where(mask & (tau == 0), 0.8, sigma)
    return sigma, tau


def test_official_mode_equals_literal_reference_on_random_tables():
    rng = np.random.default_rng(0)
    differ = 0
    for _ in range(3000):
        n_g, n_d = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        sigma, tau = random_tables(rng, n_g, n_d)
        rec, prec, _ = _deteval_image(sigma, tau, 0.7, 0.6, 0.8, official=True)
        r_rec, r_prec = reference_official(sigma, tau)
        assert (rec, prec) == pytest.approx((r_rec, r_prec)), (sigma, tau)
        s_rec, s_prec, _ = _deteval_image(sigma, tau, 0.7, 0.6, 0.8, official=False)
        differ += (s_rec, s_prec) != pytest.approx((rec, prec))
    # the generator must produce tables where the modes disagree, or the test proves nothing about them
    assert differ > 50


def box(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


def test_one_to_one_with_different_sigma_and_tau_detections():
    # GT 100x20. D0 covers it and much more (sigma 1.0, tau 0.5); D1 covers its left 30 % exactly
    # (sigma 0.3, tau 1.0). Only D0 passes sigma > 0.7, only D1 passes tau > 0.6.
    gt = {1: [(box(0, 0, 100, 20), False)]}
    pred = {1: [(box(0, 0, 100, 40), 0.9), (box(0, 0, 30, 20), 0.9)]}
    strict = evaluate_polygons(gt, pred, "totaltext")
    official = evaluate_polygons(gt, pred, "totaltext", deteval_mode="official")
    assert strict["recall_credit"] == 0 and strict["precision_credit"] == 0
    assert official["recall_credit"] == 1 and official["precision_credit"] == 1
    assert official["num_one_to_one"] == 1 and official["deteval_mode"] == "official"
    assert (official["precision"], official["recall"]) == (0.5, 1.0)


def test_split_candidate_whose_sigma_rounds_to_zero():
    # a 2000x200 GT covered by two halves (sigma 0.5 each, tau 1) plus a 10x10 detection inside it:
    # sigma = 100 / 400000 rounds to 0.00, tau = 1. Official: the tiny one is a split candidate too
    # (precision credit 0.8 x 3); strict: it is not (0.8 x 2, the tiny one stays a false positive).
    gt = {1: [(box(0, 0, 2000, 200), False)]}
    pred = {1: [(box(0, 0, 1000, 200), 0.9), (box(1000, 0, 2000, 200), 0.9), (box(500, 50, 510, 60), 0.9)]}
    strict = evaluate_polygons(gt, pred, "totaltext")
    official = evaluate_polygons(gt, pred, "totaltext", deteval_mode="official")
    assert strict["num_split"] == official["num_split"] == 1
    assert strict["precision_credit"] == pytest.approx(1.6)
    assert official["precision_credit"] == pytest.approx(2.4)
    assert strict["recall_credit"] == official["recall_credit"] == pytest.approx(0.8)


def test_modes_agree_without_ambiguous_overlaps_and_bad_mode_is_refused():
    gt = {1: [(box(0, 0, 100, 20), False), (box(0, 50, 80, 70), False)]}
    pred = {1: [(box(1, 0, 100, 21), 0.9), (box(0, 52, 80, 70), 0.8), (box(300, 300, 320, 320), 0.7)]}
    a = evaluate_polygons(gt, pred, "totaltext")
    b = evaluate_polygons(gt, pred, "totaltext", deteval_mode="official")
    assert (a["precision"], a["recall"]) == (b["precision"], b["recall"]) == (pytest.approx(2 / 3), 1.0)
    with pytest.raises(ValueError, match="deteval_mode"):
        evaluate_polygons(gt, pred, "totaltext", deteval_mode="matlab")


# ---------------------------------------------------------------- CLI: modes, honest output
def _files(tmp_path, pred_ids):
    import json

    gt = {
        "images": [{"id": 1, "file_name": "img1.jpg", "width": 200, "height": 100}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": [[0, 0, 100, 0, 100, 20, 0, 20]],
                "bbox": [0, 0, 100, 20],
            }
        ],
        "categories": [{"id": 1, "name": "text"}],
    }
    preds = []
    for i in pred_ids:
        preds.append(
            {"image_id": i, "category_id": 1, "score": 0.9, "segmentation": [[0, 0, 100, 0, 100, 40, 0, 40]]}
        )
        preds.append(
            {"image_id": i, "category_id": 1, "score": 0.9, "segmentation": [[0, 0, 30, 0, 30, 20, 0, 20]]}
        )
    g, p = tmp_path / "gt.json", tmp_path / "pred.json"
    g.write_text(json.dumps(gt))
    p.write_text(json.dumps(preds))
    return str(g), str(p)


def test_cli_deteval_mode(tmp_path, capsys):
    import json

    from i3cl_core.cli import main

    g, p = _files(tmp_path, [1])
    assert main(["evaluate", "--gt", g, "--pred", p, "--protocol", "totaltext", "--json"]) == 0
    strict = json.loads(capsys.readouterr().out)
    assert (
        main(
            [
                "evaluate",
                "--gt",
                g,
                "--pred",
                p,
                "--protocol",
                "totaltext",
                "--json",
                "--deteval-mode",
                "official",
            ]
        )
        == 0
    )
    official = json.loads(capsys.readouterr().out)
    assert strict["recall"] == 0 and official["recall"] == 1 and official["deteval_mode"] == "official"


@pytest.mark.parametrize("as_json", [True, False])
def test_cli_warns_when_no_image_is_shared_and_strict_exits_3(tmp_path, capsys, as_json):
    from i3cl_core.cli import main

    g, p = _files(tmp_path, [7, 8])
    extra = ["--json"] if as_json else []
    assert main(["evaluate", "--gt", g, "--pred", p, *extra]) == 0
    err = capsys.readouterr().err
    assert "share no image" in err and "[7, 8]" in err
    assert main(["evaluate", "--gt", g, "--pred", p, "--strict", *extra]) == 3
    assert "share no image" in capsys.readouterr().err


def test_cli_partly_unknown_images_warn_in_json_mode_and_strict_exits_3(tmp_path, capsys):
    from i3cl_core.cli import main

    g, p = _files(tmp_path, [1, 9])
    assert main(["evaluate", "--gt", g, "--pred", p, "--json"]) == 0
    err = capsys.readouterr().err
    assert "images not in the ground truth were ignored" in err and "[9]" in err
    assert main(["evaluate", "--gt", g, "--pred", p, "--json", "--strict"]) == 3
    capsys.readouterr()
    (tmp_path / "ok").mkdir()
    g2, p2 = _files(tmp_path / "ok", [1])
    assert main(["evaluate", "--gt", g2, "--pred", p2, "--json", "--strict"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_cli_folder_given_as_gt_or_pred_says_so(tmp_path, capsys):
    from i3cl_core.cli import main

    g, p = _files(tmp_path, [1])
    assert main(["evaluate", "--gt", str(tmp_path), "--pred", p]) == 2
    err = capsys.readouterr().err
    assert "--gt" in err and "is a folder" in err and "COCO dataset json" in err
    assert main(["evaluate", "--gt", g, "--pred", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--pred" in err and "is a folder" in err and "ArT submission json" in err


# ---------------------------------------------------------------- exports for the official scripts
def test_export_submission_formats_and_round_trip(tmp_path, capsys):
    import json

    from i3cl_core.cli import main

    images = {
        "images": [
            {"id": 1, "file_name": "img1.jpg", "width": 200, "height": 100},
            {"id": 2, "file_name": "sub/img2.jpg", "width": 200, "height": 100},
        ],
        "annotations": [],
        "categories": [{"id": 1, "name": "text"}],
    }
    preds = [
        {"image_id": 1, "score": 0.9, "segmentation": [[0.4, 0.6, 100.2, 0, 100, 20, 0, 20]]},
        {"image_id": 1, "score": 0.2, "segmentation": [[0, 50, 10, 50, 10, 60]]},
        {"image_id": 1, "score": 0.8, "segmentation": [[5, 5, 5.2, 5.1, 5.4, 4.9]]},
    ]  # collapses to 1 point
    (tmp_path / "images.json").write_text(json.dumps(images))
    (tmp_path / "pred.json").write_text(json.dumps(preds))
    base = [
        "export-submission",
        "--pred",
        str(tmp_path / "pred.json"),
        "--images",
        str(tmp_path / "images.json"),
    ]
    assert main(base + ["--format", "totaltext", "--out", str(tmp_path / "tt"), "--score-thr", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "1 polygons had fewer than 3" in err
    assert (tmp_path / "tt" / "img1.txt").read_text() == "1,0,0,100,20,100,20,0\n"  # y first
    assert (tmp_path / "tt" / "img2.txt").read_text() == ""  # every image gets a file
    assert main(base + ["--format", "ctw1500", "--out", str(tmp_path / "ctw")]) == 0
    assert (tmp_path / "ctw" / "img1.txt").read_text().splitlines() == [
        "0,1,100,0,100,20,0,20",
        "0,50,10,50,10,60",
    ]
    assert main(base + ["--format", "art", "--out", str(tmp_path / "art")]) == 0
    sub = json.loads((tmp_path / "art" / "submission.json").read_text())
    assert sub["res_img1"][0] == {"points": [[0, 1], [100, 0], [100, 20], [0, 20]], "confidence": 0.9}
    assert sub["res_img2"] == []
