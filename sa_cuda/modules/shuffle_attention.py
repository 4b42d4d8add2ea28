"""``SALayer`` (the paper's official layer) and ``ShuffleAttention`` (the seed's layer), fused.

Each subclasses its reference in sa_cuda.reference, so parameters, initialisation, attribute names
and state_dict keys are the reference's by construction (strict loads work both ways). forward runs
the fused op when it is built for the input's device and the reference code elsewhere, and during
ONNX export (the exported graph then holds the reference math, which ONNX runtimes know).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..ops import fused_available, sa_layer, shuffle_attention
from ..ops.shuffle_attention import KERNEL_DTYPES


def _use_fused(x: Tensor) -> bool:
    """False only where the reference must run: a device without fused kernels, ONNX export. A
    non-tensor x goes to the fused path, whose checks name the problem."""
    if not isinstance(x, Tensor):
        return True
    return fused_available(x.device) and not torch.onnx.is_in_onnx_export()


def _check_layout(channel, groups) -> None:
    """ValueError unless channel is a positive multiple of 2 * groups (m >= 1 channels a branch)."""
    for name, value in (("channel", channel), ("groups", groups)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"sa_cuda: {name} must be an int >= 1, got {value!r}")
    if channel % (2 * groups) != 0:
        raise ValueError(f"sa_cuda: channel ({channel}) must be a positive multiple of 2 * groups "
                         f"(groups = {groups}): each group splits into two branches of "
                         f"channel / (2 * groups) channels")


def _init_layer(module: torch.nn.Module, reference_init, channel, groups, device, dtype) -> None:
    """Runs the reference's __init__ after checking its arguments. ``device=`` and ``dtype=`` work
    as for PyTorch's own modules (timm passes both to an attention layer): parameters are created
    on ``device`` and converted to ``dtype``."""
    _check_layout(channel, groups)
    if dtype is not None and dtype not in KERNEL_DTYPES:
        raise ValueError(f"sa_cuda: dtype must be one of {KERNEL_DTYPES}, got {dtype!r}")
    if device is None:
        reference_init(channel, groups)
    else:
        with torch.device(device):
            reference_init(channel, groups)
    if dtype is not None:
        module.to(dtype=dtype)


class SALayer(reference.SALayer):
    """Fused SA-Net ``sa_layer``: x [B, C, H, W] -> [B, C, H, W], C divisible by 2 * groups."""

    def __init__(self, channel: int, groups: int = 64, *, device=None, dtype=None):
        _init_layer(self, super().__init__, channel, groups, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not _use_fused(x):
            return super().forward(x)
        return sa_layer(x, self.groups, self.cweight, self.cbias, self.sweight, self.sbias,
                        self.gn.weight, self.gn.bias, self.gn.eps)


class ShuffleAttention(reference.ShuffleAttention):
    """Fused seed ``ShuffleAttention``: x [B, C, H, W] -> [B, C, H, W], C divisible by 2 * groups."""

    def __init__(self, channel: int, groups: int = 64, *, device=None, dtype=None):
        _init_layer(self, super().__init__, channel, groups, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not _use_fused(x):
            return super().forward(x)
        return shuffle_attention(x, self.groups, self.affine1.weight, self.affine1.bias,
                                 self.affine2.weight, self.affine2.bias, self.gn.weight,
                                 self.gn.bias, self.gn.eps)
