"""Shared fixtures. Unit tests never talk to a Prefect server: an accidental API call fails fast."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def write_coco(root: Path, images: list[dict], annotations: list[dict], ann_name: str = "train.json",
               img_dir: str = "train_images", write_images: bool = True) -> tuple[Path, Path]:
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
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                     "categories": [{"id": 1, "name": "text"}]}))
    return ann_file, img_root


def rect(x, y, w, h):
    return [x, y, x + w, y, x + w, y + h, x, y + h]


@pytest.fixture
def coco_factory(tmp_path):
    def make(images, annotations, **kw):
        return write_coco(tmp_path, images, annotations, **kw)
    return make
