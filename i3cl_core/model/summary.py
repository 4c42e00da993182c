"""Parameters per part of a model and its output strides (``i3cl model-summary``)."""

from __future__ import annotations


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


def config_summary(cfg) -> dict:
    """:func:`summarize` of the model of ``cfg`` (an I3CLConfig; built without pretrained weights), plus
    ``backbone``: the backbone's name."""
    from i3cl_core.model.detector import build_model  # deferred: pulls torch, needed only to build

    cfg.model.backbone.weights = None  # counting needs no weights
    info = summarize(build_model(cfg))
    info["backbone"] = cfg.model.backbone.name
    return info
