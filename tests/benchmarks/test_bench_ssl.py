"""The SSL benchmark's CPU smoke path (benchmarks/gpu_ssl.sh with SMOKE=1): teachers, ensemble, fusion with
its threshold chosen on the validation split, a strongly augmented soft-background arm and its control,
evaluation, and the one table with its protocol, paired differences, gate and coverage rows; and round 2 (the
round-1 student labels the unlabeled images again, round 1's arm continues from it on those labels)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_ssl_smoke_runs_the_benchmark_end_to_end_on_cpu(tmp_path):
    env = dict(os.environ, SMOKE="1", OUT_DIR=str(tmp_path), OMP_NUM_THREADS="2")
    res = subprocess.run(
        ["bash", "benchmarks/gpu_ssl.sh", "--arms", "control", "ssl_strong_bg", "ssl_r2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
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
        "ssl_r2 - ssl_strong_bg",
        "round-2 pseudo labels",
        "round-2 pseudo - best teacher",
    ):
        assert row in table, row
    result = json.loads((tmp_path / "wd" / "seed1" / "result.json").read_text())
    assert set(result["scores"]) == {"teacher:teacher_a", "control", "ssl_strong_bg", "ssl_r2"}
    # the arm trained on a strongly augmented, soft-background pseudo set; the validation split chose
    # thresholds
    cfg = (tmp_path / "wd" / "seed1" / "arms" / "ssl_strong_bg" / "config.yaml").read_text()
    assert "augment: strong" in cfg and "background_weight: 0.5" in cfg
    assert all(0.0 <= s["val_thr"] <= 1.0 for s in result["scores"].values())
    assert result["gate"] is not None and result["protocol"] == "continue"
    # round 2: the round-1 student alone labelled the unlabeled images again; round 1's arm continued from it
    # with only its labels changed
    assert result["round2"]["labeler"] == "ssl_strong_bg" and result["round2"]["members"] == "student"
    r2 = (tmp_path / "wd" / "seed1" / "arms" / "ssl_r2" / "config.yaml").read_text()
    assert "r2_pseudo" in r2 and "augment: strong" in r2
    assert str(tmp_path / "wd" / "seed1" / "arms" / "ssl_strong_bg") in r2  # load_from: the round-1 student
