"""Whole datasets: images rendered in worker processes, written with their COCO json
(:func:`generate_dataset`), and the demo's splits (:func:`generate_demo`)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from i3cl_core.data.synth.fonts import _resolve_cjk, find_latin_fonts
from i3cl_core.data.synth.render import list_backgrounds, render_sample
from i3cl_core.utils import atomic_write_json, die_with_parent

GENERATOR_VERSION = "1.0"
CATEGORY = {"id": 1, "name": "text"}
# below this many images per worker a process pool costs more than it saves (each spawned worker imports
# the renderer's libraries, about 1-2 s): 16 images of 128 px took 3.4 s with 2 workers, 0.8 s in-process
POOL_MIN_IMAGES_PER_WORKER = 8


# ------------------------------------------------------------------------------------------------ datasets


def _init_worker() -> None:
    die_with_parent()  # a kill -9 of the generating process leaves no worker behind
    try:
        import cv2  # deferred: OpenCV loads in the render workers only

        cv2.setNumThreads(1)
    except Exception:
        pass


def _work(task: tuple) -> tuple[int, str, int, int, list[dict]]:
    """Render one image, write its JPEG, return (index, file_name, width, height, annotations)."""
    import cv2  # deferred: OpenCV loads only when images are rendered

    index, seed, size, img_dir, cjk_font, backgrounds = task
    img, anns = render_sample(seed, index, size, cjk_font, backgrounds)
    quality = int(np.random.default_rng([seed, index, 2]).integers(60, 96))
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"could not encode synthetic image {index}")
    name = f"synth_{index:06d}.jpg"
    tmp = Path(img_dir) / f".{name}.tmp"
    tmp.write_bytes(buf.tobytes())
    os.replace(tmp, Path(img_dir) / name)
    return index, name, int(size[0]), int(size[1]), anns


def _check_args(num_images: int, size: Sequence[int], workers: int) -> tuple[int, int]:
    if int(num_images) < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if len(size) != 2 or min(int(size[0]), int(size[1])) < 64 or max(int(size[0]), int(size[1])) > 8192:
        raise ValueError(f"size must be two integers (width height) between 64 and 8192, got {tuple(size)}")
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return int(size[0]), int(size[1])


def generate_dataset(
    out_dir: str | os.PathLike,
    num_images: int,
    seed: int = 0,
    size: tuple[int, int] = (512, 512),
    backgrounds_dir: str | os.PathLike | None = None,
    workers: int = 1,
    progress: bool = True,
    cjk: bool | None = None,
    ann_name: str = "annotations.json",
) -> dict:
    """Write ``out_dir/images/synth_NNNNNN.jpg`` and ``out_dir/<ann_name>`` (COCO polygons).

    ``cjk``: None detects a Chinese font (one warning per process when there is none), False draws
    Latin only, True asks for Chinese (falls back to Latin with the same warning when no font exists).
    The json depends only on ``seed``, ``num_images``, ``size``, the backgrounds and the fonts, not on
    ``workers`` (a few images are rendered in this process whatever ``workers`` says). Returns a summary
    dict.
    """
    from tqdm import tqdm  # deferred: tqdm costs ~40 ms at import; only generating needs it

    w, h = _check_args(num_images, size, workers)
    seed = int(seed)
    out = Path(out_dir)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    backgrounds = list_backgrounds(backgrounds_dir)
    cjk_font = _resolve_cjk(cjk)
    tasks = [(i, seed, (w, h), str(img_dir), cjk_font, backgrounds) for i in range(1, int(num_images) + 1)]

    start = time.perf_counter()
    results = []
    bar = tqdm(total=len(tasks), desc="synth", unit="img", file=sys.stderr, disable=not progress, leave=False)
    try:
        if workers == 1 or len(tasks) < POOL_MIN_IMAGES_PER_WORKER * workers:
            for task in tasks:
                results.append(_work(task))
                bar.update(1)
        else:
            ctx = mp.get_context("spawn")  # no fork: safe with threads (torch, cv2) in the parent
            with ctx.Pool(min(int(workers), len(tasks)), initializer=_init_worker) as pool:
                for res in pool.imap(_work, tasks, chunksize=max(1, min(8, len(tasks) // (4 * workers)))):
                    results.append(res)
                    bar.update(1)
    finally:
        bar.close()
    seconds = time.perf_counter() - start

    images, annotations = [], []
    for index, name, iw, ih, anns in results:  # imap keeps index order
        images.append({"id": index, "file_name": name, "width": iw, "height": ih})
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": index, **ann})
    info = {
        "description": "I3CL synthetic curved scene text",
        "generator": "i3cl_core.data.synth",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "size": [w, h],
        "cjk": cjk_font is not None,
        # the rendered pixels depend on the machine's fonts: a data set made elsewhere differs if these do
        "fonts": [Path(f).name for f in (*find_latin_fonts(), cjk_font) if f],
        "backgrounds": "skimage" + (f"+{len(backgrounds)} user images" if backgrounds else ""),
    }
    coco = {"info": info, "images": images, "annotations": annotations, "categories": [dict(CATEGORY)]}
    ann_file = atomic_write_json(out / ann_name, coco)
    n_dc = sum(a["iscrowd"] for a in annotations)
    return {
        "num_images": len(images),
        "num_instances": len(annotations),
        "num_dontcare": n_dc,
        "cjk": cjk_font is not None,
        "seconds": round(seconds, 3),
        "images_per_s": round(len(images) / max(seconds, 1e-9), 2),
        "ann_file": str(ann_file),
        "img_root": str(img_dir),
    }


def _split_seed(seed: int, split: int) -> int:
    return int(np.random.SeedSequence([int(seed), 7919, split]).generate_state(1)[0])


def generate_demo(
    out_dir: str | os.PathLike,
    seed: int = 0,
    num_train: int = 200,
    num_unlabeled: int = 200,
    num_test: int = 100,
    size: tuple[int, int] = (384, 384),
    workers: int = 1,
    num_val: int = 0,
    progress: bool = True,
    cjk: bool | None = None,
    backgrounds_dir: str | os.PathLike | None = None,
) -> dict:
    """The demo dataset: ``train/`` (labeled), ``unlabeled/`` (images.json without annotations plus the
    hidden gt.json), ``test/`` and, with ``num_val`` > 0, a small labeled ``val/`` split (what the
    pipeline chooses fusion thresholds on), each split from its own seed derived from ``seed``."""
    out = Path(out_dir)
    common = dict(size=size, workers=workers, progress=progress, cjk=cjk, backgrounds_dir=backgrounds_dir)
    summary = {
        "train": generate_dataset(out / "train", num_train, seed=_split_seed(seed, 0), **common),
        "unlabeled": generate_dataset(
            out / "unlabeled", num_unlabeled, seed=_split_seed(seed, 1), ann_name="gt.json", **common
        ),
        "test": generate_dataset(out / "test", num_test, seed=_split_seed(seed, 2), **common),
    }
    if num_val > 0:
        summary["val"] = generate_dataset(out / "val", num_val, seed=_split_seed(seed, 3), **common)
    gt_path = Path(summary["unlabeled"]["ann_file"])
    gt = json.loads(gt_path.read_text(encoding="utf-8"))
    images_only = {
        "info": {**gt["info"], "note": "unlabeled split: annotations hidden in gt.json"},
        "images": gt["images"],
        "annotations": [],
        "categories": gt["categories"],
    }
    images_json = atomic_write_json(out / "unlabeled" / "images.json", images_only)
    summary["unlabeled"]["images_file"] = str(images_json)
    summary["unlabeled"]["gt_file"] = str(gt_path)
    return summary
