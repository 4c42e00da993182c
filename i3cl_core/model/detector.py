"""The I3CL detector: backbone -> FPN -> IntraCL (per level) -> RPN -> RoI heads (InterCL on the
mask branch) -> boxes, scores and polygons.

Follow one image: ``I3CL.forward(images)`` normalises and pads the batch (and in eval mode resizes
it to the test scale), ``features`` runs backbone, FPN and the five IntraCL blocks, the RPN proposes
boxes, :class:`~i3cl_core.model.roi_heads.RoIHeads` classifies them and predicts 28x28 masks, and
:func:`detections_to_polygons` pastes each mask into the original image and traces its polygon.

Training: ``model(images, targets)`` returns the loss dict (``loss_rpn_cls``, ``loss_rpn_box``,
``loss_rcnn_cls``, ``loss_rcnn_box``, ``loss_mask``). Images are float [3, H, W] in [0, 1], RGB;
targets are the dataset's target dicts (see ``i3cl_core.data.coco``). Inference: ``model(images)``
returns per image a dict with ``boxes`` [N, 4], ``scores`` [N], ``labels`` [N] and ``polygons``
(N arrays (K, 2), clockwise) in the coordinates of the input images.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from i3cl_core.data.polygons import masks_to_polygons, paste_mask  # noqa: F401 (paste_mask: re-exported)
from i3cl_core.model.backbone import FPN, TORCHVISION_RESNETS, ResNetBackbone, TimmBackbone
from i3cl_core.model.intra_cl import IntraCL
from i3cl_core.model.roi_heads import RoIHeads
from i3cl_core.model.rpn import I3CLRPN
from i3cl_core.model.vitae import ViTAEv2Backbone
from i3cl_core.structures import Instances

# ImageNet statistics of the release (RGB, 0-255), here on the 0-1 scale
PIXEL_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
PIXEL_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)


def build_backbone(cfg) -> nn.Module:
    """``cfg`` is a :class:`i3cl_core.config.BackboneConfig`."""
    name = cfg.name
    if name in TORCHVISION_RESNETS:
        backbone = ResNetBackbone(name, cfg.frozen_stages, cfg.norm_eval)
    elif name.startswith("timm:"):
        backbone = TimmBackbone(name[5:], cfg.frozen_stages, cfg.norm_eval)
    elif name == "vitaev2_s":
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


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 convolutions natively (else bf16 autocast is emulated and
    slow)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        try:  # x86 with AVX512-BF16 or AMX; elsewhere oneDNN emulates bfloat16
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


class I3CL(nn.Module):
    """The I3CL detector: a Mask R-CNN for text with IntraCL blocks on the FPN levels and InterCL in
    the mask branch (docs/model.md).

    image -> normalise, resize to the test scale, pad to 32 -> backbone (C2-C5) -> FPN (P2-P6) ->
    IntraCL per level -> RPN proposals -> RoI heads: box branch (class scores, box deltas) and mask
    branch (RoI features -> InterCL -> FCN mask head) -> per-instance masks pasted into the image and
    traced into polygons (:meth:`predict`).

    Training: ``model(images, targets)`` returns the loss dict (``loss_rpn_cls``, ``loss_rpn_box``,
    ``loss_rcnn_cls``, ``loss_rcnn_box``, ``loss_mask``); targets carry per-instance ``lossweight``
    and do-not-care regions. Coordinates follow the pixel-area convention declared in
    :mod:`i3cl_core.data.polygons` (pixel (x, y) covers [x, x+1) x [y, y+1)).
    """

    def __init__(self, cfg):
        """``cfg`` is a :class:`i3cl_core.config.ModelConfig`."""
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone)
        self.neck = FPN(self.backbone.out_channels, cfg.fpn_channels)
        self.intra_cl = nn.ModuleList(IntraCL(cfg.fpn_channels) for _ in range(5)) if cfg.intra_cl else None
        self.rpn = I3CLRPN(cfg, cfg.fpn_channels)
        self.roi_heads = RoIHeads(cfg, cfg.fpn_channels)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(3, 1, 1), persistent=False)
        # inference only: run backbone, FPN and IntraCL under float16 autocast (CUDA AMP for the heavy
        # convolutions; the heads, boxes and masks stay float32, so coordinates keep their precision)
        self.fp16_features = False

    # ------------------------------------------------------------------ input
    def test_scale(self, h: int, w: int, sides: tuple[int, int] | None = None) -> float:
        """Resize factor of an h x w image: the short side to ``sides[0]`` unless the long side would
        exceed ``sides[1]`` (default: the config's ``test_short_side``, ``test_long_side``)."""
        short, long = sides or (self.cfg.test_short_side, self.cfg.test_long_side)
        return min(long / max(h, w), short / min(h, w))

    def preprocess(
        self, images: list[Tensor], resize: bool, sides: tuple[int, int] | None = None
    ) -> tuple[ImageList, list[float]]:
        """Normalise, optionally resize to the test scale (keep ratio; ``sides`` overrides the
        config's test sides), pad to a multiple of 32."""
        out, scales = [], []
        for img in images:
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"expected images of shape [3, H, W], got {tuple(img.shape)}")
            img = (img - self.pixel_mean) / self.pixel_std
            scale = 1.0
            if resize:
                h, w = img.shape[-2:]
                scale = self.test_scale(h, w, sides)
                nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
                if (nh, nw) != (h, w):
                    img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
            out.append(img)
            scales.append(scale)
        d = self.cfg.size_divisible
        ph = int(math.ceil(max(i.shape[1] for i in out) / d) * d)
        pw = int(math.ceil(max(i.shape[2] for i in out) / d) * d)
        batch = out[0].new_zeros((len(out), 3, ph, pw))
        for b, img in zip(batch, out):
            b[:, : img.shape[1], : img.shape[2]].copy_(img)
        return ImageList(batch, [tuple(i.shape[-2:]) for i in out]), scales

    # ------------------------------------------------------------------ network
    def features(self, batch: Tensor) -> list[Tensor]:
        """[P2, P3, P4, P5, P6] after IntraCL, float32 (``model.bf16_features`` computes them in bfloat16)."""
        if self.cfg.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        # no context at all when off: a disabled autocast would also switch off the trainer's CUDA AMP here
        use_bf16 = self.cfg.bf16_features is True or (
            self.cfg.bf16_features == "auto" and native_bf16(batch.device)
        )
        dtype = (
            torch.float16
            if self.fp16_features and not self.training
            else torch.bfloat16
            if use_bf16
            else None
        )
        autocast = torch.autocast(batch.device.type, dtype=dtype) if dtype is not None else nullcontext()
        with autocast:
            feats = self.neck(self.backbone(batch))
            if self.intra_cl is not None:
                feats = [block(f) for block, f in zip(self.intra_cl, feats)]
        return (
            [f.float() for f in feats] if dtype is not None else feats
        )  # under the trainer's CUDA AMP they stay float16

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        if self.training:
            if targets is None:
                raise ValueError("I3CL needs targets in training mode")
            image_list, _ = self.preprocess(images, resize=False)
            targets = [self._targets_to_device(t, image_list.tensors.device) for t in targets]
            feats = self.features(image_list.tensors)
            proposals, rpn_losses = self.rpn(image_list, feats, targets)
            _, roi_losses = self.roi_heads(
                feats, proposals, image_list.image_sizes, image_list.tensors.shape[-2:], targets
            )
            return {**rpn_losses, **roi_losses}
        return self.predict(images)

    @staticmethod
    def _targets_to_device(t: dict, device) -> dict:
        return {k: (v.to(device) if isinstance(v, (Tensor, Instances)) else v) for k, v in t.items()}

    @torch.no_grad()
    def predict(
        self,
        images: list[Tensor],
        resize: bool = True,
        polygons: bool = True,
        epsilon: float = 0.005,
        test_sides: tuple[int, int] | None = None,
    ) -> list[dict]:
        """Detections in original image coordinates (boxes, scores, labels, mask_probs, and polygons);
        ``test_sides`` (short, long) replaces the config's test scale for this call only."""
        image_list, scales = self.preprocess(images, resize=resize, sides=test_sides)
        feats = self.features(image_list.tensors)
        proposals, _ = self.rpn(image_list, feats)
        detections, _ = self.roi_heads(
            feats, proposals, image_list.image_sizes, image_list.tensors.shape[-2:]
        )
        results = []
        for det, scale, img in zip(detections, scales, images):
            h, w = img.shape[-2:]
            boxes = det["boxes"] / scale
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            res = {
                "boxes": boxes,
                "scores": det["scores"],
                "labels": det["labels"],
                "mask_probs": det["mask_probs"],
            }
            if polygons:
                res.update(
                    detections_to_polygons(
                        boxes, det["scores"], det["mask_probs"], (h, w), self.cfg.mask_thr, epsilon
                    )
                )
            results.append(res)
        return results


# ---------------------------------------------------------------------------------- masks -> polygons
def detections_to_polygons(
    boxes: Tensor, scores: Tensor, mask_probs: Tensor, image_hw, thr: float, epsilon: float
) -> dict:
    """Polygons (original image coordinates) for each detection; detections whose mask yields no
    polygon get ``None`` so that indices stay aligned with boxes and scores
    (:func:`i3cl_core.data.polygons.masks_to_polygons`, the rule the torch-free runtime shares)."""
    probs = mask_probs.detach().float().cpu().numpy()
    return {"polygons": masks_to_polygons(boxes.detach().cpu().numpy(), probs, image_hw, thr, epsilon)}


def build_model(cfg) -> I3CL:
    """``cfg``: an :class:`~i3cl_core.config.I3CLConfig` or its ``model`` section."""
    model = I3CL(getattr(cfg, "model", cfg))
    if model.cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
