"""Checkpoints: the model's state dict plus the config that built it.

Files are written atomically and read with ``torch.load(weights_only=True)``; a truncated, corrupt
or mismatched file gives a :class:`CheckpointError` that names the file and what is wrong.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import torch

from i3cl_core.config import build_config
from i3cl_core.model.errors import CheckpointError, unreadable_checkpoint
from i3cl_core.utils import atomic_write_bytes

FORMAT = "i3cl-checkpoint"
VERSION = 1


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, cfg, extra: dict | None = None) -> Path:
    """``cfg``: the full :class:`~i3cl_core.config.I3CLConfig` (stored as plain data)."""
    model = getattr(model, "module", model)  # unwrap DDP
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": cfg.model_dump(mode="json"),
    }
    if extra:
        payload.update(extra)
    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise unreadable_checkpoint(path, "checkpoint", e) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(
            f"{path}: not an i3cl checkpoint (expected a dict with format={FORMAT!r}, 'model' and "
            "'config'); original mmdetection checkpoints are imported with `i3cl convert-checkpoint`"
        )
    return ckpt


def config_from_checkpoint(ckpt: dict, path: str = "checkpoint"):
    try:
        return build_config(ckpt["config"], {})
    except Exception as e:
        raise CheckpointError(f"{path}: its stored config is not valid for this version: {e}") from None


# parameter names of earlier versions of this project -> current names
_RENAMED = (
    (
        re.compile(r"^(intra_cl\.\d+)\.norm\.(.+)$"),
        r"\1.bn.\2",
    ),  # IntraCL/InterCL BatchNorm: `norm` -> `bn` (the
    (re.compile(r"^(roi_heads\.inter_cl)\.norm\.(.+)$"), r"\1.bn.\2"),  # release's name) in November 2026
)


def upgrade_state(state: dict) -> dict:
    """Rename the keys of checkpoints written by earlier versions (see ``_RENAMED``); others unchanged."""
    out = {}
    for key, value in state.items():
        for pattern, new in _RENAMED:
            key = pattern.sub(new, key)
        out[key] = value
    return out


def load_state_strict(model: torch.nn.Module, state: dict, path: str) -> None:
    state = upgrade_state(state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:4])})")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes (e.g. {'; '.join(shapes[:3])})")
        raise CheckpointError(f"{path}: checkpoint does not match the model: " + ", ".join(parts))
    model.load_state_dict(state)


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", model_overrides: dict | None = None
):
    """(model in eval mode, I3CLConfig) from a checkpoint; ``model_overrides`` may change test-time
    settings (score_thr, nms_thr, ...), never the architecture."""
    # deferred: pulls torchvision; reading a checkpoint needs torch only
    from i3cl_core.model.detector import build_model

    ckpt = load_checkpoint(path)
    cfg = config_from_checkpoint(ckpt, str(path))
    if model_overrides:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update=model_overrides)})
    cfg.model.backbone.weights = None  # the checkpoint holds the weights
    model = build_model(cfg)
    load_state_strict(model, ckpt["model"], str(path))
    return model.to(device).eval(), cfg
