"""ViTAEv2-S backbone (window attention without shift in stages 1-2, global attention in 3-4).

ViTAEv2 stacks four stages. Each stage starts with a *reduction cell* (RC) that downsamples and
widens the token map, followed by ``depth`` *normal cells* (NC). Both cell types run a
convolutional branch in parallel with attention, which gives the transformer a locality prior:

Reduction cell (downsample ratio r, kernel k, dilations D, embed dim E, token dim T):

    x (NCHW, padded to a multiple of r)
    pyramid = concat_d GELU(conv_kxk(x, stride r, dilation d))     "PRM": E channels per dilation
    tokens  = pyramid as [B, N, E*|D|]
    a       = v + proj(attention(LN(tokens)))     -> [B, N, T]   (window or global; v is the skip,
                                                                  because input and output widths differ)
    x       = a + PCM(x)                          PCM: three grouped 3x3 convs (strides make r), BN, SiLU
    x       = x + MLP(LN(x))

Normal cell (width C, grouped PCM with hidden width C * mlp_ratio):

    x = x + DropPath(attention(LN(x))) + DropPath(PCM(x))
    x = x + DropPath(MLP(LN(x)))

ViTAEv2-S: downsample ratios [4,2,2,2], token dims [64,128,256,512], embed dims [64,64,128,256],
NC depths [2,2,8,2], NC heads [1,2,4,8], RC heads [1,1,2,4], NC groups [1,32,64,128], RC groups
[1,16,32,64], mlp ratio 4 (normal cells), RC kernels [7,3,3,3], RC dilations [[1,2,3,4],[1,2,3],
[1,2],[1,2]], window 7 (no shift) in stages 1-2, global attention in stages 3-4, LayerNorm eps 1e-6.

Any input size works: each reduction cell pads its input (bottom/right, zeros) to a multiple of its
ratio, so stage i has ceil(H / stride_i) rows, and window attention pads its token map to a
multiple of the window and crops afterwards. At sizes divisible by 32 (the detector pads to 32)
nothing is padded before the reduction cells, the same as the original.

Stochastic depth: linspace(0, drop_path_rate, sum(depths)) sliced *cumulatively* per stage. The
release slices with the previous stage's depth instead (docs/model.md: [0:2], [2:4], [2:10], [8:10]);
``drop_path_schedule="release"`` reproduces that.

Parameter names follow the layout of the official ViTAEv2 code as far as we know it
(``layers.{i}.RC.PRM.convs.{j}.0``, ``layers.{i}.RC.PCM.{0,1,3,4,6}``, ``layers.{i}.RC.attn.{norm1,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``layers.{i}.NC.{j}.{norm1, attn.qkv, attn.proj,
attn.relative_position_bias_table, norm2, mlp.fc1, mlp.fc2, PCM.{0,1,3,4,6}}``) so that ImageNet
ViTAEv2 checkpoints load non-strictly; this is written from the architecture's description, not
from that code, and the names could not be checked against a real checkpoint. Other details taken
from our understanding of ViTAE and equally unchecked: the reduction cells' MLP has ratio 1 (that
gives 19.36 M parameters with the ImageNet head, against the paper's ~19.2 M; ratio 4 would give
21.5 M); every qkv projection has a bias (a checkpoint without one leaves it at its zero init,
which is the same function); the value skip of reduction cells merges the heads; global reduction
cells scale attention by their input width (T2T convention); window attention has a relative
position bias table per head (zero init, so a checkpoint without one means no bias); the stage
outputs have no extra norm; the ImageNet file's ``state_dict`` is used (not ``state_dict_ema``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from i3cl_core.model.backbone import FreezableBackbone, freeze
from i3cl_core.model.errors import CheckpointError
from i3cl_core.model.weights import read_state_dict, select_prefix, strip_prefixes
from i3cl_core.utils import get_logger

log = get_logger("model")

VITAEV2_S = dict(
    downsample_ratios=(4, 2, 2, 2),
    token_dims=(64, 128, 256, 512),
    embed_dims=(64, 64, 128, 256),
    depths=(2, 2, 8, 2),
    nc_heads=(1, 2, 4, 8),
    rc_heads=(1, 1, 2, 4),
    nc_groups=(1, 32, 64, 128),
    rc_groups=(1, 16, 32, 64),
    kernel_sizes=(7, 3, 3, 3),
    dilations=((1, 2, 3, 4), (1, 2, 3), (1, 2), (1, 2)),
    token_types=("window", "window", "transformer", "transformer"),
)


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


# ------------------------------------------------------------------------------------ attention
class GlobalAttention(nn.Module):
    """Multi-head self-attention over all tokens. With ``in_dim != out_dim`` (reduction cells) the
    values, merged over heads, serve as the skip connection: out = v + proj(softmax(qk) v).
    ``scale_by_input``: scale the logits by (in_dim / heads)^-0.5 instead of (out_dim / heads)^-0.5,
    the convention of the T2T token transformer that ViTAE's global reduction cells build on."""

    def __init__(
        self, in_dim: int, out_dim: int, heads: int, qkv_bias: bool = True, scale_by_input: bool = False
    ):
        super().__init__()
        if out_dim % heads:
            raise ValueError(f"attention width {out_dim} is not divisible by {heads} heads")
        self.heads = heads
        self.out_dim = out_dim
        self.scale = ((in_dim if scale_by_input else out_dim) // heads) ** -0.5
        self.value_skip = in_dim != out_dim
        self.qkv = nn.Linear(in_dim, 3 * out_dim, bias=qkv_bias)
        self.proj = nn.Linear(out_dim, out_dim)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, self.out_dim // self.heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]  # each [B, heads, N, d]

    def _finish(self, out: Tensor, v: Tensor) -> Tensor:
        b, _, n, _ = out.shape
        out = self.proj(out.transpose(1, 2).reshape(b, n, self.out_dim))
        if self.value_skip:
            out = out + v.transpose(1, 2).reshape(b, n, self.out_dim)
        return out

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        q, k, v = self._qkv(x)
        return self._finish(F.scaled_dot_product_attention(q, k, v, scale=self.scale), v)


class WindowAttention(GlobalAttention):
    """Attention inside non-overlapping ``window x window`` windows (no shift), with a learned
    relative position bias per head. The token map is zero-padded (bottom/right) to a multiple of
    the window and cropped afterwards, so any map size works."""

    def __init__(self, in_dim: int, out_dim: int, heads: int, window: int = 7, qkv_bias: bool = True):
        super().__init__(in_dim, out_dim, heads, qkv_bias)
        self.window = window
        # zero start: a checkpoint without the table behaves as attention without position bias
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        coords = torch.stack(
            torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        ).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]) + (window - 1)  # [2, w*w, w*w], each in [0, 2w-2]
        self.register_buffer("relative_position_index", rel[0] * (2 * window - 1) + rel[1], persistent=False)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        b, n, c = x.shape
        h, w = hw
        ws = self.window
        x = x.view(b, h, w, c)
        ph, pw = (-h) % ws, (-w) % ws
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        # windows: [B * nWin, ws*ws, C]
        win = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        q, k, v = self._qkv(win)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(ws * ws, ws * ws, self.heads).permute(2, 0, 1).unsqueeze(0).to(q.dtype)
        out = self._finish(
            F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale), v
        )  # [B*nWin, ws*ws, out]
        out = out.view(b, hp // ws, wp // ws, ws, ws, self.out_dim).permute(0, 1, 3, 2, 4, 5)
        out = out.reshape(b, hp, wp, self.out_dim)[:, :h, :w]
        return out.reshape(b, h * w, self.out_dim)


def make_attention(kind: str, in_dim: int, out_dim: int, heads: int, window: int) -> GlobalAttention:
    if kind == "window":
        return WindowAttention(in_dim, out_dim, heads, window)
    if kind == "transformer":
        return GlobalAttention(in_dim, out_dim, heads, scale_by_input=in_dim != out_dim)
    raise ValueError(f"unknown token type {kind!r} (window or transformer)")


def _tokens(x: Tensor) -> Tensor:
    return x.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, HW, C]


def _map(x: Tensor, hw: tuple[int, int]) -> Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], hw[0], hw[1])  # [B, HW, C] -> [B, C, H, W]


# ------------------------------------------------------------------------------------ cells
class PyramidReduction(nn.Module):
    """PRM: parallel dilated k x k convs with stride r (+GELU), concatenated along channels. The
    padding ceil(((k-1)d + 1 - r) / 2) makes every branch give the same H/r x W/r map."""

    def __init__(self, in_chans: int, embed_dim: int, kernel: int, stride: int, dilations):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(
                    in_chans,
                    embed_dim,
                    kernel,
                    stride=stride,
                    dilation=d,
                    padding=math.ceil(((kernel - 1) * d + 1 - stride) / 2),
                ),
                nn.GELU(),
            )
            for d in dilations
        )
        self.out_chans = embed_dim * len(dilations)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([conv(x) for conv in self.convs], dim=1)


class RCTransformer(nn.Module):
    """The reduction cell's token block: norm1 -> attention (in -> out width) ... norm2 -> MLP."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, heads: int, mlp_ratio: float, window: int):
        super().__init__()
        self.norm1 = _layer_norm(in_dim)
        self.attn = make_attention(kind, in_dim, out_dim, heads, window)
        self.norm2 = _layer_norm(out_dim)
        self.mlp = Mlp(out_dim, int(out_dim * mlp_ratio))


class ReductionCell(nn.Module):
    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        token_dim: int,
        ratio: int,
        kernel: int,
        dilations,
        heads: int,
        group: int,
        kind: str,
        window: int = 7,
        mlp_ratio: float = 1.0,
    ):
        super().__init__()
        self.ratio = ratio
        self.PRM = PyramidReduction(in_chans, embed_dim, kernel, ratio, dilations)
        self.attn = RCTransformer(kind, self.PRM.out_chans, token_dim, heads, mlp_ratio, window)
        # PCM: three grouped 3x3 convs whose strides multiply to the ratio (4 -> 2,2,1; 2 -> 2,1,1)
        strides, rest = [], ratio // 2
        for _ in range(3):
            strides.append(2 if rest > 0 else 1)
            rest //= 2
        if math.prod(strides) != ratio:
            raise ValueError(f"downsample ratio {ratio}: only 1, 2, 4 or 8 are supported")
        self.PCM = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim, 3, stride=strides[0], padding=1, groups=group),
            nn.BatchNorm2d(embed_dim),
            nn.SiLU(inplace=True),
            nn.Conv2d(embed_dim, embed_dim, 3, stride=strides[1], padding=1, groups=group),
            nn.BatchNorm2d(embed_dim),
            nn.SiLU(inplace=True),
            nn.Conv2d(embed_dim, token_dim, 3, stride=strides[2], padding=1, groups=group),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """``x`` [B, C, H, W] -> (tokens [B, N, T], (H', W')) with H' = ceil(H / ratio)."""
        ph, pw = (-x.shape[-2]) % self.ratio, (-x.shape[-1]) % self.ratio
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        pyramid = self.PRM(x)
        hw = (pyramid.shape[-2], pyramid.shape[-1])
        blk = self.attn
        t = blk.attn(blk.norm1(_tokens(pyramid)), hw) + _tokens(self.PCM(x))
        return t + blk.mlp(blk.norm2(t)), hw


class NormalCell(nn.Module):
    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float,
        group: int,
        kind: str,
        window: int = 7,
        drop_path: float = 0.0,
    ):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = _layer_norm(dim)
        self.attn = make_attention(kind, dim, dim, heads, window)
        self.drop_path = DropPath(drop_path)
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, hidden)
        self.PCM = nn.Sequential(
            nn.Conv2d(dim, hidden, 3, padding=1, groups=group),
            nn.BatchNorm2d(hidden),
            nn.SiLU(inplace=True),
            nn.Conv2d(hidden, dim, 3, padding=1, groups=group),
            nn.BatchNorm2d(dim),
            nn.SiLU(inplace=True),
            nn.Conv2d(dim, dim, 3, padding=1, groups=group),
            nn.SiLU(inplace=True),
        )

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        conv = _tokens(self.PCM(_map(x, hw)))
        x = x + self.drop_path(self.attn(self.norm1(x), hw)) + self.drop_path(conv)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Stage(nn.Module):
    def __init__(self, rc: ReductionCell, ncs: list[NormalCell]):
        super().__init__()
        self.RC = rc
        self.NC = nn.ModuleList(ncs)


# ------------------------------------------------------------------------------------ backbone
class ViTAEv2Backbone(FreezableBackbone):
    """ViTAEv2-S feature extractor: ``forward(x)`` -> [C2, C3, C4, C5] with 64/128/256/512 channels
    at strides 4/8/16/32."""

    def __init__(
        self,
        drop_path_rate: float = 0.3,
        grad_checkpointing: bool = False,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        rc_mlp_ratio: float = 1.0,
        drop_path_schedule: str = "cumulative",
        in_chans: int = 3,
        arch: dict | None = None,
    ):
        super().__init__()
        a = dict(VITAEV2_S, **(arch or {}))
        depths = list(a["depths"])
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        if drop_path_schedule == "cumulative":
            starts = [sum(depths[:i]) for i in range(len(depths))]
        elif drop_path_schedule == "release":  # docs/model.md: offset by the previous stage's depth only
            starts = [0] + depths[:-1]
        else:
            raise ValueError(f"drop_path_schedule: {drop_path_schedule!r} (cumulative or release)")
        stages, chans = [], in_chans
        for i, depth in enumerate(depths):
            kind = a["token_types"][i]
            rc = ReductionCell(
                chans,
                a["embed_dims"][i],
                a["token_dims"][i],
                a["downsample_ratios"][i],
                a["kernel_sizes"][i],
                a["dilations"][i],
                a["rc_heads"][i],
                a["rc_groups"][i],
                kind,
                window_size,
                rc_mlp_ratio,
            )
            ncs = [
                NormalCell(
                    a["token_dims"][i],
                    a["nc_heads"][i],
                    mlp_ratio,
                    a["nc_groups"][i],
                    kind,
                    window_size,
                    dpr[starts[i] + j],
                )
                for j in range(depth)
            ]
            stages.append(Stage(rc, ncs))
            chans = a["token_dims"][i]
        self.layers = nn.ModuleList(stages)
        self.out_channels = list(a["token_dims"])
        self.strides = [math.prod(a["downsample_ratios"][: i + 1]) for i in range(len(depths))]
        self.grad_checkpointing = grad_checkpointing
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.apply(self._init_weights)
        self._freeze()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def _freeze(self) -> None:
        """``frozen_stages``: -1 none; 0 the first reduction cell (the stem); k >= 1 the first k stages."""
        if self.frozen_stages < 0:
            return
        freeze([self.layers[0].RC] if self.frozen_stages == 0 else list(self.layers[: self.frozen_stages]))

    def _run(self, fn, *args):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for stage in self.layers:
            t, hw = self._run(stage.RC, x)
            for cell in stage.NC:
                t = self._run(cell, t, hw)
            x = _map(t, hw).contiguous()
            outs.append(x)
        return outs

    # -------------------------------------------------------------------------------- weights
    def load_weights(self, path: str):
        """Non-strict load of ImageNet ViTAEv2 weights from a local file. The classifier (``head.*``)
        and the final norm (``norm.*``) are dropped, as are buffers we recompute; missing and
        skipped keys are logged. Raises :class:`CheckpointError` when nothing matches."""
        own = self.state_dict()
        state, prefix = select_prefix(strip_prefixes(read_state_dict(path, "ViTAEv2 weights")), own.keys())
        if prefix:
            log.info("ViTAEv2 weights %s: using the keys under %r", path, prefix)
        dropped = [
            k
            for k in state
            if k.split(".")[0] in ("head", "norm", "fc", "classifier")
            or k.endswith(("relative_position_index", "attn_mask"))
        ]
        state = {k: v for k, v in state.items() if k not in dropped}
        shapes = [
            f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and own[k].shape != v.shape
        ]
        state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape or k not in own}
        result = self.load_state_dict(state, strict=False)
        loaded = len(state) - len(result.unexpected_keys)
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
        log.info(
            "ViTAEv2 weights %s: %d tensors loaded, %d missing, %d unexpected, %d shape mismatches, "
            "%d dropped (classifier/recomputed buffers)",
            path,
            loaded,
            len(missing),
            len(unexpected),
            len(shapes),
            len(dropped),
        )
        if missing:
            log.info(
                "  missing (kept at init): %s%s", ", ".join(missing[:8]), " ..." if len(missing) > 8 else ""
            )
        if unexpected:
            log.info(
                "  unexpected (skipped): %s%s",
                ", ".join(unexpected[:8]),
                " ..." if len(unexpected) > 8 else "",
            )
        if shapes:
            log.warning(
                "  other shapes (skipped): %s%s", "; ".join(shapes[:5]), " ..." if len(shapes) > 5 else ""
            )
        if loaded == 0:
            raise CheckpointError(
                f"{path}: none of its keys match the ViTAEv2-S backbone (first keys: {list(state)[:3]})"
            )
        return missing, unexpected + shapes
