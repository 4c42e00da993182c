"""The run summary of an ssl-pipeline work dir: ``summary.md`` and its figures under ``summary_figures/``.

It holds the final table (every model on the test split, the SSL gain over the control, the pseudo
labels' quality against the best teacher), a bar chart of F per model, each training's curve, the
pseudo labels' P/R/F curve, and three unlabeled images where each teacher's detections, the fused
pseudo labels and (when given) the hidden ground truth are drawn side by side. The pipeline publishes
the same text and pictures as the parent run's markdown artifact.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from i3cl_core.data.errors import DatasetError
from i3cl_core.data.image_io import read_image
from i3cl_core.pipeline.results import gate_text
from i3cl_core.pipeline.variants import pseudo_file as current_pseudo
from i3cl_core.pipeline.workdir import FUSION_REPORT, WorkDir, model_runs
from i3cl_core.pseudo.report import f_per_model_png, side_by_side_png, training_curve_png
from i3cl_core.utils import atomic_write_text, safe_join

COLOURS = ["#1f77b4", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def _table(summary: dict) -> list[str]:
    scores = summary.get("scores") or {}
    lines = ["| model | P | R | F |", "|---|---|---|---|"]
    for name, s in scores.items():
        lines.append(f"| {name} | {s['precision']:.4f} | {s['recall']:.4f} | {s['hmean']:.4f} |")
    return lines


def _claims(summary: dict) -> list[str]:
    scores = summary.get("scores") or {}
    out = []
    student = next((v for k, v in scores.items() if k.startswith("student:")), None)
    control = next((v for k, v in scores.items() if k.startswith("control:")), None)
    if student and control:
        out.append(
            "* SSL gain (student - control, same start and iterations): "
            f"**{student['hmean'] - control['hmean']:+.4f} F**"
        )
    pq, bt = summary.get("pseudo_quality"), summary.get("best_teacher_on_unlabeled")
    if pq and bt:
        out.append(
            f"* pseudo labels F {pq['hmean']:.4f} vs the best teacher on the unlabeled images ({bt['name']}, "
            f"threshold {bt['thr']}) F {bt['hmean']:.4f}: **{pq['hmean'] - bt['hmean']:+.4f}**"
        )
    if summary.get("keep_thr") is not None:
        out.append(f"* keep_thr {summary['keep_thr']}, {summary.get('pseudo_labels')} pseudo labels")
    gate = gate_text(summary.get("validation_gate"))
    if gate:
        out += [f"* {line}" for line in gate.splitlines()]
    return out


def _predictions_by_image(folder: Path, ids: set, thr: float) -> dict:
    out: dict = {}
    for f in sorted(Path(folder).glob("shard_*.json")):
        for r in json.loads(f.read_text()):
            if r["image_id"] in ids and r.get("score", 1.0) >= thr:
                out.setdefault(r["image_id"], []).append(np.asarray(r["segmentation"][0]).reshape(-1, 2))
    return out


def sample_panels(wd: Path, data: dict, figs: Path, n: int = 3) -> list[Path]:
    """``n`` unlabeled images (those with the most pseudo labels), teachers / fused / GT side by side."""
    layout = WorkDir(wd)
    pseudo_file = current_pseudo(layout.pseudo_dir())
    if pseudo_file is None:
        return []
    pseudo = json.loads(pseudo_file.read_text())
    by_image: dict = {}
    for a in pseudo["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    chosen = sorted(by_image, key=lambda i: (-sum(1 for a in by_image[i] if not a["iscrowd"]), i))[:n]
    names = {im["id"]: im["file_name"] for im in pseudo["images"]}
    report_file = pseudo_file.parent / FUSION_REPORT
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    thr = {
        Path(m["source"]).name: m["best_threshold"] for m in (report.get("quality") or {}).get("models", [])
    }
    predictions = layout.predictions()
    teachers = sorted(p.name for p in predictions.iterdir() if p.is_dir()) if predictions.exists() else []
    preds = {t: _predictions_by_image(predictions / t, set(chosen), thr.get(t, 0.5)) for t in teachers}
    gt = {}
    if data.get("unlabeled_gt") and Path(data["unlabeled_gt"]).exists():
        g = json.loads(Path(data["unlabeled_gt"]).read_text())
        for a in g["annotations"]:
            if a["image_id"] in chosen:
                pts = np.asarray(a["segmentation"][0]).reshape(-1, 2)
                gt.setdefault(a["image_id"], []).append((pts, "dashed") if a.get("iscrowd") else pts)
    paths = []
    for image_id in chosen:
        try:
            img = read_image(safe_join(data["unlabeled_root"], names[image_id]))
        except (ValueError, DatasetError):
            continue
        panels = [
            (f"{t} (score >= {thr.get(t, 0.5)})", preds[t].get(image_id, []), COLOURS[k % len(COLOURS)])
            for k, t in enumerate(teachers)
        ]
        fused = [
            np.asarray(a["segmentation"][0]).reshape(-1, 2)
            if not a["iscrowd"]
            else (np.asarray(a["segmentation"][0]).reshape(-1, 2), "dashed")
            for a in by_image[image_id]
        ]
        panels.append(("fused pseudo labels", fused, "#2ca02c"))
        if gt:
            panels.append(("hidden ground truth", gt.get(image_id, []), "#d62728"))
        paths.append(side_by_side_png(img, panels, figs / f"sample_{image_id}.png", title=names[image_id]))
    return paths


def write_summary(wd: Path, summary: dict, data: dict) -> dict:
    """Write ``summary.md`` and its figures; returns ``{"md": path, "blocks": [(heading, [(alt, png)])]}``
    (the blocks are what the pipeline's artifact shows)."""
    wd = Path(wd)
    layout = WorkDir(wd)
    figs = layout.summary_figures
    blocks = []
    if summary.get("scores"):
        bar = f_per_model_png(summary["scores"], figs / "f_per_model.png")
        blocks.append(("F per model on the test split", [("F per model", bar)]))
    current = current_pseudo(layout.pseudo_dir())
    report = current.parent / FUSION_REPORT if current else layout.pseudo_dir() / FUSION_REPORT
    if report.exists():
        pr = json.loads(report.read_text()).get("figures", {}).get("pr_curve")
        if pr and Path(pr).exists():
            blocks.append(("Pseudo labels over the score threshold", [("PR curve", Path(pr))]))
    curves = []
    for _, folder in layout.model_folders():
        where = folder.relative_to(wd).as_posix()  # teachers, control, student, rounds/r2/student
        for name, run in model_runs(folder):
            if (run / "metrics.jsonl").exists():
                png = training_curve_png(
                    run / "metrics.jsonl",
                    figs / f"train_{where.replace('/', '_')}_{name}.png",
                    f"{where}/{name}",
                )
                if png:
                    curves.append((f"{where}/{name}", png))
    if curves:
        blocks.append(("Training curves", curves))
    samples = sample_panels(wd, data, figs)
    if samples:
        blocks.append(
            (
                "Samples: each teacher, the fused pseudo labels, the hidden ground truth",
                [(p.stem, p) for p in samples],
            )
        )
    lines = ["# SSL pipeline summary", "", *_table(summary), "", *_claims(summary)]
    root = wd.resolve()
    for heading, images in blocks:
        lines += ["", f"## {heading}", ""]
        lines += [
            f"![{alt}]"
            f"({Path(p).resolve().relative_to(root) if Path(p).resolve().is_relative_to(root) else p})"
            for alt, p in images
        ]
    md = atomic_write_text(layout.summary_md, "\n".join(lines) + "\n")
    return {
        "md": str(md),
        "text_head": "\n".join(["", *_table(summary), "", *_claims(summary)]),
        "blocks": blocks,
    }
