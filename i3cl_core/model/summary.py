"""``i3cl model-summary CONFIG [--set ...] [--json]``: parameters per part and output strides."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (default: the paper's R50 I3CL)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def summarize(model) -> dict:
    def count(module, trainable=False):
        if module is None:
            return 0
        return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)

    inter = model.roi_heads.inter_cl
    parts = {
        "backbone": count(model.backbone),
        "neck": count(model.neck),
        "intra_cl": count(model.intra_cl),
        "rpn": count(model.rpn),
        "roi_heads": count(model.roi_heads) - count(inter),
        "inter_cl": count(inter),
    }
    parts["total"] = sum(parts.values())
    return {
        "parameters": parts,
        "trainable": count(model, trainable=True),
        "backbone_channels": list(model.backbone.out_channels),
        "backbone_strides": list(model.backbone.strides),
        "fpn_strides": [*model.backbone.strides, model.backbone.strides[-1] * 2],
        "fpn_channels": model.neck.out_channels,
    }


def run(args: argparse.Namespace) -> int:
    from i3cl_core.config import load_config
    from i3cl_core.model.detector import build_model

    cfg = load_config(args.config, args.overrides)
    cfg.model.backbone.weights = None  # counting needs no weights
    info = summarize(build_model(cfg))
    info["backbone"] = cfg.model.backbone.name
    if args.json:
        print(json.dumps(info))
        return 0
    print(
        f"backbone {info['backbone']}: channels {info['backbone_channels']}, strides {info['backbone_strides']}"
    )
    print(f"FPN: {info['fpn_channels']} channels, strides {info['fpn_strides']} (P2-P6)")
    width = max(map(len, info["parameters"]))
    for name, n in info["parameters"].items():
        print(f"  {name:<{width}}  {n:>12,}")
    print(f"  {'trainable':<{width}}  {info['trainable']:>12,}")
    return 0
