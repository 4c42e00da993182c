"""The ViTAEv2-S backbone: size, output strides, any input size, window attention, gradient
checkpointing, loading weights, and the detector and recipe built on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from i3cl_core.config import load_config
from i3cl_core.model.errors import CheckpointError
from i3cl_core.model.vitae import GlobalAttention, ViTAEv2Backbone, WindowAttention

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "demo" / "tiny_model.yaml"
VITAE = REPO / "configs" / "i3cl_vitae" / "train.yaml"

# ViTAEv2-S without its ImageNet head; with the head (LayerNorm 512 + Linear 512 -> 1000) it is
# 19.36 M, against the paper's ~19.2 M
VITAEV2_S_PARAMS = 18_846_344


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return ViTAEv2Backbone().eval()


def test_size_channels_and_strides(backbone):
    n = sum(p.numel() for p in backbone.parameters())
    assert n == VITAEV2_S_PARAMS
    assert 18.5e6 < n + 512 * 2 + 513 * 1000 < 20e6
    assert backbone.out_channels == [64, 128, 256, 512] and backbone.strides == [4, 8, 16, 32]
    with torch.no_grad():
        outs = backbone(torch.randn(1, 3, 224, 320))
    assert [tuple(o.shape) for o in outs] == [
        (1, 64, 56, 80),
        (1, 128, 28, 40),
        (1, 256, 14, 20),
        (1, 512, 7, 10),
    ]
    assert all(torch.isfinite(o).all() for o in outs)


def test_any_input_size(backbone):
    with torch.no_grad():
        outs = backbone(torch.randn(2, 3, 61, 99))
    assert [tuple(o.shape[-2:]) for o in outs] == [(16, 25), (8, 13), (4, 7), (2, 4)]  # ceil(size / stride)


def test_window_attention_is_attention_inside_each_window():
    torch.manual_seed(0)
    win = WindowAttention(32, 32, heads=2, window=7).eval()
    full = GlobalAttention(32, 32, heads=2).eval()
    full.load_state_dict({k: v for k, v in win.state_dict().items() if not k.startswith("relative")})
    x = torch.randn(1, 14 * 14, 32)
    out = win(x, (14, 14)).view(1, 14, 14, 32)
    grid = x.view(1, 14, 14, 32)
    for i in (0, 7):
        for j in (0, 7):
            ref = full(grid[:, i : i + 7, j : j + 7].reshape(1, 49, 32))
            assert torch.allclose(out[:, i : i + 7, j : j + 7].reshape(1, 49, 32), ref, atol=1e-5)
    # a map smaller than the window is padded: one window, padding tokens only as extra keys
    assert win(torch.randn(2, 5 * 3, 32), (5, 3)).shape == (2, 15, 32)
    # reduction cells change the width; the values (merged over heads) are the skip connection
    rc = WindowAttention(48, 16, heads=1, window=7)
    assert rc(torch.randn(1, 20, 48), (4, 5)).shape == (1, 20, 16)


def test_drop_path_schedules():
    def rates(m):
        return [[round(nc.drop_path.p, 4) for nc in stage.NC] for stage in m.layers]

    step = 0.3 / 13
    cumulative = rates(ViTAEv2Backbone(drop_path_rate=0.3))
    assert cumulative[0] == [0.0, round(step, 4)] and cumulative[3] == [round(12 * step, 4), 0.3]
    release = rates(
        ViTAEv2Backbone(drop_path_rate=0.3, drop_path_schedule="release")
    )  # the release's schedule, docs/model.md
    assert release[2][0] == round(2 * step, 4) and release[3] == [round(8 * step, 4), round(9 * step, 4)]


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    small = {"depths": (1, 1, 2, 1)}
    a = ViTAEv2Backbone(drop_path_rate=0.0, arch=small).train()
    b = ViTAEv2Backbone(drop_path_rate=0.0, grad_checkpointing=True, arch=small).train()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 96)
    for m in (a, b):
        sum(o.square().mean() for o in m(x)).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-6), name


def test_frozen_stages_and_norm_eval():
    m = ViTAEv2Backbone(frozen_stages=1, norm_eval=True).train()
    assert not any(p.requires_grad for p in m.layers[0].parameters())
    assert all(p.requires_grad for p in m.layers[1].parameters())
    assert not m.layers[2].NC[0].PCM[1].training


def test_load_weights(tmp_path, backbone, caplog):
    # our own weights, saved the way an ImageNet training script would: nested, prefixed, with the
    # classifier, the final norm and recomputed buffers beside them
    state = {f"module.{k}": v + 1.0 for k, v in backbone.state_dict().items()}
    state.update(
        {
            "module.head.weight": torch.zeros(1000, 512),
            "module.head.bias": torch.zeros(1000),
            "module.norm.weight": torch.ones(512),
            "module.norm.bias": torch.zeros(512),
            "module.layers.0.NC.0.attn.relative_position_index": torch.zeros(49, 49, dtype=torch.long),
        }
    )
    torch.save({"epoch": 300, "state_dict": state}, tmp_path / "vitaev2_s.pth.tar")
    m = ViTAEv2Backbone()
    missing, skipped = m.load_weights(str(tmp_path / "vitaev2_s.pth.tar"))
    assert missing == [] and skipped == []
    for k, v in m.state_dict().items():
        assert torch.equal(v, backbone.state_dict()[k] + 1.0), k
    # through the config, as the detector does
    from i3cl_core.model.detector import build_backbone

    cfg = load_config(VITAE, [f"model.backbone.weights={tmp_path / 'vitaev2_s.pth.tar'}"]).model.backbone
    built = build_backbone(cfg)
    assert torch.equal(built.layers[2].NC[5].mlp.fc1.weight, backbone.layers[2].NC[5].mlp.fc1.weight + 1.0)
    # a partial file (e.g. names that differ) loads what it can and reports the rest
    partial = {k: v for k, v in backbone.state_dict().items() if k.startswith("layers.0.")}
    partial["layers.9.unknown"] = torch.zeros(1)
    torch.save(partial, tmp_path / "partial.pth")
    missing, skipped = ViTAEv2Backbone().load_weights(str(tmp_path / "partial.pth"))
    assert missing and all(not k.startswith("layers.0.") for k in missing) and skipped == ["layers.9.unknown"]
    # nothing that matches -> error
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="none of its keys match the ViTAEv2-S"):
        ViTAEv2Backbone().load_weights(str(tmp_path / "resnet.pth"))


def text_image(h: int, w: int):
    """A grey image with two dark words, and their boxes as targets."""
    import cv2
    import numpy as np

    img = np.full((h, w, 3), 200, np.uint8)
    boxes = []
    for x, y, txt in [(10, 40, "TEXT"), (20, 100, "HI")]:
        cv2.putText(img, txt, (x, y), cv2.FONT_HERSHEY_SIMPLEX, 1.2, (20, 20, 120), 3)
        (tw, th), b = cv2.getTextSize(txt, cv2.FONT_HERSHEY_SIMPLEX, 1.2, 3)
        boxes.append([x, y - th - 3, x + tw, y + b])
    polys = [[np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32)] for x0, y0, x1, y1 in boxes]
    from i3cl_core.structures import Instances

    target = {
        "instances": Instances(
            boxes=torch.tensor(boxes, dtype=torch.float32),
            labels=torch.ones(len(boxes), dtype=torch.int64),
            polygons=polys,
            lossweight=torch.ones(len(boxes)),
        ),
        "dontcare": Instances(boxes=torch.zeros((0, 4)), polygons=[]),
    }
    return torch.from_numpy(img).permute(2, 0, 1).float() / 255, target


def test_detector_with_vitae_trains_and_predicts():
    from i3cl_core.model.detector import build_model

    torch.manual_seed(0)
    cfg = load_config(
        TINY,
        [
            "model.backbone.name=vitaev2_s",
            "model.backbone.drop_path_rate=0.0",
            "model.test_short_side=128",
            "model.test_long_side=160",
        ],
    )
    m = build_model(cfg)
    assert m.neck.fpn.inner_blocks[0][0].in_channels == 64
    image, target = text_image(128, 160)
    m.train()
    losses = m([image], [target])
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_rcnn_cls", "loss_rcnn_box", "loss_mask"}
    sum(losses.values()).backward()
    assert m.backbone.layers[0].RC.PRM.convs[3][0].weight.grad is not None
    assert m.backbone.layers[3].NC[1].attn.qkv.weight.grad.abs().sum() > 0
    m.eval()
    out = m([image])
    assert set(out[0]) >= {"boxes", "scores", "polygons"}


def test_vitae_recipe():
    from i3cl_core.engine.train import build_optimizer
    from i3cl_core.model.detector import build_model

    cfg = load_config(VITAE, ["model.backbone.weights=null"])
    assert cfg.model.backbone.name == "vitaev2_s" and cfg.model.intra_cl and cfg.model.inter_cl
    assert cfg.train.optimizer == "adamw" and cfg.train.lr == 1e-4 and cfg.train.weight_decay == 0.05
    assert cfg.train.epochs == 12 and cfg.train.lr_steps == [8] and cfg.data.augment.policies == "vitae"
    assert cfg.data.augment.scales[0] == (480, 1333) and cfg.data.augment.scales[-1] == (896, 1600)
    m = build_model(cfg)
    opt = build_optimizer(m, cfg.train)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    named = dict(m.named_parameters())
    assert id(named["backbone.layers.0.NC.0.attn.relative_position_bias_table"]) in no_decay
    assert id(named["backbone.layers.3.NC.1.norm2.weight"]) in no_decay
    assert id(named["backbone.layers.3.NC.1.mlp.fc1.weight"]) not in no_decay
    assert id(named["backbone.layers.1.RC.PCM.0.weight"]) not in no_decay
