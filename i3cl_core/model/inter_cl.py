"""InterCL: the inter-instance block with global context.

Applied to the mask branch's RoI features R [N, C, 14, 14] between the mask RoIAlign and the mask
head. It runs per image: the n_i RoIs of image i form one sequence, so attention is across the
instances of one image and never across images. This works for any batch size, in training and in
inference (the release only ran batch size 1 at test).

1. Global context (GCG): for each level P2-P5 a bias-free 1x1 conv, then global average pooling over
   the image's valid (unpadded) area; the four vectors are summed: g_i in R^C. The release's
   ``padding=1`` on these 1x1 convs is fixed to 0 (docs/model.md), and pooling skips the batch padding so
   an image's context does not depend on the other images in its batch.
2. Instance transformer: conv1x1(C -> 32) -> adaptive max pool 3x3 -> 288-d tokens -> a 3-layer,
   4-head post-norm TransformerEncoder (FFN 2048, dropout 0.1, no positional encoding) -> back to
   [n_i, 32, 3, 3] -> conv1x1(32 -> C) -> bilinear upsample to 14x14 (align_corners=True).
3. F = R + t_up + g_i.
4. conv3x3(C -> C, no bias) -> conv1x1(C -> C) -> BN -> ReLU (no residual around this step).

At C = 256: 5,483,136 parameters. With zero RoIs the input is returned unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GlobalContext(nn.Module):
    """Sum over levels of GAP(conv1x1(P_l)) per image, over each image's valid area."""

    def __init__(self, channels: int, num_levels: int = 4):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 1, bias=False) for _ in range(num_levels))

    def forward(
        self, features: list[torch.Tensor], image_sizes: list[tuple[int, int]], padded_hw: tuple[int, int]
    ):
        if torch.onnx.is_in_onnx_export():
            return self.forward_traced(features, image_sizes[0], padded_hw)
        context = None
        for conv, feat in zip(self.convs, features):
            y = conv(feat)
            fh, fw = y.shape[-2:]
            pooled = []
            for i, (h, w) in enumerate(image_sizes):
                vh = max(1, min(fh, -(-h * fh // padded_hw[0])))  # ceil(h / stride)
                vw = max(1, min(fw, -(-w * fw // padded_hw[1])))
                pooled.append(y[i, :, :vh, :vw].mean(dim=(1, 2)))
            level = torch.stack(pooled)
            context = level if context is None else context + level
        return context  # [B, C]

    def forward_traced(self, features: list[torch.Tensor], image_size, padded_hw) -> torch.Tensor:
        """The same context for one image whose valid size ``image_size`` (h, w) and padded size ``padded_hw``
        are tensors: every size stays a value of the graph (ONNX export)."""
        h, w = image_size[0], image_size[1]
        padded = padded_hw
        context = None
        for conv, feat in zip(self.convs, features):
            y = conv(feat)
            fh, fw = torch._shape_as_tensor(y)[-2], torch._shape_as_tensor(y)[-1]
            vh = torch.minimum(
                torch.clamp((h * fh + padded[0] - 1) // padded[0], min=1), fh
            )  # ceil(h / stride)
            vw = torch.minimum(torch.clamp((w * fw + padded[1] - 1) // padded[1], min=1), fw)
            rows = (torch.arange(y.shape[-2], device=y.device) < vh).to(y.dtype)
            cols = (torch.arange(y.shape[-1], device=y.device) < vw).to(y.dtype)
            level = (y * rows[:, None] * cols[None, :]).sum(dim=(2, 3)) / (vh * vw).to(y.dtype)
            context = level if context is None else context + level
        return context  # [1, C]


def adaptive_max_pool_unrolled(x: torch.Tensor, out: int) -> torch.Tensor:
    """``F.adaptive_max_pool2d(x, out)`` written as the max over each of its windows (rows
    floor(i * S / out) to ceil((i + 1) * S / out)): the same values, for exporters that cannot read the
    input size of the adaptive pooling."""
    sh, sw = int(x.shape[-2]), int(x.shape[-1])
    rows = []
    for i in range(out):
        h0, h1 = i * sh // out, -(-(i + 1) * sh // out)
        cells = [
            x[..., h0:h1, j * sw // out : -(-(j + 1) * sw // out)].amax(dim=(-2, -1)) for j in range(out)
        ]
        rows.append(torch.stack(cells, dim=-1))
    return torch.stack(rows, dim=-2)


def encoder_unrolled(encoder: nn.TransformerEncoder, x: torch.Tensor) -> torch.Tensor:
    """``encoder(x.unsqueeze(1)).squeeze(1)`` in eval mode for one sequence ``x`` [N, d], written with
    reshapes that keep N a value of the graph (the exporter fixes it at the traced count inside
    ``nn.MultiheadAttention``). Post-norm layers with ReLU, as :class:`InterCL` builds them."""
    for layer in encoder.layers:
        attn = layer.self_attn
        heads = attn.num_heads
        d = x.shape[-1]
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (
            t.reshape(-1, heads, d // heads).transpose(0, 1) for t in (q, k, v)
        )  # [heads, N, d / heads]
        weights = torch.softmax(q @ k.transpose(1, 2) / float(d // heads) ** 0.5, dim=-1)
        a = (weights @ v).transpose(0, 1).reshape(-1, d)
        x = layer.norm1(x + attn.out_proj(a))
        x = layer.norm2(x + layer.linear2(torch.relu(layer.linear1(x))))
    return x if encoder.norm is None else encoder.norm(x)


class InterCL(nn.Module):
    """Inter-instance collaborative learning in the mask branch: the RoI features of one image attend
    to each other. Each RoI [C, S, S] becomes a token (1x1 conv to ``token_channels``, adaptive max pool
    to ``token_pool`` x ``token_pool``, flattened); a transformer encoder runs over the image's tokens;
    the result is mapped back (1x1 conv, bilinear up to S x S) and added to the RoI together with the
    image's global context (:class:`GlobalContext`); a 3x3 and a 1x1 conv, BatchNorm and ReLU follow.
    RoIs never attend across images."""

    def __init__(
        self,
        channels: int = 256,
        token_channels: int = 32,
        token_pool: int = 3,
        layers: int = 3,
        heads: int = 4,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        num_levels: int = 4,
    ):
        super().__init__()
        self.token_pool = token_pool
        self.token_channels = token_channels
        d_model = token_channels * token_pool * token_pool
        self.context = GlobalContext(channels, num_levels)
        self.to_tokens = nn.Conv2d(channels, token_channels, 1)
        layer = nn.TransformerEncoderLayer(
            d_model,
            heads,
            dim_feedforward=ffn_dim,
            dropout=dropout,
            activation="relu",
            batch_first=False,
            norm_first=False,
        )
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.from_tokens = nn.Conv2d(token_channels, channels, 1)
        self.fuse_conv3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.fuse_conv1 = nn.Conv2d(channels, channels, 1)
        self.bn = nn.BatchNorm2d(channels)  # the release's name (see IntraCL.bn)

    def forward(
        self,
        rois: torch.Tensor,
        counts: list[int],
        features: list[torch.Tensor],
        image_sizes: list[tuple[int, int]],
        padded_hw: tuple[int, int],
    ) -> torch.Tensor:
        """``rois`` [N, C, S, S] ordered image by image; ``counts[i]`` RoIs belong to image i;
        ``features`` the FPN levels P2-P5 of the batch."""
        if torch.onnx.is_in_onnx_export():
            return self.forward_traced(rois, features, image_sizes, padded_hw)
        if rois.shape[0] == 0:
            return rois
        assert sum(counts) == rois.shape[0], (counts, rois.shape)
        context = self.context(features, image_sizes, padded_hw)  # [B, C]
        size = rois.shape[-2:]
        tokens = F.adaptive_max_pool2d(self.to_tokens(rois), self.token_pool).flatten(1)  # [N, d]
        encoded = []
        for chunk in torch.split(tokens, counts):
            if chunk.shape[0] == 0:
                continue
            encoded.append(self.transformer(chunk.unsqueeze(1)).squeeze(1))  # sequence-first, batch 1
        t = torch.cat(encoded).view(-1, self.token_channels, self.token_pool, self.token_pool)
        t = F.interpolate(self.from_tokens(t), size=size, mode="bilinear", align_corners=True)
        g = torch.repeat_interleave(
            context, torch.as_tensor(counts, device=rois.device), dim=0, output_size=sum(counts)
        )
        fused = rois + t + g[:, :, None, None]
        return torch.relu(self.bn(self.fuse_conv1(self.fuse_conv3(fused))))

    def forward_traced(
        self, rois: torch.Tensor, features: list[torch.Tensor], image_sizes, padded_hw
    ) -> torch.Tensor:
        """:meth:`forward` for the RoIs of one image with no branch on their number (ONNX export: the graph
        holds every step whatever the number of detections; ``image_sizes[0]`` and ``padded_hw`` are
        tensors)."""
        context = self.context.forward_traced(features, image_sizes[0], padded_hw)  # [1, C]
        size = (int(rois.shape[-2]), int(rois.shape[-1]))  # the mask RoIAlign's fixed output size
        tokens = adaptive_max_pool_unrolled(self.to_tokens(rois), self.token_pool).flatten(1)  # [N, d]
        t = encoder_unrolled(self.transformer, tokens)
        t = t.reshape(-1, self.token_channels, self.token_pool, self.token_pool)
        t = F.interpolate(self.from_tokens(t), size=size, mode="bilinear", align_corners=True)
        fused = rois + t + context[:, :, None, None]
        return torch.relu(self.bn(self.fuse_conv1(self.fuse_conv3(fused))))
