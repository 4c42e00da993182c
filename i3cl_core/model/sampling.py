"""Sampling helpers shared by the RPN and the RoI heads: do-not-care coverage, the per-image random
generator and the balanced positive/negative sampler."""

from __future__ import annotations

import torch
from torch import Tensor


def box_iof(boxes: Tensor, regions: Tensor) -> Tensor:
    """[N, M] intersection over the area of ``boxes`` (not the union)."""
    if boxes.numel() == 0 or regions.numel() == 0:
        return boxes.new_zeros((boxes.shape[0], regions.shape[0]))
    lt = torch.max(boxes[:, None, :2], regions[None, :, :2])
    rb = torch.min(boxes[:, None, 2:], regions[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=1)
    return inter / area.clamp(min=1e-6)[:, None]


def dontcare_boxes(target: dict) -> Tensor | None:
    """The do-not-care boxes of a target (its ``dontcare`` instances), ``None`` when it has none."""
    dontcare = target.get("dontcare")
    return None if dontcare is None or len(dontcare) == 0 else dontcare.boxes


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


def balanced_sample(
    labels: Tensor, batch_size: int, positive_fraction: float, generator=None
) -> tuple[Tensor, Tensor]:
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
