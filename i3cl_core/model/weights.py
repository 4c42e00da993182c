"""Weights from other origins, read from local paths only: pretrained backbones, the original release's
checkpoints, self-supervised encoders (``torch.load(weights_only=True)``, wrapper prefixes removed, the
sub-dict that matches a module chosen). The project's own checkpoints are
:mod:`i3cl_core.model.checkpoint`."""

from __future__ import annotations

import os

import torch
from torch import nn

from i3cl_core.model.errors import CheckpointError, unreadable_checkpoint
from i3cl_core.utils import get_logger

log = get_logger("model")


def read_state_dict(path: str, what: str = "weights") -> dict[str, torch.Tensor]:
    """Load a tensor dict from ``path`` with ``weights_only=True``; unwrap common nesting."""

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: {what} file not found (weights are only read from local paths)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with code objects, not a torch file ...
        raise unreadable_checkpoint(path, what, e) from None
    for key in ("state_dict", "model", "model_state", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and obj[key]:
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: {what} file does not hold a state dict of tensors")
    return obj


def strip_prefixes(state: dict[str, torch.Tensor], prefixes=("module.", "backbone.", "encoder.", "model.")):
    """Drop wrapper prefixes (DDP ``module.``, ``backbone.``, ...) shared by the keys."""
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if state and all(k.startswith(p) for k in state):
                state = {k[len(p) :]: v for k, v in state.items()}
                changed = True
    return state


# prefixes of the parts of self-supervised checkpoints that are *not* the encoder to use (MoCo's key
# encoder, BYOL's target network, EMA teachers): chosen only when nothing else matches as well
_SECONDARY_ENCODERS = ("encoder_k", "key_encoder", "momentum", "target", "teacher", "ema")


def select_prefix(state: dict[str, torch.Tensor], own_keys) -> tuple[dict[str, torch.Tensor], str]:
    """The sub-dict of ``state`` whose keys, with one common prefix removed, match ``own_keys`` best,
    and that prefix. Handles ``module.``, ``backbone.``, MoCo's ``module.encoder_q.`` (next to
    ``encoder_k.``, ``queue``) and the like; a plain state dict comes back unchanged with prefix ''."""
    own = set(own_keys)
    counts: dict[str, int] = {}
    for k in state:
        parts = k.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in own:
                prefix = ".".join(parts[:i]) + "." if i else ""
                counts[prefix] = counts.get(prefix, 0) + 1
    if not counts:
        return state, ""

    def rank(p: str):
        secondary = any(s in p.lower() for s in _SECONDARY_ENCODERS)
        return (counts[p], not secondary, -len(p))

    best = max(counts, key=rank)
    if not best:
        return state, ""
    return {k[len(best) :]: v for k, v in state.items() if k.startswith(best)}, best


def load_pretrained(
    module: nn.Module, path: str, prefix_hint: str | None = None
) -> tuple[list[str], list[str]]:
    """Non-strict load of local pretrained weights; logs and returns (missing, unexpected) keys."""
    state = read_state_dict(path, "pretrained weights")
    if prefix_hint:
        nested = {k[len(prefix_hint) :]: v for k, v in state.items() if k.startswith(prefix_hint)}
        if nested:
            state = nested
    state = strip_prefixes(state)
    own = module.state_dict()
    shape_mismatch = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if k not in shape_mismatch}
    result = module.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys) + shape_mismatch
    log.info(
        "loaded %s: %d tensors, %d missing, %d unexpected/skipped%s",
        path,
        len(state) - len(result.unexpected_keys),
        len(missing),
        len(unexpected),
        f" (e.g. missing {missing[:3]}, skipped {unexpected[:3]})" if missing or unexpected else "",
    )
    if len(state) == len(result.unexpected_keys):
        raise CheckpointError(f"{path}: none of its keys match the backbone (first keys: {list(state)[:3]})")
    return missing, unexpected
