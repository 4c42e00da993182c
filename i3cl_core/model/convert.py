"""A checkpoint of the original mmdetection-based I3CL release, imported as an i3cl checkpoint
(``i3cl convert-checkpoint ORIGINAL.pth OUT.pth [--config CONFIG] [--set ...]``).

The original's parameter names are mapped to ours (table below), the 63-class heads are cut down to
our classes, and the result is loaded strictly into ``build_model(cfg)`` and written as an
i3cl checkpoint. Every key of the original is either mapped or deliberately dropped; anything else
is listed and makes the command fail.

=========================================================  ===================================================
original (mmdetection)                                      ours
=========================================================  ===================================================
backbone.*                                                  backbone.* (torchvision / ViTAEv2 names,
                                                            unchanged)
neck.lateral_convs.{i}.conv.*                               neck.fpn.inner_blocks.{i}.0.*
neck.fpn_convs.{i}.conv.*                                   neck.fpn.layer_blocks.{i}.0.*
intra_cl_module.{l}.conv1x1_reduce_channel.*                intra_cl.{l}.reduce.*
intra_cl_module.{l}.{c,v,q}_layer_{kxk,kx1,1xk}.*           intra_cl.{l}.stages.{7:0,5:1,3:2}
                                                              .{square,vertical,horizontal}.*
intra_cl_module.{l}.conv1x1_return_channel.*                intra_cl.{l}.expand.*
intra_cl_module.{l}.bn.*                                    intra_cl.{l}.bn.*
rpn_head.rpn_conv.* / rpn_cls.* / rpn_reg.*                 rpn.head.conv.0.0.* / cls_logits.* / bbox_pred.*
roi_head.bbox_head.shared_fcs.{0,1}.*                       roi_heads.box_head.fc6.* / fc7.*
roi_head.bbox_head.fc_cls.* (C+1 rows, background last)     roi_heads.box_head.cls_score.* rows [C, 0..K-1]
roi_head.bbox_head.fc_reg.* (4C rows, class-specific)       roi_heads.box_head.bbox_pred.* rows 0..4K-1
roi_head.mask_head.convs.{i}.conv.*                         roi_heads.mask_head.convs.{2i}.*
roi_head.mask_head.upsample.*                               roi_heads.mask_head.upsample.*
roi_head.mask_head.conv_logits.* (C channels)               roi_heads.mask_head.logits.* channels 0..K-1
roi_head.inter_cl_module.conv1x1_reduce_channel.*           roi_heads.inter_cl.to_tokens.*
roi_head.inter_cl_module.transformer_encoder_instance.*     roi_heads.inter_cl.transformer.*
roi_head.inter_cl_module.conv1x1_return_channel.*           roi_heads.inter_cl.from_tokens.*
roi_head.inter_cl_module.conv3x3_out.* / conv1x1_out.*      roi_heads.inter_cl.fuse_conv3.* / fuse_conv1.*
roi_head.inter_cl_module.bn.*                               roi_heads.inter_cl.bn.*
roi_head.inter_cl_module.global_context_extract_module      roi_heads.inter_cl.context.convs.{i}.weight
  .conv1x1_list.{i}.weight
=========================================================  ===================================================

C = the original's foreground classes (63: 'text' first, then 0-9, A-Z, a-z), K = ours (1: text).
Dropped on purpose: buffers we recompute (``relative_position_index``, ``attn_mask``).

The config decides which modules exist: IntraCL/InterCL tensors of the original are dropped when
the config switches the module off, and a module the config switches on but the original lacks
(e.g. a mixtrain-stage checkpoint, modules off) keeps its fresh initialisation. Both are reported.
The release's GCG 1x1 convs had padding=1 (docs/model.md), which we fix to 0, so with InterCL on the
converted model's outputs are close to, but not bit-identical with, the original's.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

import numpy as np

from i3cl_core.model.errors import CheckpointError, pickled_code

if TYPE_CHECKING:  # torch is imported where it is used, so that `i3cl --help` stays fast
    import torch

# (pattern, replacement) on the original name, applied in order; the first match wins
_RENAMES: list[tuple[str, str]] = [
    (r"^backbone\.(.+)$", r"backbone.\1"),
    (r"^neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)$", r"neck.fpn.inner_blocks.\1.0.\2"),
    (r"^neck\.fpn_convs\.(\d+)\.conv\.(weight|bias)$", r"neck.fpn.layer_blocks.\1.0.\2"),
    (r"^intra_cl_module\.(\d+)\.conv1x1_reduce_channel\.(weight|bias)$", r"intra_cl.\1.reduce.\2"),
    (r"^intra_cl_module\.(\d+)\.conv1x1_return_channel\.(weight|bias)$", r"intra_cl.\1.expand.\2"),
    (r"^intra_cl_module\.(\d+)\.bn\.(.+)$", r"intra_cl.\1.bn.\2"),
    (r"^rpn_head\.rpn_conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1"),
    (r"^rpn_head\.rpn_cls\.(weight|bias)$", r"rpn.head.cls_logits.\1"),
    (r"^rpn_head\.rpn_reg\.(weight|bias)$", r"rpn.head.bbox_pred.\1"),
    (r"^roi_head\.bbox_head\.shared_fcs\.0\.(weight|bias)$", r"roi_heads.box_head.fc6.\1"),
    (r"^roi_head\.bbox_head\.shared_fcs\.1\.(weight|bias)$", r"roi_heads.box_head.fc7.\1"),
    (r"^roi_head\.bbox_head\.fc_cls\.(weight|bias)$", r"roi_heads.box_head.cls_score.\1"),
    (r"^roi_head\.bbox_head\.fc_reg\.(weight|bias)$", r"roi_heads.box_head.bbox_pred.\1"),
    (r"^roi_head\.mask_head\.upsample\.(weight|bias)$", r"roi_heads.mask_head.upsample.\1"),
    (r"^roi_head\.mask_head\.conv_logits\.(weight|bias)$", r"roi_heads.mask_head.logits.\1"),
    (
        r"^roi_head\.inter_cl_module\.conv1x1_reduce_channel\.(weight|bias)$",
        r"roi_heads.inter_cl.to_tokens.\1",
    ),
    (
        r"^roi_head\.inter_cl_module\.conv1x1_return_channel\.(weight|bias)$",
        r"roi_heads.inter_cl.from_tokens.\1",
    ),
    (
        r"^roi_head\.inter_cl_module\.transformer_encoder_instance\.(.+)$",
        r"roi_heads.inter_cl.transformer.\1",
    ),
    (r"^roi_head\.inter_cl_module\.conv3x3_out\.(weight|bias)$", r"roi_heads.inter_cl.fuse_conv3.\1"),
    (r"^roi_head\.inter_cl_module\.conv1x1_out\.(weight|bias)$", r"roi_heads.inter_cl.fuse_conv1.\1"),
    (r"^roi_head\.inter_cl_module\.bn\.(.+)$", r"roi_heads.inter_cl.bn.\1"),
    (
        r"^roi_head\.inter_cl_module\.global_context_extract_module\.conv1x1_list\.(\d+)\.weight$",
        r"roi_heads.inter_cl.context.convs.\1.weight",
    ),
]
_INTRA_BRANCH = re.compile(r"^intra_cl_module\.(\d+)\.([cvq])_layer_(\d)x(\d)\.(weight|bias)$")
_MASK_CONV = re.compile(r"^roi_head\.mask_head\.convs\.(\d+)\.conv\.(weight|bias)$")
_DROP = re.compile(r"(relative_position_index|attn_mask)$")
_STAGE_OF_KERNEL = {7: 0, 5: 1, 3: 2}
_BRANCH = {"c": "square", "v": "vertical", "q": "horizontal"}

GCG_NOTE = (
    "note: the release's GCG 1x1 convs had padding=1 (docs/model.md); ours have padding 0, so the converted "
    "model's InterCL context differs slightly and outputs are not bit-identical with the original"
)


def rename(key: str) -> str | None:
    """Our name for an original parameter name, or None when there is no counterpart."""
    m = _INTRA_BRANCH.match(key)
    if m:
        level, kind, kh, kw, what = m.groups()
        kh, kw = int(kh), int(kw)
        k = max(kh, kw)
        expected = {"c": (k, k), "v": (k, 1), "q": (1, k)}[kind]
        if (kh, kw) != expected or k not in _STAGE_OF_KERNEL:
            return None
        return f"intra_cl.{level}.stages.{_STAGE_OF_KERNEL[k]}.{_BRANCH[kind]}.{what}"
    m = _MASK_CONV.match(key)
    if m:
        return f"roi_heads.mask_head.convs.{2 * int(m.group(1))}.{m.group(2)}"
    for pattern, repl in _RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def _module_of(key: str) -> str | None:
    if key.startswith("intra_cl."):
        return "intra_cl"
    if key.startswith("roi_heads.inter_cl."):
        return "inter_cl"
    return None


def convert_state(
    original: dict[str, torch.Tensor], own: dict[str, torch.Tensor], path: str = "original"
) -> tuple[dict, dict]:
    """Map an original state dict onto ``own`` (the target model's state dict).

    Returns (state, report): ``state`` has exactly ``own``'s keys when everything worked; ``report``
    has ``mapped`` (count), ``dropped`` (deliberately, with reasons), ``unmatched`` (original keys
    with no counterpart), ``fresh`` (our keys the original lacks, by module), ``missing`` (other
    keys of ours the original lacks), ``shapes`` (shape mismatches) and ``classes`` (C, K).
    """
    report: dict = {
        "mapped": 0,
        "dropped": [],
        "unmatched": [],
        "fresh": {},
        "missing": [],
        "shapes": [],
        "notes": [],
    }
    cls_key, own_cls = "roi_head.bbox_head.fc_cls.weight", own.get("roi_heads.box_head.cls_score.weight")
    if cls_key not in original:
        raise CheckpointError(
            f"{path}: no {cls_key}: not a checkpoint of the original I3CL (mmdetection) release"
        )
    c_orig = original[cls_key].shape[0] - 1
    k_ours = own_cls.shape[0] - 1
    if k_ours > c_orig:
        raise CheckpointError(f"{path}: the original has {c_orig} classes, the config asks for {k_ours}")
    report["classes"] = (c_orig, k_ours)

    state: dict[str, torch.Tensor] = {}
    for key, value in original.items():
        if _DROP.search(key):
            report["dropped"].append(f"{key} (buffer we recompute)")
            continue
        new = rename(key)
        if new is None:
            report["unmatched"].append(key)
            continue
        if new not in own:
            module = _module_of(new)
            if module is not None:
                report["dropped"].append(f"{key} ({module} is off in the config)")
            else:
                report["unmatched"].append(f"{key} -> {new} (not in our model)")
            continue
        # the 63-class heads -> ours: background is last in mmdetection, first in ours
        if new.startswith("roi_heads.box_head.cls_score."):
            value = value[[c_orig, *range(k_ours)]]
        elif new.startswith("roi_heads.box_head.bbox_pred."):
            if value.shape[0] == 4 * c_orig:
                value = value[: 4 * k_ours]
        elif new.startswith("roi_heads.mask_head.logits."):
            if value.shape[0] == c_orig:
                value = value[:k_ours]
        if value.shape != own[new].shape:
            report["shapes"].append(f"{key} {tuple(value.shape)} -> {new} {tuple(own[new].shape)}")
            continue
        state[new] = value.clone()
        report["mapped"] += 1

    for key, value in own.items():
        if key in state:
            continue
        module = _module_of(key)
        if module is not None:  # the config switches on a module the original did not have
            report["fresh"].setdefault(module, 0)
            report["fresh"][module] += 1
            state[key] = value.clone()
        else:
            report["missing"].append(key)
    if c_orig != k_ours:
        report["notes"].append(
            f"classes: the original's {c_orig}-class heads were cut to {k_ours} (cls rows [{c_orig}, "
            f"{', '.join(map(str, range(k_ours)))}], reg rows 0-{4 * k_ours - 1}, "
            f"mask channels 0-{k_ours - 1})"
        )
    if "roi_heads.inter_cl.context.convs.0.weight" in state and "inter_cl" not in report["fresh"]:
        report["notes"].append(GCG_NOTE)
    return state, report


def read_original(path: str) -> dict[str, torch.Tensor]:
    """The tensor dict of an original checkpoint (``{'meta', 'state_dict', 'optimizer'}`` or a bare
    state dict), loaded with ``weights_only=True`` (numpy scalars in ``meta`` are allowed)."""
    import torch  # deferred: only reading the original needs torch, the key mapping does not

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: original checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # mmcv's meta may hold numpy scalars; allow just those
        try:
            core = np._core if hasattr(np, "_core") else np.core
            scalar = core.multiarray.scalar
            dtypes = [type(np.dtype(t)) for t in ("int64", "int32", "float64", "float32", "bool")]
            with torch.serialization.safe_globals([scalar, np.dtype, *dtypes]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            text = str(first)
            if "unsupported global" in text.lower():  # a pickled object, not a corrupt file
                raise CheckpointError(
                    f"{path}: cannot read the original checkpoint: {pickled_code(text)} "
                    "Nothing in it was run. "
                    "Besides tensors only numpy scalars are accepted here (mmcv's meta). "
                    "If the file comes from a source you trust, re-save only its 'state_dict' of tensors "
                    "with the release's own environment on a trusted machine, then convert that file"
                ) from None
            msg = text.splitlines()[0][:200] if text else type(first).__name__
            raise CheckpointError(
                f"{path}: cannot read the original checkpoint: truncated, corrupt or not a torch file ({msg})"
            ) from None
    if isinstance(obj, dict) and obj.get("format") == "i3cl-checkpoint":
        raise CheckpointError(f"{path}: already an i3cl checkpoint; nothing to convert")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path}: does not hold a state dict of tensors (expected an mmdetection checkpoint "
            "with 'state_dict')"
        )
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def convert_checkpoint(original_path: str, out_path: str, cfg, echo=print) -> dict:
    """Convert ``original_path`` for the model of ``cfg`` (an I3CLConfig) and write ``out_path``."""
    # deferred: these pull torch and torchvision, as read_original's torch
    from i3cl_core.model.checkpoint import load_state_strict, save_checkpoint
    from i3cl_core.model.detector import build_model

    original = read_original(original_path)
    cfg.model.backbone.weights = None  # every weight comes from the original
    model = build_model(cfg)
    state, report = convert_state(original, model.state_dict(), original_path)
    c_orig, k_ours = report["classes"]
    echo(
        f"{original_path}: {len(original)} tensors, {c_orig} classes; mapped {report['mapped']}, "
        f"dropped {len(report['dropped'])}, unmatched {len(report['unmatched'])}"
    )
    by_reason: dict[str, list[str]] = {}
    for item in report["dropped"]:
        key, reason = item.split(" (", 1)
        by_reason.setdefault(reason.rstrip(")"), []).append(key)
    for reason, keys in by_reason.items():
        echo(
            f"  dropped {len(keys)} tensors ({reason}): "
            f"{', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
        )
    for module, n in report["fresh"].items():
        echo(
            f"  {module}: not in the original ({n} tensors): "
            "keeps its fresh initialisation (the config switches it on)"
        )
    for note in report["notes"]:
        echo(f"  {note}")
    problems = [
        (f"{len(report['unmatched'])} original keys with no counterpart", report["unmatched"]),
        (f"{len(report['shapes'])} with other shapes", report["shapes"]),
        (f"{len(report['missing'])} of our keys missing from the original", report["missing"]),
    ]
    problems = [(title, items) for title, items in problems if items]
    for title, items in problems:
        echo(f"  unmatched: {title}:")
        for item in items[:20]:
            echo(f"    {item}")
        if len(items) > 20:
            echo(f"    ... and {len(items) - 20} more")
    if problems:
        summary = "; ".join(f"{title} (e.g. {items[0]})" for title, items in problems)
        raise CheckpointError(
            f"{original_path}: does not fit the model of this config (backbone "
            f"{cfg.model.backbone.name}, intra_cl {cfg.model.intra_cl}, inter_cl {cfg.model.inter_cl}, "
            f"{k_ours} classes): {summary}"
        )
    load_state_strict(model, state, original_path)
    save_checkpoint(out_path, model, cfg, extra={"converted_from": str(original_path)})
    echo(
        f"wrote {out_path} (backbone {cfg.model.backbone.name}, "
        f"intra_cl {cfg.model.intra_cl}, inter_cl {cfg.model.inter_cl})"
    )
    return report
