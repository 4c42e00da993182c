"""Pseudo labelling: Weighted Polygon Fusion against ensemble-boxes WBF, order independence,
pseudo-label rules, the fuse command's bad-input handling, and the resumable sharded ensemble."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import Polygon, box

from i3cl_core.config import FuseConfig, load_config
from i3cl_core.data.errors import DatasetError
from i3cl_core.fusion import Member, canonical, cluster_predictions, mean_shape_polygon, pseudo_labels
from i3cl_core.pseudo.fuse import fuse_predictions

REPO = Path(__file__).resolve().parents[2]
W, H = 640, 480


def rect(x1, y1, x2, y2):
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float64)


def random_case(rng, k=3):
    """K models' rectangles: jittered copies of a few objects (some missed) plus false positives."""
    objects = rng.uniform([0, 0, 30, 15], [520, 420, 150, 80], (rng.integers(1, 9), 4))
    preds = []
    for _ in range(k):
        p = []
        for x, y, w, h in objects:
            if rng.random() < 0.85:
                x, y, w, h = np.array([x, y, w, h]) + rng.normal(0, 5, 4)
                p.append((rect(x, y, x + abs(w) + 1, y + abs(h) + 1), float(rng.uniform(0.05, 1))))
        for _ in range(rng.integers(0, 3)):
            x, y = rng.uniform(0, 540), rng.uniform(0, 420)
            p.append(
                (rect(x, y, x + rng.uniform(10, 100), y + rng.uniform(10, 60)), float(rng.uniform(0.05, 1)))
            )
        preds.append([(np.clip(r, 0, [W, H]), s) for r, s in p])
    return preds


def as_wbf_input(preds):
    boxes = [
        [[r[:, 0].min() / W, r[:, 1].min() / H, r[:, 0].max() / W, r[:, 1].max() / H] for r, _ in p]
        for p in preds
    ]
    scores = [[s for _, s in p] for p in preds]
    labels = [[0] * len(p) for p in preds]
    return boxes, scores, labels


def with_edge_midpoints(r):
    """The same rectangle as an 8-point polygon (takes the mean-shape path instead of the corner mean)."""
    return np.array(
        [r[0], (r[0] + r[1]) / 2, r[1], (r[1] + r[2]) / 2, r[2], (r[2] + r[3]) / 2, r[3], (r[3] + r[0]) / 2]
    )


def test_a_models_duplicate_does_not_lower_the_score_with_model_max_avg_or_one_member_per_model():
    """Two models (or two TTA views) find the same word (0.9 and 0.8); the first also left a weaker
    overlapping detection (0.2). WBF's avg lets the duplicate join and pull the mean down; model_max_avg
    counts each model's best member once; one_per_model keeps the duplicate out of the cluster altogether."""
    word = rect(100, 100, 200, 140)
    dup = rect(104, 100, 204, 142)
    preds = [[(word, 0.9), (dup, 0.2)], [(word, 0.8)]]
    top = cluster_predictions(preds, conf_type="avg")[0]
    assert len(top.members) == 3 and top.score == pytest.approx((0.9 + 0.2 + 0.8) / 3)
    top = cluster_predictions(preds, conf_type="model_max_avg")[0]
    assert len(top.members) == 3 and top.score == pytest.approx((0.9 + 0.8) / 2)
    clusters = cluster_predictions(preds, conf_type="avg", one_per_model=True)
    assert [len(c.members) for c in clusters] == [2, 1]
    assert [c.score for c in clusters] == pytest.approx([(0.9 + 0.8) / 2, 0.2 / 2])
    # a word only one model found: half its score under both rules (the other model's vote is 0)
    alone = cluster_predictions([[(word, 0.9)], []], conf_type="model_max_avg")[0]
    assert alone.score == pytest.approx(0.45)
    assert FuseConfig(conf_type="model_max_avg").conf_type == "model_max_avg"


@pytest.mark.parametrize("conf_type", ["avg", "max", "box_and_model_avg", "absent_model_aware_avg"])
def test_rectangles_cluster_and_score_exactly_like_wbf(conf_type):
    from ensemble_boxes import weighted_boxes_fusion

    rng = np.random.default_rng(sum(map(ord, conf_type)))
    shape_ious = []
    for _ in range(60):
        preds = random_case(rng)
        weights = rng.uniform(0.5, 2.0, 3)
        b, s, lab = as_wbf_input(preds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wb, ws, _ = weighted_boxes_fusion(
                b, s, lab, weights=weights.tolist(), iou_thr=0.55, skip_box_thr=0.1, conf_type=conf_type
            )
        clusters = cluster_predictions(preds, weights, iou_thr=0.55, skip_thr=0.1, conf_type=conf_type)
        assert len(clusters) == len(wb)
        ours = sorted(
            (round(c.score, 5), *(np.r_[c.points.min(0), c.points.max(0)] / [W, H, W, H])) for c in clusters
        )
        ref = sorted(((round(float(sc), 5), *bx) for sc, bx in zip(ws, wb)))
        for o, r in zip(ours, ref):
            assert o[0] == pytest.approx(r[0], abs=2e-5)  # fused score
            assert np.allclose(o[1:], r[1:], atol=1e-5)  # cluster geometry = WBF's weighted box
        # the output polygon overlaps WBF's fused box with IoU >= 0.9: the corner mean for quads, and the
        # mean shape (distance fields, used for other polygons) of the same rectangles given as 8-gons
        by_score = sorted(clusters, key=lambda c: -c.score)
        for c, (sc, bx) in zip(by_score, sorted(zip(ws, wb), key=lambda t: -t[0])):
            ref_box = box(*(np.array(bx) * [W, H, W, H]))
            twins = [cc for cc in by_score if abs(cc.score - sc) < 2e-5]
            assert max(iou(cc.polygon, ref_box) for cc in twins) >= 0.999
            if len(c.members) > 1:
                as_8gons = [
                    Member(canonical(with_edge_midpoints(m.polygon)), m.score, m.model, m.weight)
                    for m in c.members
                ]
                shape_ious.append(
                    max(
                        iou(mean_shape_polygon(as_8gons), box(*np.r_[cc.points.min(0), cc.points.max(0)]))
                        for cc in twins
                    )
                )
    # the mean shape (the fallback for self-intersecting point means) rounds the corners where the
    # members' corners differ, so it is close to WBF's box but not equal
    assert len(shape_ious) > 50 and np.mean(shape_ious) >= 0.95 and min(shape_ious) >= 0.8


def iou(poly, geom) -> float:
    p = Polygon(poly)
    return p.intersection(geom).area / p.union(geom).area


def test_equal_weights_result_does_not_depend_on_model_order():
    rng = np.random.default_rng(7)
    for _ in range(20):
        preds = random_case(rng, k=4)
        # curved polygons too: resample-mean and vote paths
        preds[0].append(
            (np.array([[100, 100], [150, 90], [200, 100], [200, 130], [150, 120], [100, 130.0]]), 0.9)
        )
        preds[2].append((np.array([[102, 101], [200, 99], [201, 131], [101, 129.0]]), 0.8))

        def signature(ps):
            cl = cluster_predictions(ps, None, 0.5, 0.05, "avg")
            return sorted((round(c.score, 6), c.votes, tuple(np.round(c.polygon, 4).ravel())) for c in cl)

        base = signature(preds)
        for perm in ([3, 2, 1, 0], [1, 3, 0, 2]):
            assert signature([preds[i] for i in perm]) == base


def test_pseudo_label_rules():
    preds = [
        [(rect(0, 0, 100, 30), 0.9), (rect(200, 200, 260, 230), 0.5), (rect(400, 0, 450, 20), 0.35)],
        [(rect(2, 1, 101, 31), 0.8), (rect(201, 199, 259, 231), 0.4)],
        [(rect(1, 0, 99, 30), 0.7)],
    ]
    clusters = cluster_predictions(preds, None, 0.55, 0.05, "avg")
    cfg = FuseConfig(keep_thr=0.5, min_votes=2, uncertain_band=(0.1, 0.5))
    labels = pseudo_labels(clusters, 3, cfg)
    by_votes = {lab["votes"]: lab for lab in labels}
    kept = by_votes[3]
    assert kept["iscrowd"] == 0 and kept["score"] == pytest.approx(0.8)
    assert kept["lossweight"] == pytest.approx(0.8 * 3 / 3)
    assert by_votes[2]["iscrowd"] == 1 and by_votes[2]["lossweight"] == 0.0  # score 0.3: uncertain band
    assert by_votes[1]["iscrowd"] == 1  # one vote, score 0.35/3 in the band
    assert len(pseudo_labels(clusters, 3, FuseConfig(keep_thr=0.5, min_votes=2, uncertain_band=None))) == 1
    # a cluster with too few votes but a high score is uncertain too, not background
    lone = cluster_predictions([[(rect(0, 0, 100, 30), 0.9)], [], []], None, 0.55, 0.05, "max")
    assert [lab["iscrowd"] for lab in pseudo_labels(lone, 3, FuseConfig(keep_thr=0.5, min_votes=2))] == [1]
    assert pseudo_labels(lone, 3, FuseConfig(keep_thr=0.5, min_votes=2, uncertain_band=None)) == []
    w = pseudo_labels(clusters, 3, FuseConfig(keep_thr=0.0, min_votes=1, lossweight_formula="votes"))
    assert sorted(lab["lossweight"] for lab in w) == pytest.approx([1 / 3, 2 / 3, 1.0])
    # min_votes is capped at the number of models: a single model still yields pseudo labels
    single = cluster_predictions(preds[:1], None, 0.55, 0.05, "max")
    assert len(pseudo_labels(single, 1, FuseConfig(keep_thr=0.3, min_votes=2))) == 3


def test_canonical_order():
    ccw = np.array([[0, 10], [10, 10], [10, 0], [0, 0.0]])  # counter-clockwise on screen
    c = canonical(ccw)
    assert c.tolist() == [[0, 0], [10, 0], [10, 10], [0, 10]]
    assert canonical([[0, 0], [1, 1]]) is None and canonical([[0, 0], [1, 1], [2, 2]]) is None
    assert canonical([[0, 0], [np.nan, 1], [2, 0]]) is None


def test_canonical_many_equals_canonical_one_by_one():
    """The vectorised form over random polygons with ties, closing points, both orientations and the
    degenerate cases (too few points, NaN, zero area) mixed in."""
    from i3cl_core.fusion import canonical_many

    rng = np.random.default_rng(5)
    polys = []
    for k in range(400):
        n = int(rng.integers(3, 15))
        p = np.round(rng.uniform(0, 20, (n, 2)))  # rounded: equal distances to the box corner happen
        if k % 7 == 0:
            p = np.vstack([p, p[:1]])  # explicitly closed
        if k % 5 == 0:
            p = p[::-1]
        polys.append(p)
    polys[3] = np.array([[0.0, 0], [1, 1]])
    polys[8] = np.array([[0.0, 0], [np.nan, 1], [2, 0]])
    polys[13] = np.array([[0.0, 0], [1, 1], [2, 2]])
    polys[21] = [[0, 0], [4, 0], [4, 3], [0, 3]]  # a plain list
    got = canonical_many(polys)
    want = [canonical(p) for p in polys]
    assert sum(w is None for w in want) >= 3
    assert all(
        (g is None and w is None) or (g is not None and w is not None and np.array_equal(g, w))
        for g, w in zip(got, want)
    )


# ------------------------------------------------------------------------------------ fuse command
def _images(tmp_path, n=4):
    images = [{"id": i, "file_name": f"u_{i}.jpg", "width": W, "height": H} for i in range(1, n + 1)]
    p = tmp_path / "images.json"
    p.write_text(json.dumps({"images": images, "annotations": []}))
    return p, images


def _results(preds_by_image):
    out = []
    for image_id, preds in preds_by_image.items():
        for poly, s in preds:
            out.append(
                {
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": [np.asarray(poly).ravel().tolist()],
                    "score": s,
                }
            )
    return out


def test_fusion_in_a_process_pool_writes_what_one_process_writes(tmp_path):
    """Above 64 images ``fuse_predictions`` fuses in a process pool (its default: the CPUs); the
    pseudo-label file is byte for byte the one-process file."""
    from i3cl_core.config import FuseConfig
    from i3cl_core.pseudo.fuse import fuse_predictions

    images_json, images = _images(tmp_path, n=80)
    rng = np.random.default_rng(11)
    sources = []
    for k in range(2):
        preds = {}
        for im in images:
            boxes = rng.uniform(0, 200, (6, 2))
            preds[im["id"]] = [
                (
                    np.array([[x, y], [x + 60, y + 3], [x + 60, y + 25], [x, y + 22]])
                    + rng.normal(0, 2, (4, 2)),
                    float(rng.uniform(0.3, 1.0)),
                )
                for x, y in boxes
            ]
        path = tmp_path / f"m{k}.json"
        path.write_text(json.dumps(_results(preds)))
        sources.append(str(path))
    cfg = FuseConfig(keep_thr=0.3, auto_keep_thr=False)
    one = fuse_predictions(sources, str(images_json), tmp_path / "one.json", cfg, workers=1, progress=False)
    two = fuse_predictions(sources, str(images_json), tmp_path / "two.json", cfg, workers=2, progress=False)
    assert one["pseudo_labels"] == two["pseudo_labels"] > 0
    strip = lambda p: {k: v for k, v in json.loads(p.read_text()).items() if k != "info"}  # noqa: E731
    assert strip(tmp_path / "one.json") == strip(tmp_path / "two.json")


def test_fuse_writes_a_loadable_lossweight_dataset(tmp_path):
    import cv2

    images_json, images = _images(tmp_path)
    (tmp_path / "images").mkdir()
    for im in images:
        cv2.imwrite(str(tmp_path / "images" / im["file_name"]), np.full((H, W, 3), 120, np.uint8))
    a = {
        1: [(rect(10, 10, 110, 40), 0.9), (rect(300, 300, 380, 330), 0.6)],
        2: [(rect(50, 50, 150, 90), 0.8)],
    }
    b = {
        1: [(rect(12, 11, 111, 41), 0.8)],
        2: [(rect(51, 52, 149, 91), 0.7)],
        99: [(rect(0, 0, 10, 10), 0.9)],
    }
    c = {1: [(rect(11, 10, 109, 39), 0.7), ([[0, 0], [5, 5]], 0.9)], 3: [(rect(5, 5, 60, 30), 0.95)]}
    files = []
    for name, d in (("a", a), ("b", b), ("c", c)):
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps(_results(d)))
        files.append(str(f))
    gt = tmp_path / "gt.json"
    gt.write_text(
        json.dumps(
            {
                "images": images,
                "categories": [{"id": 1, "name": "text"}],
                "annotations": [
                    {
                        "id": 1,
                        "image_id": 1,
                        "segmentation": [rect(10, 10, 110, 40).ravel().tolist()],
                        "iscrowd": 0,
                        "bbox": [10, 10, 100, 30],
                    },
                    {
                        "id": 2,
                        "image_id": 2,
                        "segmentation": [rect(50, 50, 150, 90).ravel().tolist()],
                        "iscrowd": 0,
                        "bbox": [50, 50, 100, 40],
                    },
                ],
            }
        )
    )
    out = tmp_path / "pseudo" / "train_lossweight.json"
    cfg = load_config(None, ["fuse.keep_thr=0.3", "fuse.min_votes=2"]).fuse
    summary = fuse_predictions(files, str(images_json), out, cfg, gt=str(gt), progress=False)
    assert summary["pseudo_labels"] == 2 and summary["images_with_labels"] == 2
    stats = {Path(s["source"]).stem: s for s in summary["model_stats"]}
    assert stats["b"]["unknown_image"] == 1 and stats["c"]["invalid_polygon"] == 1  # counted, not silent
    data = json.loads(out.read_text())
    assert [im["file_name"] for im in data["images"]] == ["u_1.jpg", "u_2.jpg", "u_3.jpg", "u_4.jpg"]
    ann = data["annotations"][0]
    assert {"segmentation", "bbox", "area", "iscrowd", "lossweight", "score", "votes"} <= ann.keys()
    assert all(0 < a["lossweight"] <= 1 for a in data["annotations"] if not a["iscrowd"])
    # the default uncertain band: lone high-score clusters are do-not-care (weight 0), not background
    dontcare = [a for a in data["annotations"] if a["iscrowd"]]
    assert summary["dontcare"] == len(dontcare) == 2 and all(
        a["votes"] == 1 and a["lossweight"] == 0 for a in dontcare
    )
    report = json.loads((tmp_path / "pseudo" / "report.json").read_text())
    assert report["quality"]["fused"]["hmean"] == 1.0
    assert Path(report["figures"]["scores"]).exists() and (tmp_path / "pseudo" / "report.md").exists()
    from PIL import Image

    for name in ("scores", "votes", "weights", "pr_curve"):  # matplotlib figures, not empty canvases
        with Image.open(report["figures"][name]) as im:
            assert im.size[0] >= 400 and len(np.unique(np.asarray(im.convert("L")))) > 20, name
    # the training dataset loads it directly and concatenates it with a labeled set (weight 1)
    from i3cl_core.data.coco import CocoTextDataset

    labeled = tmp_path / "labeled.json"
    labeled.write_text(
        json.dumps(
            {
                "images": images[:1],
                "categories": [{"id": 1, "name": "text"}],
                "annotations": [
                    {
                        "id": 1,
                        "image_id": 1,
                        "segmentation": [rect(10, 10, 110, 40).ravel().tolist()],
                        "iscrowd": 0,
                        "bbox": [10, 10, 100, 30],
                    }
                ],
            }
        )
    )
    ds = CocoTextDataset([(labeled, tmp_path / "images"), (out, tmp_path / "images")])
    assert len(ds) == 3
    weights = [ds[i][1]["instances"].lossweight.tolist() for i in range(3)]
    assert weights[0] == [1.0] and all(0 < w < 1 for w in weights[1] + weights[2])


def test_fuse_bad_inputs(tmp_path):
    images_json, _ = _images(tmp_path)
    cfg = FuseConfig()
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DatasetError, match="empty.json: no usable prediction at all"):
        fuse_predictions([str(empty)], str(images_json), tmp_path / "o.json", cfg, progress=False)
    assert not (tmp_path / "o.json").exists()  # nothing for a student to train on
    s = fuse_predictions(
        [str(empty)], str(images_json), tmp_path / "o.json", cfg, progress=False, allow_empty=True
    )
    assert s["pseudo_labels"] == 0 and s["model_stats"][0]["predictions"] == 0
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(DatasetError, match="broken.json: malformed JSON"):
        fuse_predictions([str(broken)], str(images_json), tmp_path / "o.json", cfg, progress=False)
    with pytest.raises(DatasetError, match="model_weights: 2 weights for 1 prediction sources"):
        fuse_predictions(
            [str(empty)],
            str(images_json),
            tmp_path / "o.json",
            FuseConfig(model_weights=[1, 2]),
            progress=False,
            allow_empty=True,
        )
    shard_dir = tmp_path / "m"
    shard_dir.mkdir()
    (shard_dir / "shard_00000.json").write_text("[]")
    (shard_dir / "coverage.json").write_text(json.dumps({"images": [1, 2]}))
    with pytest.raises(DatasetError, match="mismatched image sets: this model ran on 2 images"):
        fuse_predictions([str(shard_dir)], str(images_json), tmp_path / "o.json", cfg, progress=False)
    with pytest.raises(DatasetError, match="prediction file or folder not found"):
        fuse_predictions(
            [str(tmp_path / "nope.json")], str(images_json), tmp_path / "o.json", cfg, progress=False
        )


def test_fuse_accepts_art_submissions(tmp_path):
    images_json, _ = _images(tmp_path)
    art = tmp_path / "art.json"
    art.write_text(
        json.dumps(
            {
                "res_1": [{"points": rect(10, 10, 60, 30).tolist(), "confidence": 0.9}],
                "res_77": [{"points": rect(0, 0, 9, 9).tolist(), "confidence": 0.9}],
            }
        )
    )
    s = fuse_predictions(
        [str(art)], str(images_json), tmp_path / "o.json", FuseConfig(keep_thr=0.3), progress=False
    )
    assert s["pseudo_labels"] == 1 and s["model_stats"][0]["unknown_image"] == 1


# ------------------------------------------------------------------------------------ ensemble
@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    import torch

    from i3cl_core.data.synth import generate_dataset
    from i3cl_core.model.checkpoint import save_checkpoint
    from i3cl_core.model.detector import build_model

    root = tmp_path_factory.mktemp("ens")
    data = generate_dataset(root / "unlabeled", 5, seed=21, size=(128, 128), progress=False, cjk=False)
    ckpts = []
    for seed in (0, 1):
        cfg = load_config(
            REPO / "configs" / "demo" / "tiny_model.yaml",
            [
                "model.test_short_side=128",
                "model.test_long_side=128",
                "model.score_thr=0.3",
                "model.max_detections=20",
            ],
        )
        torch.manual_seed(seed)
        m = build_model(cfg).eval()
        m.roi_heads.box_head.cls_score.bias.data = torch.tensor([0.0, 0.6])  # some confident detections
        ckpts.append(str(save_checkpoint(root / f"teacher_{seed}.pth", m, cfg)))
    return ckpts, data


@pytest.mark.slow
def test_killed_ensemble_resumes_without_recomputing(tmp_path, two_checkpoints):
    ckpts, data = two_checkpoints
    cmd = [
        sys.executable,
        "-m",
        "i3cl_core.cli",
        "ensemble",
        "--checkpoints",
        *ckpts,
        "--images",
        data["img_root"],
        "--shard-size",
        "1",
        "--no-progress",
        "--out",
    ]
    subprocess.run(cmd + [str(tmp_path / "full")], check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(
        cmd + [str(tmp_path / "killed")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    pred = tmp_path / "killed" / "predictions" / "teacher_0"
    deadline = time.time() + 300
    while len(list(pred.glob("shard_*.json"))) < 2 and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in pred.glob("shard_*.json")}
    n_full = len(list((tmp_path / "full" / "predictions").rglob("shard_*.json")))
    n_killed = len(list((tmp_path / "killed" / "predictions").rglob("shard_*.json")))
    assert len(done_before) >= 2 and n_killed < n_full  # killed mid-run, after some finished shards
    res = subprocess.run(
        cmd + [str(tmp_path / "killed")], check=True, capture_output=True, text=True, timeout=600
    )
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["models"][0]["skipped_done"] == len(done_before)
    for name, mtime in done_before.items():
        assert (pred / name).stat().st_mtime_ns == mtime  # finished shards were not recomputed
    full = sorted((tmp_path / "full").rglob("*.json"))
    killed = sorted((tmp_path / "killed").rglob("*.json"))
    assert [p.relative_to(tmp_path / "full") for p in full] == [
        p.relative_to(tmp_path / "killed") for p in killed
    ]
    for a, b in zip(full, killed):
        if a.name != "members.json":
            assert a.read_bytes() == b.read_bytes(), a.name


def test_ensemble_then_fuse_round_trip(tmp_path, two_checkpoints):
    from i3cl_core.pseudo.ensemble import run_ensemble

    ckpts, data = two_checkpoints
    s = run_ensemble(ckpts, data["img_root"], tmp_path / "ens", shard_size=2, progress=False, flips=["h"])
    assert s["shards"] == 3 and len(s["members"]) == 2
    out = tmp_path / "pseudo.json"
    f = fuse_predictions(
        s["members"], s["images_json"], out, FuseConfig(keep_thr=0.0, uncertain_band=None), progress=False
    )
    assert f["images"] == 5 and f["models"] == 2
    assert f["pseudo_labels"] == len(json.loads(out.read_text())["annotations"])
    # a re-run reuses the shards only when they came from the same checkpoint, images and settings
    again = run_ensemble(ckpts, data["img_root"], tmp_path / "ens", shard_size=2, progress=False, flips=["h"])
    assert [m["skipped_done"] for m in again["models"]] == [3, 3]
    no_tta = run_ensemble(ckpts, data["img_root"], tmp_path / "ens", shard_size=2, progress=False)
    assert [m["computed"] for m in no_tta["models"]] == [3, 3]
    resharded = run_ensemble(ckpts, data["img_root"], tmp_path / "ens", shard_size=3, progress=False)
    assert [m["computed"] for m in resharded["models"]] == [2, 2]


# ------------------------------------------------------------------------------------ thresholds from val
def _val_case(tmp_path, rng):
    """A labeled validation split (10 images, 3 texts each) and two models' predictions on it: each
    true text found by both models with scores in [0.55, 0.95], plus false positives with scores
    below 0.5; and an unlabeled split (3 images) with predictions of the same kind."""

    def split(name, n, labeled):
        images, anns, preds = [], [], [[], []]
        for i in range(1, n + 1):
            images.append({"id": i, "file_name": f"{name}_{i}.jpg", "width": W, "height": H})
            for j in range(3):
                x, y = 20 + 200 * j, 40 + 30 * (i % 5)
                r = rect(x, y, x + 150, y + 40)
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": i,
                        "category_id": 1,
                        "iscrowd": 0,
                        "segmentation": [r.ravel().tolist()],
                        "bbox": [x, y, 150, 40],
                        "area": 6000,
                    }
                )
                for m in range(2):
                    preds[m].append(
                        {
                            "image_id": i,
                            "segmentation": [(r + rng.normal(0, 2, r.shape)).ravel().tolist()],
                            "score": float(rng.uniform(0.55, 0.95)),
                        }
                    )
            for m in range(2):  # a false positive both models agree on
                fp = rect(50, 300, 200, 340) + m
                preds[m].append(
                    {
                        "image_id": i,
                        "segmentation": [fp.ravel().tolist()],
                        "score": float(rng.uniform(0.1, 0.45)),
                    }
                )
        ann_file = tmp_path / f"{name}.json"
        ann_file.write_text(
            json.dumps(
                {
                    "images": images,
                    "annotations": anns if labeled else [],
                    "categories": [{"id": 1, "name": "text"}],
                }
            )
        )
        sources = []
        for m in range(2):
            p = tmp_path / f"{name}_model{m}.json"
            p.write_text(json.dumps(preds[m]))
            sources.append(str(p))
        return ann_file, sources

    return split("val", 10, True), split("unlabeled", 3, False)


def test_keep_thr_is_chosen_on_the_validation_split_without_the_unlabeled_ground_truth(tmp_path):
    from i3cl_core.pipeline.stages import fuse_stage
    from i3cl_core.pseudo.thresholds import choose_keep_thr

    (val_json, val_sources), (unl_json, unl_sources) = _val_case(tmp_path, np.random.default_rng(0))
    cfg = FuseConfig(keep_thr=0.05, auto_keep_thr=True, uncertain_band=(0.3, 0.4))
    chosen = choose_keep_thr(val_sources, val_json, cfg)
    # every true text scores >= 0.55, every false positive < 0.45: F is 1.0 exactly between them
    assert 0.45 <= chosen["keep_thr"] <= 0.55 and chosen["val"]["hmean"] == 1.0
    assert next(r for r in chosen["sweep"] if r["threshold"] == 0.05)["precision"] < 0.8

    hidden_gt = tmp_path / "unlabeled_gt.json"  # never written: the selection must not need it
    out = tmp_path / "pseudo" / "train_lossweight.json"
    s = fuse_stage(
        unl_sources,
        str(unl_json),
        str(out),
        cfg,
        gt=None,
        img_root=str(tmp_path),
        val_members=val_sources,
        val_ann_file=str(val_json),
    )
    assert not hidden_gt.exists()
    assert s["keep_thr"] == chosen["keep_thr"] and s["keep_thr_chosen_on"] == str(val_json)
    data = json.loads(out.read_text())
    kept = [a for a in data["annotations"] if not a["iscrowd"]]
    assert len(kept) == 9 and all(a["score"] >= chosen["keep_thr"] for a in kept)
    # the uncertain band now reaches from its low edge up to the chosen threshold
    assert data["info"]["fuse"]["uncertain_band"] == [0.3, chosen["keep_thr"]]
    dontcare = [a for a in data["annotations"] if a["iscrowd"]]
    assert dontcare and all(0.3 <= a["score"] < chosen["keep_thr"] and a["lossweight"] == 0 for a in dontcare)
    report = json.loads((out.parent / "report.json").read_text())
    assert report["keep_thr_selection"]["chosen_on"] == str(val_json) and "quality" not in report
    assert s["keep_thr_selection"] == report["keep_thr_selection"]  # returned as a value, written once

    # switched off: keep_thr as given (0.05 lets the false positives through)
    s_off = fuse_stage(
        unl_sources,
        str(unl_json),
        str(out),
        cfg.model_copy(update={"auto_keep_thr": False}),
        gt=None,
        img_root=str(tmp_path),
        val_members=val_sources,
        val_ann_file=str(val_json),
    )
    assert s_off["keep_thr"] == 0.05 and s_off["pseudo_labels"] == 12 and s_off["keep_thr_chosen_on"] is None
    assert s_off["dontcare"] == 0  # the band [0.3, 0.4) lies above keep_thr 0.05: nothing is left out
    # the fused labels' quality on validation is still measured at the given keep_thr (the pipeline's gate)
    at_005 = next(r for r in chosen["sweep"] if r["threshold"] == 0.05)
    assert s_off["keep_thr_selection"]["val"] == {k: at_005[k] for k in ("precision", "recall", "hmean")}
    assert s_off["keep_thr_selection"]["val"]["hmean"] < chosen["val"]["hmean"]


def test_ensemble_recomputes_shards_when_the_checkpoint_changed(tmp_path, two_checkpoints, caplog):
    import shutil

    from i3cl_core.pseudo.ensemble import run_ensemble

    ckpts, data = two_checkpoints
    ckpt = tmp_path / "m" / "checkpoints" / "latest.pth"
    ckpt.parent.mkdir(parents=True)
    shutil.copy(ckpts[0], ckpt)
    run_ensemble([str(ckpt)], data["img_root"], tmp_path / "ens", shard_size=2, progress=False)
    shard = tmp_path / "ens" / "predictions" / "m" / "shard_00000.json"
    first = shard.read_text()
    again = run_ensemble([str(ckpt)], data["img_root"], tmp_path / "ens", shard_size=2, progress=False)
    assert again["models"][0]["computed"] == 0  # same checkpoint: resumed, nothing recomputed
    shutil.copy(ckpts[1], ckpt)  # retrained under the same path
    with caplog.at_level("WARNING"):
        third = run_ensemble([str(ckpt)], data["img_root"], tmp_path / "ens", shard_size=2, progress=False)
    assert third["models"][0]["computed"] == 3 and "checkpoint" in caplog.text and "changed" in caplog.text
    assert shard.read_text() != first


def test_fuse_cli_refuses_wrong_shaped_predictions_foreign_overrides_and_reports_capped_votes(
    tmp_path, capsys
):
    from i3cl_core.cli import main

    images_json, _ = _images(tmp_path)
    wrong = tmp_path / "wrong.json"  # records without image ids' polygons: nothing usable
    wrong.write_text(json.dumps([{"image_id": 1, "segmentation": [[1, 2]], "score": 0.9}]))
    base = [
        "fuse",
        "--predictions",
        str(wrong),
        str(wrong),
        "--images",
        str(images_json),
        "--out",
        str(tmp_path / "p.json"),
        "--no-progress",
        "--set",
        "fuse.auto_keep_thr=false",
    ]
    assert main(base) == 2
    assert "wrong.json: no usable prediction at all (1 invalid polygons" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()
    assert main(base + ["--allow-empty"]) == 0 and (tmp_path / "p.json").exists()
    capsys.readouterr()
    assert main(base + ["--allow-empty", "--set", "train.lr=5"]) == 2
    assert "--set train.lr=5: i3cl fuse reads only fuse.* settings" in capsys.readouterr().err
    assert main(base + ["--allow-empty", "--set", "fuse.min_votes=5"]) == 0
    assert "fuse.min_votes=5 is more than the 2 prediction sources; using 2" in capsys.readouterr().err


def test_two_cpu_workers_write_the_same_shard_files_as_one_and_load_each_model_once(
    tmp_path, two_checkpoints
):
    from i3cl_core.pseudo.ensemble import run_ensemble

    ckpts, data = two_checkpoints
    kw = dict(shard_size=1, progress=False, batch_size=2, loader_workers=1, precision="fp32")
    one = run_ensemble(ckpts, data["img_root"], tmp_path / "one", devices=["cpu"], **kw)
    two = run_ensemble(ckpts, data["img_root"], tmp_path / "two", devices=["cpu", "cpu"], **kw)
    assert one["devices"] == ["cpu"] and two["devices"] == ["cpu", "cpu"]
    assert one["model_loads_per_worker"] == [2]  # 10 (model, shard) jobs, each model loaded once
    assert sum(two["model_loads_per_worker"]) <= 4 and max(two["model_loads_per_worker"]) <= 2
    files = sorted(
        p.relative_to(tmp_path / "one")
        for p in (tmp_path / "one").rglob("*.json")
        if p.name != "members.json"
    )
    assert len([f for f in files if f.name.startswith("shard_")]) == 10
    assert files == sorted(
        p.relative_to(tmp_path / "two")
        for p in (tmp_path / "two").rglob("*.json")
        if p.name != "members.json"
    )
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    assert (
        sum(len(json.loads((tmp_path / "one" / f).read_text())) for f in files if f.name.startswith("shard_"))
        > 0
    )


def test_batched_inference_matches_one_image_at_a_time(tmp_path, two_checkpoints):
    from i3cl_core.pseudo.ensemble import run_ensemble

    ckpts, data = two_checkpoints
    a = run_ensemble(
        ckpts[:1],
        data["img_root"],
        tmp_path / "b1",
        shard_size=5,
        devices=["cpu"],
        batch_size=1,
        loader_workers=0,
        precision="fp32",
        progress=False,
    )
    b = run_ensemble(
        ckpts[:1],
        data["img_root"],
        tmp_path / "b3",
        shard_size=5,
        devices=["cpu"],
        batch_size=3,
        loader_workers=2,
        precision="fp32",
        progress=False,
    )
    r1 = json.loads(Path(a["members"][0], "shard_00000.json").read_text())
    r3 = json.loads(Path(b["members"][0], "shard_00000.json").read_text())
    assert len(r1) == len(r3) > 0  # the same detections, scores equal to float rounding
    for x, y in zip(
        sorted(r1, key=lambda r: (r["image_id"], -r["score"])),
        sorted(r3, key=lambda r: (r["image_id"], -r["score"])),
    ):
        assert x["image_id"] == y["image_id"] and abs(x["score"] - y["score"]) < 1e-4


def test_bad_devices_and_precisions_are_refused_before_any_work(tmp_path, two_checkpoints, capsys):
    from i3cl_core.cli import main
    from i3cl_core.devices import resolve_devices
    from i3cl_core.infer.precision import resolve_precision

    ckpts, data = two_checkpoints
    assert resolve_devices("auto") == ["cpu"] and resolve_devices(["cpu", "cpu"]) == ["cpu", "cpu"]
    with pytest.raises(ValueError, match=r"'cuda:1' requested but this machine has 0 visible CUDA device"):
        resolve_devices(["cuda:1"])
    with pytest.raises(ValueError, match="not a device"):
        resolve_devices(["gpu0"])
    with pytest.raises(ValueError, match="fp16 autocast needs a CUDA device"):
        resolve_precision("fp16", "cpu")
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("auto", "cpu") in ("fp32", "bf16")
    base = [
        "ensemble",
        "--checkpoints",
        ckpts[0],
        "--images",
        data["img_root"],
        "--out",
        str(tmp_path / "e"),
        "--no-progress",
    ]
    assert main(base + ["--devices", "cuda:0"]) == 2
    assert "--devices: 'cuda:0' requested" in capsys.readouterr().err
    assert main(base + ["--precision", "fp16"]) == 2
    assert "--precision: fp16 autocast needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_infer_params_name_the_renamed_fields():
    from pydantic import ValidationError

    from i3cl_core.pipeline.params import InferParams

    with pytest.raises(ValidationError, match="infer.device was replaced by infer.devices"):
        InferParams(device="cuda")
    with pytest.raises(ValidationError, match="infer.workers was replaced by infer.devices"):
        InferParams(workers=2)
    with pytest.raises(ValidationError, match="devices"):
        InferParams(devices=["gpu:0"])
    with pytest.raises(ValidationError, match="give one"):
        InferParams(dask_address="tcp://127.0.0.1:8786", dask_workers=2)
    assert InferParams(devices=["cuda:0", "cuda:1"]).devices == ["cuda:0", "cuda:1"]
    # the candidate threshold's old name (a saved deployment's parameters) is read as the new one, into the
    # same shard cache key; both at once are refused
    old = InferParams(score_thr=0.2)
    assert old.min_score == 0.2 and old.shard_settings() == InferParams(min_score=0.2).shard_settings()
    with pytest.raises(ValidationError, match="give only min_score"):
        InferParams(score_thr=0.2, min_score=0.3)


def test_fuse_reads_what_evaluate_reads_rle_masks_included(tmp_path):
    """Prediction sources go through the evaluation's reader: an RLE mask counts as its traced polygon."""
    from pycocotools import mask as mask_utils

    from i3cl_core.pseudo.sources import load_model_predictions

    images_json, images = _images(tmp_path, n=1)
    m = np.zeros((H, W), np.uint8, order="F")
    m[50:80, 100:200] = 1
    rle = mask_utils.encode(m)
    rle["counts"] = rle["counts"].decode()
    f = tmp_path / "rle.json"
    f.write_text(
        json.dumps(
            [
                {"image_id": 1, "category_id": 1, "segmentation": rle, "score": 0.8},
                {"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 12], "score": 0.7},
            ]
        )
    )
    preds, stats = load_model_predictions(f, images)
    assert stats["predictions"] == 2 and stats["invalid_polygon"] == 0
    (poly, score), (box, _) = preds[1]
    assert score == 0.8 and poly[:, 0].min() == 100 and poly[:, 0].max() == 200 and poly[:, 1].max() == 80
    assert box.tolist() == [[10, 10], [40, 10], [40, 22], [10, 22]]


def test_keep_thr_beta_below_one_chooses_for_precision(monkeypatch):
    from i3cl_core.pseudo import thresholds

    rows = [
        {"threshold": t, "precision": p, "recall": r, "hmean": round(2 * p * r / (p + r), 4), "best": False}
        for t, p, r in [(0.3, 0.60, 0.90), (0.5, 0.75, 0.75), (0.7, 0.95, 0.60), (0.9, 0.99, 0.20)]
    ]
    best_f = max(rows, key=lambda r: r["hmean"])
    for r in rows:
        r["best"] = r is best_f
    monkeypatch.setattr(thresholds, "val_sweep", lambda *a: [dict(r) for r in rows])
    assert thresholds.choose_keep_thr([], "val.json", FuseConfig())["keep_thr"] == best_f["threshold"] == 0.5
    chosen = thresholds.choose_keep_thr([], "val.json", FuseConfig(keep_thr_beta=0.5))
    assert chosen["keep_thr"] == 0.7 and chosen["val"]["precision"] == 0.95
    assert thresholds.f_beta(0.95, 0.60, 0.5) == pytest.approx(1.25 * 0.57 / (0.25 * 0.95 + 0.60))
    with pytest.raises(Exception, match="keep_thr_beta"):
        FuseConfig(keep_thr_beta=0)


def test_min_votes_is_chosen_on_the_validation_split_with_its_keep_thr(monkeypatch):
    """auto_min_votes: each min_votes from 1 to the number of models gets its own best keep_thr on the
    validation split; the best F wins, ties go to more votes; switched off, min_votes stays as given."""
    from i3cl_core.pseudo import thresholds

    def sweep(sources, images_json, cfg):  # one vote: more recall; two votes: precise but misses text
        p, r = {1: (0.80, 0.78), 2: (0.90, 0.60), 3: (0.95, 0.30)}[cfg.min_votes]
        return [
            {
                "threshold": 0.5,
                "precision": p,
                "recall": r,
                "hmean": round(2 * p * r / (p + r), 4),
                "best": True,
            }
        ]

    monkeypatch.setattr(thresholds, "val_sweep", sweep)
    chosen = thresholds.choose_fusion(["a", "b", "c"], "val.json", FuseConfig())
    assert chosen["min_votes"] == 1 and set(chosen["by_min_votes"]) == {1, 2, 3}
    assert chosen["by_min_votes"][1] > chosen["by_min_votes"][2] > chosen["by_min_votes"][3]
    # F0.5 counts precision twice: two votes win
    assert (
        thresholds.choose_fusion(["a", "b", "c"], "val.json", FuseConfig(keep_thr_beta=0.5))["min_votes"] == 2
    )
    # off: only the given value (capped at the number of models) is tried
    off = thresholds.choose_fusion(["a", "b"], "val.json", FuseConfig(auto_min_votes=False, min_votes=3))
    assert off["min_votes"] == 2 and list(off["by_min_votes"]) == [2]
    # ties go to more votes
    monkeypatch.setattr(
        thresholds,
        "val_sweep",
        lambda s, j, cfg: [{"threshold": 0.5, "precision": 0.8, "recall": 0.8, "hmean": 0.8, "best": True}],
    )
    assert thresholds.choose_fusion(["a", "b"], "val.json", FuseConfig())["min_votes"] == 2
