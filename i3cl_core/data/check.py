"""Every image of every dataset of a config, checked before training (``i3cl check-data CONFIG``).

For each image listed in ``data.train``, ``data.val`` and ``data.test``: the file exists, its header
decodes (Pillow reads the header only; ``--decode`` decodes every pixel too), the file is not cut
short (a JPEG ends with its end-of-image marker, a PNG with its IEND chunk: the same rule as the image
reader's, from the file's first and last bytes), it is within the pixel limit, and its size equals the json's
``width`` x ``height`` (in the stored frame, or the displayed one with ``--exif-transpose``, as the reader).
The summary counts the images that carry an EXIF orientation tag: their pixels are read as stored. Images are
checked in a thread pool (``--workers``), at a few seconds per thousand images on local disks. All problems
are listed at once, before any training starts; training runs the same header check first
(``data.check_images``).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from i3cl_core.data.coco import load_coco_records
from i3cl_core.data.errors import DatasetError
from i3cl_core.data.image_io import file_truncation, header, read_image


@dataclass
class CheckResult:
    images: int = 0
    problems: list = field(default_factory=list)  # "file: image id: what is wrong"
    seconds: float = 0.0
    oriented: int = 0  # images whose EXIF orientation tag says "turn me" (2-8)

    def summary(self) -> str:
        rate = 1000 * self.seconds / max(self.images, 1)
        head = (
            f"checked {self.images} images in {self.seconds:.2f} s ({rate:.2f} s per 1000 images): "
            f"{len(self.problems)} problem(s)"
        )
        if self.oriented:
            head += (
                f"; {self.oriented} image(s) carry an EXIF orientation tag: "
                "read in their stored orientation, as "
                f"the annotations of the text datasets assume (--exif-transpose if yours were drawn on the "
                f"displayed pictures)"
            )
        return head


def _check_one(item, decode: bool) -> tuple[str | None, int]:
    """``(problem or None, EXIF orientation)`` of one image."""
    ann_file, image_id, path, width, height = item
    where = f"{ann_file}: image {image_id} ({path})"
    if not Path(path).is_file():
        return f"{where}: file missing", 1
    try:
        w, h, orientation = header(path, where)
        if decode:
            read_image(path, f"image {image_id}")
    except DatasetError as e:
        return str(e) if str(e).startswith(where) else f"{where}: {e}", 1
    if (w, h) != (width, height):
        return f"{where}: the json says {width}x{height}, the file is {w}x{h}", orientation
    reason = file_truncation(path)
    if reason:
        return f"{where}: {reason}", orientation
    return None, orientation


def check_sources(sources, workers: int = 8, decode: bool = False) -> CheckResult:
    """Check every image of ``sources`` (``(ann_file, img_root)`` pairs): see the module docstring.
    Structural errors of the json itself raise DatasetError as when loading it."""
    t0 = time.time()
    items = []
    for ann_file, img_root in sources:
        records, _ = load_coco_records(
            ann_file, img_root, keep_empty=True, check_files=False, min_image_size=1
        )
        items.extend((str(ann_file), r.image_id, str(r.path), r.width, r.height) for r in records)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        checked = list(pool.map(lambda it: _check_one(it, decode), items))
    return CheckResult(
        images=len(items),
        problems=[p for p, _ in checked if p],
        seconds=time.time() - t0,
        oriented=sum(o not in (0, 1) for _, o in checked),
    )


def config_sources(cfg) -> list[tuple[str, str]]:
    sources = [(s.ann_file, s.img_root) for s in cfg.data.train]
    for s in (cfg.data.val, cfg.data.test):
        if s is not None:
            sources.append((s.ann_file, s.img_root))
    return sources


def raise_on_problems(result: CheckResult, limit: int = 20) -> None:
    if result.problems:
        shown = "\n  ".join(result.problems[:limit])
        more = f"\n  ... and {len(result.problems) - limit} more" if len(result.problems) > limit else ""
        raise DatasetError(
            f"{len(result.problems)} of {result.images} images cannot be used:\n  {shown}{more}"
        )
