"""The data a pipeline run works on: the paths given as parameters, else the synthetic demo splits, resolved
once per work dir (``data.json``)."""

from __future__ import annotations

import json
from pathlib import Path

from i3cl_core.pipeline.params import DataParams
from i3cl_core.pipeline.stages import ensure_demo_data
from i3cl_core.pipeline.workdir import WorkDir
from i3cl_core.utils import atomic_write_json


def resolve_data(data: DataParams, wd: Path) -> dict:
    """Resolved data paths: explicit ones, else the synthetic demo splits (generated when missing).
    A stage run with the default ``data`` on an existing work_dir uses the data it was made with
    (``work_dir/data.json``), so ``fuse-pseudo-labels/default -p work_dir=...`` needs no data paths."""
    saved = WorkDir(wd).data_file
    if data == DataParams() and saved.exists():
        return json.loads(saved.read_text())
    resolved = _from_params(data)
    atomic_write_json(saved, resolved, indent=2)
    return resolved


def _from_params(data: DataParams) -> dict:
    demo = None
    if data.uses_demo():
        demo_dir = Path(data.demo_dir)
        if not demo_dir.is_absolute():
            demo_dir = Path.cwd() / demo_dir
        demo = ensure_demo_data(
            demo_dir,
            data.demo_seed,
            data.demo_train,
            data.demo_unlabeled,
            data.demo_test,
            data.demo_size,
            num_val=data.demo_val,
        )
    split = {"ann_file", "img_root"}  # what an evaluation split uses of a DatasetSource
    return {  # the training-only fields of a labeled set only when set: data.json as before they existed
        "labeled": [d.model_dump(exclude_defaults=True) for d in data.labeled]
        if data.labeled
        else demo["labeled"],
        "unlabeled_images": data.unlabeled_images or demo["unlabeled_images"],
        "unlabeled_root": data.unlabeled_root or demo["unlabeled_root"],
        "unlabeled_gt": data.unlabeled_gt
        if data.unlabeled_images
        else (data.unlabeled_gt or demo["unlabeled_gt"]),
        "test": data.test.model_dump(include=split) if data.test else demo["test"],
        "val": data.val.model_dump(include=split)
        if data.val
        else (demo["val"] if demo and not data.labeled else None),
    }
