"""COCO polygon dataset: original layout, bad input, augmentations, lockstep dropping."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import rect, write_coco
from shapely.geometry import Polygon as SPolygon

from i3cl_core.config import AugmentConfig
from i3cl_core.data.coco import CocoTextDataset, collate, load_coco_records
from i3cl_core.data.errors import DatasetError
from i3cl_core.data.polygons import instance_area
from i3cl_core.data.transforms import (
    ClipAndFilter,
    Compose,
    Photometric,
    RandomAffine,
    RandomFlip,
    Resize,
    Rotate,
    Sample,
    build_source_transforms,
    build_strong_transform,
    build_train_transform,
)
from i3cl_core.structures import Instances


def _img(i, w=320, h=240, name=None):
    return {"id": i, "file_name": name or f"gt_{i}.jpg", "width": w, "height": h}


def _ann(i, image_id, poly, **kw):
    xs, ys = poly[0::2], poly[1::2]
    return {
        "id": i,
        "image_id": image_id,
        "category_id": 1,
        "segmentation": [poly],
        "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
        "iscrowd": 0,
        **kw,
    }


# ------------------------------------------------------------------------------------------ layout
def test_original_release_layout_loads_unchanged(tmp_path):
    """data/art/train.json + train_images/, data/lsvt/train1.json, *_lossweight.json, concatenated."""
    art = tmp_path / "data" / "art"
    write_coco(
        art,
        [_img(1), _img(2)],
        [_ann(1, 1, rect(10, 10, 60, 20)), _ann(2, 2, rect(30, 40, 80, 30))],
        ann_name="train.json",
        img_dir="train_images",
    )
    lsvt = tmp_path / "data" / "lsvt"
    write_coco(
        lsvt,
        [_img(1, name="gt_0.jpg")],
        [
            _ann(7, 1, rect(5, 5, 40, 40), lossweight=0.25),
            _ann(8, 1, rect(100, 100, 50, 20), lossweight=1.0),
            _ann(9, 1, rect(200, 10, 50, 20), iscrowd=1, lossweight=0.0),
        ],
        ann_name="train1_lossweight.json",
        img_dir="train_images",
    )
    ds = CocoTextDataset(
        [
            (art / "train.json", art / "train_images"),
            (lsvt / "train1_lossweight.json", lsvt / "train_images"),
        ],
        train=True,
    )
    assert len(ds) == 3
    img, tgt = ds[2]
    assert img.shape == (3, 240, 320) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert tgt["instances"].boxes.tolist() == [[5, 5, 45, 45], [100, 100, 150, 120]]
    assert tgt["instances"].lossweight.tolist() == [0.25, 1.0]
    assert tgt["instances"].ann_id.tolist() == [7, 8]
    assert tgt["instances"].labels.tolist() == [1, 1]
    assert tgt["dontcare"].boxes.tolist() == [[200, 10, 250, 30]]
    # default weight 1.0 when absent
    assert ds[0][1]["instances"].lossweight.tolist() == [1.0]
    images, targets = collate([ds[0], ds[1]])
    assert len(images) == 2 and targets[1]["image_id"] == 2


def test_rle_and_bbox_only_and_ignore(coco_factory):
    from pycocotools import mask as mask_utils

    m = np.zeros((240, 320), np.uint8, order="F")
    m[50:80, 100:200] = 1
    rle = mask_utils.encode(m)
    rle["counts"] = rle["counts"].decode()
    anns = [
        {"id": 1, "image_id": 1, "segmentation": rle, "bbox": [100, 50, 100, 30], "iscrowd": 0},
        {"id": 2, "image_id": 1, "bbox": [10, 10, 30, 12], "iscrowd": 0},
        {"id": 3, "image_id": 1, "segmentation": [rect(0, 200, 50, 20)], "ignore": True},
    ]
    ann, root = coco_factory([_img(1)], anns)
    _, tgt = CocoTextDataset([(ann, root)])[0]
    b = tgt["instances"].boxes
    assert b.shape == (2, 4)
    assert b[0].tolist() == [100, 50, 200, 80]  # the mask's pixel boundary, as the evaluation traces it
    assert b[1].tolist() == [10, 10, 40, 22]
    assert tgt["dontcare"].boxes.tolist() == [[0, 200, 50, 220]]


# ------------------------------------------------------------------------------------------ bad input
def test_malformed_json(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"images": [}')
    with pytest.raises(DatasetError, match=r"bad.json: malformed JSON at line 1"):
        load_coco_records(p, tmp_path)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DatasetError, match="annotation file not found"):
        load_coco_records(tmp_path / "nope.json", tmp_path)


def test_annotation_with_unknown_image(coco_factory):
    ann, root = coco_factory([_img(1)], [_ann(42, 99, rect(1, 1, 20, 20))])
    with pytest.raises(DatasetError, match=r"train.json: annotation 42 points to unknown image id 99"):
        CocoTextDataset([(ann, root)])


@pytest.mark.parametrize("name", ["../escape.jpg", "/etc/passwd", "sub/../../x.jpg"])
def test_file_name_escaping_root_is_refused(coco_factory, name):
    ann, root = coco_factory([_img(5, name=name)], [_ann(1, 5, rect(1, 1, 20, 20))], write_images=False)
    with pytest.raises(DatasetError, match=r"train.json: image 5: refused: .*(escapes|absolute)"):
        CocoTextDataset([(ann, root)])


def test_missing_image_file(coco_factory):
    ann, root = coco_factory([_img(3)], [_ann(1, 3, rect(1, 1, 20, 20))], write_images=False)
    with pytest.raises(DatasetError, match=r"1 image file\(s\) missing, e.g. .*gt_3.jpg \(image 3\)"):
        CocoTextDataset([(ann, root)])


def test_unreadable_image(coco_factory):
    ann, root = coco_factory([_img(3)], [_ann(1, 3, rect(1, 1, 20, 20))])
    (root / "gt_3.jpg").write_bytes(b"not a jpeg")
    ds = CocoTextDataset([(ann, root)])
    with pytest.raises(DatasetError, match=r"gt_3.jpg: image 3 is unreadable"):
        ds[0]


@pytest.mark.parametrize("weight", [-0.5, float("nan"), "high", True])
def test_bad_lossweight(coco_factory, weight):
    ann, root = coco_factory([_img(1)], [_ann(11, 1, rect(1, 1, 20, 20), lossweight=weight)])
    with pytest.raises(DatasetError, match=r"annotation 11: lossweight must be a finite number >= 0"):
        CocoTextDataset([(ann, root)])


def test_geometry_problems_counted_once_per_dataset(coco_factory, caplog):
    anns = [
        _ann(1, 1, rect(10, 10, 50, 20)),
        _ann(2, 1, [0, 0, 10, 10]),  # 2 points
        _ann(3, 1, [10, 100, 60, 140, 60, 100, 10, 140]),  # bow-tie: repaired
        _ann(4, 1, [10, 10, 20, 20, 30, 30]),  # collinear: zero area
        _ann(5, 1, [0, 0, 40, 0, 40, 40, 20, 40, 20, -20, 0, 40]),  # self-intersecting: repaired
        _ann(6, 2, [1, 1, 2, 2]),
    ]
    ann, root = coco_factory([_img(1), _img(2)], anns)
    with caplog.at_level(logging.INFO, logger="i3cl"):
        ds = CocoTextDataset([(ann, root)])
    rep = ds.reports[0]
    assert rep.dropped == {"too_few_points": 2, "zero_area": 1}
    assert rep.repaired == 2 and rep.care == 3
    assert rep.images_without_text == 1 and rep.images_kept == 1
    msgs = [r.getMessage() for r in caplog.records if "train.json" in r.getMessage()]
    assert len(msgs) == 1  # one report line per dataset, not one per sample
    assert "2 too few points (annotation ids 2, 6)" in msgs[0] and "repaired (annotation ids 3, 5)" in msgs[0]
    _, tgt = ds[0]
    assert tgt["instances"].ann_id.tolist() == [1, 3, 5]
    bowtie = tgt["instances"].polygons[1][0]
    assert SPolygon(bowtie).is_valid and SPolygon(bowtie).area == pytest.approx(40 * 25 / 2)  # one lobe kept


def test_empty_dataset_after_filtering(coco_factory):
    ann, root = coco_factory([_img(1, w=20, h=20)], [_ann(1, 1, rect(1, 1, 10, 10))])
    with pytest.raises(DatasetError, match="no usable images after filtering"):
        CocoTextDataset([(ann, root)])


# ------------------------------------------------------------------------------------------ augmentations
def _sample(n=6, w=400, h=300, seed=0):
    rng = np.random.default_rng(seed)
    polys, crowd = [], []
    for i in range(n):
        x, y = rng.uniform(0, w - 80), rng.uniform(0, h - 40)
        polys.append([np.array([[x, y], [x + 70, y + 5], [x + 65, y + 35], [x - 3, y + 30]], np.float32)])
        crowd.append(i % 3 == 2)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    return Sample(
        img,
        Instances(
            polygons=polys,
            iscrowd=np.array(crowd),
            lossweight=np.linspace(0.1, 1.0, n).astype(np.float32),
            ann_id=np.arange(100, 100 + n, dtype=np.int64),
        ),
        1,
        "x.jpg",
        (h, w),
    )


def test_rotation_keeps_polygon_area_and_boxes_contain_polygons():
    s = _sample()
    # put polygons well inside so none is clipped by a 10 degree rotation
    s = s.with_polygons([[p[0] * 0.5 + np.array([100, 75], np.float32)] for p in s.instances.polygons])
    areas = [instance_area(p) for p in s.instances.polygons]
    out = Rotate(10, prob=1.0)(s, np.random.default_rng(1))
    assert len(out) == len(s)
    assert np.allclose([instance_area(p) for p in out.instances.polygons], areas, rtol=1e-4)
    img, tgt = out.to_tensors()
    for b, parts in zip(tgt["instances"].boxes, tgt["instances"].polygons):
        pts = np.concatenate(parts)
        assert (pts[:, 0] >= b[0].item() - 1e-4).all() and (pts[:, 0] <= b[2].item() + 1e-4).all()
        assert (pts[:, 1] >= b[1].item() - 1e-4).all() and (pts[:, 1] <= b[3].item() + 1e-4).all()


def test_rotation_moves_polygons_with_the_pixels():
    """A bright square rotates to where its polygon goes."""
    img = np.zeros((201, 301, 3), np.uint8)
    img[40:60, 200:240] = 255
    poly = np.array([[200, 40], [240, 40], [240, 60], [200, 60]], np.float32)
    s = Sample(
        img,
        Instances(
            polygons=[[poly]],
            iscrowd=np.array([False]),
            lossweight=np.ones(1, np.float32),
            ann_id=np.zeros(1, np.int64),
        ),
    )
    out = Rotate(15, prob=1.0, fill=0)(s, np.random.default_rng(0))
    from i3cl_core.data.polygons import rasterize_instance

    m = rasterize_instance(out.instances.polygons[0], 201, 301).astype(bool)
    bright = out.image[..., 0] > 127
    iou = (m & bright).sum() / (m | bright).sum()
    assert iou > 0.9


def _shape_sample(h=240, w=320):
    """Two curved-ish polygons drawn filled in white on black (one per colour channel pair), as a Sample."""
    from i3cl_core.data.polygons import rasterize_instance

    t = np.linspace(0, np.pi, 12)
    arc = np.concatenate(
        [
            np.stack([160 + 110 * np.cos(t), 150 - 70 * np.sin(t)], 1),
            np.stack([160 + 80 * np.cos(t[::-1]), 150 - 45 * np.sin(t[::-1])], 1),
        ]
    ).astype(np.float32)
    box = np.array([[40, 180], [150, 170], [155, 215], [45, 225]], np.float32)
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = rasterize_instance([arc], h, w) * 255
    img[..., 1] = rasterize_instance([box], h, w) * 255
    inst = Instances(
        polygons=[[arc], [box]],
        iscrowd=np.array([False, False]),
        lossweight=np.ones(2, np.float32),
        ann_id=np.arange(2, dtype=np.int64),
    )
    return Sample(img, inst)


def test_strong_augmentation_keeps_polygons_on_their_pixels():
    """Each filled polygon's mask, transformed with the image by the strong policy's geometry (flip, affine
    with zoom, rotation, shear and shift, resize), against the transformed polygon rasterised: IoU >= 0.95 for
    every instance that survives, over many random draws; the pixel-only operations change no polygon."""
    from i3cl_core.data.polygons import rasterize_instance

    geo = AugmentConfig(
        scales=[(200, 400), (300, 500)],
        flip="random",
        vflip_prob=0.5,
        rotate_fill=0,
        strong={"color_prob": 0, "blur_noise_prob": 0, "cutout_prob": 0, "affine_prob": 1.0},
    )
    strong = build_strong_transform(geo)
    ious, kept = [], 0
    for seed in range(40):
        out = strong(_shape_sample(), np.random.default_rng(seed))
        assert "affine" in out.log
        h, w = out.size
        for k, parts in zip(out.instances.ann_id, out.instances.polygons):
            pixels = out.image[..., int(k)] > 127
            if pixels.sum() < 200:  # mostly pushed out of the canvas: the clipped sliver is all that is left
                continue
            m = rasterize_instance(parts, h, w).astype(bool)
            ious.append((m & pixels).sum() / (m | pixels).sum())
            kept += 1
    assert kept >= 50 and min(ious) >= 0.95, (kept, min(ious))

    # the pixel-only operations (colour, blur or noise, cutout) come after the geometry and never move a
    # polygon: with the same seed the full policy gives the polygons of the geometry alone, bit for bit
    def policy(**probs):
        return build_strong_transform(
            AugmentConfig(scales=[(200, 400)], rotate_fill=0, strong={"affine_prob": 1.0, **probs})
        )

    full = policy(color_prob=1.0, blur_noise_prob=1.0, cutout_prob=1.0)
    geo_only = policy(color_prob=0.0, blur_noise_prob=0.0, cutout_prob=0.0)
    for seed in range(5):
        a, b = (
            full(_shape_sample(), np.random.default_rng(seed)),
            geo_only(_shape_sample(), np.random.default_rng(seed)),
        )
        assert "color_jitter" in a.log and any(x.startswith("cutout") for x in a.log)
        assert not np.array_equal(a.image, b.image)
        assert [[p.tolist() for p in parts] for parts in a.instances.polygons] == [
            [p.tolist() for p in parts] for parts in b.instances.polygons
        ]


def test_online_views_share_their_pixels_and_polygons():
    """augment: online: the weak view (flip, resize) keeps each polygon on its pixels, and the student's view
    is the same image under colour, blur or noise and cutout only: same size, same polygons, other pixels."""
    from i3cl_core.data.polygons import rasterize_instance
    from i3cl_core.data.transforms import build_online_transform

    online = build_online_transform(
        AugmentConfig(
            scales=[(200, 400)],
            flip="random",
            vflip_prob=0.5,
            rotate_fill=0,
            strong={"color_prob": 1.0, "blur_noise_prob": 1.0, "cutout_prob": 1.0},
        )
    )
    for seed in range(5):
        out = online(_shape_sample(), np.random.default_rng(seed))
        h, w = out.size
        assert out.student_image is not None and out.student_image.shape == out.image.shape
        assert not np.array_equal(out.student_image, out.image) and "color_jitter" in out.log
        for k, parts in zip(out.instances.ann_id, out.instances.polygons):
            pixels = out.image[..., int(k)] > 127
            m = rasterize_instance(parts, h, w).astype(bool)
            assert (m & pixels).sum() / (m | pixels).sum() >= 0.95
        image, target = out.to_tensors()
        assert target["student_image"].shape == image.shape


def test_strong_affine_range_and_per_source_transforms():
    aff = RandomAffine(scale=(0.5, 1.5), rotate=30, shear=15, translate=0.1)
    rng = np.random.default_rng(0)
    zooms = [np.sqrt(abs(np.linalg.det(aff.matrix(100, 100, rng)[:, :2]))) for _ in range(500)]
    assert 0.45 < min(zooms) < 0.6 and 1.3 < max(zooms) < 1.6
    aug = AugmentConfig(scales=[(128, 192)])
    t = build_source_transforms(aug, ["default", "strong", "default", "online"])
    assert "StudentView" in repr(t[3]) and "RandomAffine" not in repr(t[3])
    assert (
        t[0] is t[2]
        and t[1] is not t[0]
        and "RandomAffine" in repr(t[1])
        and "RandomAffine" not in repr(t[0])
    )
    with pytest.raises(Exception, match="strong.scale"):
        AugmentConfig(strong={"scale": (2.0, 1.0)})


def test_dataset_gives_each_source_its_transform_and_background_weight(coco_factory):
    d1 = coco_factory([_img(1)], [_ann(1, 1, rect(10, 10, 100, 30))], ann_name="a.json")
    d2 = coco_factory([_img(1)], [_ann(1, 1, rect(10, 10, 100, 30))], ann_name="b.json")

    def mark(value):  # a "transform" that writes its mark into the instances' lossweight
        def t(s, rng):
            inst = Instances(**s.instances.fields())
            inst.lossweight = np.full(len(s), value, np.float32)
            return Sample(s.image, inst)

        return t

    ds = CocoTextDataset([d1, d2], transform=[mark(2.0), mark(3.0)], background_weights=[1.0, 0.3], seed=1)
    (_, t1), (_, t2) = ds[0], ds[1]
    assert (t1["background_weight"], t2["background_weight"]) == (1.0, 0.3)
    assert t1["instances"].lossweight.tolist() == [2.0] and t2["instances"].lossweight.tolist() == [3.0]
    with pytest.raises(ValueError, match="1 background weights for 2 datasets"):
        CocoTextDataset([d1, d2], background_weights=[1.0])
    with pytest.raises(ValueError, match="1 transforms for 2 datasets"):
        CocoTextDataset([d1, d2], transform=[mark(1.0)])


def test_weights_and_flags_stay_aligned_after_drops():
    s = _sample(n=30, seed=3)
    # move polygons so a rotation pushes several out of the image
    s = s.with_polygons(
        [
            [p[0] * 1.0 + np.array([0 if i % 2 else 330, 0], np.float32)]
            for i, p in enumerate(s.instances.polygons)
        ]
    )
    by_id = {
        int(a): (float(w), bool(c))
        for a, w, c in zip(s.instances.ann_id, s.instances.lossweight, s.instances.iscrowd)
    }
    dropped_any = False
    for seed in range(20):
        out = Compose([Rotate(15, 1.0), Resize([(150, 400)]), ClipAndFilter(4.0)])(
            s, np.random.default_rng(seed)
        )
        dropped_any |= len(out) < len(s)
        assert set(out.instances.fields()) == {"polygons", "iscrowd", "lossweight", "ann_id"}
        for a, w, c in zip(out.instances.ann_id, out.instances.lossweight, out.instances.iscrowd):
            assert by_id[int(a)] == (float(w), bool(c))
        _, tgt = out.to_tensors()
        assert len(tgt["instances"]) == int((~out.instances.iscrowd).sum()) and len(tgt["dontcare"]) == int(
            out.instances.iscrowd.sum()
        )
        for a, w in zip(tgt["instances"].ann_id.tolist(), tgt["instances"].lossweight.tolist()):
            assert by_id[a][0] == pytest.approx(w) and not by_id[a][1]
    assert dropped_any


def test_flips_mirror_polygons_and_keep_clockwise_order():
    s = _sample(n=3, seed=5)
    from shapely.geometry import LinearRing

    for mode_seed in range(6):
        out = RandomFlip("original")(s, np.random.default_rng(mode_seed))
        flip = out.log[-1]
        for p0, p1 in zip(s.instances.polygons, out.instances.polygons):
            a, b = p0[0], p1[0][::-1]
            if flip == "flip_h":
                assert np.allclose(b[:, 0], 400 - a[:, 0]) and np.allclose(b[:, 1], a[:, 1])
            else:
                assert np.allclose(b[:, 1], 300 - a[:, 1]) and np.allclose(b[:, 0], a[:, 0])
            assert LinearRing(p0[0]).is_ccw == LinearRing(p1[0]).is_ccw
    flips = {RandomFlip("original")(s, np.random.default_rng(k)).log[-1] for k in range(20)}
    assert flips == {"flip_h", "flip_v"}  # the original release always flips
    assert RandomFlip("none")(s, np.random.default_rng(0)).log == []


def test_resize_keep_ratio_and_scales_polygons():
    s = _sample(n=4, w=400, h=300)
    out = Resize([(150, 1000)])(s, np.random.default_rng(0))
    assert out.size == (150, 200)
    assert np.allclose(out.instances.polygons[0][0], s.instances.polygons[0][0] * 0.5)
    out = Resize([(600, 700)])(s, np.random.default_rng(0))  # the long-side cap wins
    assert out.size == (525, 700)


def test_photometric_factors():
    img = np.full((10, 10, 3), 100, np.uint8)
    img[:5] = 50
    s = Sample(
        img,
        Instances(
            polygons=[],
            iscrowd=np.zeros(0, bool),
            lossweight=np.zeros(0, np.float32),
            ann_id=np.zeros(0, np.int64),
        ),
    )
    b = Photometric("brightness", 1.54, 1.0)(s, np.random.default_rng(0)).image
    assert b[0, 0, 0] == 77 and b[9, 9, 0] == 154
    c = Photometric("contrast", 1.54, 1.0)(s, np.random.default_rng(0)).image
    assert c[0, 0, 0] == int(75 - 1.54 * 25 + 0.5) and c[9, 9, 0] == int(75 + 1.54 * 25 + 0.5)


def test_pipeline_is_deterministic_under_seed(coco_factory):
    imgs = [_img(i, w=640, h=480) for i in range(1, 4)]
    anns = [
        _ann(10 * i + k, i, rect(20 + 100 * k, 30 + 60 * k, 90, 30), lossweight=0.1 * (k + 1))
        for i in range(1, 4)
        for k in range(4)
    ]
    ann, root = coco_factory(imgs, anns)
    aug = AugmentConfig(scales=[(200, 400), (300, 500)])

    def run(seed, epoch):
        ds = CocoTextDataset([(ann, root)], transform=build_train_transform(aug), seed=seed)
        ds.set_epoch(epoch)
        return [ds[i] for i in range(len(ds))]

    a, b, c = run(0, 0), run(0, 0), run(0, 1)
    for (ia, ta), (ib, tb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(ta["instances"].boxes, tb["instances"].boxes)
        assert torch.equal(ta["instances"].lossweight, tb["instances"].lossweight)
    assert any(ia.shape != ic.shape or not torch.equal(ia, ic) for (ia, _), (ic, _) in zip(a, c))


def test_one_polygon_rule_with_its_reasons():
    """repair_polygon is the rule datasets, converters and the validator share."""
    from i3cl_core.data.polygons import REPAIR_REASONS, polygon_area, repair_polygon

    far = np.array([[1e12, 1e12], [1e12 + 100, 1e12], [1e12 + 100, 1e12 + 100], [1e12, 1e12 + 100]])
    kept = repair_polygon(far, dtype=np.float64)
    assert kept.status == "ok" and polygon_area(kept.parts[0]) == 100 * 100
    huge = [[1.5e308, 1], [-1.5e308, 1], [-1.5e308, 9], [1.5e308, 9]]
    assert repair_polygon(huge).status == "too_large"
    assert repair_polygon([[0, 0], [1, 1]]).status == "too_few_points"
    assert repair_polygon([[0, 0], [0, 0], [1, 1]]).status == "zero_area"
    assert repair_polygon([[0, 0], [np.nan, 1], [1, 1]]).status == "non_finite"
    bow = repair_polygon([[0, 0], [10, 10], [10, 0], [0, 10]], keep="all")
    assert bow.status == "repaired" and [polygon_area(p) for p in bow.parts] == [25.0, 25.0]
    assert len(repair_polygon([[0, 0], [10, 10], [10, 0], [0, 10]]).parts) == 1  # keep="largest"
    assert set(REPAIR_REASONS) == {"non_finite", "too_few_points", "too_large", "zero_area"}
