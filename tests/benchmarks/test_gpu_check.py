"""The GPU check script's CPU-runnable parts (benchmarks/gpu_check.py --quick --device cpu): it runs,
prints its one table and writes the same rows as JSON. (Its pipeline part runs the same flows as
test_flows.py and is left out here for time.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_cpu_run_prints_one_table_with_every_row(tmp_path):
    out = tmp_path / "gpu_check.json"
    res = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu_check.py",
            "--parts",
            "train",
            "infer",
            "--quick",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "2"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    table = res.stdout[res.stdout.index("GPU check:") :]
    rows = json.loads(out.read_text())["rows"]
    checks = [r["check"] for r in rows]
    assert checks == [
        "training",
        "inference I3CL (tiny_model)",
        "inference I3CL (tiny_model)",
        "inference torchvision maskrcnn_resnet50_fpn",
        "ratio I3CL / torchvision time per image",
        "bf16_features on vs off (speed-up)",
    ]
    assert all(r.get("images_per_s", 1) > 0 and r.get("ratio", 1) > 0 for r in rows)
    assert not any("status" in r for r in rows)
    for r in rows:
        assert r["check"] in table
    bad = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--iters", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--iters and --images must be >= 1" in bad.stderr
