"""What the Prefect UI shows besides logs: markdown artifacts with embedded pictures (training curves, the
pseudo-label report, the run summary) and table artifacts, each kept under a size the UI renders whole."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from i3cl_core.pipeline.run_summary import write_summary
from i3cl_core.pipeline.variants import compare
from i3cl_core.pipeline.workdir import FUSION_REPORT, WorkDir
from i3cl_core.pseudo.report import training_curve_png


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


ARTIFACT_BUDGET = 450_000  # bytes of markdown per artifact (pictures included): the UI renders it whole


def _image_uri(path: str | Path, max_side: int = 560, quality: int = 80) -> str:
    """A compact JPEG thumbnail of ``path`` as a data URI (charts and sample pictures alike)."""
    from PIL import Image  # deferred: Pillow loads only when a thumbnail is made

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def markdown_with_images(
    title: str,
    blocks: list[tuple[str, list[tuple[str, str | Path]]]],
    intro: str = "",
    budget: int = ARTIFACT_BUDGET,
) -> str:
    """CommonMark for an artifact: ``# title``, ``intro``, then per block ``## heading`` and its pictures
    (alt text, file), every block separated by a blank line; thumbnails shrink until the whole text fits
    ``budget`` bytes."""
    for max_side, quality in ((560, 80), (420, 70), (320, 60), (240, 50)):
        parts = [f"# {title}"] + ([intro] if intro else [])
        for heading, images in blocks:
            parts.append(f"## {heading}")
            parts += [
                f"![{alt}]({_image_uri(p, max_side, quality)})" for alt, p in images if Path(p).exists()
            ]
        text = "\n\n".join(parts) + "\n"
        if len(text.encode()) <= budget:
            return text
    return text


def training_curve_artifact(name: str, out: Path, when: str) -> None:
    """The training's loss and learning-rate curve as a markdown artifact (one version per epoch)."""
    try:
        png = training_curve_png(out / "metrics.jsonl", out / "train_curve.png", f"{name} ({when})")
    except Exception as e:  # a figure must never stop a training
        get_run_logger().warning("training curve of %s not drawn: %s", name, e)
        return
    if png is not None:
        create_markdown_artifact(
            markdown_with_images(f"Training {name}", [(when, [("loss and learning rate", png)])]),
            key=f"training-curve-{slug(name)}",
            description=f"training curve of {name} ({when})",
        )


def pseudo_label_artifacts(variant_dir: Path, summary: dict, ssl_round: int = 1) -> None:
    report = json.loads((variant_dir / FUSION_REPORT).read_text())
    rows = [
        {"stat": k, "value": summary[k]}
        for k in ("images", "models", "pseudo_labels", "dontcare", "images_with_labels")
    ]
    quality = report.get("quality")
    if quality:
        rows += [
            {
                "stat": f"{r['source']} P/R/F",
                "value": f"{r['precision']:.3f} / {r['recall']:.3f} / {r['hmean']:.3f}",
            }
            for r in quality["table"]
        ]
    selection = summary.get("keep_thr_selection") or report.get("keep_thr_selection") or {}
    rows.append(
        {
            "stat": "keep_thr",
            "value": f"{selection.get('keep_thr')} (chosen on {selection['chosen_on']})"
            if selection.get("chosen_on")
            else f"{selection.get('keep_thr')} (as given)",
        }
    )
    suffix = "" if ssl_round == 1 else f"-r{ssl_round}"
    create_table_artifact(
        rows, key=f"pseudo-label-stats{suffix}", description="pseudo labels (and quality vs the hidden GT)"
    )
    headings = {
        "pr_curve": "Precision / recall / F of the fused labels over the score threshold",
        "scores": "Fused scores",
        "votes": "Votes per pseudo label",
        "weights": "Loss weights",
    }
    blocks = [(headings.get(name, name), [(name, p)]) for name, p in report["figures"].items()]
    blocks.append(("Samples", [(f"sample {k + 1}", p) for k, p in enumerate(report.get("samples", [])[:3])]))
    intro = (
        f"{summary['pseudo_labels']} pseudo labels, {summary['dontcare']} do-not-care regions on "
        f"{summary['images']} images from {summary['models']} models."
    )
    create_markdown_artifact(
        markdown_with_images("Pseudo labels", blocks, intro),
        key=f"pseudo-labels{suffix}",
        description="histograms, PR curve and samples",
    )


def pseudo_variants_artifact(wd: Path, pseudo_dir: Path, ssl_round: int) -> None:
    """A table of every fused variant of one round's pseudo labels and the models trained on each."""
    rows = [
        {
            "variant": r["variant"] + (" (current)" if r["current"] else ""),
            "keep_thr": r["keep_thr"],
            "min_votes": r["fuse"].get("min_votes"),
            "conf_type": r["fuse"].get("conf_type"),
            "iou_thr": r["fuse"].get("iou_thr"),
            "pseudo_labels": r["pseudo_labels"],
            "F_vs_hidden_GT": (r["quality"] or {}).get("hmean"),
            "models": ", ".join(m for m, _ in r["models"]) or "-",
        }
        for r in compare(wd)
        if r["stage"] == str(pseudo_dir.relative_to(wd))
    ]
    create_table_artifact(
        rows,
        key="pseudo-variants" + ("" if ssl_round == 1 else f"-r{ssl_round}"),
        description="every fused variant of this work dir's pseudo labels and the models trained on each",
    )


def summary_artifact(wd: Path, summary: dict) -> None:
    """summary.md with its figures, and the same as the parent run's markdown artifact."""
    written = write_summary(wd, summary, json.loads(WorkDir(wd).data_file.read_text()))
    text = markdown_with_images("SSL pipeline summary", written["blocks"], written["text_head"].strip())
    create_markdown_artifact(text, key="ssl-pipeline-summary", description="final table, figures and samples")
    print(f"run summary: {written['md']}")
