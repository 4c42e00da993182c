"""``i3cl evaluate``: score predictions against ground truth.

Output: a table by default; with ``--json``, JSON Lines on stdout: one object per protocol (in the order
art, totaltext, ctw1500, icdar2015 for ``--protocol all``), then one ``{"protocol": "coco_map", ...}`` object
with ``--coco-map``. With ``--sweep`` a protocol's object is ``{"protocol", "best": {...}, "sweep": [...]}``.
``--out FILE`` also writes all objects as one JSON list.

Problems that make a score meaningless (no image shared by ground truth and predictions, predictions for
images the ground truth does not have, skipped GT polygons) are warnings on stderr in every output mode;
with ``--strict`` the first two exit with code 3 (after printing the scores).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from i3cl_core.data.errors import DatasetError
from i3cl_core.evaluation.protocols import PROTOCOLS
from i3cl_core.utils import atomic_write_json

PROTOCOL_CHOICES = (*PROTOCOLS, "all")
GT_FORMATS = "a COCO dataset json or an ArT json ({'gt_<n>': [...]})"
PRED_FORMATS = (
    "a COCO results json (a list), a COCO dataset json with scored annotations, or an ArT submission json "
    "({'res_<n>': [...]})"
)
EXIT_STRICT = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gt", required=True, help=f"ground truth: {GT_FORMATS}")
    parser.add_argument("--pred", required=True, help=f"predictions: {PRED_FORMATS}")
    parser.add_argument(
        "--protocol",
        default="art",
        choices=PROTOCOL_CHOICES,
        help="art/ctw1500/icdar2015: RRC-style IoU>0.5; totaltext: DetEval (default: art)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print JSON Lines (one object per protocol) instead of a table"
    )
    parser.add_argument(
        "--sweep", action="store_true", help="evaluate at score thresholds 0.05..0.95 (step 0.05)"
    )
    parser.add_argument(
        "--thresholds",
        type=str,
        default=None,
        help="comma-separated score thresholds for --sweep (default 0.05,0.10,...,0.95)",
    )
    parser.add_argument("--score-thr", type=float, default=None, help="drop predictions with score < T first")
    parser.add_argument(
        "--coco-map", action="store_true", help="also report COCO bbox/segm mAP (COCO GT only)"
    )
    parser.add_argument(
        "--match",
        default="greedy",
        choices=("greedy", "best_iou"),
        help="IoU protocols: RRC greedy (default) or greedy by descending IoU",
    )
    parser.add_argument(
        "--tr", type=float, default=0.7, help="DetEval recall (sigma) threshold (default 0.7)"
    )
    parser.add_argument(
        "--tp", type=float, default=0.6, help="DetEval precision (tau) threshold (default 0.6)"
    )
    parser.add_argument(
        "--deteval-mode",
        default="strict",
        choices=("strict", "official"),
        help="totaltext: strict (default: one detection must pass both tests in the one-to-one "
        "pass) or official (the rules of Total-Text's Deteval.py; docs/evaluation.md)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help=f"exit {EXIT_STRICT} when no image is shared by --gt and --pred or when predictions "
        "name images that are not in the ground truth",
    )
    parser.add_argument("--out", default=None, help="also write the results to this JSON file (a list)")


def _options(protocol: str, args) -> dict:
    if protocol == "totaltext":
        return {"tr": args.tr, "tp": args.tp, "deteval_mode": args.deteval_mode}
    return {"match": args.match}


def _parse_thresholds(text: str | None):
    if text is None:
        return None
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise DatasetError(f"--thresholds: expected comma-separated numbers, got {text!r}") from e


def run(args) -> int:
    # deferred: shapely; i3cl --help loads every command module
    from i3cl_core.evaluation.core import prepare
    from i3cl_core.evaluation.io import load_ground_truth, load_predictions

    for flag, path, formats in (("--gt", args.gt, GT_FORMATS), ("--pred", args.pred, PRED_FORMATS)):
        if Path(path).is_dir():
            raise DatasetError(f"{flag} {path}: is a folder; give a json file: {formats}")
    gt = load_ground_truth(args.gt)
    preds = load_predictions(args.pred, gt)
    prep = prepare(gt, preds)
    protocols = PROTOCOLS if args.protocol == "all" else (args.protocol,)
    thresholds = _parse_thresholds(args.thresholds)
    objects = []
    for p in protocols:
        opts = _options(p, args)
        if args.sweep:
            rows = prep.sweep(p, thresholds, **opts)
            best = next((r for r in rows if r.get("best")), None)
            objects.append({"protocol": p, "best": best, "sweep": rows})
        else:
            objects.append(prep.evaluate(p, args.score_thr, **opts))
    if args.coco_map:
        from i3cl_core.evaluation.coco import coco_map  # deferred: pycocotools, only for --coco-map

        objects.append(coco_map(gt, preds))
    if args.json:
        for obj in objects:
            print(json.dumps(obj, ensure_ascii=False))
    else:
        print(format_report(objects))
    serious = _warnings(objects, len(preds.by_image), sys.stderr)
    if gt.duplicate_file_names:
        shown = "; ".join(f"{name!r} has ids {a!r} and {b!r}" for name, a, b in gt.duplicate_file_names[:5])
        more = len(gt.duplicate_file_names) - 5
        print(
            f"warning: {args.gt}: {len(gt.duplicate_file_names)} image(s) listed twice under two ids ({shown}"
            f"{f'; {more} more' if more > 0 else ''}): their text is scored once per id (recall drops); "
            "remove the duplicate entries",
            file=sys.stderr,
        )
    if gt.num_outside_image:
        print(
            f"warning: {gt.num_outside_image} ground-truth polygons have points more than one image size "
            "outside their image (kept, as missed objects unless matched); check the coordinate scale",
            file=sys.stderr,
        )
    if preds.num_outside_image:
        print(
            f"warning: {preds.num_outside_image} predictions have points more than one image size outside "
            "their image (kept, as false positives unless they match); check the coordinate scale",
            file=sys.stderr,
        )
    if args.out:
        atomic_write_json(args.out, objects, indent=1)
    if serious and args.strict:
        print(f"--strict: exit {EXIT_STRICT}", file=sys.stderr)
        return EXIT_STRICT
    return 0


def _warnings(objects, num_known_images: int, stream) -> bool:
    """Print the warnings on ``stream``; True when the images of the two files do not correspond."""
    first = next((o.get("best") or o for o in objects if o.get("protocol") != "coco_map"), None)
    if not first:
        return False
    serious = False
    n_unknown = first.get("num_unknown_images", 0)
    if n_unknown and not num_known_images:
        print(
            f"warning: the ground truth and the predictions share no image: all {n_unknown} predicted images "
            f"are unknown to the ground truth (first ids: {first['unknown_image_ids']}); the scores are 0 by "
            "construction. Check that both files use the same ids (COCO image_id, or ArT gt_<n> / res_<n>).",
            file=stream,
        )
        serious = True
    elif n_unknown:
        print(
            f"warning: {first['num_unknown_predictions']} predictions for {n_unknown} images not "
            f"in the ground truth were ignored (first ids: {first['unknown_image_ids']})",
            file=stream,
        )
        serious = True
    if first.get("num_invalid_gt"):
        print(
            f"warning: {first['num_invalid_gt']} GT polygons with < 3 points, non-finite coordinates or zero "
            "area were skipped",
            file=stream,
        )
    return serious


def format_report(objects: list[dict]) -> str:
    lines = []
    head = (
        f"{'protocol':<10} {'thr':>5} {'P':>7} {'R':>7} {'H':>7} {'matched':>9} {'gt':>6} {'det':>6} "
        f"{'gt_dc':>6} {'det_dc':>6} {'invalid':>7} {'images':>6}"
    )
    for obj in objects:
        if obj.get("protocol") == "coco_map":
            lines.append("")
            lines.append(
                "COCO mAP  "
                + "  ".join(f"{k}={v:.4f}" for k, v in obj.items() if k.startswith(("bbox_", "segm_")))
            )
            continue
        rows = obj["sweep"] if "sweep" in obj else [obj]
        if "sweep" in obj or not lines or lines[-1].startswith("COCO"):
            if lines:
                lines.append("")
            lines.append(head)
        for r in rows:
            matched = r.get("num_matched", r.get("recall_credit"))
            matched_s = f"{matched:>9d}" if isinstance(matched, int) else f"{matched:>9.2f}"
            thr = "-" if r.get("score_thr") is None else f"{r['score_thr']:.2f}"
            mark = " *best" if r.get("best") else ""
            lines.append(
                f"{r['protocol']:<10} {thr:>5} {r['precision']:>7.4f} {r['recall']:>7.4f} {r['hmean']:>7.4f} "
                f"{matched_s} {r['num_gt_care']:>6d} {r['num_det_care']:>6d} {r['num_gt_dontcare']:>6d} "
                f"{r['num_det_dontcare']:>6d} {r['num_invalid_det']:>7d} {r['num_images']:>6d}{mark}"
            )
    return "\n".join(lines)
