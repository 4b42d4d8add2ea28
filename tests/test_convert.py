"""sa_cuda.convert / fuse: what is replaced (same outputs and gradients as before), what is left
alone (bit for bit, reported with a reason), hooks, shared instances, attributes, meta models.

The foreign classes below are written from their published code; look-alikes that compute
something else are the external testers' cases (and more of the same kinds)."""

from __future__ import annotations

import copy
import gc
import threading
import types
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, forward_backward, make_input, randomize_
from torch import nn

import sa_cuda
from sa_cuda.convert import _REGISTRY, ConvertReport, reason_not_convertible, register
from sa_cuda.testing import max_err

SHAPE = (2, 32, 7, 9)  # input of _net: B, C, H, W


# ---- foreign classes, from their published code ------------------------------------------------
class OfficialSaLayer(nn.Module):
    """SA-Net's models/sa_resnet.py ``sa_layer`` (wofmanaf/SA-Net)."""

    def __init__(self, channel, groups=64):
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
    def channel_shuffle(x, groups):
        b, c, h, w = x.shape
        x = x.reshape(b, groups, -1, h, w)
        x = x.permute(0, 2, 1, 3, 4)
        return x.reshape(b, -1, h, w)

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.reshape(b * self.groups, -1, h, w)
        x_0, x_1 = x.chunk(2, dim=1)
        xn = self.avg_pool(x_0)
        xn = self.cweight * xn + self.cbias
        xn = x_0 * self.sigmoid(xn)
        xs = self.gn(x_1)
        xs = self.sweight * xs + self.sbias
        xs = x_1 * self.sigmoid(xs)
        out = torch.cat([xn, xs], dim=1)
        out = out.reshape(b, -1, h, w)
        out = self.channel_shuffle(out, 2)
        return out


class CommentedSaLayer(nn.Module):
    """The official layer as a user may have pasted it: comments, docstrings, other local names,
    functional sigmoid, no avg_pool / sigmoid submodules."""

    def __init__(self, channel, groups=64):
        super().__init__()
        self.groups = groups  # number of groups G
        mid = channel // (2 * groups)
        # gate parameters
        self.cweight = nn.Parameter(torch.zeros(1, mid, 1, 1))
        self.cbias = nn.Parameter(torch.ones(1, mid, 1, 1))
        self.sweight = nn.Parameter(torch.zeros(1, mid, 1, 1))
        self.sbias = nn.Parameter(torch.ones(1, mid, 1, 1))
        self.gn = nn.GroupNorm(mid, mid)

    @staticmethod
    def channel_shuffle(tensor, num_groups):
        """Interleave the channel groups."""
        batch, channels, height, width = tensor.shape
        tensor = tensor.reshape(batch, num_groups, -1, height, width).transpose(1, 2)
        return tensor.reshape(batch, -1, height, width)

    def forward(self, inputs):
        """SA: split into groups, channel gate on one half, spatial gate on the other."""
        batch, _, height, width = inputs.shape
        grouped = inputs.reshape(batch * self.groups, -1, height, width)
        channel_half, spatial_half = grouped.chunk(2, dim=1)
        # channel attention: global average pooling
        pooled = channel_half.mean(dim=(2, 3), keepdim=True)
        channel_half = channel_half * torch.sigmoid(self.cweight * pooled + self.cbias)
        # spatial attention: group norm statistics
        normed = self.gn(spatial_half)
        spatial_half = spatial_half * torch.sigmoid(self.sweight * normed + self.sbias)
        merged = torch.cat([channel_half, spatial_half], dim=1).reshape(batch, -1, height, width)
        return self.channel_shuffle(merged, 2)


class ExternalAttentionShuffleAttention(nn.Module):
    """External-Attention-pytorch's model/attention/ShuffleAttention.py (groups in ``G``)."""

    def __init__(self, channel=512, reduction=16, G=8):
        super().__init__()
        self.G = G
        self.channel = channel
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.gn = nn.GroupNorm(channel // (2 * G), channel // (2 * G))
        self.cweight = nn.Parameter(torch.zeros(1, channel // (2 * G), 1, 1))
        self.cbias = nn.Parameter(torch.ones(1, channel // (2 * G), 1, 1))
        self.sweight = nn.Parameter(torch.zeros(1, channel // (2 * G), 1, 1))
        self.sbias = nn.Parameter(torch.ones(1, channel // (2 * G), 1, 1))
        self.sigmoid = nn.Sigmoid()

    def init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    @staticmethod
    def channel_shuffle(x, groups):
        b, c, h, w = x.shape
        x = x.reshape(b, groups, -1, h, w)
        x = x.permute(0, 2, 1, 3, 4)
        x = x.reshape(b, -1, h, w)
        return x

    def forward(self, x):
        b, c, h, w = x.size()
        # group into subfeatures
        x = x.view(b * self.G, -1, h, w)  # bs*G,c//G,h,w
        # channel_split
        x_0, x_1 = x.chunk(2, dim=1)  # bs*G,c//(2*G),h,w
        # channel attention
        x_channel = self.avg_pool(x_0)  # bs*G,c//(2*G),1,1
        x_channel = self.cweight * x_channel + self.cbias  # bs*G,c//(2*G),1,1
        x_channel = x_0 * self.sigmoid(x_channel)
        # spatial attention
        x_spatial = self.gn(x_1)  # bs*G,c//(2*G),h,w
        x_spatial = self.sweight * x_spatial + self.sbias  # bs*G,c//(2*G),h,w
        x_spatial = x_1 * self.sigmoid(x_spatial)  # bs*G,c//(2*G),h,w
        # concatenate along channel axis
        out = torch.cat([x_channel, x_spatial], dim=1)  # bs*G,c//G,h,w
        out = out.contiguous().view(b, -1, h, w)
        # channel shuffle
        out = self.channel_shuffle(out, 2)
        return out


class SeedShuffleAttention(nn.Module):
    """The seed document's ShuffleAttention (1x1-conv gates)."""

    def __init__(self, channel, groups=64):
        super().__init__()
        self.groups = groups
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        mid_channel = channel // (groups * 2)
        self.affine1 = nn.Conv2d(mid_channel, mid_channel, 1)
        self.affine2 = nn.Conv2d(mid_channel, mid_channel, 1)
        self.sigmoid = nn.Sigmoid()
        self.gn = nn.GroupNorm(num_groups=mid_channel, num_channels=mid_channel)

    def channel_shuffle(self, x, groups):
        b, c, h, w = x.shape
        x = x.reshape(b, groups, -1, h, w)
        x = x.permute(0, 2, 1, 3, 4)
        return x.reshape(b, -1, h, w)

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.reshape(b * self.groups, -1, h, w)  # [bg, c/g, h, w]
        x_0, x_1 = x.chunk(2, dim=1)  # [bg, c/2g, h, w]
        # channel attention using SE
        xn = self.avg_pool(x_0)
        xn = self.affine1(xn)
        xn = x_0 * self.sigmoid(xn)
        # spatial attention using Group Norm
        xs = self.gn(x_1)
        xs = self.affine2(xs)
        xs = x_1 * self.sigmoid(xs)
        out = torch.cat([xn, xs], dim=1)
        out = out.reshape(b, -1, h, w)
        # channel shuffle
        out = self.channel_shuffle(out, 2)
        return out


class RenamedSeedShuffleAttention(nn.Module):
    """The seed's layer with other local names and F calls instead of the pool/sigmoid modules."""

    def __init__(self, channel, groups=64):
        super().__init__()
        self.groups = groups
        width = channel // (groups * 2)
        self.gn = nn.GroupNorm(width, width)
        self.affine1 = nn.Conv2d(width, width, kernel_size=1)
        self.affine2 = nn.Conv2d(width, width, kernel_size=1)

    def forward(self, feature_map):
        n, _, rows, cols = feature_map.shape
        first, second = feature_map.reshape(n * self.groups, -1, rows, cols).chunk(2, dim=1)
        first = first * torch.sigmoid(self.affine1(F.adaptive_avg_pool2d(first, 1)))
        second = second * torch.sigmoid(self.affine2(self.gn(second)))
        joined = torch.cat([first, second], dim=1).reshape(n, 2, -1, rows, cols)
        return joined.transpose(1, 2).reshape(n, -1, rows, cols)


class SubclassAddsNothingRelevant(OfficialSaLayer):
    """A subclass with its own __init__ default and a repr helper: forward is the official one."""

    def __init__(self, channel, groups=4):
        super().__init__(channel, groups)

    def extra_repr(self):
        return f"groups={self.groups}"


class ReferenceSubclass(sa_cuda.reference.SALayer):
    """A subclass of a registered class that overrides nothing its forward uses."""

    def describe(self):
        return "mine"


class NotShuffleAttention(nn.Module):
    """Has a gn and groups but no SA parameters: not a look-alike, never reported."""

    def __init__(self):
        super().__init__()
        self.groups = 2
        self.gn = nn.GroupNorm(4, 4)

    def forward(self, x):
        return self.gn(x)


# ---- look-alikes that compute something else ----------------------------------------------------
class ScaledResidual(OfficialSaLayer):
    def forward(self, x):
        return 2 * super().forward(x) + x


class CountingSubclass(OfficialSaLayer):
    calls = 0

    def forward(self, x):
        CountingSubclass.calls += 1
        return super().forward(x)


class NoShuffle(OfficialSaLayer):
    @staticmethod
    def channel_shuffle(x, groups):
        return x


class ExtraParameter(ExternalAttentionShuffleAttention):
    def __init__(self, channel, G):
        super().__init__(channel, G=G)
        self.scale = nn.Parameter(torch.ones(1))


class ExtraBuffer(OfficialSaLayer):
    def __init__(self, channel, groups):
        super().__init__(channel, groups)
        self.register_buffer("mask", torch.ones(1, channel // (2 * groups), 1, 1))


class ExtraSubmodule(SeedShuffleAttention):
    def __init__(self, channel, groups):
        super().__init__(channel, groups)
        self.proj = nn.Identity()


def _add_sa_parameters(module, channel, groups):
    """The official layer's attributes (groups, cweight, cbias, sweight, sbias, gn) on module."""
    module.groups = groups
    mid = channel // (2 * groups)
    module.cweight = nn.Parameter(torch.zeros(1, mid, 1, 1))
    module.cbias = nn.Parameter(torch.ones(1, mid, 1, 1))
    module.sweight = nn.Parameter(torch.zeros(1, mid, 1, 1))
    module.sbias = nn.Parameter(torch.ones(1, mid, 1, 1))
    module.gn = nn.GroupNorm(mid, mid)


class MaxPoolGate(nn.Module):
    """Same attributes as the official layer, unrelated class, max-pool channel gate."""

    def __init__(self, channel, groups):
        super().__init__()
        _add_sa_parameters(self, channel, groups)

    def forward(self, x):
        b, c, h, w = x.shape
        x_0, x_1 = x.reshape(b * self.groups, -1, h, w).chunk(2, dim=1)
        xn = x_0 * torch.sigmoid(self.cweight * F.adaptive_max_pool2d(x_0, 1) + self.cbias)
        xs = x_1 * torch.sigmoid(self.sweight * self.gn(x_1) + self.sbias)
        out = torch.cat([xn, xs], dim=1).reshape(b, 2, -1, h, w)
        return out.transpose(1, 2).reshape(b, -1, h, w)


class SquareInputBranch(nn.Module):
    """The official math, except that square inputs skip the channel shuffle."""

    def __init__(self, channel, groups):
        super().__init__()
        _add_sa_parameters(self, channel, groups)

    def forward(self, x):
        b, c, h, w = x.shape
        x_0, x_1 = x.reshape(b * self.groups, -1, h, w).chunk(2, dim=1)
        xn = x_0 * torch.sigmoid(self.cweight * x_0.mean((2, 3), keepdim=True) + self.cbias)
        xs = x_1 * torch.sigmoid(self.sweight * self.gn(x_1) + self.sbias)
        out = torch.cat([xn, xs], dim=1).reshape(b, -1, h, w)
        if h == w:
            return out
        return out.reshape(b, 2, -1, h, w).transpose(1, 2).reshape(b, -1, h, w)


class DetachedGate(nn.Module):
    """The official output, but no gradient flows through the spatial gate."""

    def __init__(self, channel, groups):
        super().__init__()
        _add_sa_parameters(self, channel, groups)

    def forward(self, x):
        b, c, h, w = x.shape
        x_0, x_1 = x.reshape(b * self.groups, -1, h, w).chunk(2, dim=1)
        xn = x_0 * torch.sigmoid(self.cweight * x_0.mean((2, 3), keepdim=True) + self.cbias)
        xs = x_1 * torch.sigmoid(self.sweight * self.gn(x_1) + self.sbias).detach()
        out = torch.cat([xn, xs], dim=1).reshape(b, 2, -1, h, w)
        return out.transpose(1, 2).reshape(b, -1, h, w)


def _official_math(module, x):
    """The official layer's math over module's attributes."""
    return sa_cuda.reference.sa_layer(
        x,
        module.groups,
        module.cweight,
        module.cbias,
        module.sweight,
        module.sbias,
        module.gn.weight,
        module.gn.bias,
        module.gn.eps,
    )


class FlagBranch(nn.Module):
    """Reads a flag of its own: the probe sees one value, the fused layer would ignore a change."""

    def __init__(self, channel, groups):
        super().__init__()
        _add_sa_parameters(self, channel, groups)
        self.shuffle = True

    def forward(self, x):
        b, c, h, w = x.shape
        x_0, x_1 = x.reshape(b * self.groups, -1, h, w).chunk(2, dim=1)
        xn = x_0 * torch.sigmoid(self.cweight * x_0.mean((2, 3), keepdim=True) + self.cbias)
        xs = x_1 * torch.sigmoid(self.sweight * self.gn(x_1) + self.sbias)
        out = torch.cat([xn, xs], dim=1)
        if not self.shuffle:
            return out.reshape(b, -1, h, w)
        return out.reshape(b, 2, -1, h, w).transpose(1, 2).reshape(b, -1, h, w)


class CountingOnSelf(nn.Module):
    """A direct nn.Module subclass whose forward keeps a call counter on self."""

    def __init__(self, channel, groups):
        super().__init__()
        _add_sa_parameters(self, channel, groups)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return sa_cuda.reference.sa_layer(
            x,
            self.groups,
            self.cweight,
            self.cbias,
            self.sweight,
            self.sbias,
            self.gn.weight,
            self.gn.bias,
            self.gn.eps,
        )


class RaisesOnNarrowPlanes(nn.Module):
    """The official math for planes at least 6 wide; raises on narrower ones."""

    def __init__(self, channel, groups):
        super().__init__()
        _add_sa_parameters(self, channel, groups)

    def forward(self, x):
        if x.shape[-1] < 6:
            raise ValueError("planes must be at least 6 wide")
        b, c, h, w = x.shape
        x_0, x_1 = x.reshape(b * self.groups, -1, h, w).chunk(2, dim=1)
        xn = x_0 * torch.sigmoid(self.cweight * x_0.mean((2, 3), keepdim=True) + self.cbias)
        xs = x_1 * torch.sigmoid(self.sweight * self.gn(x_1) + self.sbias)
        out = torch.cat([xn, xs], dim=1).reshape(b, 2, -1, h, w)
        return out.transpose(1, 2).reshape(b, -1, h, w)


class PassesSelfOn(nn.Module):
    """Correct math, but computed by a helper that gets self (and could read anything on it)."""

    def __init__(self, channel, groups):
        super().__init__()
        _add_sa_parameters(self, channel, groups)

    def forward(self, x):
        return _official_math(self, x)


class TrainingBranch(nn.Module):
    """Skips the spatial gate in training mode."""

    def __init__(self, channel, groups):
        super().__init__()
        _add_sa_parameters(self, channel, groups)

    def forward(self, x):
        b, c, h, w = x.shape
        x_0, x_1 = x.reshape(b * self.groups, -1, h, w).chunk(2, dim=1)
        xn = x_0 * torch.sigmoid(self.cweight * x_0.mean((2, 3), keepdim=True) + self.cbias)
        xs = x_1 if self.training else x_1 * torch.sigmoid(self.sweight * self.gn(x_1) + self.sbias)
        out = torch.cat([xn, xs], dim=1).reshape(b, 2, -1, h, w)
        return out.transpose(1, 2).reshape(b, -1, h, w)


class NoGradForward(nn.Module):
    """The official output computed without autograd: no gradient reaches x or the parameters."""

    def __init__(self, channel, groups):
        super().__init__()
        _add_sa_parameters(self, channel, groups)

    @torch.no_grad()
    def forward(self, x):
        b, c, h, w = x.shape
        x_0, x_1 = x.reshape(b * self.groups, -1, h, w).chunk(2, dim=1)
        xn = x_0 * torch.sigmoid(self.cweight * x_0.mean((2, 3), keepdim=True) + self.cbias)
        xs = x_1 * torch.sigmoid(self.sweight * self.gn(x_1) + self.sbias)
        out = torch.cat([xn, xs], dim=1).reshape(b, 2, -1, h, w)
        return out.transpose(1, 2).reshape(b, -1, h, w)


class CallOverride(OfficialSaLayer):
    def __call__(self, x):
        return super().__call__(x) + 1


class GroupNormSubclass(nn.GroupNorm):
    pass


def _hooked_gn():
    layer = OfficialSaLayer(32, 4)
    layer.gn.register_forward_hook(lambda mod, inp, out: None)
    return layer


def _instance_forward_override():
    layer = OfficialSaLayer(32, 4)
    layer.forward = types.MethodType(lambda self, x: OfficialSaLayer.forward(self, x) * 2, layer)
    return layer


def _instance_channel_shuffle_override():
    layer = OfficialSaLayer(32, 4)
    layer.__dict__["channel_shuffle"] = lambda x, groups: x
    return layer


def _subclassed_gn():
    layer = OfficialSaLayer(32, 4)
    layer.gn = GroupNormSubclass(4, 4)
    return layer


def _with(make, **factories):
    """A maker of make() with some attributes replaced by fresh factory() values."""

    def build():
        layer = make()
        for name, factory in factories.items():
            setattr(layer, name, factory())
        return layer

    return build


def _parametrized_cweight():
    layer = OfficialSaLayer(32, 4)
    torch.nn.utils.parametrize.register_parametrization(layer, "cweight", nn.Tanh())
    return layer


def _hides_fused_attribute():
    layer = RenamedSeedShuffleAttention(32, 4)  # its forward does not use channel_shuffle
    layer.channel_shuffle = True
    return layer


def _list_attribute():
    layer = OfficialSaLayer(32, 4)
    layer.history = []
    return layer


def _registered_subclass_overriding_forward():
    class Doubled(sa_cuda.reference.SALayer):
        def forward(self, x):
            return 2 * super().forward(x)

    return Doubled(32, 4)


def _conv_without_bias():
    layer = SeedShuffleAttention(32, 4)
    layer.affine2 = nn.Conv2d(4, 4, 1, bias=False)
    return layer


def _non_affine_gn():
    layer = OfficialSaLayer(32, 4)
    layer.gn = nn.GroupNorm(4, 4, affine=False)
    return layer


NEGATIVES = [
    pytest.param(
        lambda: ScaledResidual(32, 4), "forward is defined by ScaledResidual", id="subclass-2sa+x"
    ),
    pytest.param(
        lambda: CountingSubclass(32, 4),
        "forward is defined by CountingSubclass",
        id="subclass-side-effect",
    ),
    pytest.param(lambda: NoShuffle(32, 4), "overrides 'channel_shuffle'", id="subclass-no-shuffle"),
    pytest.param(lambda: ExtraParameter(32, 2), "extra parameter(s) scale", id="extra-parameter"),
    pytest.param(lambda: ExtraBuffer(32, 4), "buffer(s) mask", id="extra-buffer"),
    pytest.param(lambda: ExtraSubmodule(32, 4), "extra submodule(s) proj", id="extra-submodule"),
    pytest.param(lambda: MaxPoolGate(32, 4), "output differs", id="max-pool-gate"),
    pytest.param(
        lambda: SquareInputBranch(32, 4),
        "output differs from Shuffle Attention's by",
        id="shape-dependent-branch",
    ),
    pytest.param(lambda: DetachedGate(32, 4), "gradient of x differs", id="detached-gate"),
    pytest.param(lambda: FlagBranch(32, 4), "forward reads self.shuffle", id="flag-branch"),
    pytest.param(lambda: CountingOnSelf(32, 4), "forward assigns self.calls", id="counter-on-self"),
    pytest.param(lambda: PassesSelfOn(32, 4), "passes self on to other code", id="self-passed-on"),
    pytest.param(_hooked_gn, "gn has hooks", id="hook-on-gn"),
    pytest.param(
        _instance_forward_override, "the instance overrides 'forward'", id="instance-forward"
    ),
    pytest.param(
        _instance_channel_shuffle_override,
        "the instance overrides 'channel_shuffle'",
        id="instance-channel_shuffle",
    ),
    pytest.param(
        _subclassed_gn, "gn is GroupNormSubclass, not exactly nn.GroupNorm", id="groupnorm-subclass"
    ),
    pytest.param(_non_affine_gn, "not GroupNorm(m, m) with affine", id="gn-not-affine"),
    pytest.param(_conv_without_bias, "affine2 is Conv2d", id="conv-without-bias"),
    pytest.param(
        lambda: RaisesOnNarrowPlanes(32, 4),
        "raised ValueError: planes must be at least 6 wide",
        id="probe-raises",
    ),
    pytest.param(
        lambda: TrainingBranch(32, 4), "forward reads self.training", id="training-branch"
    ),
    pytest.param(
        lambda: NoGradForward(32, 4), "forward gives no gradient of x", id="no-grad-forward"
    ),
    pytest.param(
        lambda: CallOverride(32, 4), "CallOverride overrides '__call__'", id="subclass-__call__"
    ),
    pytest.param(
        _with(lambda: OfficialSaLayer(32, 4), avg_pool=lambda: nn.AdaptiveMaxPool2d(1)),
        "avg_pool is AdaptiveMaxPool2d",
        id="max-pool-module",
    ),
    pytest.param(
        _with(lambda: SeedShuffleAttention(32, 4), sigmoid=nn.Hardsigmoid),
        "sigmoid is Hardsigmoid",
        id="hardsigmoid-module",
    ),
    pytest.param(
        _with(lambda: OfficialSaLayer(32, 4), gn=lambda: nn.GroupNorm(1, 4)),
        "not GroupNorm(m, m)",
        id="gn-one-group",
    ),
    pytest.param(
        _parametrized_cweight, "extra submodule(s) parametrizations", id="parametrized-cweight"
    ),
    pytest.param(
        _hides_fused_attribute,
        "would hide the fused layer's channel_shuffle",
        id="attribute-hides-fused",
    ),
    pytest.param(_list_attribute, "instance attribute 'history' holds a list", id="list-attribute"),
    pytest.param(
        _registered_subclass_overriding_forward,
        "Doubled overrides 'forward' of SALayer",
        id="registered-subclass-forward",
    ),
]


def _net(layer):
    return nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), layer, nn.ReLU(), nn.Conv2d(32, 32, 1))


def _inputs(dtype=torch.float64, device="cpu"):
    return (
        make_input(SHAPE, seed=1, dtype=dtype, device=device),
        make_input(SHAPE, seed=2, dtype=dtype, device=device),
    )


def _assert_same(after, before, rtol=1e-10):
    for key in before:
        assert max_err(after[key], before[key]) <= rtol * max(
            1.0, before[key].abs().max().item()
        ), key


# ---- replaced: same outputs, gradients, parameters, keys -----------------------------------------
POSITIVES = [
    pytest.param(lambda: OfficialSaLayer(32, groups=4), sa_cuda.SALayer, id="official-sa_layer"),
    pytest.param(
        lambda: CommentedSaLayer(32, groups=4), sa_cuda.SALayer, id="official-commented-renamed"
    ),
    pytest.param(
        lambda: ExternalAttentionShuffleAttention(32, G=2),
        sa_cuda.SALayer,
        id="external-attention-G",
    ),
    pytest.param(lambda: SeedShuffleAttention(32, groups=4), sa_cuda.ShuffleAttention, id="seed"),
    pytest.param(
        lambda: RenamedSeedShuffleAttention(32, groups=2),
        sa_cuda.ShuffleAttention,
        id="seed-renamed",
    ),
    pytest.param(lambda: sa_cuda.reference.SALayer(32, 4), sa_cuda.SALayer, id="reference-SALayer"),
    pytest.param(
        lambda: sa_cuda.reference.ShuffleAttention(32, 8),
        sa_cuda.ShuffleAttention,
        id="reference-ShuffleAttention",
    ),
    pytest.param(
        _with(lambda: OfficialSaLayer(32, 4), gn=lambda: nn.GroupNorm(4, 4, eps=1e-3)),
        sa_cuda.SALayer,
        id="official-gn-eps",
    ),
    pytest.param(lambda: SubclassAddsNothingRelevant(32), sa_cuda.SALayer, id="foreign-subclass"),
    pytest.param(lambda: ReferenceSubclass(32, 2), sa_cuda.SALayer, id="registered-subclass"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make_layer,fused_cls", POSITIVES)
def test_convert_keeps_outputs_gradients_and_parameters(make_layer, fused_cls, device):
    torch.manual_seed(0)
    model = randomize_(_net(make_layer()).double(), seed=3).to(device).train(False)
    x, grad_out = _inputs(device=device)
    before = forward_backward(model, x, grad_out)
    keys = list(model.state_dict())
    params = dict(model.named_parameters())
    layer = model[1]
    plain = {k: v for k, v in vars(layer).items() if isinstance(v, (int, str)) and k != "training"}

    report = sa_cuda.convert(model, report=True)
    assert report.replaced == [("1", type(layer).__name__)] and report.skipped == []
    assert int(report) == report.count == 1
    assert type(model[1]) is fused_cls
    assert model.training is False and model[1].training is False
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects
    assert model[1].gn is layer.gn
    assert {k: getattr(model[1], k) for k in plain} == plain  # e.g. External-Attention's G, channel
    _assert_same(forward_backward(model, x, grad_out), before)
    assert sa_cuda.convert(model, report=True) == ConvertReport()  # fused modules are left alone


def test_optimizer_built_before_conversion_keeps_updating():
    model = randomize_(_net(ExternalAttentionShuffleAttention(32, G=2)).double(), seed=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    assert sa_cuda.convert(model) == 1
    x, grad_out = _inputs()
    grads = forward_backward(model, x, grad_out)
    old = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), old[name] - 0.5 * grads[name], rtol=0, atol=1e-15)
    assert not torch.equal(model[1].cweight.detach(), old["1.cweight"])


def test_keeps_plain_attributes_and_training_flag():
    layer = ExternalAttentionShuffleAttention(64, G=4)
    layer.tag, layer.sizes, layer.note = "stage-2", (3, (4, None)), None
    model = nn.Sequential(layer).train()
    layer.gn.eval()  # a submodule's own flag is not overwritten
    sa_cuda.convert(model)
    fused = model[0]
    assert (fused.G, fused.channel, fused.groups) == (4, 64, 4)
    assert (fused.tag, fused.sizes, fused.note) == ("stage-2", (3, (4, None)), None)
    assert fused.training is True and fused.gn.training is False


# ---- left alone: unchanged bit for bit, reported with a reason -----------------------------------
@pytest.mark.parametrize("make_layer,reason", NEGATIVES)
def test_look_alikes_that_compute_something_else_are_left_alone(make_layer, reason):
    torch.manual_seed(0)
    layer = make_layer()
    randomize_(layer, seed=5)
    model = nn.Sequential(layer)
    x = make_input((2, 32, 6, 6), seed=6)
    before = model(x)
    report = sa_cuda.convert(model, report=True)
    assert report.count == 0 and report.replaced == []
    assert model[0] is layer
    assert [(name, cls) for name, cls, _ in report.skipped] == [("0", type(layer).__name__)]
    assert reason in report.skipped[0][2], report.skipped[0][2]
    assert torch.equal(model(x), before)
    assert sa_cuda.fuse(layer) is None
    assert reason in reason_not_convertible(layer)


def test_flagged_look_alikes_really_differ():
    """The negatives are real: each computes something other than Shuffle Attention for some input
    or state (so converting them would change the model)."""
    x = make_input((1, 32, 4, 4), seed=7, dtype=torch.float64)
    for make in (
        lambda: ScaledResidual(32, 4),
        lambda: NoShuffle(32, 4),
        lambda: MaxPoolGate(32, 4),
        lambda: SquareInputBranch(32, 4),
    ):
        layer = randomize_(make().double(), seed=8)
        want = sa_cuda.reference.sa_layer(
            x,
            4,
            layer.cweight,
            layer.cbias,
            layer.sweight,
            layer.sbias,
            layer.gn.weight,
            layer.gn.bias,
        )
        assert max_err(layer(x), want) > 1e-3
    layer = randomize_(FlagBranch(32, 4).double(), seed=8)
    before = layer(x)
    layer.shuffle = False
    assert max_err(layer(x), before) > 1e-3


def test_not_look_alikes_are_not_reported():
    model = nn.Sequential(NotShuffleAttention(), nn.Linear(3, 3), sa_cuda.SALayer(16, 2))
    assert sa_cuda.convert(model, report=True) == ConvertReport()


# ---- hooks -------------------------------------------------------------------------------------
def _register_every_hook(layer, seen):
    """Every hook kind on layer; each records what it sees into seen[kind]."""

    def record(kind, *values):
        seen.setdefault(kind, []).append(
            tuple(v.detach().clone() if torch.is_tensor(v) else v for v in values)
        )

    return [
        layer.register_forward_pre_hook(lambda mod, args: record("pre", args[0])),
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs: record("pre_kwargs", args[0], len(kwargs)), with_kwargs=True
        ),
        layer.register_forward_hook(lambda mod, args, out: record("forward", args[0], out)),
        layer.register_forward_hook(
            lambda mod, args, kwargs, out: record("forward_kwargs", out, len(kwargs)),
            with_kwargs=True,
        ),
        layer.register_forward_hook(lambda mod, args, out: record("always", out), always_call=True),
        layer.register_full_backward_pre_hook(lambda mod, gout: record("backward_pre", gout[0])),
        layer.register_full_backward_hook(
            lambda mod, gin, gout: record("backward", gin[0], gout[0])
        ),
        layer.register_state_dict_pre_hook(lambda mod, prefix, keep_vars: record("sd_pre", prefix)),
        layer.register_state_dict_post_hook(
            lambda mod, sd, prefix, meta: record("sd_post", prefix, len(sd))
        ),
        layer.register_load_state_dict_pre_hook(
            lambda mod, sd, prefix, *rest: record("load_pre", prefix, type(mod).__name__)
        ),
        layer.register_load_state_dict_post_hook(
            lambda mod, keys: record("load_post", len(keys.missing_keys), type(mod).__name__)
        ),
    ]


def _exercise(model, x, grad_out):
    forward_backward(model, x, grad_out)
    state = model.state_dict()
    model.load_state_dict(state)


def test_every_hook_kind_fires_after_conversion_with_the_same_values():
    model = randomize_(_net(OfficialSaLayer(32, 4)), seed=9)
    twin = copy.deepcopy(model)
    seen_before, seen_after = {}, {}
    _register_every_hook(twin[1], seen_before)
    handles = _register_every_hook(model[1], seen_after)
    original = weakref.ref(model[1])
    assert sa_cuda.convert(model) == 1
    gc.collect()
    assert original() is None  # so the load_state_dict pre-hook must not need the original
    x, grad_out = _inputs(torch.float32)
    _exercise(twin, x, grad_out)
    _exercise(model, x, grad_out)

    assert set(seen_after) == set(seen_before) and len(seen_before) == 11
    for kind, records in seen_before.items():
        assert len(seen_after[kind]) == len(records) == 1, kind  # once: the probe runs no hook
        (got,), (want,) = seen_after[kind], records
        for got_value, want_value in zip(got, want):
            if torch.is_tensor(want_value):  # inputs, outputs, grad_input, grad_output
                torch.testing.assert_close(got_value, want_value, rtol=1e-5, atol=1e-5, msg=kind)
            elif want_value == "OfficialSaLayer":  # the module the hook gets: the fused one now
                assert got_value == "SALayer", kind
            else:
                assert got_value == want_value, kind

    for handle in handles:  # the handles returned before the conversion still remove the hooks
        handle.remove()
    seen_after.clear()
    _exercise(model, x, grad_out)
    assert seen_after == {}


class _Recorder:
    """A hook owner that cannot be deep-copied (it holds a lock)."""

    def __init__(self):
        self.lock, self.outputs = threading.Lock(), []

    def hook(self, module, args, output):
        self.outputs.append(output.detach().clone())


def test_probe_does_not_copy_or_run_the_layers_hooks():
    recorder = _Recorder()
    layer = randomize_(OfficialSaLayer(32, 4), seed=16)
    layer.register_forward_hook(recorder.hook)
    model = nn.Sequential(layer)
    x = make_input((2, 32, 5, 5), seed=17)
    want = layer(x)
    assert sa_cuda.convert(model) == 1 and len(recorder.outputs) == 1
    model(x)
    assert len(recorder.outputs) == 2
    torch.testing.assert_close(recorder.outputs[1], want, rtol=1e-5, atol=1e-5)


def test_deprecated_backward_hook_keeps_firing():
    """register_backward_hook (deprecated) keeps firing. PyTorch defines its grad_input as the
    gradients of the last autograd op's inputs: a reshape in the eager layer, the fused op (x and
    the parameters) after conversion, so grad_input[0] is now the true gradient of the layer's
    input; grad_output[0] is the same as before."""
    model = randomize_(_net(SeedShuffleAttention(32, 4)), seed=10)
    twin, full = copy.deepcopy(model), copy.deepcopy(model)
    seen = {"before": [], "after": [], "full": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation warning
        twin[1].register_backward_hook(lambda mod, gin, gout: seen["before"].append((gin, gout)))
        handle = model[1].register_backward_hook(
            lambda mod, gin, gout: seen["after"].append((gin, gout))
        )
        full[1].register_full_backward_hook(lambda mod, gin, gout: seen["full"].append((gin, gout)))
        assert sa_cuda.convert(model) == 1
        x, grad_out = _inputs(torch.float32)
        for net in (twin, full, model):
            forward_backward(net, x, grad_out)
        assert len(seen["before"]) == len(seen["after"]) == 1
        (_, gout_before), (gin_after, gout_after) = seen["before"][0], seen["after"][0]
        torch.testing.assert_close(gout_after[0], gout_before[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gin_after[0], seen["full"][0][0][0], rtol=1e-5, atol=1e-5)
        handle.remove()
        forward_backward(model, x, grad_out)
    assert len(seen["after"]) == 1


# ---- shared instances, idempotence, report -----------------------------------------------------
def test_shared_instance_is_replaced_everywhere_by_one_fused_module():
    layer = randomize_(OfficialSaLayer(32, 4).double(), seed=11)
    model = nn.Sequential(layer, nn.Identity(), layer)
    x, grad_out = _inputs()
    before = forward_backward(model, x, grad_out)
    report = sa_cuda.convert(model, report=True)
    assert report.replaced == [("0, 2", "OfficialSaLayer")] and report.count == 1
    assert type(model[0]) is sa_cuda.SALayer and model[0] is model[2]
    assert list(model.state_dict()) == [
        "0.cweight",
        "0.cbias",
        "0.sweight",
        "0.sbias",
        "0.gn.weight",
        "0.gn.bias",
        "2.cweight",
        "2.cbias",
        "2.sweight",
        "2.sbias",
        "2.gn.weight",
        "2.gn.bias",
    ]
    _assert_same(forward_backward(model, x, grad_out), before)


def test_shared_instance_in_different_parents():
    layer = SeedShuffleAttention(32, 4)
    model = nn.Sequential(nn.Sequential(layer), nn.ModuleDict({"sa": layer}))
    report = sa_cuda.convert(model, report=True)
    assert report.replaced == [("0.0, 1.sa", "SeedShuffleAttention")]
    assert model[0][0] is model[1]["sa"] and type(model[0][0]) is sa_cuda.ShuffleAttention


def test_report_lists_replaced_and_skipped_look_alikes():
    model = nn.Sequential(
        NotShuffleAttention(),
        nn.Sequential(OfficialSaLayer(16, 2), SeedShuffleAttention(16, 2)),
        ScaledResidual(16, 4),
        sa_cuda.SALayer(16, 2),
        OfficialSaLayer(16, 4),
    )
    report = sa_cuda.convert(model, report=True)
    assert report.replaced == [
        ("1.0", "OfficialSaLayer"),
        ("1.1", "SeedShuffleAttention"),
        ("4", "OfficialSaLayer"),
    ]
    assert [(name, cls) for name, cls, _ in report.skipped] == [("2", "ScaledResidual")]
    assert int(report) == 3 and model[4].groups == 4
    assert type(model[0]) is NotShuffleAttention and type(model[2]) is ScaledResidual
    assert sa_cuda.convert(model) == 0


def test_the_model_itself_is_not_replaced():
    layer = OfficialSaLayer(16, 2)
    report = sa_cuda.convert(layer, report=True)
    assert report.count == 0
    assert report.skipped == [
        (
            "",
            "OfficialSaLayer",
            "the model itself cannot be replaced in place; use sa_cuda.fuse(model)",
        )
    ]
    fused = sa_cuda.fuse(layer)
    assert (
        isinstance(fused, sa_cuda.SALayer)
        and fused.cweight is layer.cweight
        and fused.gn is layer.gn
    )
    assert sa_cuda.fuse(nn.Linear(2, 2)) is None
    assert (
        sa_cuda.fuse(fused) is None
        and reason_not_convertible(fused) == "already a fused sa_cuda module"
    )
    assert reason_not_convertible(layer) is None


def test_convert_leaves_the_global_rng_alone():
    model = _net(SeedShuffleAttention(32, 4))
    state = torch.get_rng_state()
    assert sa_cuda.convert(model) == 1
    assert torch.equal(torch.get_rng_state(), state)


def test_sa_resnet_with_reference_layers_is_converted():
    eager = sa_cuda.models.sa_resnet50(num_classes=10, fused=False).double().eval()
    for module in eager.modules():
        if isinstance(module, sa_cuda.reference.SALayer):
            randomize_(module, seed=14)
    model = copy.deepcopy(eager)
    report = sa_cuda.convert(model, report=True)
    assert report.count == 16 and report.skipped == []
    assert report.replaced[0] == ("layer1.0.sa", "SALayer")
    assert list(model.state_dict()) == list(eager.state_dict())
    x = make_input((2, 3, 32, 32), seed=15, dtype=torch.float64)
    assert max_err(model(x), eager(x)) <= 1e-10


# ---- meta device -------------------------------------------------------------------------------
@pytest.mark.parametrize("make_layer,fused_cls", POSITIVES[:5])
def test_meta_model_is_converted_and_materializes(make_layer, fused_cls):
    """A model built on the meta device is converted (the probe runs on a CPU copy); after
    to_empty + load_state_dict it computes what the unconverted model computes."""
    with torch.device("meta"):
        model = _net(make_layer())
    assert sa_cuda.convert(model) == 1 and type(model[1]) is fused_cls
    assert model[1].gn.weight.is_meta
    eager = randomize_(_net(make_layer()), seed=12).double()
    model.to_empty(device="cpu").double().load_state_dict(eager.state_dict(), strict=True)
    x, grad_out = _inputs()
    _assert_same(forward_backward(model, x, grad_out), forward_backward(eager, x, grad_out))


# ---- the registry ------------------------------------------------------------------------------
_NO_SOURCE_CLASS = """
class NoSourceSaLayer(nn.Module):
    def __init__(self, channel, n_groups):
        super().__init__()
        self.n_groups = n_groups
        mid = channel // (2 * n_groups)
        self.cweight = nn.Parameter(torch.zeros(1, mid, 1, 1))
        self.cbias = nn.Parameter(torch.ones(1, mid, 1, 1))
        self.sweight = nn.Parameter(torch.zeros(1, mid, 1, 1))
        self.sbias = nn.Parameter(torch.ones(1, mid, 1, 1))
        self.gn = nn.GroupNorm(mid, mid)

    def forward(self, x):
        return reference.sa_layer(x, self.n_groups, self.cweight, self.cbias, self.sweight,
                                  self.sbias, self.gn.weight, self.gn.bias, self.gn.eps)
"""


def test_registered_user_class_is_converted():
    """A class whose source is not available (exec) and whose groups are in n_groups: left alone
    until registered; then converted (the probe is skipped, the structure is still checked)."""
    scope = {"nn": nn, "torch": torch, "reference": sa_cuda.reference}
    exec(_NO_SOURCE_CLASS, scope)
    cls = scope["NoSourceSaLayer"]
    model = randomize_(_net(cls(32, 4)).double(), seed=13)
    x, grad_out = _inputs()
    before = forward_backward(model, x, grad_out)
    report = sa_cuda.convert(model, report=True)
    assert (
        report.count == 0
        and "source of NoSourceSaLayer.forward is not available" in report.skipped[0][2]
    )

    assert register(cls, "sa_layer", groups_attr="n_groups") is cls
    try:
        report = sa_cuda.convert(model, report=True)
        assert report.replaced == [("1", "NoSourceSaLayer")]
        assert type(model[1]) is sa_cuda.SALayer and model[1].groups == 4 and model[1].n_groups == 4
        _assert_same(forward_backward(model, x, grad_out), before)
        broken = cls(32, 4)
        broken.extra = nn.Linear(2, 2)  # registered, but not the registered structure
        assert "extra submodule(s) extra" in reason_not_convertible(broken)
    finally:
        _REGISTRY.pop(cls)


def test_register_rejects_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register(int, "sa_layer")
    with pytest.raises(ValueError, match="variant must be one of"):
        register(OfficialSaLayer, "se_layer")
    with pytest.raises(ValueError, match="groups_attr"):
        register(OfficialSaLayer, "sa_layer", groups_attr="not a name")


def test_public_names():
    assert sa_cuda.register_convertible is register
    assert sa_cuda.reason_not_convertible is reason_not_convertible
    assert sa_cuda.ConvertReport is ConvertReport
