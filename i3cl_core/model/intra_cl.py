"""IntraCL: the intra-instance multi-receptive-field block.

One block per FPN level (P2-P6, no weight sharing), applied to the FPN outputs before both the RPN
and the RoI extractors. With C input channels and c = C/4:

    r  = conv1x1(C -> c)(x)
    s7 = conv7x7(r)  + conv7x1(r)  + conv1x7(r)       three parallel branches, summed
    s5 = conv5x5(s7) + conv5x1(s7) + conv1x5(s7)      stages in series 7 -> 5 -> 3,
    s3 = conv3x3(s5) + conv3x1(s5) + conv1x3(s5)      no activation between them
    y  = ReLU(BN(conv1x1(c -> C)(s3)))
    out = x + y

At C = 256 a block has 497,024 parameters. PyTorch default initialisation, as the release.
"""

from __future__ import annotations

import torch
from torch import nn


class MultiKernelStage(nn.Module):
    """Square k x k, vertical k x 1 and horizontal 1 x k convolutions in parallel, summed."""

    def __init__(self, channels: int, k: int):
        super().__init__()
        p = k // 2
        self.square = nn.Conv2d(channels, channels, (k, k), padding=(p, p))
        self.vertical = nn.Conv2d(channels, channels, (k, 1), padding=(p, 0))
        self.horizontal = nn.Conv2d(channels, channels, (1, k), padding=(0, p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.square(x) + self.vertical(x) + self.horizontal(x)


class IntraCL(nn.Module):
    """Intra-instance collaborative learning on one FPN level: a residual block whose branch reduces
    the channels by 4 (1x1), applies one :class:`MultiKernelStage` per kernel size (7, 5, 3: square,
    vertical and horizontal kernels, so that long, thin and curved text gets receptive fields of its
    own shape), expands back (1x1) and adds ``relu(bn(.))`` to the input. Shape unchanged."""

    def __init__(self, channels: int = 256, kernels: tuple[int, ...] = (7, 5, 3)):
        super().__init__()
        reduced = channels // 4
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.stages = nn.Sequential(*[MultiKernelStage(reduced, k) for k in kernels])
        self.expand = nn.Conv2d(reduced, channels, 1)
        # named `bn` as in the release, so that a `norm` no-decay key (ViTAE recipe) leaves it decayed as
        # there
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stages(self.reduce(x))
        return x + torch.relu(self.bn(self.expand(y)))
