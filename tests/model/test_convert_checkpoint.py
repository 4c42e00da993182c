"""Importing checkpoints of the original mmdetection release (`i3cl convert-checkpoint`), and loading
RegionCL / MoCo-style ResNet-50 weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from i3cl_core.cli import main
from i3cl_core.config import load_config
from i3cl_core.model.backbone import ResNetBackbone
from i3cl_core.model.checkpoint import load_checkpoint, load_model
from i3cl_core.model.convert import convert_checkpoint, convert_state, rename
from i3cl_core.model.errors import CheckpointError
from i3cl_core.model.weights import select_prefix

REPO = Path(__file__).resolve().parents[2]
R50 = REPO / "configs" / "_base_" / "i3cl_r50_fpn.yaml"
# every parameter/buffer name and shape of the original I3CL R50 checkpoint (copy of shared/ spec data)
KEYS = Path(__file__).resolve().parent / "original_i3cl_r50_keys.json"

TEXT_ROW, BG_ROW = 11.0, -7.0


def original_state(drop_modules: bool = False) -> dict[str, torch.Tensor]:
    """Random tensors with exactly the names and shapes of the original R50 checkpoint, with known
    values planted in the text-class and background rows."""
    shapes = json.loads(KEYS.read_text())["state_dict"]
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, shape in shapes.items():
        if drop_modules and ("intra_cl_module" in k or "inter_cl_module" in k):
            continue
        state[k] = (
            torch.zeros(shape, dtype=torch.int64)
            if k.endswith("num_batches_tracked")
            else torch.randn(shape, generator=g)
        )
    state["roi_head.bbox_head.fc_cls.weight"][0] = TEXT_ROW
    state["roi_head.bbox_head.fc_cls.bias"][0] = TEXT_ROW
    state["roi_head.bbox_head.fc_cls.weight"][63] = BG_ROW
    state["roi_head.bbox_head.fc_cls.bias"][63] = BG_ROW
    for i in range(4):
        state["roi_head.bbox_head.fc_reg.weight"][i] = 100.0 + i
        state["roi_head.bbox_head.fc_reg.bias"][i] = 100.0 + i
    state["roi_head.mask_head.conv_logits.weight"][0] = TEXT_ROW
    state["roi_head.mask_head.conv_logits.bias"][0] = TEXT_ROW
    return state


@pytest.fixture(scope="module")
def r50_state():
    from i3cl_core.model.detector import build_model

    return build_model(load_config(R50)).state_dict()


def test_every_original_key_has_a_counterpart_and_the_classes_land_right(r50_state):
    orig = original_state()
    state, report = convert_state(orig, r50_state)
    assert (
        report["unmatched"] == []
        and report["shapes"] == []
        and report["missing"] == []
        and report["fresh"] == {}
    )
    assert report["mapped"] == len(orig) == len(r50_state)
    assert set(state) == set(r50_state)
    assert report["classes"] == (63, 1)
    # background first in ours, last in mmdetection; the text class is row 1 (ours) / row 0 (theirs)
    assert torch.all(state["roi_heads.box_head.cls_score.weight"][0] == BG_ROW)
    assert torch.all(state["roi_heads.box_head.cls_score.weight"][1] == TEXT_ROW)
    assert state["roi_heads.box_head.cls_score.bias"].tolist() == [BG_ROW, TEXT_ROW]
    assert state["roi_heads.box_head.bbox_pred.bias"].tolist() == [100.0, 101.0, 102.0, 103.0]
    assert torch.all(state["roi_heads.box_head.bbox_pred.weight"][3] == 103.0)
    assert torch.all(state["roi_heads.mask_head.logits.weight"] == TEXT_ROW)
    assert state["roi_heads.mask_head.logits.bias"].tolist() == [TEXT_ROW]
    # a few renames, value for value
    pairs = {
        "neck.lateral_convs.2.conv.weight": "neck.fpn.inner_blocks.2.0.weight",
        "neck.fpn_convs.3.conv.bias": "neck.fpn.layer_blocks.3.0.bias",
        "rpn_head.rpn_conv.weight": "rpn.head.conv.0.0.weight",
        "roi_head.mask_head.convs.3.conv.weight": "roi_heads.mask_head.convs.6.weight",
        "intra_cl_module.4.c_layer_5x5.weight": "intra_cl.4.stages.1.square.weight",
        "intra_cl_module.1.v_layer_3x1.bias": "intra_cl.1.stages.2.vertical.bias",
        "intra_cl_module.0.q_layer_1x7.weight": "intra_cl.0.stages.0.horizontal.weight",
        "intra_cl_module.2.bn.running_var": "intra_cl.2.bn.running_var",
        "roi_head.inter_cl_module.global_context_extract_module.conv1x1_list.3.weight": (
            "roi_heads.inter_cl.context.convs.3.weight"
        ),
        "roi_head.inter_cl_module.transformer_encoder_instance.layers.2.linear1.weight": (
            "roi_heads.inter_cl.transformer.layers.2.linear1.weight"
        ),
        "backbone.layer3.5.bn2.running_mean": "backbone.layer3.5.bn2.running_mean",
    }
    for theirs, ours in pairs.items():
        assert rename(theirs) == ours
        assert torch.equal(state[ours], orig[theirs])
    assert rename("intra_cl_module.0.v_layer_1x7.weight") is None  # a vertical branch must be k x 1


def test_convert_command_writes_a_loadable_checkpoint(tmp_path, capsys):
    orig_path = tmp_path / "i3cl_r50_original.pth"
    torch.save({"meta": {"epoch": 8, "CLASSES": ("text", "0")}, "state_dict": original_state()}, orig_path)
    out = tmp_path / "converted.pth"
    assert main(["convert-checkpoint", str(orig_path), str(out), "--config", str(R50)]) == 0
    text = capsys.readouterr().out
    assert "unmatched 0" in text and "padding=1" in text and "63-class heads were cut to 1" in text
    ckpt = load_checkpoint(out)
    assert ckpt["model"]["roi_heads.box_head.cls_score.bias"].tolist() == [BG_ROW, TEXT_ROW]
    model, cfg = load_model(out)
    assert cfg.model.backbone.name == "resnet50" and model.roi_heads.inter_cl is not None


def test_original_without_the_modules(tmp_path, r50_state):
    """A mixtrain-stage original (IntraCL/InterCL off): our config decides what the model has."""
    orig = original_state(drop_modules=True)
    _, report = convert_state(orig, r50_state)  # modules on: they keep their fresh initialisation
    assert (
        report["unmatched"] == []
        and report["missing"] == []
        and set(report["fresh"]) == {"intra_cl", "inter_cl"}
    )
    path = tmp_path / "mixtrain.pth"
    torch.save({"state_dict": orig}, path)
    cfg = load_config(R50, ["model.intra_cl=false", "model.inter_cl=false"])
    report = convert_checkpoint(str(path), str(tmp_path / "out.pth"), cfg, echo=lambda *a: None)
    assert report["fresh"] == {} and report["dropped"] == []
    # and the other way round: modules present in the original, off in the config -> dropped
    _, report = convert_state(original_state(), {k: v for k, v in r50_state.items() if "intra_cl" not in k})
    assert len(report["dropped"]) == 5 * 27 and report["unmatched"] == []


def test_mismatching_files_give_clear_errors(tmp_path, capsys):
    bad_shape = original_state()
    bad_shape["roi_head.bbox_head.shared_fcs.1.weight"] = torch.zeros(512, 1024)
    p = tmp_path / "bad_shape.pth"
    torch.save({"state_dict": bad_shape}, p)
    with pytest.raises(CheckpointError, match="other shapes.*shared_fcs.1"):
        convert_checkpoint(str(p), str(tmp_path / "o.pth"), load_config(R50), echo=lambda *a: None)
    assert not (tmp_path / "o.pth").exists()

    unknown = original_state()
    unknown["roi_head.something_new.weight"] = torch.zeros(3)
    torch.save({"state_dict": unknown}, p)
    with pytest.raises(CheckpointError, match=r"no counterpart \(e.g. roi_head.something_new.weight"):
        convert_checkpoint(str(p), str(tmp_path / "o.pth"), load_config(R50), echo=lambda *a: None)

    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    assert main(["convert-checkpoint", str(tmp_path / "junk.pth"), str(tmp_path / "o.pth")]) == 2
    assert "cannot read the original checkpoint" in capsys.readouterr().err

    torch.save({"state_dict": {"conv1.weight": torch.zeros(64, 3, 7, 7)}}, p)  # e.g. ImageNet weights
    assert main(["convert-checkpoint", str(p), str(tmp_path / "o.pth")]) == 2
    assert "not a checkpoint of the original I3CL" in capsys.readouterr().err
    assert main(["convert-checkpoint", str(tmp_path / "missing.pth"), str(tmp_path / "o.pth")]) == 2


# ---------------------------------------------------------------------------------- RegionCL weights
def _resnet18_state(prefix: str = "") -> dict[str, torch.Tensor]:
    net = ResNetBackbone("resnet18", frozen_stages=-1)
    return {
        prefix + k: torch.full_like(v, 0.5) if v.is_floating_point() else v
        for k, v in net.state_dict().items()
    }


@pytest.mark.parametrize(
    "layout", ["plain", "module", "backbone", "moco", "moco_nested", "state_dict_encoder_q"]
)
def test_regioncl_style_weights_load(tmp_path, layout):
    target = _resnet18_state()
    fc = {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    if layout == "plain":
        obj = {**target, **fc}
    elif layout == "module":
        obj = {"state_dict": {"module." + k: v for k, v in {**target, **fc}.items()}}
    elif layout == "backbone":  # a detection/self-supervised framework's checkpoint
        obj = {"state_dict": {**_resnet18_state("backbone."), "neck.conv.weight": torch.zeros(3)}}
    elif layout in ("moco", "moco_nested"):  # MoCo: query encoder, key encoder with other values, queue
        p = "module." if layout == "moco_nested" else ""
        key_enc = {
            f"{p}encoder_k.{k}": torch.full_like(v, -1.0) for k, v in target.items() if v.is_floating_point()
        }
        obj = {
            "epoch": 200,
            "arch": "resnet18",
            "state_dict": {
                **key_enc,
                **_resnet18_state(f"{p}encoder_q."),
                f"{p}encoder_q.fc.0.weight": torch.zeros(2048, 512),
                f"{p}queue": torch.zeros(128, 65536),
                f"{p}queue_ptr": torch.zeros(1, dtype=torch.long),
            },
        }
    else:
        obj = {"model": {"encoder_q." + k: v for k, v in target.items()}, "optimizer": {}}
    path = tmp_path / f"{layout}.pth"
    torch.save(obj, path)
    net = ResNetBackbone("resnet18", frozen_stages=-1)
    result = net.load_weights(str(path))
    assert result.missing_keys == []
    assert torch.all(net.layer4[1].conv2.weight == 0.5) and torch.all(net.bn1.running_var == 0.5)


def test_weights_that_do_not_fit_are_refused(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(CheckpointError, match="none of its keys match"):
        ResNetBackbone("resnet18").load_weights(str(path))
    torch.save(_resnet18_state(), path)  # resnet18 weights for a resnet50
    with pytest.raises(CheckpointError, match="other shapes"):
        ResNetBackbone("resnet50").load_weights(str(path))


def test_select_prefix_prefers_the_query_encoder():
    own = ["conv1.weight", "layer1.0.conv1.weight"]
    state = {f"{p}{k}": torch.zeros(1) for p in ("encoder_k.", "encoder_q.") for k in own}
    sub, prefix = select_prefix(state, own)
    assert prefix == "encoder_q." and set(sub) == set(own)
    assert select_prefix({k: torch.zeros(1) for k in own}, own)[1] == ""


class _Payload:
    """Stands for any object a pickle could carry."""

    def __init__(self):
        self.x = 1


def test_pickled_objects_are_refused_with_safe_advice(tmp_path):
    import torch

    from i3cl_core.model.checkpoint import load_checkpoint
    from i3cl_core.model.convert import read_original
    from i3cl_core.model.weights import read_state_dict

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": _Payload()}, path)
    for call in (
        lambda: load_checkpoint(path),
        lambda: read_state_dict(str(path)),
        lambda: read_original(str(path)),
    ):
        with pytest.raises(CheckpointError) as e:
            call()
        msg = str(e.value)
        assert "evil.pth" in msg and "could run code" in msg and "Nothing in it was run" in msg
        assert "_Payload" in msg  # the pickled global is named
        assert "weights_only" not in msg  # never the advice to unpickle, not even PyTorch's cut short
    with pytest.raises(CheckpointError, match="i3cl convert-checkpoint"):
        load_checkpoint(path)
