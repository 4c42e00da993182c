"""The SSL benchmark's CPU smoke path (benchmarks/gpu_ssl.sh with SMOKE=1): teachers, ensemble, fusion with its
threshold chosen on the validation split, a strongly augmented soft-background arm and its control, evaluation,
and the one table with its protocol, paired differences, gate and coverage rows."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_ssl_smoke_runs_the_benchmark_end_to_end_on_cpu(tmp_path):
    env = dict(os.environ, SMOKE="1", OUT_DIR=str(tmp_path), OMP_NUM_THREADS="2")
    res = subprocess.run(
        ["bash", "benchmarks/gpu_ssl.sh"], cwd=REPO, capture_output=True, text=True, timeout=600, env=env
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    table = res.stdout[res.stdout.index("SSL benchmark:") :]
    for row in (
        "protocol: arms start from the first teacher at its final learning rate",
        "teacher:teacher_a",
        "control - teacher:teacher_a",
        "ssl_strong_bg - control",
        "pseudo labels vs hidden GT",
        "gate: pseudo - control",
        "coverage ssl_strong_bg",
    ):
        assert row in table, row
    result = json.loads((tmp_path / "wd" / "seed1" / "result.json").read_text())
    assert set(result["scores"]) == {"teacher:teacher_a", "control", "ssl_strong_bg"}
    # the arm trained on a strongly augmented, soft-background pseudo set; the validation split chose thresholds
    cfg = (tmp_path / "wd" / "seed1" / "arms" / "ssl_strong_bg" / "config.yaml").read_text()
    assert "augment: strong" in cfg and "background_weight: 0.5" in cfg
    assert all(0.0 <= s["val_thr"] <= 1.0 for s in result["scores"].values())
    assert result["gate"] is not None and result["protocol"] == "continue"
