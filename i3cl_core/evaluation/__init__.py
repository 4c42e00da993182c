"""Scene-text detection evaluation: ArT / CTW1500 / ICDAR2015 (RRC-style IoU) and Total-Text (DetEval).

Public API (imported lazily so that ``i3cl --help`` stays fast)::

    from i3cl_core.evaluation import load_ground_truth, load_predictions, evaluate, sweep, evaluate_polygons
    gt = load_ground_truth("val.json")           # COCO dataset json or ArT-native json
    preds = load_predictions("results.json", gt)  # COCO results list or ArT submission json
    evaluate(gt, preds, protocol="art")          # {'precision', 'recall', 'hmean', counts...}
    sweep(gt, preds, protocol="totaltext")       # one dict per score threshold, best marked
    evaluate_polygons({img: [(poly, dontcare)]}, {img: [(poly, score)]}, protocol="ctw1500")

See ``docs/evaluation.md`` for the protocol definitions and deviations from the public scripts.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_ground_truth": "io",
    "load_predictions": "io",
    "GroundTruth": "io",
    "Predictions": "io",
    "GtImage": "io",
    "art_token": "io",
    "evaluate": "core",
    "sweep": "core",
    "prepare": "core",
    "evaluate_polygons": "core",
    "prepare_polygons": "core",
    "PreparedEval": "core",
    "PROTOCOLS": "protocols",
    "DEFAULT_SWEEP": "core",
    "coco_map": "coco",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
