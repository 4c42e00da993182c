"""i3cl export (ONNX) and the torch-free runtime: parity with PyTorch, no torch imported, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_teachers

pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[2]


def synth_images(sizes, seed=3):
    from i3cl_core.data.synth.render import render_sample

    return [render_sample(seed=seed, index=i + 1, size=size)[0] for i, size in enumerate(sizes)]


def matched(ref: dict, got: dict, box_tol: float, score_tol: float, mask_tol: float) -> int:
    """How many of ``ref``'s detections have one in ``got`` with the same box, score and mask (within the
    tolerances); order may differ where scores tie."""
    free = list(range(len(got["scores"])))
    n = 0
    for b, s, m in zip(ref["boxes"], ref["scores"], ref["mask_probs"]):
        for j in free:
            if (
                np.abs(got["boxes"][j] - b).max() <= box_tol
                and abs(got["scores"][j] - s) <= score_tol
                and np.abs(got["mask_probs"][j] - m).max() <= mask_tol
            ):
                free.remove(j)
                n += 1
                break
    return n


def torch_detections(model, rgb) -> dict:
    with torch.no_grad():
        out = model.predict([torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float() / 255], polygons=False)[
            0
        ]
    return {k: out[k].float().numpy() for k in ("boxes", "scores", "mask_probs")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from i3cl_core.deploy.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("deploy")
    ckpt = random_teachers(root, side=256, seeds=(0,))["teacher_0"]
    summary = export_onnx(ckpt, root / "model.onnx")
    return {"ckpt": ckpt, "onnx": root / "model.onnx", "summary": summary, "root": root}


def test_export_matches_pytorch_on_images_of_other_sizes(exported):
    from i3cl_core.deploy.onnx_runtime import OnnxDetector
    from i3cl_core.model.checkpoint import load_model

    s = exported["summary"]
    assert s["opset"] == 17 and s["sample_detections"] > 0 and s["parity"]["max_score_diff"] < 1e-4
    detector = OnnxDetector(exported["onnx"], threads=1)
    meta = detector.metadata
    assert json.loads(meta["i3cl.config"])["model"]["test_short_side"] == 256
    assert json.loads(meta["i3cl.preprocess"])["size_divisible"] == 32
    model, cfg = load_model(exported["ckpt"], "cpu")
    model.cfg = model.cfg.model_copy(update={"bf16_features": False})  # the graph is float32
    # sizes other than the tracing image's: every shape of the graph follows its input
    for rgb in synth_images([(300, 200), (256, 256), (200, 420)]):
        ref, got = torch_detections(model, rgb), detector.detect(rgb)
        assert len(ref["scores"]) > 0
        assert abs(len(ref["scores"]) - len(got["scores"])) <= 1
        assert matched(ref, got, box_tol=0.05, score_tol=1e-4, mask_tol=1e-3) >= len(ref["scores"]) - 1
        # polygons: the same tracing rule on both sides
        polys = detector.predict(rgb)
        assert polys and all(p.shape[1] == 2 and 0 <= s <= 1 for p, s in polys)


def test_no_text_gives_no_detections_and_no_error(exported):
    from i3cl_core.deploy.onnx_runtime import OnnxDetector

    detector = OnnxDetector(exported["onnx"], threads=1)
    detector.session  # noqa: B018
    # a model whose classifier says "background" everywhere: zero boxes through NMS, InterCL and the mask head
    import onnx

    proto = onnx.load(str(exported["onnx"]))
    name = next(i.name for i in proto.graph.initializer if i.name.endswith("cls_score.bias"))
    init = next(i for i in proto.graph.initializer if i.name == name)
    init.CopyFrom(onnx.numpy_helper.from_array(np.array([20.0, -20.0], np.float32), name))
    path = exported["root"] / "silent.onnx"
    onnx.save(proto, str(path))
    out = OnnxDetector(path, threads=1).detect(synth_images([(256, 256)])[0])
    assert out["boxes"].shape == (0, 4) and out["scores"].shape == (0,) and out["mask_probs"].shape[0] == 0


def test_infer_engine_onnxruntime_writes_what_torch_writes_and_imports_no_torch(exported, tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for k, rgb in enumerate(synth_images([(300, 200), (256, 256)], seed=9)):
        Image.fromarray(rgb).save(folder / f"gt_{k + 1}.png")
    common = ["--images", str(folder), "--no-progress", "--score-thr", "0.3", "--no-vis"]
    torch_out, ort_out = tmp_path / "torch", tmp_path / "ort"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "i3cl_core.cli",
            "infer",
            "--checkpoint",
            exported["ckpt"],
            "--precision",
            "fp32",
            "--workers",
            "0",
            "--out",
            str(torch_out),
            *common,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    # torch made unimportable: the run must not need it; -X importtime lists every module it imports
    code = (
        "import sys, runpy; sys.modules['torch'] = None; sys.argv = ['i3cl'] + sys.argv[1:]; "
        "runpy.run_module('i3cl_core.cli', run_name='__main__')"
    )
    r = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-c",
            code,
            "infer",
            "--engine",
            "onnxruntime",
            "--model",
            str(exported["onnx"]),
            "--threads",
            "1",
            "--out",
            str(ort_out),
            *common,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    imported = [
        line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")
    ]
    assert "onnxruntime" in imported and not [
        m for m in imported if m.split(".")[0] in ("torch", "torchvision")
    ]
    a = json.loads((torch_out / "results.json").read_text())
    b = json.loads((ort_out / "results.json").read_text())
    assert a and abs(len(a) - len(b)) <= 1
    for name in ("submission.json", "images.json"):
        assert (ort_out / name).exists()
    assert sorted(p.name for p in (ort_out / "txt").iterdir()) == ["gt_1.txt", "gt_2.txt"]
    assert json.loads((ort_out / "run.json").read_text())["engine"] == "onnxruntime"
    # each torch polygon has an onnxruntime twin: same image, score within 1e-4, IoU >= 0.9
    from shapely.geometry import Polygon

    def poly(r):
        return Polygon(np.array(r["segmentation"][0]).reshape(-1, 2)).buffer(0)

    twins = 0
    for x in a:
        px = poly(x)
        for y in b:
            if y["image_id"] == x["image_id"] and abs(y["score"] - x["score"]) <= 1e-4:
                py = poly(y)
                if px.union(py).area and px.intersection(py).area / px.union(py).area >= 0.9:
                    twins += 1
                    break
    assert twins >= len(a) - 1


def test_bad_model_files_and_options_are_refused_clearly(exported, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from i3cl_core.deploy.onnx_runtime import OnnxDetector
    from i3cl_core.model.errors import CheckpointError

    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(exported["onnx"].read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not an ONNX model"):
        OnnxDetector(truncated)
    with pytest.raises(CheckpointError, match="no such ONNX file"):
        OnnxDetector(tmp_path / "missing.onnx")
    # a valid ONNX model that is not an i3cl export
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    other = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(other))
    with pytest.raises(CheckpointError, match="not an i3cl export"):
        OnnxDetector(other)
    # the CLI: a model without --engine onnxruntime, and a truncated file, end with one line each
    for args, expect in (
        ([f"--model={exported['onnx']}"], "needs --engine onnxruntime"),
        (["--engine", "onnxruntime", f"--model={truncated}"], "truncated, corrupt"),
    ):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "i3cl_core.cli",
                "infer",
                *args,
                "--images",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert r.returncode != 0 and expect in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_an_unexportable_part_is_named(exported, tmp_path, monkeypatch):
    from i3cl_core.deploy.onnx_export import ExportError, export_onnx
    from i3cl_core.model import intra_cl

    original = intra_cl.IntraCL.forward

    def with_unexportable_op(self, x):  # an operator without an ONNX translation
        return (
            original(self, x)
            + torch.special.zeta(torch.ones_like(x[:, :1]) * 2, torch.ones_like(x[:, :1])) * 0
        )

    monkeypatch.setattr(intra_cl.IntraCL, "forward", with_unexportable_op)
    with pytest.raises(ExportError, match="the backbone, FPN or IntraCL"):
        export_onnx(exported["ckpt"], tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_r50_config_exports(tmp_path):
    """The paper's R50 model (random weights) exports and matches PyTorch on the tracing image."""
    from i3cl_core.config import load_config
    from i3cl_core.deploy.onnx_export import export_onnx
    from i3cl_core.model.checkpoint import save_checkpoint
    from i3cl_core.model.detector import build_model

    cfg = load_config(
        REPO / "configs" / "i3cl_r50" / "pretrain.yaml",
        ["model.backbone.weights=null", "model.test_short_side=320", "model.test_long_side=480"],
    )
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "r50.pth", build_model(cfg).eval(), cfg)
    s = export_onnx(ckpt, tmp_path / "r50.onnx")
    assert s["sample_detections"] > 0 and s["parity"]["max_score_diff"] < 1e-3
    assert s["parity"]["max_box_diff"] < 0.05


def test_an_exported_model_joins_the_ensemble_next_to_its_checkpoint(exported, tmp_path):
    """`i3cl ensemble --checkpoints a.pth a.onnx`: the exported member's shards hold the same detections."""
    from PIL import Image

    from i3cl_core.pseudo.ensemble import run_ensemble

    folder = tmp_path / "unlabeled"
    folder.mkdir()
    for k, rgb in enumerate(synth_images([(256, 256), (300, 200), (200, 300)], seed=11)):
        Image.fromarray(rgb).save(folder / f"u_{k}.png")
    s = run_ensemble(
        [exported["ckpt"], str(exported["onnx"])],
        str(folder),
        tmp_path / "ens",
        shard_size=2,
        devices=["cpu"],
        precision="fp32",
        progress=False,
        batch_size=1,
        loader_workers=0,
    )
    assert s["models"][1]["model"] == "model" and s["models"][1]["computed"] == 2
    by_member = []
    for member in s["members"]:
        results = []
        for f in sorted(Path(member).glob("shard_*.json")):
            results += json.loads(f.read_text())
        by_member.append(results)
    torch_results, onnx_results = by_member
    assert torch_results and abs(len(torch_results) - len(onnx_results)) <= 1
    close = sum(
        any(y["image_id"] == x["image_id"] and abs(y["score"] - x["score"]) <= 1e-4 for y in onnx_results)
        for x in torch_results
    )
    assert close >= len(torch_results) - 1
    with pytest.raises(Exception, match="test-time augmentation"):
        run_ensemble(
            [str(exported["onnx"])],
            str(folder),
            tmp_path / "ens_tta",
            devices=["cpu"],
            flips=["h"],
            progress=False,
            loader_workers=0,
        )


def test_pipeline_exported_members_are_checked():
    from pydantic import ValidationError

    from i3cl_core.pipeline.params import InferParams

    assert InferParams(exported_members=["m.onnx"]).exported_members == ["m.onnx"]
    with pytest.raises(ValidationError, match="not an .onnx file"):
        InferParams(exported_members=["m.pth"])
    with pytest.raises(ValidationError, match="test-time augmentation"):
        InferParams(exported_members=["m.onnx"], tta_flips=["h"])
