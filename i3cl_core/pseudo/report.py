"""Figures of the pseudo-label report and of the run summary (matplotlib, Agg backend, no display).

Every function writes one PNG and returns its path: histograms with labelled axes, the precision /
recall / F curve of the fused labels over the score threshold with the chosen ``keep_thr`` marked, the
pseudo labels' F per threshold against each teacher's best, a bar chart of F per model, and a
training curve (loss terms, learning rate) per model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib  # deferred: matplotlib loads only when a figure is drawn

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # deferred: only after the Agg backend is chosen

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)
    _plt().close(fig)
    return path


def histogram_png(
    values, bins, title: str, path: Path, xlabel: str | None = None, ylabel: str = "instances"
) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3))
    values = np.asarray(values, dtype=float)
    bins = np.asarray(bins, dtype=float)
    ax.hist(values, bins=bins, color="#4682b4", edgecolor="white")
    if len(bins) > 1 and np.allclose(bins - np.floor(bins), 0.5):  # bins centred on integers: integer ticks
        ax.set_xticks(np.arange(bins[0] + 0.5, bins[-1]))
    ax.set_title(f"{title} (n = {len(values)})")
    ax.set_xlabel(xlabel or title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def pr_curve_png(
    rows: list[dict], path: Path, keep_thr: float | None = None, teachers: list[dict] | None = None
) -> Path:
    """P, R and F of the fused clusters against the hidden ground truth over the score threshold; the
    chosen ``keep_thr`` as a vertical line; each teacher's best F as a horizontal dotted line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    t = [r["threshold"] for r in rows]
    for key, label, colour in (
        ("precision", "precision", "#1f5fbf"),
        ("recall", "recall", "#c83232"),
        ("hmean", "F (hmean)", "#1e961e"),
    ):
        ax.plot(t, [r[key] for r in rows], label=label, color=colour, lw=2)
    for tr in teachers or []:
        ax.axhline(tr["hmean"], ls=":", color="grey", lw=1)
        ax.text(
            0.01,
            tr["hmean"] + 0.005,
            f"{tr['name']}: best F {tr['hmean']:.3f}",
            ha="left",
            va="bottom",
            fontsize=7,
            color="dimgrey",
            transform=ax.get_yaxis_transform(),
        )
    if keep_thr is not None:
        ax.axvline(keep_thr, color="black", ls="--", lw=1)
        ax.text(keep_thr, 0.02, f" keep_thr {keep_thr:g}", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("fused score threshold")
    ax.set_ylabel("vs hidden ground truth")
    ax.set_title("Fused pseudo labels: precision / recall / F")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def f_per_model_png(scores: dict[str, dict], path: Path, title: str = "F per model (test split)") -> Path:
    """A bar per model (``{name: {"hmean", ...}}``), teachers / control / student coloured apart."""
    plt = _plt()
    names = list(scores)
    colours = [
        "#808080" if n.startswith("teacher") else "#e08a1e" if n.startswith("control") else "#1e7fbf"
        for n in names
    ]
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(names) + 1), 3.2))
    vals = [scores[n]["hmean"] for n in names]
    bars = ax.bar(range(len(names)), vals, color=colours)
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.3f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, min(1.0, max(vals + [0.1]) + 0.12))
    ax.set_ylabel("F (hmean)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def training_curve_png(metrics_jsonl: Path, path: Path, title: str) -> Path | None:
    """Loss terms and learning rate by iteration from a training's ``metrics.jsonl`` (None without
    iteration records)."""
    rows = []
    for line in Path(metrics_jsonl).read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "iter" in r and "loss" in r:
            rows.append(r)
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    it = [r["iter"] for r in rows]
    for key in sorted(k for k in rows[-1] if k.startswith("loss")):
        ax.plot(
            it,
            [r.get(key, np.nan) for r in rows],
            label=key.replace("loss_", ""),
            lw=1.5 if key == "loss" else 1,
        )
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(it, [r.get("lr", np.nan) for r in rows], color="black", ls="--", lw=1, label="lr")
    ax2.set_ylabel("learning rate")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="upper right")
    return _save(fig, path)


def side_by_side_png(
    image_rgb: np.ndarray, panels: list[tuple[str, list, str]], path: Path, title: str = ""
) -> Path:
    """One picture per panel (``(title, polygons, colour)``; a polygon is an (N, 2) array, or
    ``(array, "dashed")`` for a do-not-care region), side by side, with a legend."""
    # deferred: matplotlib loads only when a figure is drawn
    from matplotlib.lines import Line2D
    from matplotlib.patches import Polygon

    plt = _plt()
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.6))
    axes = np.atleast_1d(axes)
    handles = []
    for ax, (name, polys, colour) in zip(axes, panels):
        ax.imshow(image_rgb)
        for poly in polys:
            dashed = isinstance(poly, tuple)
            pts = np.asarray(poly[0] if dashed else poly, dtype=float).reshape(-1, 2)
            ax.add_patch(
                Polygon(
                    pts,
                    closed=True,
                    fill=False,
                    lw=1.2,
                    edgecolor="lightgrey" if dashed else colour,
                    ls="--" if dashed else "-",
                )
            )
        ax.set_title(f"{name} ({sum(1 for p in polys if not isinstance(p, tuple))})", fontsize=9)
        ax.axis("off")
        handles.append(Line2D([], [], color=colour, lw=2, label=name))
    handles.append(Line2D([], [], color="lightgrey", lw=2, ls="--", label="do-not-care"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(bottom=0.12)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    tmp.replace(path)
    plt.close(fig)
    return path
