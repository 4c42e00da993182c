"""Backbones (C2-C5 at strides 4/8/16/32) and the FPN (P2-P6).

* torchvision ResNets (``resnet18/34/50/101``): the stem and the first ``frozen_stages`` stages are
  frozen; with ``norm_eval`` every BatchNorm keeps its running statistics frozen while its affine
  parameters stay trainable (mmdetection's ``norm_eval=True``, unlike torchvision's FrozenBN).
* any timm model with ``features_only`` (``timm:resnest101e``, ``timm:resnext101_32x8d``, ...).
* ``vitaev2_s`` (see vitae.py, when present).

Pretrained weights only ever come from a local path (``model.backbone.weights``); nothing is
downloaded. The FPN is torchvision's with P6 = max-pool(P5), the same as the release.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from i3cl_core.model.errors import CheckpointError  # noqa: F401  (raised here; importable from here too)
from i3cl_core.utils import get_logger

log = get_logger("model")

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def read_state_dict(path: str, what: str = "weights") -> dict[str, torch.Tensor]:
    """Load a tensor dict from ``path`` with ``weights_only=True``; unwrap common nesting."""
    import os

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: {what} file not found (weights are only read from local paths)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with code objects, not a torch file ...
        from i3cl_core.model.errors import unreadable_checkpoint

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


def freeze(modules) -> None:
    """Eval mode and no gradients for ``modules`` (frozen stages)."""
    for module in modules:
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)


def freeze_bn_statistics(module: nn.Module) -> None:
    """mmdetection's ``norm_eval``: BatchNorm layers keep their running statistics (eval mode) while
    their affine parameters stay trainable."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class FreezableBackbone(nn.Module):
    """Keeps frozen stages frozen and, with ``norm_eval``, BatchNorm statistics fixed whenever the
    model is put in training mode; subclasses set ``norm_eval`` and override ``_freeze``."""

    norm_eval: bool = False

    def _freeze(self) -> None:
        """Freeze the configured stages (none by default)."""

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze()
        if mode and self.norm_eval:
            freeze_bn_statistics(self)
        return self


class ResNetBackbone(FreezableBackbone):
    def __init__(self, name: str = "resnet50", frozen_stages: int = 1, norm_eval: bool = True):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, name)(weights=None)
        self.name = name
        # torchvision's own names, so torchvision / RegionCL state dicts load as they are
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        width = 4 if name in ("resnet50", "resnet101", "resnet152") else 1
        self.out_channels = [64 * width, 128 * width, 256 * width, 512 * width]
        self.strides = [4, 8, 16, 32]
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self._freeze()

    def _freeze(self) -> None:
        stages = [[self.conv1, self.bn1], [self.layer1], [self.layer2], [self.layer3], [self.layer4]]
        for stage in stages[: self.frozen_stages + 1] if self.frozen_stages >= 0 else []:
            freeze(stage)

    def load_weights(self, path: str):
        """torchvision-style ResNet weights (ImageNet, or RegionCL / MoCo-style self-supervised ones),
        possibly nested under ``state_dict``/``model`` and prefixed (``module.``, ``backbone.``,
        ``module.encoder_q.``, ...); the classifier ``fc.*`` is dropped."""
        state, prefix = select_prefix(read_state_dict(path, "backbone weights"), self.state_dict().keys())
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        own = self.state_dict()
        shapes = [
            f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and own[k].shape != v.shape
        ]
        if shapes:  # another depth or width: refuse rather than load a part of it
            raise CheckpointError(
                f"{path}: {len(shapes)} tensors have other shapes than in a torchvision "
                f"{self.name} (another ResNet?), e.g. {'; '.join(shapes[:3])}"
            )
        result = self.load_state_dict(state, strict=False)
        log.info(
            "backbone weights %s%s: %d loaded, %d missing, %d unexpected %s",
            path,
            f" (keys under {prefix!r})" if prefix else "",
            len(state) - len(result.unexpected_keys),
            len(result.missing_keys),
            len(result.unexpected_keys),
            (result.missing_keys + result.unexpected_keys)[:5],
        )
        if len(state) == len(result.unexpected_keys):
            raise CheckpointError(f"{path}: none of its keys match a torchvision {self.name}")
        return result

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]


class TimmBackbone(FreezableBackbone):
    """Any timm model with ``features_only``: the last four feature levels (strides 4-32)."""

    def __init__(self, model_name: str, frozen_stages: int = -1, norm_eval: bool = True):
        super().__init__()
        import timm

        self.body = timm.create_model(
            model_name, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4)
        )
        info = self.body.feature_info
        self.out_channels = list(info.channels())
        self.strides = list(info.reduction())
        if self.strides != [4, 8, 16, 32]:
            raise ValueError(f"timm:{model_name}: feature strides {self.strides}, expected [4, 8, 16, 32]")
        self.norm_eval = norm_eval

    def load_weights(self, path: str):
        return load_pretrained(self.body, path)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))


def build_backbone(cfg) -> nn.Module:
    """``cfg`` is a :class:`i3cl_core.config.BackboneConfig`."""
    name = cfg.name
    if name in TORCHVISION_RESNETS:
        backbone = ResNetBackbone(name, cfg.frozen_stages, cfg.norm_eval)
    elif name.startswith("timm:"):
        backbone = TimmBackbone(name[5:], cfg.frozen_stages, cfg.norm_eval)
    elif name == "vitaev2_s":
        from i3cl_core.model.vitae import ViTAEv2Backbone

        backbone = ViTAEv2Backbone(
            drop_path_rate=cfg.drop_path_rate,
            grad_checkpointing=cfg.grad_checkpointing,
            frozen_stages=cfg.frozen_stages,
            norm_eval=cfg.norm_eval,
        )
    else:
        raise ValueError(
            f"model.backbone.name: unknown backbone {name!r}; allowed: {', '.join(TORCHVISION_RESNETS)}, "
            "timm:<model name>, vitaev2_s"
        )
    if cfg.weights:
        backbone.load_weights(cfg.weights)
    return backbone


class FPN(nn.Module):
    """torchvision's FPN over C2-C5 plus P6 = max-pool(P5): returns [P2, P3, P4, P5, P6]."""

    def __init__(self, in_channels: list[int], out_channels: int = 256):
        super().__init__()
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        out = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))
        return list(out.values())
