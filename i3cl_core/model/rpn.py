"""Region proposal network with per-instance loss weights and
do-not-care regions.

Built on torchvision's anchor generator, head, box coder, sampler and proposal filtering; what
differs from torchvision's RPN:

* matching keeps mmdetection's floor on low-quality matches: an anchor becomes positive for a GT
  through the "best anchor of this GT" rule only if that best IoU is >= ``min_pos_iou`` (0.3);
* anchors covered by a do-not-care region (intersection / anchor area > ``dontcare_iof_thr``) are
  neither positives nor negatives;
* the box loss is plain L1 (not smooth L1);
* positives carry the ``lossweight`` of their matched GT in both terms; negatives weigh 1; both
  terms are divided by the number of sampled anchors (positives + negatives over the batch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import box_iou


class FlooredMatcher(det_utils.Matcher):
    """torchvision's Matcher whose low-quality matches need an IoU of at least ``min_pos_iou``."""

    def __init__(self, high: float, low: float, min_pos_iou: float = 0.0, allow_low_quality_matches: bool = True):
        super().__init__(high, low, allow_low_quality_matches)
        self.min_pos_iou = min_pos_iou

    def set_low_quality_matches_(self, matches: Tensor, all_matches: Tensor, match_quality_matrix: Tensor) -> None:
        highest, _ = match_quality_matrix.max(dim=1)
        gt_idx, pred_idx = torch.nonzero(
            (match_quality_matrix == highest[:, None]) & (highest[:, None] >= self.min_pos_iou), as_tuple=True
        )
        matches[pred_idx] = all_matches[pred_idx]


def box_iof(boxes: Tensor, regions: Tensor) -> Tensor:
    """[N, M] intersection over the area of ``boxes`` (not the union)."""
    if boxes.numel() == 0 or regions.numel() == 0:
        return boxes.new_zeros((boxes.shape[0], regions.shape[0]))
    lt = torch.max(boxes[:, None, :2], regions[None, :, :2])
    rb = torch.min(boxes[:, None, 2:], regions[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=1)
    return inter / area.clamp(min=1e-6)[:, None]


def dontcare_mask(boxes: Tensor, dontcare_boxes: Tensor | None, thr: float) -> Tensor:
    """True where a box is covered by a do-not-care region more than ``thr`` (IoF)."""
    if dontcare_boxes is None or dontcare_boxes.numel() == 0:
        return torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    return (box_iof(boxes, dontcare_boxes.to(boxes)) > thr).any(dim=1)


def sample_generator(target: dict, salt: int) -> torch.Generator | None:
    """A CPU generator seeded from the target's ``seed`` (set by the dataset from (seed, epoch,
    index)), so that anchor and RoI sampling of an image do not depend on how the batch is split
    across processes; ``None`` (the global RNG) when the target has no seed."""
    seed = target.get("seed")
    if seed is None:
        return None
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + salt) % (2**63 - 1))


def balanced_sample(labels: Tensor, batch_size: int, positive_fraction: float, generator=None) -> tuple[Tensor, Tensor]:
    """Random positives (label >= 1) up to ``batch_size * positive_fraction``, negatives (label 0)
    filling the rest: boolean masks."""
    positive = torch.where(labels >= 1)[0]
    negative = torch.where(labels == 0)[0]
    num_pos = min(positive.numel(), int(batch_size * positive_fraction))
    num_neg = min(negative.numel(), batch_size - num_pos)
    pos = positive[torch.randperm(positive.numel(), generator=generator)[:num_pos].to(labels.device)]
    neg = negative[torch.randperm(negative.numel(), generator=generator)[:num_neg].to(labels.device)]
    pos_mask = torch.zeros_like(labels, dtype=torch.bool)
    neg_mask = torch.zeros_like(labels, dtype=torch.bool)
    pos_mask[pos] = True
    neg_mask[neg] = True
    return pos_mask, neg_mask


def weighted_rpn_loss(
    objectness: Tensor, deltas: Tensor, labels: Tensor, targets: Tensor, weights: Tensor, sampled_pos: Tensor, sampled_neg: Tensor
) -> tuple[Tensor, Tensor]:
    """RPN losses. All inputs are concatenated over the batch; ``weights`` is the matched
    GT's lossweight per anchor; ``sampled_pos``/``sampled_neg`` are index tensors."""
    sampled = torch.cat([sampled_pos, sampled_neg])
    num = max(sampled.numel(), 1)
    label_w = torch.ones_like(objectness)
    label_w[sampled_pos] = weights[sampled_pos]
    loss_obj = (F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled], reduction="none") * label_w[sampled]).sum() / num
    l1 = (deltas[sampled_pos] - targets[sampled_pos]).abs().sum(dim=1)
    loss_box = (l1 * weights[sampled_pos]).sum() / num
    return loss_obj, loss_box


class I3CLRPN(RegionProposalNetwork):
    """torchvision's RPN with the release's settings: one anchor size per FPN level and three aspect
    ratios, anchors matched at IoU 0.7 / 0.3 (low-quality matches only above ``min_pos_iou``), and
    per-instance loss weights: each sampled anchor's classification and box terms are scaled by the
    ``lossweight`` of the GT instance it matched (negatives weigh 1); anchors on do-not-care regions
    are ignored."""

    def __init__(self, cfg, in_channels: int):
        sizes = tuple((s,) for s in cfg.anchor_sizes)
        ratios = (tuple(cfg.anchor_ratios),) * len(sizes)
        anchor_generator = AnchorGenerator(sizes, ratios)
        head = RPNHead(in_channels, anchor_generator.num_anchors_per_location()[0])
        super().__init__(
            anchor_generator,
            head,
            fg_iou_thresh=0.7,
            bg_iou_thresh=0.3,
            batch_size_per_image=cfg.rpn_batch_size_per_image,
            positive_fraction=cfg.rpn_positive_fraction,
            pre_nms_top_n=dict(training=cfg.rpn_pre_nms_top_n_train, testing=cfg.rpn_pre_nms_top_n_test),
            post_nms_top_n=dict(training=cfg.rpn_post_nms_top_n_train, testing=cfg.rpn_post_nms_top_n_test),
            nms_thresh=cfg.rpn_nms_thresh,
        )
        self.proposal_matcher = FlooredMatcher(0.7, 0.3, min_pos_iou=0.3)
        self.dontcare_iof_thr = cfg.dontcare_iof_thr
        self.ignore_dontcare = cfg.ignore_dontcare

    def assign(self, anchors: list[Tensor], targets: list[dict]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per image: labels (1 pos, 0 neg, -1 ignored), matched GT boxes, per-anchor weights."""
        labels, matched_boxes, weights = [], [], []
        for anchors_i, t in zip(anchors, targets):
            gt = t["boxes"]
            if gt.numel() == 0:
                lab = torch.zeros(anchors_i.shape[0], dtype=torch.float32, device=anchors_i.device)
                mb = torch.zeros_like(anchors_i)
                w = torch.ones_like(lab)
            else:
                matches = self.proposal_matcher(box_iou(gt, anchors_i))
                idx = matches.clamp(min=0)
                mb = gt[idx]
                lab = (matches >= 0).to(torch.float32)
                lab[matches == self.proposal_matcher.BELOW_LOW_THRESHOLD] = 0.0
                lab[matches == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1.0
                w = t["lossweights"].to(anchors_i)[idx] if "lossweights" in t else torch.ones_like(lab)
                w = torch.where(matches >= 0, w, torch.ones_like(w))
            if self.ignore_dontcare:
                lab[dontcare_mask(anchors_i, t.get("dontcare_boxes"), self.dontcare_iof_thr)] = -1.0
            labels.append(lab)
            matched_boxes.append(mb)
            weights.append(w)
        return labels, matched_boxes, weights

    def forward(self, images, features: list[Tensor], targets: list[dict] | None = None):
        objectness, deltas = self.head(features)
        anchors = self.anchor_generator(images, features)
        num_images = len(anchors)
        num_anchors_per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = self.box_coder.decode(deltas.detach(), anchors).view(num_images, -1, 4)
        boxes, _ = self.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level)
        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("the RPN needs targets in training mode")
            labels, matched_boxes, weights = self.assign(anchors, targets)
            regression_targets = self.box_coder.encode(matched_boxes, anchors)
            sampled = [
                balanced_sample(lab, self.fg_bg_sampler.batch_size_per_image, self.fg_bg_sampler.positive_fraction,
                                sample_generator(t, salt=1))
                for lab, t in zip(labels, targets)
            ]
            pos = torch.where(torch.cat([p for p, _ in sampled]))[0]
            neg = torch.where(torch.cat([n for _, n in sampled]))[0]
            loss_obj, loss_box = weighted_rpn_loss(
                objectness.flatten(), deltas, torch.cat(labels), torch.cat(regression_targets), torch.cat(weights), pos, neg
            )
            losses = {"loss_rpn_cls": loss_obj, "loss_rpn_box": loss_box}
        return boxes, losses
