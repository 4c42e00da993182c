"""The sparse RoIAlign against torchvision's: the same values and gradients, on the rules' edge cases."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align

from i3cl_core.model.roi_align import roi_align_sparse


def _rois(gen: torch.Generator, k: int, width: float, height: float, images: int) -> torch.Tensor:
    """Random boxes of many sizes and aspect ratios, a few reaching past the map, plus edge cases."""
    w = torch.empty(k).uniform_(2, width * 0.9, generator=gen)
    h = w * torch.empty(k).uniform_(0.1, 1.5, generator=gen)
    x1 = torch.rand(k, generator=gen) * (width - w / 2) - w / 4
    y1 = torch.rand(k, generator=gen) * (height - h / 2) - h / 4
    boxes = torch.stack([x1, y1, x1 + w, y1 + h], 1)
    edge = torch.tensor(
        [
            [-40.0, -40.0, 10.0, 6.0],  # mostly outside, top left
            [width - 8, height - 8, width + 30, height + 30],  # past the bottom right border
            [50.0, 50.0, 50.0, 50.0],  # empty
            [10.0, 10.0, 11.0, 10.5],  # under a pixel
            [0.0, 0.0, width, height],  # the whole map
        ]
    )
    boxes = torch.cat([boxes, edge])
    index = torch.randint(0, images, (len(boxes), 1), generator=gen).float()
    return torch.cat([index, boxes], 1)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("output_size", [7, 14])
def test_values_and_gradients_are_torchvisions(aligned, sampling_ratio, output_size):
    gen = torch.Generator().manual_seed(output_size * 10 + sampling_ratio + aligned)
    for stride, (h, w) in ((4, (44, 60)), (16, (11, 15))):
        feat = torch.randn(2, 5, h, w, generator=gen, dtype=torch.float64)
        rois = _rois(gen, 40, w * stride, h * stride, 2).double()
        args = (output_size, 1.0 / stride, sampling_ratio, aligned)
        a = feat.clone().requires_grad_(True)
        b = feat.clone().requires_grad_(True)
        want, got = roi_align(a, rois, *args), roi_align_sparse(b, rois, *args)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        weights = torch.randn(want.shape, generator=gen, dtype=torch.float64)
        (want * weights).sum().backward()
        (got * weights).sum().backward()
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-10)


def test_channels_last_float32_features_and_no_rois():
    gen = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 8, 30, 40, generator=gen).contiguous(memory_format=torch.channels_last)
    rois = _rois(gen, 30, 160, 120, 2)
    got = roi_align_sparse(feat, rois, 7, 0.25)
    torch.testing.assert_close(got, roi_align(feat, rois, 7, 0.25, 0, True), rtol=0, atol=1e-5)
    assert got.dtype == torch.float32
    empty = roi_align_sparse(feat, rois[:0], 7, 0.25)
    assert empty.shape == (0, 8, 7, 7)


def test_the_pooler_gives_the_same_features_with_either_implementation():
    from i3cl_core.model.roi_heads import RoIPooler

    gen = torch.Generator().manual_seed(1)
    features = [torch.randn(2, 6, 64 // s, 96 // s, generator=gen) for s in (1, 2, 4, 8)]
    boxes = [_rois(gen, 25, 384, 256, 1)[:, 1:].clamp(0, 256) for _ in range(2)]
    sparse = RoIPooler(7, impl="sparse")(features, boxes)
    torch.testing.assert_close(sparse, RoIPooler(7, impl="torchvision")(features, boxes), rtol=0, atol=1e-5)
    torch.testing.assert_close(sparse, RoIPooler(7)(features, boxes), rtol=0, atol=0)  # auto: sparse on CPU
