"""Backbones (C2-C5 at strides 4/8/16/32) and the FPN (P2-P6).

* torchvision ResNets (``resnet18/34/50/101``): the stem and the first ``frozen_stages`` stages are
  frozen; with ``norm_eval`` every BatchNorm keeps its running statistics frozen while its affine
  parameters stay trainable (mmdetection's ``norm_eval=True``, unlike torchvision's FrozenBN).
* any timm model with ``features_only`` (``timm:resnest101e``, ``timm:resnext101_32x8d``, ...).
* ``vitaev2_s`` (vitae.py); :func:`i3cl_core.model.detector.build_backbone` picks one by name.

Pretrained weights only ever come from a local path (``model.backbone.weights``); nothing is
downloaded. The FPN is torchvision's with P6 = max-pool(P5), the same as the release.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torchvision
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from i3cl_core.model.errors import CheckpointError
from i3cl_core.model.weights import load_pretrained, read_state_dict, select_prefix
from i3cl_core.utils import get_logger

log = get_logger("model")

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


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
        import timm  # deferred: timm loads only for timm backbones

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


class FPN(nn.Module):
    """torchvision's FPN over C2-C5 plus P6 = max-pool(P5): returns [P2, P3, P4, P5, P6]."""

    def __init__(self, in_channels: list[int], out_channels: int = 256):
        super().__init__()
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        out = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))
        return list(out.values())
