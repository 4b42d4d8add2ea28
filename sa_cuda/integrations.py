"""Shuffle Attention where users build their networks: timm's attention-layer hook.

timm's ResNet blocks take an attention layer class (``block_args=dict(attn_layer=...)``) and build
it as ``attn_layer(channels, device=..., dtype=...)`` after the block's last BatchNorm, before the
residual add: after bn3 in ``Bottleneck``, after bn2 in ``BasicBlock``, where SA-Net puts it.
``timm_attn`` gives that hook an SA layer::

    import timm, sa_cuda
    model = timm.create_model("resnet50", block_args=dict(attn_layer=sa_cuda.timm_attn()))

The fused layer's parameters and state_dict keys are the reference's, so a checkpoint of either
loads into the other, and ``sa_cuda.convert`` turns a model built with ``fused=False`` (or with any
layer it recognises) into the fused one.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch import nn

from . import modules, reference
from .ops.checks import is_positive_int
from .variants import VARIANTS

__all__ = ["layer_groups", "timm_attn"]

# variant name -> (fused module class, reference module class), from the one description of the
# variants (sa_cuda.variants).
_LAYERS = {
    v.name: (getattr(modules, v.module_name), getattr(reference, v.module_name)) for v in VARIANTS
}


def layer_groups(channels: int, groups: int) -> int:
    """The groups an SA layer of ``channels`` channels takes under ``timm_attn(groups=groups)``:
    the largest g <= groups with channels % (2 g) == 0 (each group has two branches of
    channels / (2 g) channels). SA-ResNet-50's 256-2048 channels keep the paper's 64; ResNet-18's
    64-channel blocks take 32."""
    _check_groups(groups, "sa_cuda.layer_groups")
    if not is_positive_int(channels) or channels < 2:
        raise ValueError(f"sa_cuda.layer_groups: channels must be an int >= 2, got {channels!r}")
    if channels % 2 != 0:
        raise ValueError(
            f"sa_cuda.layer_groups: channels must be even (two branches a group), got {channels}"
        )
    return next(g for g in range(min(groups, channels // 2), 0, -1) if channels % (2 * g) == 0)


def _check_groups(groups: object, where: str) -> None:
    if not is_positive_int(groups):
        raise ValueError(f"{where}: groups must be an int >= 1, got {groups!r}")


def _build(
    channels: int,
    *,
    variant: str,
    groups: int,
    fused: bool,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """One layer, as timm's create_attn builds it: ``attn_layer(channels, device=, dtype=)``."""
    fused_cls, reference_cls = _LAYERS[variant]
    g = layer_groups(channels, groups)
    if fused:
        return fused_cls(channels, g, device=device, dtype=dtype)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        layer = reference_cls(channels, g)
    return layer.to(dtype=dtype) if dtype is not None else layer


def timm_attn(
    variant: str = "sa_layer", groups: int = 64, *, fused: bool = True
) -> Callable[..., nn.Module]:
    """timm's ``attn_layer`` for Shuffle Attention: a picklable callable ``(channels, device=None,
    dtype=None) -> module``.

    - ``variant``: "sa_layer" (SA-Net's layer, ``sa_cuda.SALayer``) or "shuffle_attention"
      (1x1-conv gates, ``sa_cuda.ShuffleAttention``).
    - ``groups``: the most groups a layer takes; a layer of C channels takes
      ``layer_groups(C, groups)`` (the paper's 64 wherever C is a multiple of 128).
    - ``fused``: the fused module (default) or the pure-PyTorch reference (same parameters and
      state_dict keys).
    """
    if not isinstance(variant, str) or variant not in _LAYERS:
        raise ValueError(
            f"sa_cuda.timm_attn: variant must be one of {sorted(_LAYERS)}, got {variant!r}"
        )
    _check_groups(groups, "sa_cuda.timm_attn")
    if not isinstance(fused, bool):
        raise ValueError(f"sa_cuda.timm_attn: fused must be a bool, got {fused!r}")
    return functools.partial(_build, variant=variant, groups=groups, fused=fused)
