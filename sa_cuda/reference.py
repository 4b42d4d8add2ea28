"""Pure-PyTorch references of both Shuffle Attention layers: the ground truth of every test and
benchmark.

``SALayer`` is the layer of SA-Net's code release (``sa_layer``: gate parameters cweight, cbias,
sweight, sbias); ``ShuffleAttention`` is the same layer with 1x1-conv gates (affine1, affine2).
sa_cuda.variants lists their parameters. Their ``forward`` is the published code, line for line;
``sa_layer`` and ``shuffle_attention`` are the same math as functions of explicit parameters (the
math and shapes: docs/design.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SALayer", "ShuffleAttention", "channel_shuffle", "sa_layer", "shuffle_attention"]


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """[B, C, H, W] -> [B, C, H, W]: channel (g, i) of the [groups, C/groups] split moves to (i, g)."""
    b, c, h, w = x.shape
    x = x.reshape(b, groups, -1, h, w)
    x = x.permute(0, 2, 1, 3, 4)
    return x.reshape(b, -1, h, w)


def _branches(x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    b, c, h, w = x.shape
    return x.reshape(b * groups, -1, h, w).chunk(2, dim=1)


def _merge(xn: Tensor, xs: Tensor, b: int) -> Tensor:
    out = torch.cat([xn, xs], dim=1)
    out = out.reshape(b, -1, out.shape[-2], out.shape[-1])
    return channel_shuffle(out, 2)


def sa_layer(
    x: Tensor,
    groups: int,
    cweight: Tensor,
    cbias: Tensor,
    sweight: Tensor,
    sbias: Tensor,
    gn_weight: Tensor,
    gn_bias: Tensor,
    eps: float = 1e-5,
) -> Tensor:
    """SALayer of ``x`` [B, C, H, W]; cweight/cbias/sweight/sbias (1, m, 1, 1), gn (m,),
    m = C / (2 * groups). Returns [B, C, H, W]."""
    x_0, x_1 = _branches(x, groups)
    xn = x_0 * torch.sigmoid(cweight * F.adaptive_avg_pool2d(x_0, 1) + cbias)
    xs = F.group_norm(x_1, x_1.shape[1], gn_weight, gn_bias, eps)
    xs = x_1 * torch.sigmoid(sweight * xs + sbias)
    return _merge(xn, xs, x.shape[0])


def shuffle_attention(
    x: Tensor,
    groups: int,
    affine1_weight: Tensor,
    affine1_bias: Tensor,
    affine2_weight: Tensor,
    affine2_bias: Tensor,
    gn_weight: Tensor,
    gn_bias: Tensor,
    eps: float = 1e-5,
) -> Tensor:
    """ShuffleAttention of ``x`` [B, C, H, W]; affine weights (m, m, 1, 1), biases and gn (m,)."""
    x_0, x_1 = _branches(x, groups)
    xn = x_0 * torch.sigmoid(F.conv2d(F.adaptive_avg_pool2d(x_0, 1), affine1_weight, affine1_bias))
    xs = F.group_norm(x_1, x_1.shape[1], gn_weight, gn_bias, eps)
    xs = x_1 * torch.sigmoid(F.conv2d(xs, affine2_weight, affine2_bias))
    return _merge(xn, xs, x.shape[0])


class SALayer(nn.Module):
    """SA-Net's ``sa_layer`` (github.com/wofmanaf/SA-Net), unchanged."""

    def __init__(self, channel: int, groups: int = 64):
        super().__init__()
        self.groups = groups
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.cweight = nn.Parameter(torch.zeros(1, channel // (2 * groups), 1, 1))
        self.cbias = nn.Parameter(torch.ones(1, channel // (2 * groups), 1, 1))
        self.sweight = nn.Parameter(torch.zeros(1, channel // (2 * groups), 1, 1))
        self.sbias = nn.Parameter(torch.ones(1, channel // (2 * groups), 1, 1))
        self.sigmoid = nn.Sigmoid()
        self.gn = nn.GroupNorm(channel // (2 * groups), channel // (2 * groups))

    @staticmethod
    def channel_shuffle(x: Tensor, groups: int) -> Tensor:
        return channel_shuffle(x, groups)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x = x.reshape(b * self.groups, -1, h, w)
        x_0, x_1 = x.chunk(2, dim=1)
        # channel attention
        xn = self.avg_pool(x_0)
        xn = self.cweight * xn + self.cbias
        xn = x_0 * self.sigmoid(xn)
        # spatial attention
        xs = self.gn(x_1)
        xs = self.sweight * xs + self.sbias
        xs = x_1 * self.sigmoid(xs)
        # concatenate along channel axis
        out = torch.cat([xn, xs], dim=1)
        out = out.reshape(b, -1, h, w)
        out = self.channel_shuffle(out, 2)
        return out


class ShuffleAttention(nn.Module):
    """``ShuffleAttention``: the Shuffle Attention layer with 1x1-conv gates, unchanged."""

    def __init__(self, channel: int, groups: int = 64):
        super().__init__()
        self.groups = groups
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        mid_channel = channel // (groups * 2)
        self.affine1 = nn.Conv2d(mid_channel, mid_channel, 1)
        self.affine2 = nn.Conv2d(mid_channel, mid_channel, 1)
        self.sigmoid = nn.Sigmoid()
        self.gn = nn.GroupNorm(num_groups=mid_channel, num_channels=mid_channel)

    def channel_shuffle(self, x: Tensor, groups: int) -> Tensor:
        return channel_shuffle(x, groups)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x = x.reshape(b * self.groups, -1, h, w)  # [bg, c/g, h, w]
        x_0, x_1 = x.chunk(2, dim=1)  # [bg, c/2g, h, w]
        # channel attention using SE
        xn = self.avg_pool(x_0)  # [bg, c/2g, 1, 1]
        xn = self.affine1(xn)  # [bg, c/2g, 1, 1]
        xn = x_0 * self.sigmoid(xn)  # [bg, c/2g, h, w]
        # spatial attention using Group Norm
        xs = self.gn(x_1)  # [bg, c/2g, h, w]
        xs = self.affine2(xs)  # [bg, c/2g, h, w]
        xs = x_1 * self.sigmoid(xs)  # [bg, c/2g, h, w]
        # concatenate along channel axis
        out = torch.cat([xn, xs], dim=1)  # [bg, c/g, h, w]
        out = out.reshape(b, -1, h, w)  # [b, c, h, w]
        # channel shuffle
        out = self.channel_shuffle(out, 2)
        return out
