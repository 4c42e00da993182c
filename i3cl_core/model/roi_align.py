"""RoIAlign as one sparse matrix product: the CPU implementation of the RoI pooler.

torchvision's CPU RoIAlign computes each output value and, in the backward, scatters each sample point's
gradient channel by channel on a single thread; in the tiny recipe's training step on 2 cores that backward
took about a fifth of the step. Here the same operation is written as a matrix product. Within a bin, each
sample is a bilinear interpolation, which is separable (a weight per feature-map row times a weight per
column), and the bin's average of its samples stays separable. So every output cell (RoI, bin row, bin
column) is a fixed weighted sum of feature-map pixels: a sparse matrix with one row per output cell and one
column per pixel, applied to the feature map laid out as pixels x channels (free for channels-last tensors).
The backward is the transposed product.

The weights follow torchvision's rules exactly (``aligned`` half-pixel offset, the adaptive sampling ratio
when ``sampling_ratio`` is 0, samples more than one pixel outside the map count as zero, the clamp at the
borders), so outputs and gradients agree with ``torchvision.ops.roi_align`` to float rounding
(``tests/model/test_roi_align.py``). On a GPU torchvision's kernel is the faster one, and ONNX export
needs it: :class:`~i3cl_core.model.roi_heads.RoIPooler` uses this one on the CPU only.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def _axis_weights(start: Tensor, length: Tensor, bins: int, sampling_ratio: int, size: int) -> Tensor:
    """[K, bins, size]: for each RoI (``start``, ``length`` in feature-map pixels along one axis) and bin,
    the weight of each feature-map row (or column) in the bin's average of its samples."""
    k = start.shape[0]
    dtype = start.dtype
    bin_len = length / bins
    grid = (
        torch.full_like(length, float(sampling_ratio))
        if sampling_ratio > 0
        else torch.ceil(length / bins).clamp(min=0)
    )
    samples = max(int(grid.max()), 1) if k else 1
    i = torch.arange(samples, dtype=dtype, device=start.device)
    p = torch.arange(bins, dtype=dtype, device=start.device)
    step = (bin_len / grid.clamp(min=1))[:, None, None]
    y = start[:, None, None] + p[None, :, None] * bin_len[:, None, None] + (i[None, None, :] + 0.5) * step
    used = (i[None, None, :] < grid[:, None, None]) & (y >= -1.0) & (y <= size)
    y = y.clamp(min=0)
    low = y.floor()
    top = low >= size - 1  # the last row: both neighbours are the border row, weight 1
    low = torch.where(top, torch.full_like(low, size - 1), low)
    frac = torch.where(top, torch.zeros_like(y), y - low)
    high = torch.where(top, low, low + 1)
    share = used.to(dtype) / grid.clamp(min=1)[:, None, None]
    weights = start.new_zeros((k, bins, size))
    weights.scatter_add_(2, low.long(), (1 - frac) * share)
    weights.scatter_add_(2, high.long(), frac * share)
    return weights


def _band(weights: Tensor) -> tuple[Tensor, Tensor]:
    """The non-zero band of each row of ``weights`` [K, bins, size]: (indices, weights), each
    [K, bins, B] with B the widest band (indices past the end carry weight 0)."""
    size = weights.shape[2]
    pos = torch.arange(size, device=weights.device)
    nonzero = weights != 0
    first = torch.where(nonzero, pos, size).amin(2)
    last = torch.where(nonzero, pos, -1).amax(2)
    first = torch.where(last >= 0, first, torch.zeros_like(first))
    width = max(int((last - first).max()) + 1, 1) if weights.numel() else 1
    idx = first[..., None] + torch.arange(width, device=weights.device)
    inside = idx < size
    idx = idx.clamp(max=size - 1)
    return idx, weights.gather(2, idx) * inside


def roi_align_sparse(
    features: Tensor,
    rois: Tensor,
    output_size: int,
    spatial_scale: float,
    sampling_ratio: int = 0,
    aligned: bool = True,
) -> Tensor:
    """``torchvision.ops.roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)``
    for ``rois`` [K, 5] (batch index, x1, y1, x2, y2): [K, C, output_size, output_size] in the features'
    dtype (computed in float64 for float64 features, else in float32)."""
    n, c, h, w = features.shape
    k, p = rois.shape[0], output_size
    if k == 0:
        return features.new_zeros((0, c, p, p))
    work = torch.float64 if features.dtype == torch.float64 else torch.float32
    boxes = rois[:, 1:].to(work) * spatial_scale
    offset = 0.5 if aligned else 0.0
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    if not aligned:  # torchvision's legacy rule: at least one pixel
        width, height = width.clamp(min=1.0), height.clamp(min=1.0)
    rows, wy = _band(_axis_weights(boxes[:, 1] - offset, height, p, sampling_ratio, h))
    cols, wx = _band(_axis_weights(boxes[:, 0] - offset, width, p, sampling_ratio, w))
    by, bx = wy.shape[2], wx.shape[2]
    image = rois[:, 0].long()
    # one row per (RoI, bin row, bin column), by * bx entries each, columns increasing within a row
    index = (
        image[:, None, None, None, None] * (h * w) + rows[:, :, None, :, None] * w + cols[:, None, :, None, :]
    )
    values = wy[:, :, None, :, None] * wx[:, None, :, None, :]
    cells = k * p * p
    pixels = features.to(work).permute(0, 2, 3, 1).reshape(n * h * w, c)
    out = _SparseProduct.apply(index.reshape(-1), values.reshape(-1), cells, by * bx, pixels)
    return out.view(k, p, p, c).permute(0, 3, 1, 2).to(features.dtype)


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is not
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


class _SparseProduct(torch.autograd.Function):
    """``matrix @ pixels`` for a CSR matrix with ``per_row`` entries in each of its ``cells`` rows (given as
    column indices and values in row order), differentiable in ``pixels``. The backward builds the transposed
    matrix itself (a stable sort of the column indices), faster than autograd's generic sparse transpose."""

    @staticmethod
    def forward(ctx, col: Tensor, values: Tensor, cells: int, per_row: int, pixels: Tensor) -> Tensor:
        crow = torch.arange(cells + 1, device=pixels.device) * per_row
        ctx.save_for_backward(col, values)
        ctx.cells, ctx.per_row, ctx.npix = cells, per_row, pixels.shape[0]
        return torch.sparse.mm(_csr(crow, col, values, (cells, pixels.shape[0])), pixels)

    @staticmethod
    def backward(ctx, grad: Tensor):
        col, values = ctx.saved_tensors
        order = torch.argsort(col, stable=True)
        crow = torch.zeros(ctx.npix + 1, dtype=torch.int64, device=grad.device)
        crow[1:] = torch.bincount(col, minlength=ctx.npix).cumsum(0)
        transposed = _csr(crow, order // ctx.per_row, values[order], (ctx.npix, ctx.cells))
        return None, None, None, None, torch.sparse.mm(transposed, grad.contiguous())
