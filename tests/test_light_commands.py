"""Commands that need no model import neither torch nor torchvision (they run where torch is absent, and
start in a fraction of a second)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

PROBE = textwrap.dedent("""
    import json, sys
    from i3cl_core.cli import main
    rc = main(sys.argv[1:])
    heavy = sorted(m for m in ("torch", "torchvision", "prefect") if m in sys.modules)
    print("PROBE " + json.dumps({"rc": rc, "heavy": heavy}))
""")


def _probe(args, cwd):
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("PROBE ")), None)
    assert line, f"no probe line; stderr: {out.stderr[-2000:]}"
    return json.loads(line[6:])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("light")
    (d / "img").mkdir()
    Image.new("RGB", (200, 100)).save(d / "img" / "img_1.jpg")
    gt = {
        "images": [{"id": 1, "file_name": "img_1.jpg", "width": 200, "height": 100}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "bbox": [0, 0, 100, 20],
                "segmentation": [[0, 0, 100, 0, 100, 20, 0, 20]],
            }
        ],
        "categories": [{"id": 1, "name": "text"}],
    }
    (d / "gt.json").write_text(json.dumps(gt))
    (d / "images.json").write_text(json.dumps({**gt, "annotations": []}))
    pred = [{"image_id": 1, "score": 0.9, "segmentation": [[1, 0, 100, 0, 100, 21, 1, 21]]}]
    (d / "a.json").write_text(json.dumps(pred))
    (d / "b.json").write_text(json.dumps(pred))
    (d / "gt_img_1.txt").write_text("0,0,100,0,100,20,0,20,text\n")
    (d / "paddle.json").write_text(
        json.dumps({"img_1.jpg": [[[[0, 0], [100, 0], [100, 20], [0, 20]], "t", 0.9]]})
    )
    return d


@pytest.mark.parametrize(
    "name",
    [
        "evaluate",
        "convert-dataset",
        "export-submission",
        "convert-predictions",
        "fuse",
        "config",
        "synth",
        "browse",
    ],
)
def test_command_runs_without_torch(files, name, tmp_path):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    d = files
    args = {
        "evaluate": ["evaluate", "--gt", f"{d}/gt.json", "--pred", f"{d}/a.json", "--protocol", "all"],
        "convert-dataset": [
            "convert-dataset",
            "--format",
            "icdar2015",
            "--ann",
            f"{d}/gt_img_1.txt",
            "--img-root",
            f"{d}/img",
            "--out",
            f"{tmp_path}/c.json",
        ],
        "export-submission": [
            "export-submission",
            "--format",
            "totaltext",
            "--pred",
            f"{d}/a.json",
            "--images",
            f"{d}/gt.json",
            "--out",
            f"{tmp_path}/tt",
        ],
        "convert-predictions": [
            "convert-predictions",
            "--format",
            "rapidocr",
            "--pred",
            f"{d}/paddle.json",
            "--images",
            f"{d}/images.json",
            "--out",
            f"{tmp_path}/p.json",
        ],
        "fuse": [
            "fuse",
            "--predictions",
            f"{d}/a.json",
            f"{d}/b.json",
            "--images",
            f"{d}/images.json",
            "--out",
            f"{tmp_path}/pseudo.json",
            "--set",
            "fuse.auto_keep_thr=false",
            "--no-progress",
        ],
        "config": ["config", "configs/demo/teacher_a.yaml"],
        "synth": [
            "synth",
            "--out",
            f"{tmp_path}/syn",
            "--num-images",
            "1",
            "--size",
            "96",
            "96",
            "--no-progress",
        ],
        "browse": ["browse", "--ann", f"{d}/gt.json", "--img-root", f"{d}/img", "--out", f"{tmp_path}/br"],
    }[name]
    r = _probe(args, repo)
    assert r["rc"] == 0 and r["heavy"] == [], r
