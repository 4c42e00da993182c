"""The I3CL detector: parameter counts, gradients, per-instance loss weights, do-not-care regions,
batched inference, checkpoints, and overfitting one image."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from i3cl_core.config import ConfigError, load_config
from i3cl_core.data.polygons import mask_to_polygon, rasterize_instance
from i3cl_core.model.checkpoint import load_model, save_checkpoint
from i3cl_core.model.detector import build_model, native_bf16
from i3cl_core.model.errors import CheckpointError
from i3cl_core.model.inter_cl import InterCL
from i3cl_core.model.intra_cl import IntraCL
from i3cl_core.model.roi_heads import weighted_fastrcnn_loss
from i3cl_core.model.rpn import weighted_rpn_loss
from i3cl_core.model.sampling import box_iof
from i3cl_core.structures import Instances

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "demo" / "tiny_model.yaml"


def tiny_cfg(*overrides):
    return load_config(TINY, list(overrides))


def text_image(h=256, w=256):
    """A grey image with three printed words and their box polygons."""
    img = np.full((h, w, 3), 200, np.uint8)
    polys = []
    for x, y, txt in [(20, 40, "HELLO"), (40, 120, "TEXT"), (30, 200, "WORLD")]:
        cv2.putText(img, txt, (x, y), cv2.FONT_HERSHEY_SIMPLEX, 1.4, (20, 20, 120), 3)
        (tw, th), b = cv2.getTextSize(txt, cv2.FONT_HERSHEY_SIMPLEX, 1.4, 3)
        polys.append(
            np.array([[x, y - th - 3], [x + tw, y - th - 3], [x + tw, y + b], [x, y + b]], np.float32)
        )
    image = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    target = {
        "instances": Instances(
            boxes=torch.tensor([[p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()] for p in polys]),
            labels=torch.ones(len(polys), dtype=torch.int64),
            polygons=[[p] for p in polys],
            lossweight=torch.ones(len(polys)),
        ),
        "dontcare": Instances(boxes=torch.zeros((0, 4)), polygons=[]),
    }
    return image, target


# ---------------------------------------------------------------------------------- structure
def test_parameter_counts_match_the_paper():
    assert sum(p.numel() for p in IntraCL(256).parameters()) == 497_024
    assert sum(p.numel() for p in InterCL(256).parameters()) == 5_483_136
    from i3cl_core.model.summary import summarize

    cfg = load_config(REPO / "configs" / "_base_" / "i3cl_r50_fpn.yaml")
    info = summarize(build_model(cfg))
    assert info["parameters"]["intra_cl"] == 5 * 497_024
    assert info["parameters"]["inter_cl"] == 5_483_136
    assert info["backbone_channels"] == [256, 512, 1024, 2048]
    assert info["fpn_strides"] == [4, 8, 16, 32, 64]


def test_switches_remove_the_modules():
    m = build_model(tiny_cfg("model.intra_cl=false", "model.inter_cl=false"))
    assert m.intra_cl is None and m.roi_heads.inter_cl is None
    assert not any("intra_cl" in k or "inter_cl" in k for k in m.state_dict())


def test_frozen_stages_and_norm_eval():
    m = build_model(load_config(REPO / "configs" / "_base_" / "i3cl_r50_fpn.yaml"))
    m.train()
    bb = m.backbone
    assert not any(p.requires_grad for p in bb.layer1.parameters()) and not bb.conv1.weight.requires_grad
    assert all(p.requires_grad for p in bb.layer2.parameters())
    assert (
        not bb.layer3[0].bn1.training and bb.layer3[0].bn1.weight.requires_grad
    )  # stats frozen, affine trains
    assert m.intra_cl[0].bn.training  # BN outside the backbone trains normally


def test_model_summary_cli(capsys):
    from i3cl_core.cli import main

    assert main(["model-summary", str(TINY), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    parts = info["parameters"]
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    assert info["backbone"] == "resnet18" and info["fpn_channels"] == 64


# ---------------------------------------------------------------------------------- training
def test_gradients_reach_every_intra_and_inter_cl_parameter():
    torch.manual_seed(0)
    m = build_model(tiny_cfg()).train()
    image, target = text_image()
    losses = m([image, image.flip(-1)], [target, target])
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_rcnn_cls", "loss_rcnn_box", "loss_mask"}
    sum(losses.values()).backward()
    for name, module in (("intra_cl", m.intra_cl), ("inter_cl", m.roi_heads.inter_cl)):
        for pname, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname} got no gradient"


def _losses_with_weights(m, image, target, weights):
    inst = Instances(**target["instances"].fields())
    inst.lossweight = torch.tensor(weights, dtype=torch.float32)
    t = dict(target, instances=inst)
    torch.manual_seed(123)  # the same anchors and RoIs are sampled every time
    return {k: v.item() for k, v in m([image], [t]).items()}


def test_loss_weights_scale_exactly_their_instances_positives():
    torch.manual_seed(0)
    m = build_model(tiny_cfg()).train()
    image, target = text_image()
    L = {w: _losses_with_weights(m, image, target, [w, 1.0, 1.0]) for w in (1.0, 0.5, 0.25, 0.0)}
    # the mask loss is not weighted
    assert len({round(L[w]["loss_mask"], 6) for w in L}) == 1
    for term in ("loss_rpn_cls", "loss_rpn_box", "loss_rcnn_box"):
        # normalisers are unchanged by w: each term is affine in w, and instance 0 really contributes
        assert L[1.0][term] != pytest.approx(L[0.5][term], rel=1e-4), term
        assert L[1.0][term] - L[0.5][term] == pytest.approx(
            2 * (L[0.5][term] - L[0.25][term]), rel=1e-3, abs=1e-6
        )
        assert L[0.5][term] - L[0.0][term] == pytest.approx(
            2 * (L[0.25][term] - L[0.0][term]), rel=1e-3, abs=1e-6
        )
    # R-CNN CE is divided by count(w > 0): affine while w > 0
    c = "loss_rcnn_cls"
    assert L[1.0][c] - L[0.5][c] == pytest.approx(2 * (L[0.5][c] - L[0.25][c]), rel=1e-3, abs=1e-6)
    # other instances' weights leave instance 0's terms alone: all-ones equals the w=1 run
    assert _losses_with_weights(m, image, target, [1.0, 1.0, 1.0]) == L[1.0]


def _losses(m, image, target, **changes):
    torch.manual_seed(123)
    return {k: v.item() for k, v in m([image], [dict(target, **changes)]).items()}


def test_background_weight_scales_the_negatives_of_its_image():
    """An image's ``background_weight`` scales the classification terms of its negative anchors and RoIs: each
    term is affine in it, 0 leaves only the positives (no box term changes), and the default is 1."""
    torch.manual_seed(0)
    m = build_model(tiny_cfg()).train()
    image, target = text_image()
    L = {w: _losses(m, image, target, background_weight=w) for w in (1.0, 0.5, 0.25, 0.0)}
    assert _losses(m, image, target) == L[1.0]
    for term in ("loss_rpn_cls", "loss_rcnn_cls"):
        assert L[1.0][term] > L[0.5][term] > L[0.25][term] > 0, term
        assert L[1.0][term] - L[0.5][term] == pytest.approx(
            2 * (L[0.5][term] - L[0.25][term]), rel=1e-3, abs=1e-6
        )
    # the RPN normalises by the sampled anchors (affine down to 0); the R-CNN CE by the samples of weight > 0,
    # so at 0 the negatives leave its normaliser too
    rpn = "loss_rpn_cls"
    assert L[0.5][rpn] - L[0.0][rpn] == pytest.approx(2 * (L[0.25][rpn] - L[0.0][rpn]), rel=1e-3, abs=1e-6)
    for term in ("loss_rpn_box", "loss_rcnn_box", "loss_mask"):
        assert len({round(L[w][term], 7) for w in L}) == 1, term
    # zero background weight on an image without text: its classification terms vanish
    empty = dict(
        target,
        instances=Instances(
            boxes=torch.zeros((0, 4)),
            labels=torch.zeros(0, dtype=torch.int64),
            polygons=[],
            lossweight=torch.zeros(0),
        ),
    )
    z = _losses(m, image, empty, background_weight=0.0)
    assert z["loss_rpn_cls"] == 0.0 and z["loss_rcnn_cls"] == 0.0
    assert _losses(m, image, empty)["loss_rpn_cls"] > 0


def test_mask_lossweight_scales_each_positives_mask_loss():
    torch.manual_seed(0)
    m = build_model(tiny_cfg("model.mask_lossweight=true")).train()
    image, target = text_image()
    L = {w: _losses_with_weights(m, image, target, [w, 1.0, 1.0]) for w in (1.0, 0.5, 0.0)}
    assert L[1.0]["loss_mask"] > L[0.5]["loss_mask"] > L[0.0]["loss_mask"] > 0
    assert L[1.0]["loss_mask"] - L[0.5]["loss_mask"] == pytest.approx(
        L[0.5]["loss_mask"] - L[0.0]["loss_mask"], rel=1e-3
    )
    zero = _losses_with_weights(m, image, target, [0.0, 0.0, 0.0])
    assert zero["loss_mask"] == 0.0  # zero weight, zero contribution
    # all weights 1: the unweighted loss of the release
    plain = build_model(tiny_cfg()).train()
    plain.load_state_dict(m.state_dict())
    assert _losses_with_weights(plain, image, target, [1.0, 1.0, 1.0])["loss_mask"] == pytest.approx(
        L[1.0]["loss_mask"], rel=1e-5
    )


def test_weighted_rpn_loss_by_hand():
    obj = torch.tensor([2.0, -1.0, 0.5, 0.0])
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0])
    deltas = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [5.0, 5, 5, 5], [5.0, 5, 5, 5]])
    targets = torch.zeros(4, 4)
    w = torch.tensor([0.5, 0.0, 1.0, 1.0])  # as the assignment gives them: negatives weigh 1
    pos, neg = torch.tensor([True, True, False, False]), torch.tensor([False, False, True, True])
    lo, lb = weighted_rpn_loss(
        obj, deltas, Instances(labels=labels, regression_targets=targets, lossweight=w), pos, neg
    )
    bce = torch.nn.functional.binary_cross_entropy_with_logits(obj, labels, reduction="none")
    assert lo.item() == pytest.approx(((0.5 * bce[0]) + 0 * bce[1] + bce[2] + bce[3]).item() / 4)
    assert lb.item() == pytest.approx((0.5 * 1.0 + 0.0 * 2.0) / 4)  # normaliser: all 4 sampled anchors


def test_weighted_fastrcnn_loss_by_hand():
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.5, 0.5]])
    labels = torch.tensor([1, 1, 0])
    box = torch.tensor([[1.0, 0, 0, 0], [0, 3.0, 0, 0], [9.0, 9, 9, 9]])
    reg = torch.zeros(3, 4)
    w = torch.tensor([2.0, 0.0, 1.0])
    lc, lb = weighted_fastrcnn_loss(
        logits, box, Instances(labels=labels, regression_targets=reg, lossweight=w)
    )
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert lc.item() == pytest.approx((2 * ce[0] + ce[2]).item() / 2)  # a w=0 positive leaves the count
    assert lb.item() == pytest.approx(2 * 1.0 / 3)  # divided by all sampled RoIs


@pytest.mark.parametrize("ignore", [True, False])
def test_dontcare_regions_never_produce_negatives(ignore):
    torch.manual_seed(0)
    m = build_model(tiny_cfg(f"model.ignore_dontcare={str(ignore).lower()}")).train()
    image, target = text_image()
    dc = torch.tensor([[140.0, 60.0, 250.0, 100.0]])
    target = dict(target, dontcare=Instances(boxes=dc, polygons=[None]))

    il, _ = m.preprocess([image], resize=False)
    feats = m.features(il.tensors)
    anchors = m.rpn.anchor_generator(il, feats)
    labels = m.rpn.assign(anchors[0], target).labels
    covered = box_iof(anchors[0], dc)[:, 0] > 0.5
    assert covered.sum() > 50
    neg_in_dc = ((labels == 0) & covered).sum().item()
    proposals = [torch.cat([dc + torch.tensor([2.0, 1, -3, 2]), dc * 1.01, torch.tensor([[0.0, 0, 50, 50]])])]
    samples = m.roi_heads.sample(proposals, [target])
    rois, lab = samples[0].boxes, samples[0].labels
    roi_neg_in_dc = ((lab == 0) & (box_iof(rois, dc)[:, 0] > 0.5)).sum().item()
    if ignore:
        assert neg_in_dc == 0 and roi_neg_in_dc == 0
        assert (labels[covered] == -1).all()
    else:  # the release's behaviour: do-not-care regions are plain background
        assert neg_in_dc > 0 and roi_neg_in_dc > 0


# ---------------------------------------------------------------------------------- inference
def _match(a, b):
    assert a["boxes"].shape == b["boxes"].shape
    torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-2, rtol=1e-4)
    torch.testing.assert_close(a["scores"], b["scores"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a["mask_probs"], b["mask_probs"], atol=1e-3, rtol=1e-3)


def test_batch_of_two_equals_each_image_alone():
    torch.manual_seed(0)
    m = build_model(tiny_cfg("model.score_thr=0.3")).eval()
    # a little training so that detections are not a flat random field
    m.roi_heads.box_head.cls_score.bias.data = torch.tensor([0.0, 0.5])
    a, _ = text_image()
    b = a.flip(-1).roll(17, dims=1)
    both = m([a, b])
    alone = [m([a])[0], m([b])[0]]
    assert len(both[0]["boxes"]) > 0 and len(both[1]["boxes"]) > 0
    for x, y in zip(both, alone):
        _match(x, y)


def _neck_dtypes(m):
    seen = []
    m.neck.register_forward_hook(lambda mod, inp, out: seen.append({o.dtype for o in out}))
    return seen


def test_bf16_features_and_channels_last():
    """bf16_features computes backbone/FPN/IntraCL in bfloat16 but hands float32 features to the heads;
    when it is off it must not switch off an enclosing autocast (the trainer's CUDA AMP)."""
    torch.manual_seed(0)
    ref = build_model(tiny_cfg()).train()
    fast = build_model(tiny_cfg("model.bf16_features=true", "model.channels_last=true")).train()
    fast.load_state_dict(ref.state_dict())
    assert fast.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 128, 160)
    seen = _neck_dtypes(fast)
    with torch.no_grad():
        a, b = ref.features(x), fast.features(x)
    assert seen == [{torch.bfloat16}]
    assert all(f.dtype == torch.float32 for f in b)
    for fa, fb in zip(a, b):
        assert fa.shape == fb.shape
        rel = (fa - fb).norm() / fa.norm()
        assert rel < 0.05, rel  # bfloat16 keeps 8 bits of mantissa
    # training still produces finite losses, and float32 gradients reach the (bf16-computed) backbone
    image, target = text_image()
    losses = fast([image], [target])
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert (
        fast.backbone.conv1.weight.grad is not None and fast.backbone.conv1.weight.grad.dtype == torch.float32
    )

    seen = _neck_dtypes(ref)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref.features(x)
    assert seen == [{torch.bfloat16}]  # the outer autocast stayed on inside features()

    auto = build_model(tiny_cfg("model.bf16_features=auto")).eval()
    seen = _neck_dtypes(auto)
    with torch.no_grad():
        auto.features(x)
    assert seen == [{torch.bfloat16 if native_bf16(torch.device("cpu")) else torch.float32}]
    with pytest.raises(ConfigError, match="bf16_features"):
        tiny_cfg("model.bf16_features=sometimes")


def test_mask_to_polygon_largest_contour_clockwise():
    mask = np.zeros((60, 100), np.uint8)
    mask[5:10, 5:10] = 1
    mask[20:50, 30:90] = 1
    poly = mask_to_polygon(mask, 0.005)
    assert poly is not None and poly[:, 0].min() >= 29 and poly[:, 1].min() >= 19
    x, y = poly[:, 0], poly[:, 1]
    assert np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)) > 0  # clockwise on screen (y down)
    assert mask_to_polygon(np.zeros((5, 5), np.uint8)) is None


# ---------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_and_errors(tmp_path):
    cfg = tiny_cfg()
    m = build_model(cfg).eval()
    path = save_checkpoint(tmp_path / "m.pth", m, cfg)
    m2, cfg2 = load_model(path)
    assert cfg2.model == cfg.model
    for (k, v), (k2, v2) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    raw = path.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"trunc.pth: cannot read checkpoint: truncated, corrupt"):
        load_model(tmp_path / "trunc.pth")
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["model"]["fpn_channels"] = 32
    torch.save(ckpt, tmp_path / "mismatch.pth")
    with pytest.raises(
        CheckpointError, match=r"mismatch.pth: checkpoint does not match the model: .*other shapes"
    ):
        load_model(tmp_path / "mismatch.pth")
    torch.save({"state_dict": m.state_dict()}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="not an i3cl checkpoint"):
        load_model(tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_model(tmp_path / "missing.pth")
    # checkpoints of earlier versions named the IntraCL/InterCL BatchNorms `norm`
    old = torch.load(path, weights_only=True)
    old["model"] = {k.replace(".bn.", ".norm."): v for k, v in old["model"].items()}
    assert "roi_heads.inter_cl.norm.running_var" in old["model"] and "intra_cl.4.norm.weight" in old["model"]
    torch.save(old, tmp_path / "old.pth")
    m3, _ = load_model(tmp_path / "old.pth")
    for (k, v), (k3, v3) in zip(m.state_dict().items(), m3.state_dict().items()):
        assert k == k3 and torch.equal(v, v3)


def test_backbone_weights_from_a_local_path_only(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, tmp_path / "r18.pth")
    m = build_model(tiny_cfg(f"model.backbone.weights={tmp_path / 'r18.pth'}"))
    assert torch.equal(m.backbone.layer3[1].conv2.weight, ref.layer3[1].conv2.weight)
    with pytest.raises(CheckpointError, match="weights file not found"):
        build_model(tiny_cfg(f"model.backbone.weights={tmp_path / 'nope.pth'}"))
    torch.save({"x.y": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="none of its keys match"):
        build_model(tiny_cfg(f"model.backbone.weights={tmp_path / 'other.pth'}"))


def test_timm_features_only_backbone():
    pytest.importorskip("timm")
    m = build_model(tiny_cfg("model.backbone.name=timm:resnet10t", "model.inter_cl=false")).eval()
    assert m.backbone.strides == [4, 8, 16, 32]
    image, target = text_image(128, 160)
    feats = m.features(m.preprocess([image], resize=False)[0].tensors)
    assert [tuple(f.shape[-2:]) for f in feats[:4]] == [
        (32, 40),
        (16, 20),
        (8, 10),
        (4, 5),
    ]  # strides 4-32 of 128x160
    out = m([image])
    assert set(out[0]) >= {"boxes", "scores", "polygons"} and len(out[0]["polygons"]) == len(out[0]["scores"])
    # and it trains: finite losses whose gradients reach the timm stages
    m.train()
    losses = m([image], [target])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for n, p in m.backbone.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------------------------- overfit
@pytest.mark.slow
def test_tiny_model_overfits_one_image():
    torch.manual_seed(0)
    cfg = tiny_cfg("model.test_short_side=256", "model.test_long_side=256")
    m = build_model(cfg)
    image, target = text_image()
    params = [p for p in m.parameters() if p.requires_grad]
    # lr 0.01: at 0.02 (no warm-up, no clipping) the losses went NaN by iteration 30 on an AVX2-only CPU
    # while an AVX512 one converged; at 0.01 every mask IoU was >= 0.94 there
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    m.train()
    for _ in range(80):  # min mask IoU 0.93 after 80 steps on an AVX512 EPYC, 0.93 after 120
        losses = m([image], [target])
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    out = m.eval()([image])[0]
    ious = []
    for gt in target["instances"].polygons:
        g = rasterize_instance(gt, 256, 256).astype(bool)
        best = 0.0
        for poly, score in zip(out["polygons"], out["scores"]):
            if poly is not None and score > 0.5:
                d = rasterize_instance([poly], 256, 256).astype(bool)
                best = max(best, (g & d).sum() / (g | d).sum())
        ious.append(best)
    assert min(ious) >= 0.7, ious


# ---------------------------------------------------------------- masks, mask targets, TTA
def test_paste_mask_maps_the_grid_onto_the_box():
    from i3cl_core.model.detector import paste_mask

    full = np.ones((28, 28), np.float32)
    mask, x0, y0 = paste_mask(full, np.array([10.0, 20.0, 50.0, 40.0]), (100, 100), 0.5)
    assert (x0, y0) == (10, 20) and mask.shape == (20, 40) and mask.all()
    left = np.zeros((28, 28), np.float32)
    left[:, :14] = 1.0  # the left half of the box
    mask, _, _ = paste_mask(left, np.array([10.0, 20.0, 50.0, 40.0]), (100, 100), 0.5)
    assert mask[:, :19].all() and not mask[:, 21:].any()
    # a box sticking out of the image is clipped to it
    mask, x0, y0 = paste_mask(full, np.array([-5.0, 90.0, 30.0, 120.0]), (100, 100), 0.5)
    assert (x0, y0) == (0, 90) and mask.shape == (10, 30) and mask.all()


def test_polygon_mask_targets_rasterise_inside_each_box():
    from i3cl_core.model.roi_heads import polygon_mask_targets

    box = torch.tensor([[10.0, 20.0, 50.0, 40.0], [10.0, 20.0, 50.0, 40.0]])
    whole = [np.array([[10, 20], [50, 20], [50, 40], [10, 40]], float)]
    left = [np.array([[10, 20], [30, 20], [30, 40], [10, 40]], float)]
    t = polygon_mask_targets([whole, left], box, 28)
    assert t.shape == (2, 28, 28) and t[0].sum() == 28 * 28
    assert t[1][:, :14].sum() == 14 * 28 and t[1][:, 14:].sum() == 0


def test_tta_scales_do_not_touch_the_models_config():
    from i3cl_core.config import load_config
    from i3cl_core.infer.predictor import predict_polygons
    from i3cl_core.model.detector import build_model

    cfg = load_config(
        REPO / "configs" / "demo" / "tiny_model.yaml",
        ["model.test_short_side=128", "model.test_long_side=160"],
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    model.roi_heads.box_head.cls_score.bias.data = torch.tensor([0.0, 0.6])
    img = torch.rand(3, 120, 150)
    before = model.cfg.model_dump()
    with torch.no_grad():
        fused = predict_polygons(model, [img], 0.005, flips=["h"], scales=[96])[0]
        assert model.cfg.model_dump() == before
        direct = model.predict([img], test_sides=(96, 160))[0]
        plain = model.predict([img])[0]
    assert model.cfg.model_dump() == before
    assert isinstance(fused, list) and all(0 <= s <= 1 for _, s in fused)
    # the per-call scale is the one used: the 96-px run differs from the config's 128 px
    assert direct["boxes"].shape != plain["boxes"].shape or not torch.allclose(
        direct["boxes"], plain["boxes"]
    )


def test_fp16_features_keep_heads_boxes_and_masks_in_float32():
    from i3cl_core.config import load_config
    from i3cl_core.model.detector import build_model

    cfg = load_config(
        REPO / "configs" / "demo" / "tiny_model.yaml",
        ["model.test_short_side=128", "model.test_long_side=128"],
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    model.roi_heads.box_head.cls_score.bias.data = torch.tensor([0.0, 0.6])
    img = [torch.rand(3, 128, 128)]
    with torch.inference_mode():
        ref = model.predict(img)[0]
        model.fp16_features = (
            True  # what infer.precision=fp16 sets (float16 autocast of backbone, FPN, IntraCL)
        )
        low = model.predict(img)[0]
    assert ref["boxes"].dtype == low["boxes"].dtype == low["scores"].dtype == torch.float32
    assert len(ref["scores"]) > 0 and abs(len(ref["scores"]) - len(low["scores"])) <= 2
    n = min(len(ref["scores"]), len(low["scores"]), 5)
    assert torch.allclose(ref["scores"][:n], low["scores"][:n], atol=5e-3)
