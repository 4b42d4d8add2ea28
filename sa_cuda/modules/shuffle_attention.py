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


def _use_fused(x: Tensor) -> bool:
    return fused_available(x.device) and not torch.onnx.is_in_onnx_export()


class SALayer(reference.SALayer):
    """Fused SA-Net ``sa_layer``: x [B, C, H, W] -> [B, C, H, W], C divisible by 2 * groups."""

    def forward(self, x: Tensor) -> Tensor:
        if not _use_fused(x):
            return super().forward(x)
        return sa_layer(x, self.groups, self.cweight, self.cbias, self.sweight, self.sbias,
                        self.gn.weight, self.gn.bias, self.gn.eps)


class ShuffleAttention(reference.ShuffleAttention):
    """Fused seed ``ShuffleAttention``: x [B, C, H, W] -> [B, C, H, W], C divisible by 2 * groups."""

    def forward(self, x: Tensor) -> Tensor:
        if not _use_fused(x):
            return super().forward(x)
        return shuffle_attention(x, self.groups, self.affine1.weight, self.affine1.bias,
                                 self.affine2.weight, self.affine2.bias, self.gn.weight,
                                 self.gn.bias, self.gn.eps)
