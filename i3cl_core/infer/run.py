"""``i3cl infer``: a checkpoint over a folder, glob, list or COCO json of images.

Writes into ``--out``: ``results.json`` (COCO results), ``submission.json`` (ArT), ``images.json``
(COCO ``images`` list with ids and sizes, usable as the IMAGES.json of ``i3cl fuse``), ``txt/<name>.txt``
and, unless ``--no-vis``, ``vis/<name>.png``. Each image's detections are first written atomically to
``per_image/<name>.json``; a re-run skips images that already have one (resumable over large folders),
unless the checkpoint or the settings changed (``run.json`` records them). An unreadable image is
reported and skipped; the run goes on.

A run whose checkpoint or settings differ from those of the complete run already in ``--out`` leaves
that run's outputs as they are until it is done: it writes everything (per-image files, PNGs, exports)
into ``--out/.infer-next/`` and then moves it into place, ``run.json`` last. So a failure half-way (a
full disk, a kill) never leaves ``run.json``, ``results.json`` and ``per_image/`` disagreeing, and the
next run with the same settings goes on from what ``.infer-next/`` holds. ``.per_image.json`` records
the settings of the per-image files beside it (what the resume check reads).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from i3cl_core.data.errors import DatasetError
from i3cl_core.data.image_io import IMAGE_EXTENSIONS
from i3cl_core.data.validate import coco_images
from i3cl_core.devices import resolve_device
from i3cl_core.infer.precision import load_inference_model
from i3cl_core.utils import atomic_write_json, atomic_write_text, get_logger, read_json, safe_join, writing

log = get_logger("infer")


@dataclass
class ImageItem:
    image_id: int
    path: Path
    file_name: str  # as written to the outputs (relative to the image root when there is one)

    @property
    def key(self) -> str:
        """The name of its per-image record (``per_image/<key>.json``)."""
        return self.file_name.replace("/", "__").replace("\\", "__")

    @property
    def stem(self) -> str:
        """The name of its ``txt/<stem>.txt`` and ``vis/<stem>.png``."""
        return Path(self.key).stem


def check_output_names(items: list[ImageItem]) -> None:
    """Two images must never write the same output file: an error naming both when their per-image
    records (``d1/x.jpg`` and a file called ``d1__x.jpg``) or their txt / vis files (``y.jpg`` and
    ``y.png``) would collide."""
    for what, name_of in (
        ("per_image/{}.json", lambda it: it.key),
        ("txt/{0}.txt and vis/{0}.png", lambda it: it.stem),
    ):
        seen: dict[str, ImageItem] = {}
        for it in items:
            other = seen.setdefault(name_of(it), it)
            if other is not it:
                raise DatasetError(
                    f"images {other.path} and {it.path} would both write {what.format(name_of(it))}; "
                    "rename one of them, or run them in separate calls"
                )


def art_key_clashes(items: list[ImageItem]) -> tuple[str, str] | None:
    """Two file names with the same ArT submission key (``d1/x.jpg`` and ``d2/x.jpg``: both ``res_x``), or
    None."""
    from i3cl_core.infer.export import art_key  # deferred: i3cl --help imports this module (for ENGINES)

    seen: dict[str, str] = {}
    for it in items:
        other = seen.setdefault(art_key(it.file_name), it.file_name)
        if other != it.file_name:
            return other, it.file_name
    return None


def collect_images(spec: str, img_root: str | None = None) -> list[ImageItem]:
    """Images from a folder (sorted, not recursive), a COCO json (its ids; files under ``img_root``,
    default the json's folder), a ``.txt`` list (one path per line, relative to the list's folder) or
    a glob pattern. Ids are 1-based positions unless the COCO json gives them."""
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        return [ImageItem(i + 1, f, f.name) for i, f in enumerate(files)]
    if p.suffix.lower() == ".json" and p.is_file():
        root = Path(img_root) if img_root else p.parent
        items = []
        for im in coco_images(read_json(p), str(p), size="optional", unique_file_names=True):
            try:
                items.append(ImageItem(im["id"], safe_join(root, im["file_name"]), im["file_name"]))
            except ValueError as e:
                raise DatasetError(f"{p}: image {im['id']}: refused: {e}") from None
        return items
    if p.suffix.lower() == ".txt" and p.is_file():
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return _unique_names(
            [
                ImageItem(i + 1, (p.parent / ln) if not os.path.isabs(ln) else Path(ln), Path(ln).name)
                for i, ln in enumerate(lines)
            ],
            str(p),
        )
    files = sorted(glob.glob(spec, recursive=True))
    if not files:
        raise FileNotFoundError(f"{spec}: no such folder, json, list file, or glob matches")
    return _unique_names([ImageItem(i + 1, Path(f), Path(f).name) for i, f in enumerate(files)], spec)


def _unique_names(items: list[ImageItem], spec: str) -> list[ImageItem]:
    """Base names, unless two images share one: then every name is the path relative to the images'
    common folder (``d1/x.jpg``, ``d2/x.jpg``), so ids and output files cannot collide. The same file
    listed twice is an error."""
    resolved: dict[str, ImageItem] = {}
    for it in items:
        key = os.path.normpath(os.path.abspath(it.path))
        if key in resolved:
            raise DatasetError(
                f"{spec}: image {it.path} is listed twice (as {resolved[key].image_id} and {it.image_id})"
            )
        resolved[key] = it
    if len({it.file_name for it in items}) == len(items):
        return items
    common = os.path.commonpath([os.path.abspath(it.path) for it in items])
    for it in items:
        it.file_name = Path(os.path.relpath(os.path.abspath(it.path), common)).as_posix()
    log.info("%s: images share base names; naming them by their path under %s", spec, common)
    return items


def _file_stats(path: str) -> list:
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


STAGING = ".infer-next"  # a run with new settings writes here, then moves its outputs into --out
PER_IMAGE_MANIFEST = ".per_image.json"  # beside per_image/: the settings its files were computed with
# what a finished staged run moves into --out (run.json and the manifest come after these)
_OUTPUTS = ("per_image", "vis", "txt", "results.json", "submission.json", "images.json", "failed.txt")
# those of a previous run that must not survive a new one that did not write them (they would disagree with
# its run.json); old PNGs stay when the new run draws none (--no-vis), as they always did
_STALE_UNLESS_WRITTEN = ("txt", "results.json", "submission.json", "images.json", "failed.txt")


def _read_manifest(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _start_per_image(root: Path, manifest: dict) -> None:
    """Empty ``root/per_image`` of files computed with other settings and record ``manifest`` as its
    settings (the manifest goes first, so that a kill half-way never leaves old files passing as new)."""
    (root / PER_IMAGE_MANIFEST).unlink(missing_ok=True)
    per_image = root / "per_image"
    if per_image.is_dir():
        for f in per_image.glob("*.json"):
            f.unlink()
    per_image.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / PER_IMAGE_MANIFEST, manifest, indent=2)


def prepare_output(out: Path, manifest: dict) -> Path:
    """The folder this run writes into: ``out`` itself when its per-image files were computed with these
    settings (a resume), or when it holds no complete run to protect; else ``out/.infer-next`` (resumed
    when it was started with these settings, else started afresh)."""
    staging = out / STAGING
    settings = _read_manifest(out / PER_IMAGE_MANIFEST)
    if settings is None and not (out / PER_IMAGE_MANIFEST).exists():
        settings = _read_manifest(out / "run.json")  # a folder written before .per_image.json existed
    if settings == manifest:
        if staging.exists():  # a run with other settings was abandoned: ours replaces it
            _remove(staging)
        return out
    if not (out / "run.json").exists() and not (out / "results.json").exists():
        if staging.exists():
            _remove(staging)
        _start_per_image(out, manifest)
        return out
    if _read_manifest(staging / PER_IMAGE_MANIFEST) == manifest and (staging / "per_image").is_dir():
        done = sum(1 for _ in (staging / "per_image").glob("*.json"))
        log.info("%s: going on with the unfinished run in %s (%d images done)", out, staging, done)
        return staging
    if staging.exists():
        _remove(staging)
    log.warning(
        "%s: checkpoint or settings changed since the last run; recomputing every image into %s (the "
        "previous outputs stay until the new ones are complete)",
        out,
        staging,
    )
    _start_per_image(staging, manifest)
    return staging


def commit_staged(staging: Path, out: Path, manifest: dict) -> None:
    """Move a complete staged run's outputs into ``out`` (renames on one file system, no space needed):
    the per-image settings of ``out`` are withdrawn first, the new ones and ``run.json`` written last."""
    (out / PER_IMAGE_MANIFEST).unlink(missing_ok=True)
    old = staging / ".previous"
    old.mkdir(exist_ok=True)
    for name in _OUTPUTS:
        new, dst = staging / name, out / name
        with writing(dst, doing=f"move {new} to"):
            if new.exists():
                if dst.exists() or dst.is_symlink():
                    os.replace(dst, old / name)
                os.replace(new, dst)
            elif name in _STALE_UNLESS_WRITTEN and (dst.exists() or dst.is_symlink()):
                os.replace(dst, old / name)
    with writing(out / PER_IMAGE_MANIFEST, doing=f"move {staging / PER_IMAGE_MANIFEST} to"):
        os.replace(staging / PER_IMAGE_MANIFEST, out / PER_IMAGE_MANIFEST)
    atomic_write_json(out / "run.json", manifest, indent=2)
    _remove(staging)


ENGINES = ("torch", "onnxruntime")


def infer_images(
    checkpoint: str,
    items: list[ImageItem],
    out_dir: str | os.PathLike,
    score_thr: float = 0.45,
    device: str = "auto",
    batch_size: int = 1,
    num_workers: int = 1,
    visualize: bool = True,
    epsilon: float | None = None,
    model_overrides: dict | None = None,
    progress: bool = True,
    model=None,
    write_exports: bool = True,
    precision: str = "auto",
    engine: str = "torch",
    threads: int | None = None,
) -> dict:
    """Run one checkpoint over ``items`` by the one inference loop
    (:func:`~i3cl_core.infer.loop.predict_images`, ``num_workers`` decoding threads, ``batch_size`` images
    per forward pass); returns a summary (counts, seconds, failures). ``precision``: see
    :mod:`i3cl_core.infer.precision` (ignored when a ``model`` is given). ``engine="onnxruntime"``:
    ``checkpoint`` is a file from ``i3cl export``, run by :class:`~i3cl_core.deploy.onnx_runtime.OnnxDetector`
    on ``threads`` CPU threads without importing torch (``device``, ``precision`` and ``batch_size`` do not
    apply; ``model_overrides`` may set the test sides)."""
    # deferred: i3cl --help imports this module (for ENGINES); tqdm costs ~40 ms
    from tqdm import tqdm

    from i3cl_core.infer.export import art_entries, coco_results, draw_results, txt_lines
    from i3cl_core.infer.loop import decoding_threads, predict_images

    if engine not in ENGINES:
        raise DatasetError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    check_output_names(items)
    out = Path(out_dir)
    if engine == "onnxruntime":
        model, dev, eps, prec = _onnx_engine(checkpoint, epsilon, model_overrides, threads, model)
        batch_size = 1
    else:
        model, dev, eps, prec = _torch_engine(checkpoint, epsilon, model_overrides, device, precision, model)
    manifest = {
        "checkpoint": _file_stats(checkpoint) if checkpoint else None,
        "score_thr": score_thr,
        "epsilon": eps,
        "model_overrides": model_overrides or {},
        "precision": prec,
    }
    if engine != "torch":  # recorded only when not the default, so that earlier runs' outputs stay resumable
        manifest["engine"] = engine
    manifest = json.loads(json.dumps(manifest))  # as read back from a file (lists, not tuples)
    root = prepare_output(
        out, manifest
    )  # out, or out/.infer-next while a complete run with other settings is there
    per_image = root / "per_image"

    todo = [i for i, it in enumerate(items) if not (per_image / f"{it.key}.json").exists()]
    skipped = len(items) - len(todo)
    if skipped:
        log.info("%s: %d of %d images already done, skipping them", out, skipped, len(items))
    failures: list[str] = []
    t0 = time.time()
    bar = tqdm(
        total=len(todo),
        desc=f"infer {Path(checkpoint).name if checkpoint else ''}",
        unit="img",
        disable=not progress,
        dynamic_ncols=True,
    )
    images = [(items[i].path, f"image {items[i].image_id}") for i in todo]
    with decoding_threads(num_workers) as decoder, contextlib.closing(bar):
        for p in predict_images(model, images, eps, dev, batch_size, decoder=decoder, keep_rgb=visualize):
            bar.update(1)
            if p.error is not None:
                failures.append(p.error)
                log.warning("skipping %s", p.error)
                continue
            item = items[todo[p.index]]
            results = coco_results(item.image_id, p.polygons, score_thr)
            record = {
                "image_id": item.image_id,
                "file_name": item.file_name,
                "width": p.width,
                "height": p.height,
                "results": results,
            }
            if visualize:
                draw_results(p.rgb, results, root / "vis" / f"{item.stem}.png")
            atomic_write_json(per_image / f"{item.key}.json", record)
    seconds = time.time() - t0
    summary = {
        "images": len(items),
        "processed": len(todo) - len(failures),
        "skipped_done": skipped,
        "failed": len(failures),
        "failures": failures[:20],
        "seconds": round(seconds, 2),
        "images_per_s": round((len(todo) - len(failures)) / max(seconds, 1e-9), 3),
        "out": str(out),
    }
    if write_exports:
        summary.update(write_outputs(items, root, txt_lines, art_entries))
    if failures:
        atomic_write_text(root / "failed.txt", "\n".join(failures) + "\n")
    if root != out:  # every new output is complete: replace the previous run's
        commit_staged(root, out, manifest)
        for key in ("results", "submission"):
            if summary.get(key):
                summary[key] = str(out / Path(summary[key]).name)
    else:
        atomic_write_json(out / "run.json", manifest, indent=2)
    return summary


def _torch_engine(checkpoint, epsilon, model_overrides, device, precision, model):
    """(model, device, epsilon, precision) of the PyTorch engine: the checkpoint loaded on ``device`` in
    ``precision`` (:func:`~i3cl_core.infer.precision.load_inference_model`), or ``model`` as given."""
    dev = resolve_device(device)
    cfg, prec = None, None
    if model is None:
        model, cfg, prec = load_inference_model(checkpoint, dev, precision, model_overrides)
    model.eval()
    eps = epsilon if epsilon is not None else (cfg.infer.polygon_epsilon if cfg is not None else 0.005)
    return model, dev, eps, prec


def _onnx_engine(path, epsilon, model_overrides, threads, detector=None):
    """(detector, None, epsilon, precision) of the torch-free engine: an exported model in an onnxruntime
    session (:class:`~i3cl_core.deploy.onnx_runtime.OnnxDetector`, ``detector`` when given), one image at a
    time."""
    # deferred: i3cl --help imports this module (for ENGINES)
    from i3cl_core.deploy.onnx_runtime import OnnxDetector

    detector = detector if detector is not None else OnnxDetector(path, threads=threads)
    for key, value in (model_overrides or {}).items():
        if key not in ("test_short_side", "test_long_side"):
            raise DatasetError(
                f"--engine onnxruntime: {key} is fixed in the exported graph; only the test sides can change"
            )
        detector.preprocess_settings[key] = int(value)
    eps = epsilon if epsilon is not None else detector.polygon_epsilon
    return detector, None, eps, "fp32"


def write_outputs(items: list[ImageItem], out: Path, txt_lines, art_entries) -> dict:
    """Assemble results.json, submission.json, images.json and txt/ from the per-image files. An ArT
    submission keys images by the last ``_`` token of their names; when two names share a key it cannot
    hold both, so it is not written (``submission`` is None and ``submission_skipped`` says why)."""
    from i3cl_core.infer.export import art_key  # deferred: i3cl --help imports this module (for ENGINES)

    clash = art_key_clashes(items)  # output-name clashes were refused by infer_images before any work
    results, submission, images = [], {}, []
    for item in items:
        f = out / "per_image" / f"{item.key}.json"
        if not f.exists():
            continue
        rec = json.loads(f.read_text())
        results.extend(rec["results"])
        submission[art_key(item.file_name)] = art_entries(rec["results"])
        images.append(
            {
                "id": rec["image_id"],
                "file_name": rec["file_name"],
                "width": rec["width"],
                "height": rec["height"],
            }
        )
        atomic_write_text(out / "txt" / f"{item.stem}.txt", txt_lines(rec["results"]))
    atomic_write_json(out / "results.json", results)
    summary = {"detections": len(results), "results": str(out / "results.json"), "submission": None}
    if clash:
        summary["submission_skipped"] = (
            f"{clash[0]} and {clash[1]} have the same ArT key {art_key(clash[0])}; "
            "submission.json not written (results.json and txt/ hold every image)"
        )
        log.warning("%s: %s", out, summary["submission_skipped"])
        (out / "submission.json").unlink(missing_ok=True)  # never a stale one from an earlier run
    else:
        atomic_write_json(out / "submission.json", submission)
        summary["submission"] = str(out / "submission.json")
    atomic_write_json(
        out / "images.json", {"images": images, "annotations": [], "categories": [{"id": 1, "name": "text"}]}
    )
    return summary
