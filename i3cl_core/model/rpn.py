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
  terms are divided by the number of sampled anchors (positives + negatives over the batch);
* proposal filtering keeps the same boxes with fewer host synchronisations: one selection of the small
  and low-scoring boxes and one NMS per image (torchvision runs one NMS per level once an image has more
  than 1,000 candidates on a CPU or 5,000 on a GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import box_iou, nms
from torchvision.ops import boxes as box_ops

from i3cl_core.model.sampling import balanced_sample, dontcare_boxes, dontcare_mask, sample_generator
from i3cl_core.structures import Instances


def level_nms(boxes: Tensor, scores: Tensor, levels: Tensor, iou_thr: float) -> Tensor:
    """NMS within each level, as one NMS call: each level's boxes are moved apart by a multiple of the largest
    coordinate, so boxes of different levels never overlap. Indices kept, by decreasing score."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    offsets = levels.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_thr)


class FlooredMatcher(det_utils.Matcher):
    """torchvision's Matcher whose low-quality matches need an IoU of at least ``min_pos_iou``."""

    def __init__(
        self, high: float, low: float, min_pos_iou: float = 0.0, allow_low_quality_matches: bool = True
    ):
        super().__init__(high, low, allow_low_quality_matches)
        self.min_pos_iou = min_pos_iou

    def set_low_quality_matches_(
        self, matches: Tensor, all_matches: Tensor, match_quality_matrix: Tensor
    ) -> None:
        highest, _ = match_quality_matrix.max(dim=1)
        gt_idx, pred_idx = torch.nonzero(
            (match_quality_matrix == highest[:, None]) & (highest[:, None] >= self.min_pos_iou), as_tuple=True
        )
        matches[pred_idx] = all_matches[pred_idx]


def weighted_rpn_loss(
    objectness: Tensor, deltas: Tensor, anchors: Instances, pos: Tensor, neg: Tensor
) -> tuple[Tensor, Tensor]:
    """RPN losses over the batch's anchors (all concatenated): ``anchors`` holds per anchor its
    ``labels`` (1, 0, -1), ``regression_targets`` and the matched GT's ``lossweight`` (1 for
    negatives); ``pos``/``neg`` are boolean masks of the sampled anchors (masks, not indices: nothing here
    waits for the device to count them)."""
    sampled = pos | neg
    num = sampled.sum().clamp(min=1)
    bce = F.binary_cross_entropy_with_logits(objectness, anchors.labels.clamp(min=0), reduction="none")
    # negatives carry their image's background weight (default 1)
    loss_obj = torch.where(sampled, bce * anchors.lossweight, 0.0).sum() / num
    l1 = (deltas - anchors.regression_targets).abs().sum(dim=1)
    loss_box = torch.where(pos, l1 * anchors.lossweight, 0.0).sum() / num
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

    def assign(self, anchors: Tensor, target: dict) -> Instances:
        """The anchors of one image as :class:`Instances`: ``labels`` (1 positive, 0 negative, -1 ignored),
        ``gt_boxes`` (the matched GT box; any box for negatives) and ``lossweight`` (the matched GT's;
        the image's ``background_weight``, default 1, for negatives)."""
        gt = target["instances"]
        background = float(target.get("background_weight", 1.0))
        if len(gt) == 0:
            labels = torch.zeros(anchors.shape[0], dtype=torch.float32, device=anchors.device)
            gt_boxes = torch.zeros_like(anchors)
            lossweight = torch.full_like(labels, background)
        else:
            matches = self.proposal_matcher(box_iou(gt.boxes, anchors))
            idx = matches.clamp(min=0)
            gt_boxes = gt.boxes[idx]
            labels = (matches >= 0).to(torch.float32)
            labels[matches == self.proposal_matcher.BELOW_LOW_THRESHOLD] = 0.0
            labels[matches == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1.0
            lossweight = torch.where(
                matches >= 0, gt.lossweight.to(anchors)[idx], torch.full_like(labels, background)
            )
        if self.ignore_dontcare:
            labels[dontcare_mask(anchors, dontcare_boxes(target), self.dontcare_iof_thr)] = -1.0
        return Instances(labels=labels, gt_boxes=gt_boxes, lossweight=lossweight)

    def filter_proposals(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's filtering (the top ``pre_nms_top_n`` per level, clipped to the image, small and
        low-scoring boxes out, NMS within each level, the best ``post_nms_top_n``) with one data-dependent
        selection and one NMS call per image."""
        num_images, device = proposals.shape[0], proposals.device
        objectness = objectness.detach().reshape(num_images, -1)
        levels = (
            torch.cat(
                [
                    torch.full((n,), i, dtype=torch.int64, device=device)
                    for i, n in enumerate(num_anchors_per_level)
                ]
            )
            .reshape(1, -1)
            .expand_as(objectness)
        )
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)
        batch_idx = torch.arange(num_images, device=device)[:, None]
        scores_all = torch.sigmoid(objectness[batch_idx, top_n_idx])
        levels, proposals = levels[batch_idx, top_n_idx], proposals[batch_idx, top_n_idx]
        final_boxes, final_scores = [], []
        for boxes, scores, lvl, shape in zip(proposals, scores_all, levels, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
            keep = torch.where((w >= self.min_size) & (h >= self.min_size) & (scores >= self.score_thresh))[0]
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = level_nms(boxes, scores, lvl, self.nms_thresh)[: self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores

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
            assigned = []
            for anchors_i, t in zip(anchors, targets):
                a = self.assign(anchors_i, t)
                a.regression_targets = self.box_coder.encode_single(a.gt_boxes, anchors_i)
                assigned.append(a)
            sampled = [
                balanced_sample(
                    a.labels,
                    self.fg_bg_sampler.batch_size_per_image,
                    self.fg_bg_sampler.positive_fraction,
                    sample_generator(t, salt=1),
                )
                for a, t in zip(assigned, targets)
            ]
            pos = torch.cat([p for p, _ in sampled])
            neg = torch.cat([n for _, n in sampled])
            loss_obj, loss_box = weighted_rpn_loss(
                objectness.flatten(), deltas, Instances.cat(assigned), pos, neg
            )
            losses = {"loss_rpn_cls": loss_obj, "loss_rpn_box": loss_box}
        return boxes, losses
