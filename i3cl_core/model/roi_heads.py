"""RoI heads: box branch (Shared2FC), mask branch (FCN, with InterCL in front),
per-instance loss weights (B) and do-not-care regions.

* RoIAlign with ``aligned=True``, 7x7 for boxes and 14x14 for masks, on P2-P5 with the canonical
  level mapping level = clamp(floor(log2(sqrt(wh) / 56 + 1e-6)), 0, 3).
* Sampling: GT boxes are appended to the proposals; IoU >= 0.5 positive, < 0.5 negative; 512 RoIs
  per image, at most 25 % positive; RoIs covered by a do-not-care region (IoF > 0.5) are neither.
* Losses: softmax CE whose positives carry their GT's lossweight (negatives their image's
  ``background_weight``, 1 unless the training set lowers it), divided by the number of samples with
  weight > 0; class-specific L1 box loss weighted by the lossweight, divided by the number of sampled
  RoIs; the mask BCE is the mean over the pixels of all positives, each positive scaled by its
  lossweight only with ``model.mask_lossweight`` (the release does not weight it).
* One foreground class by default: logits [background, text] (background is index 0 here; the
  release's mmdetection heads put it last, which matters only when importing its checkpoints).
* Mask targets are the GT polygons rasterised inside each positive box at 28x28 (the COCO
  polygon-to-mask rule), which equals cropping the full bitmap with RoIAlign and binarising at 0.5
  up to boundary pixels, without materialising full-image masks.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes, roi_align

from i3cl_core.model.inter_cl import InterCL
from i3cl_core.model.roi_align import roi_align_sparse
from i3cl_core.model.sampling import balanced_sample, dontcare_boxes, dontcare_mask, sample_generator
from i3cl_core.structures import Instances


class RoIPooler(nn.Module):
    """Multi-level RoIAlign (``aligned=True``) over P2-P5. ``impl`` (``model.roi_align``): torchvision's
    kernel, or :func:`~i3cl_core.model.roi_align.roi_align_sparse` (the same values, faster on CPU);
    ``auto`` takes the sparse one for CPU tensors."""

    def __init__(
        self,
        output_size: int,
        strides=(4, 8, 16, 32),
        canonical_scale: float = 56.0,
        impl: str = "auto",
    ):
        super().__init__()
        self.output_size = output_size
        self.strides = strides
        self.canonical_scale = canonical_scale
        self.impl = impl

    def levels(self, boxes: Tensor) -> Tensor:
        scale = torch.sqrt(
            (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
        )
        lvl = torch.floor(torch.log2(scale / self.canonical_scale + 1e-6))
        return lvl.clamp(0, len(self.strides) - 1).to(torch.int64)

    def forward(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        c = features[0].shape[1]
        out = features[0].new_zeros((rois.shape[0], c, self.output_size, self.output_size))
        if torch.onnx.is_in_onnx_export():
            return self.forward_traced(features, rois)
        if rois.shape[0] == 0:
            return out
        sparse = self.impl == "sparse" or (self.impl == "auto" and features[0].device.type == "cpu")
        align = roi_align_sparse if sparse else roi_align
        levels = self.levels(rois[:, 1:])
        for lvl, (feat, stride) in enumerate(zip(features, self.strides)):
            idx = torch.where(levels == lvl)[0]
            if idx.numel():
                out[idx] = align(
                    feat, rois[idx], self.output_size, 1.0 / stride, sampling_ratio=0, aligned=True
                ).to(out.dtype)
        return out

    def forward_traced(self, features: list[Tensor], rois: Tensor) -> Tensor:
        """:meth:`forward` without a branch on the number of RoIs and without in-place indexing (ONNX export):
        each level pools its RoIs, the results are concatenated and put back in the RoIs' order."""
        levels = self.levels(rois[:, 1:])
        pooled, order = [], []
        for lvl, (feat, stride) in enumerate(zip(features, self.strides)):
            idx = torch.where(levels == lvl)[0]
            pooled.append(
                roi_align(feat, rois[idx], self.output_size, 1.0 / stride, sampling_ratio=0, aligned=True)
            )
            order.append(idx)
        return torch.cat(pooled)[torch.argsort(torch.cat(order))]


class BoxHead(nn.Module):
    """Shared2FC: flatten -> FC -> ReLU -> FC -> ReLU -> (cls logits, class-specific deltas)."""

    def __init__(self, in_channels: int, pool: int, representation: int, num_classes: int):
        super().__init__()
        self.fc6 = nn.Linear(in_channels * pool * pool, representation)
        self.fc7 = nn.Linear(representation, representation)
        self.cls_score = nn.Linear(representation, num_classes + 1)
        self.bbox_pred = nn.Linear(representation, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))
        return self.cls_score(x), self.bbox_pred(x)


class MaskHead(nn.Module):
    """FCN mask head: convs 3x3 + ReLU, 2x deconv + ReLU, 1x1 to one channel per class."""

    def __init__(self, channels: int, num_convs: int, num_classes: int):
        super().__init__()
        layers = []
        for _ in range(num_convs):
            layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.upsample = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.logits = nn.Conv2d(channels, num_classes, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(F.relu(self.upsample(self.convs(x))))


# ------------------------------------------------------------------------------------------ losses
def weighted_fastrcnn_loss(
    class_logits: Tensor, box_regression: Tensor, rois: Instances
) -> tuple[Tensor, Tensor]:
    """R-CNN losses over the sampled RoIs of the batch (``rois``: ``labels``, ``regression_targets`` and
    ``lossweight``, the matched GT's for positives, the image's background weight for negatives)."""
    labels, lossweight = rois.labels, rois.lossweight
    ce = F.cross_entropy(class_logits, labels, reduction="none")
    loss_cls = (ce * lossweight).sum() / (lossweight > 0).sum().clamp(min=1)
    n = class_logits.shape[0]
    deltas = box_regression.reshape(n, -1, 4)[
        torch.arange(n, device=labels.device), (labels - 1).clamp(min=0)
    ]
    l1 = (deltas - rois.regression_targets).abs().sum(dim=1)
    loss_box = torch.where(labels > 0, l1 * lossweight, 0.0).sum() / max(n, 1)  # positives only
    return loss_cls, loss_box


def mask_loss(mask_logits: Tensor, targets: Tensor, lossweight: Tensor | None = None) -> Tensor:
    """Mean per-pixel BCE over all positives of the batch; with ``lossweight`` (one per positive) each
    positive's pixels are scaled by its weight (the mean stays over all pixels, as the classification loss
    keeps its normaliser when weights change)."""
    if lossweight is None:
        return F.binary_cross_entropy_with_logits(mask_logits, targets)
    bce = F.binary_cross_entropy_with_logits(mask_logits, targets, reduction="none")
    return (bce.mean(dim=(1, 2)) * lossweight.to(bce)).mean()


def polygon_mask_targets(polygons: list, boxes: Tensor, size: int) -> Tensor:
    """Rasterise each instance (list of (K, 2) parts) inside its box at ``size`` x ``size``."""
    from pycocotools import mask as mask_utils  # deferred: pycocotools loads only to rasterize targets

    out = np.zeros((len(polygons), size, size), dtype=np.float32)
    boxes_np = boxes.detach().cpu().numpy().astype(np.float64)
    for i, (parts, (x1, y1, x2, y2)) in enumerate(zip(polygons, boxes_np)):
        sx, sy = size / max(x2 - x1, 1e-3), size / max(y2 - y1, 1e-3)
        flat = [
            ((np.asarray(p, np.float64) - (x1, y1)) * (sx, sy)).reshape(-1).tolist()
            for p in parts
            if len(p) >= 3
        ]
        if flat:
            out[i] = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(flat, size, size)))
    return torch.from_numpy(out).to(boxes.device)


class RoIHeads(nn.Module):
    """Box and mask branches on the RPN's proposals.

    Training: proposals (plus the GT boxes) are matched to the GT at IoU 0.5, sampled
    (``box_batch_size_per_image`` per image, a positive fraction), and carry their GT's box, mask polygon and
    per-instance loss weight; proposals on do-not-care regions are neither positives nor negatives. The box
    branch (:class:`BoxHead` on 7x7 RoIAlign) gives the weighted classification and box losses; the mask
    branch (14x14 RoIAlign of the positives, :class:`InterCL`, :class:`MaskHead`) the mask loss against 28x28
    targets rasterised from the polygons. Inference: class scores and decoded boxes, per-class NMS, then masks
    for the kept boxes."""

    def __init__(self, cfg, channels: int):
        super().__init__()
        self.box_pooler = RoIPooler(7, impl=cfg.roi_align)
        self.mask_pooler = RoIPooler(14, impl=cfg.roi_align)
        self.box_head = BoxHead(channels, 7, cfg.representation_size, cfg.num_classes)
        self.inter_cl = None
        if cfg.inter_cl:
            ic = cfg.inter_cl_cfg
            self.inter_cl = InterCL(
                channels, ic.token_channels, ic.token_pool, ic.layers, ic.heads, ic.ffn_dim, ic.dropout
            )
        self.mask_head = MaskHead(channels, cfg.mask_head_convs, cfg.num_classes)
        self.matcher = det_utils.Matcher(0.5, 0.5, allow_low_quality_matches=False)
        self.box_coder = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
        self.num_classes = cfg.num_classes
        self.cfg = cfg

    # -------------------------------------------------------------------- training samples
    def sample(self, proposals: list[Tensor], targets: list[dict]) -> list[Instances]:
        """Per image, the sampled RoIs as :class:`Instances` (positives first): ``boxes``, ``labels``,
        ``regression_targets``, ``lossweight`` (the matched GT's for positives, the image's
        ``background_weight`` for negatives) and
        ``gt_index`` (the matched GT instance, -1 for negatives)."""
        out = []
        for props, t in zip(proposals, targets):
            gt = t["instances"]
            gt_boxes = gt.boxes.to(props)
            props = torch.cat([props, gt_boxes])
            if len(gt) == 0:
                matched = torch.full((props.shape[0],), -1, dtype=torch.int64, device=props.device)
                labels = torch.zeros_like(matched)
            else:
                matched = self.matcher(box_iou(gt_boxes, props))
                labels = torch.where(matched >= 0, gt.labels.to(props.device)[matched.clamp(min=0)], 0)
            if self.cfg.ignore_dontcare:
                labels = torch.where(
                    dontcare_mask(props, dontcare_boxes(t), self.cfg.dontcare_iof_thr), -1, labels
                )
            pos, neg = balanced_sample(
                labels,
                self.cfg.box_batch_size_per_image,
                self.cfg.box_positive_fraction,
                sample_generator(t, salt=2),
            )
            keep = torch.where(pos | neg)[0]
            # positives first (each group in index order): the mask branch takes them in this order
            keep = keep[torch.argsort((labels[keep] <= 0).to(torch.uint8), stable=True)]
            rois = Instances(boxes=props, labels=labels, gt_index=matched)[keep]
            positive = rois.labels > 0
            background = torch.full_like(rois.boxes[:, 0], float(t.get("background_weight", 1.0)))
            if len(gt):
                idx = rois.gt_index.clamp(min=0)
                rois.lossweight = torch.where(positive, gt.lossweight.to(props)[idx], background)
                rois.regression_targets = self.box_coder.encode_single(gt_boxes[idx], rois.boxes)
            else:
                rois.lossweight = background
                rois.regression_targets = self.box_coder.encode_single(
                    torch.zeros_like(rois.boxes), rois.boxes
                )
            out.append(rois)
        return out

    # -------------------------------------------------------------------- mask branch
    def mask_forward(self, features: list[Tensor], boxes: list[Tensor], image_sizes, padded_hw) -> Tensor:
        x = self.mask_pooler(features, boxes)
        if self.inter_cl is not None:
            x = self.inter_cl(x, [b.shape[0] for b in boxes], features, image_sizes, padded_hw)
        return self.mask_head(x)

    def forward(self, features: list[Tensor], proposals: list[Tensor], image_sizes, padded_hw, targets=None):
        features = features[:4]  # P2-P5
        if self.training:
            samples = self.sample(proposals, targets)
            class_logits, box_regression = self.box_head(
                self.box_pooler(features, [r.boxes for r in samples])
            )
            loss_cls, loss_box = weighted_fastrcnn_loss(class_logits, box_regression, Instances.cat(samples))
            # mask branch on the positives of each image
            pos_boxes, pos_labels, pos_weights, mask_targets = [], [], [], []
            for rois, t in zip(samples, targets):
                positives = rois[rois.labels > 0]
                pos_boxes.append(positives.boxes)
                pos_labels.append(positives.labels)
                pos_weights.append(positives.lossweight)
                polygons = t["instances"].polygons
                mask_targets.append(
                    polygon_mask_targets(
                        [polygons[j] for j in positives.gt_index.tolist()], positives.boxes, 28
                    )
                )
            mask_logits = self.mask_forward(features, pos_boxes, image_sizes, padded_hw)
            pos_labels = torch.cat(pos_labels)
            if pos_labels.numel() == 0:
                loss_mask = mask_logits.sum() * 0.0
            else:
                chosen = mask_logits[
                    torch.arange(pos_labels.numel(), device=pos_labels.device), pos_labels - 1
                ]
                loss_mask = mask_loss(
                    chosen,
                    torch.cat(mask_targets),
                    torch.cat(pos_weights) if self.cfg.mask_lossweight else None,
                )
            return [], {"loss_rcnn_cls": loss_cls, "loss_rcnn_box": loss_box, "loss_mask": loss_mask}

        class_logits, box_regression = self.box_head(self.box_pooler(features, proposals))
        detections = self.postprocess(class_logits, box_regression, proposals, image_sizes)
        boxes = [d["boxes"] for d in detections]
        mask_logits = self.mask_forward(features, boxes, image_sizes, padded_hw)
        labels = torch.cat([d["labels"] for d in detections])
        probs = mask_logits[torch.arange(labels.numel(), device=labels.device), labels - 1].sigmoid()
        for d, p in zip(detections, torch.split(probs, [b.shape[0] for b in boxes])):
            d["mask_probs"] = p  # [N, 28, 28] in box coordinates
        return detections, {}

    def postprocess(self, class_logits, box_regression, proposals, image_sizes) -> list[dict]:
        cfg = self.cfg
        counts = [p.shape[0] for p in proposals]
        boxes_all = self.box_coder.decode(box_regression, proposals)  # [N, C, 4]
        scores_all = F.softmax(class_logits, -1)
        out = []
        for boxes, scores, size in zip(boxes_all.split(counts), scores_all.split(counts), image_sizes):
            boxes = clip_boxes_to_image(boxes, size)
            labels = torch.arange(1, self.num_classes + 1, device=boxes.device).expand(boxes.shape[0], -1)
            boxes, scores, labels = boxes.reshape(-1, 4), scores[:, 1:].reshape(-1), labels.reshape(-1)
            keep = torch.where(scores > cfg.score_thr)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = remove_small_boxes(boxes, 1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, cfg.nms_thr)[: cfg.max_detections]
            out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return out
