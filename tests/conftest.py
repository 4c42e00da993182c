"""Shared fixtures. Unit tests never talk to a Prefect server: an accidental API call fails fast."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def write_coco(
    root: Path,
    images: list[dict],
    annotations: list[dict],
    ann_name: str = "train.json",
    img_dir: str = "train_images",
    write_images: bool = True,
) -> tuple[Path, Path]:
    """Write a COCO json and (optionally) grey JPEG images of the listed sizes under ``root``."""
    import cv2

    img_root = root / img_dir
    img_root.mkdir(parents=True, exist_ok=True)
    if write_images:
        for im in images:
            path = img_root / im["file_name"]
            path.parent.mkdir(parents=True, exist_ok=True)
            arr = np.full((im["height"], im["width"], 3), 90, np.uint8)
            cv2.imwrite(str(path), arr)
    ann_file = root / ann_name
    ann_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "text"}]})
    )
    return ann_file, img_root


def rect(x, y, w, h):
    return [x, y, x + w, y, x + w, y + h, x, y + h]


@pytest.fixture
def coco_factory(tmp_path):
    def make(images, annotations, **kw):
        return write_coco(tmp_path, images, annotations, **kw)

    return make


def random_teachers(root: Path, side: int = 256, seeds=(0, 1)) -> dict[str, str]:
    """Small random I3CL teachers (tiny_model, a classifier biased to detect), one checkpoint per seed:
    what the ensemble stage needs, without training. ``{"teacher_<seed>": path}``."""
    import torch

    from i3cl_core.config import load_config
    from i3cl_core.model.checkpoint import save_checkpoint
    from i3cl_core.model.detector import build_model

    ckpts = {}
    for seed in seeds:
        cfg = load_config(
            Path(__file__).resolve().parents[1] / "configs" / "demo" / "tiny_model.yaml",
            [f"model.test_short_side={side}", f"model.test_long_side={side}", "model.max_detections=20"],
        )
        torch.manual_seed(seed)
        m = build_model(cfg).eval()
        m.roi_heads.box_head.cls_score.bias.data = torch.tensor([0.0, 0.6])
        ckpts[f"teacher_{seed}"] = str(save_checkpoint(Path(root) / f"teacher_{seed}.pth", m, cfg))
    return ckpts


def ensemble_work_dir(path: Path, ckpts: dict[str, str], img_root: str) -> Path:
    """A pipeline work dir whose teachers are ``ckpts`` and whose unlabeled set is ``img_root``."""
    from i3cl_core.pipeline.stages import check_work_dir

    wd = check_work_dir(path)
    (wd / "teachers").mkdir()
    (wd / "teachers" / "teachers.json").write_text(json.dumps(ckpts))
    (wd / "data.json").write_text(
        json.dumps(
            {
                "labeled": [],
                "val": None,
                "test": None,
                "unlabeled_gt": None,
                "unlabeled_images": img_root,
                "unlabeled_root": img_root,
            }
        )
    )
    return wd


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One local Prefect server (SQLite, 127.0.0.1) for every test that needs a real one: the flows, Dask,
    Slurm and browser tests. A test that kills it starts it again on the same port and database
    (``server.start()``); the PostgreSQL test runs its own."""
    from flows.server import LocalServer

    with LocalServer(tmp_path_factory.mktemp("prefect-home"), timeout=240) as srv:
        yield srv


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, theirs, ...), from /proc."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text().split()
            except OSError:
                continue
            if int(stat[3]) == pid:
                out.append(int(p.name))
                out.extend(descendants(int(p.name)))
    return out
