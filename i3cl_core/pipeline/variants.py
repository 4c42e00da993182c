"""Stage outputs kept per variant, and what every model was made from.

Fusion (the step researchers re-run most) writes each variant of its pseudo labels into its own folder,
``pseudo/<key>/`` (``train_lossweight.json``, ``report.json``, ``report.md``, figures), where ``key`` is a
short fingerprint of its inputs and parameters; ``pseudo/current.json`` (written atomically) names the
variant the next stage uses. Re-fusing with new parameters adds a variant and moves ``current``;
re-fusing with earlier parameters finds that variant again. Nothing is overwritten.

Trained students and controls are kept the same way: ``student/<name>/<key>/`` (and
``control/<name>/<key>/``), ``key`` a fingerprint of what the training starts from (the pseudo-label
variant, the model spec and overrides, the start checkpoint), with ``student/<name>/current.json``
naming the one downstream stages use (:func:`i3cl_core.pipeline.workdir.current_model_dir`). Re-training after
a re-fusion adds a folder; the earlier student, its lineage and its test score stay.

A work dir made before variants existed (``pseudo/train_lossweight.json``, ``student/<name>/checkpoints``
directly) keeps loading: its files are read as a variant named ``legacy``.

``lineage.json`` next to a trained model records what it was made from (data files and their
fingerprints, the start checkpoint, the pseudo-label variant and its fusion parameters, the config,
the code version, the flow run). ``compare`` and ``gc`` back ``i3cl runs compare`` / ``i3cl runs gc``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

from i3cl_core import __version__
from i3cl_core.pipeline.workdir import CURRENT, FUSION_REPORT, PSEUDO_LABELS, TEST_EVAL, WorkDir
from i3cl_core.utils import atomic_write_json, fingerprint

LEGACY = "legacy"


def variant_key(**inputs) -> str:
    """12 hex digits of SHA-1 over the JSON of ``inputs`` (sorted keys)."""
    return hashlib.sha1(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:12]


def variant_dir(stage_dir: Path, key: str) -> Path:
    return Path(stage_dir) / key


def set_current(stage_dir: Path, key: str, info: dict) -> Path:
    """Point ``stage_dir/current.json`` at variant ``key`` (atomic); ``info`` describes it."""
    return atomic_write_json(
        Path(stage_dir) / CURRENT,
        {"variant": key, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), **info},
        indent=2,
    )


def current_variant(stage_dir: Path) -> str | None:
    stage_dir = Path(stage_dir)
    f = stage_dir / CURRENT
    if f.exists():
        return json.loads(f.read_text())["variant"]
    if (stage_dir / PSEUDO_LABELS).exists():
        return LEGACY
    return None


def pseudo_file(stage_dir: Path, variant: str | None = None) -> Path | None:
    """The pseudo labels of ``variant`` (default: the current one), or None when there are none."""
    stage_dir = Path(stage_dir)
    variant = variant or current_variant(stage_dir)
    if variant is None:
        return None
    path = stage_dir / PSEUDO_LABELS if variant == LEGACY else stage_dir / variant / PSEUDO_LABELS
    return path if path.exists() else None


def variants(stage_dir: Path) -> list[dict]:
    """Every variant of a pseudo-label folder, oldest first: key, path, parameters, counts, quality."""
    stage_dir = Path(stage_dir)
    out = []
    if (stage_dir / PSEUDO_LABELS).exists():
        out.append(_describe(stage_dir, LEGACY, stage_dir))
    for d in (
        sorted(
            (p for p in stage_dir.iterdir() if p.is_dir() and (p / PSEUDO_LABELS).exists()),
            key=lambda p: (p / PSEUDO_LABELS).stat().st_mtime,
        )
        if stage_dir.exists()
        else []
    ):
        out.append(_describe(stage_dir, d.name, d))
    current = current_variant(stage_dir)
    for v in out:
        v["current"] = v["variant"] == current
    return out


def _describe(stage_dir: Path, key: str, folder: Path) -> dict:
    report = json.loads((folder / FUSION_REPORT).read_text()) if (folder / FUSION_REPORT).exists() else {}
    params = report.get("fuse") or {}
    if not params:
        info = json.loads((folder / PSEUDO_LABELS).read_text()).get("info", {})
        params = info.get("fuse", {})
    quality = (report.get("quality") or {}).get("fused")
    return {
        "variant": key,
        "path": str(folder / PSEUDO_LABELS),
        "fuse": params,
        "pseudo_labels": report.get("pseudo_labels"),
        "dontcare": report.get("dontcare"),
        "keep_thr": (report.get("keep_thr_selection") or {}).get("keep_thr", params.get("keep_thr")),
        "quality": quality,
    }


# ------------------------------------------------------------------ lineage
def code_version() -> dict:
    commit = None
    try:
        repo = Path(__file__).resolve().parents[1]
        res = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if res.returncode == 0:
            commit = res.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"package": __version__, "git_commit": commit}


def write_lineage(
    model_dir: Path,
    *,
    data_sets: list[dict],
    load_from: str | None,
    config: str,
    pseudo: dict | None = None,
    flow_run_id: str | None = None,
) -> Path:
    """``model_dir/lineage.json``: what this model was made from."""
    sets = [{**s, "fingerprint": fingerprint(s["ann_file"])} for s in data_sets]
    record = {
        "data": sets,
        "load_from": load_from,
        "load_from_fingerprint": fingerprint(load_from) if load_from else None,
        "config": config,
        "pseudo": pseudo,
        "code": code_version(),
        "flow_run_id": flow_run_id,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return atomic_write_json(Path(model_dir) / "lineage.json", record, indent=2)


def _lineages(work_dir: Path) -> list[tuple[Path, dict]]:
    return [
        (f.parent, json.loads(f.read_text()))
        for f in sorted(Path(work_dir).rglob("lineage.json"))
        if ".prefect-results" not in f.parts
    ]


def _pseudo_dirs(work_dir: Path) -> list[Path]:
    return [d for d in WorkDir(work_dir).pseudo_dirs() if d.exists()]


def compare(work_dir: Path) -> list[dict]:
    """One row per pseudo-label variant (every round): parameters, counts, quality, the models trained on
    it and their F on the test split (from eval/)."""
    wd = Path(work_dir)
    lineages = _lineages(wd)
    scores = {}
    files = (
        sorted(f for f in WorkDir(wd).eval_dir.glob("*.json") if not f.name.endswith(".val.json"))
        if WorkDir(wd).eval_dir.exists()
        else []
    )  # <model>.val.json: the validation split, where thresholds are chosen
    files += [d / TEST_EVAL for d, _ in lineages if (d / TEST_EVAL).exists()]  # every variant's own
    for f in files:
        try:
            r = json.loads(f.read_text())
            scores[str(Path(r["checkpoint"]).parents[1])] = r["hmean"]
        except (KeyError, ValueError, IndexError):
            continue
    rows = []
    for stage in _pseudo_dirs(wd):
        for v in variants(stage):
            users = [
                (str(d.relative_to(wd)), scores.get(str(d)))
                for d, lin in lineages
                if (lin.get("pseudo") or {}).get("path") == v["path"]
            ]
            rows.append({"stage": str(stage.relative_to(wd)), **v, "models": users})
    return rows


def gc(work_dir: Path, keep: int, dry_run: bool = False) -> list[Path]:
    """Remove pseudo-label variants beyond the ``keep`` most recent of each stage folder that neither
    ``current`` nor any model's lineage needs; returns what was (or would be) removed."""
    wd = Path(work_dir)
    needed = {(lin.get("pseudo") or {}).get("path") for _, lin in _lineages(wd)}
    removed = []
    for stage in _pseudo_dirs(wd):
        vs = variants(stage)
        for v in vs[:-keep] if keep > 0 else vs:
            if v["current"] or v["path"] in needed or v["variant"] == LEGACY:
                continue
            folder = Path(v["path"]).parent
            removed.append(folder)
            if not dry_run:
                shutil.rmtree(folder)
    return removed
