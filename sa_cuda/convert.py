"""Swap Shuffle Attention layers in an existing model for the fused modules, in place.

Recognized, by structure (whatever the class is called):

- per-channel layers: SA-Net's official ``sa_layer``, External-Attention-pytorch's
  ``ShuffleAttention`` (groups in ``G``), ``sa_cuda.reference.SALayer``: parameters ``cweight``,
  ``cbias``, ``sweight``, ``sbias`` of shape (1, m, 1, 1), ``gn`` = GroupNorm(m, m), an int
  ``groups`` or ``G`` -> ``sa_cuda.SALayer``;
- 1x1-conv layers: the seed's ``ShuffleAttention``, ``sa_cuda.reference.ShuffleAttention``:
  ``affine1``, ``affine2`` = Conv2d(m, m, 1) with bias, ``gn`` = GroupNorm(m, m), ``groups``
  -> ``sa_cuda.ShuffleAttention``.

The fused module takes over the original's Parameter objects and its ``gn`` submodule (so an
optimizer built before the conversion keeps updating the same tensors, state_dict keys stay the
same, and device, dtype and requires_grad are unchanged), its forward/backward hooks and its
training mode. Modules that are already fused, and anything else, are left alone.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .modules import SALayer, ShuffleAttention

__all__ = ["convert", "fuse"]

_PER_CHANNEL = ("cweight", "cbias", "sweight", "sbias")
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks")


def _groups(module: nn.Module) -> Optional[int]:
    for name in ("groups", "G"):
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return None


def _branch_norm(module: nn.Module) -> Optional[int]:
    """m when module.gn is GroupNorm(m, m) with affine parameters, else None."""
    gn = getattr(module, "gn", None)
    if isinstance(gn, nn.GroupNorm) and gn.affine and gn.num_groups == gn.num_channels:
        return gn.num_channels
    return None


def _is_per_channel(module: nn.Module, m: int) -> bool:
    params = [getattr(module, name, None) for name in _PER_CHANNEL]
    return all(isinstance(p, nn.Parameter) and tuple(p.shape) == (1, m, 1, 1) for p in params)


def _is_conv1x1(module: nn.Module, m: int) -> bool:
    convs = [getattr(module, name, None) for name in ("affine1", "affine2")]
    return all(isinstance(c, nn.Conv2d) and c.in_channels == m and c.out_channels == m
               and c.kernel_size == (1, 1) and c.stride == (1, 1) and c.padding == (0, 0)
               and c.dilation == (1, 1) and c.groups == 1 and c.bias is not None
               and c.padding_mode == "zeros" for c in convs)


def fuse(module: nn.Module) -> Optional[nn.Module]:
    """The fused equivalent of one Shuffle Attention module (sharing its parameters), or None
    when ``module`` is not one (or is fused already)."""
    if isinstance(module, (SALayer, ShuffleAttention)):
        return None
    groups, m = _groups(module), _branch_norm(module)
    if groups is None or m is None:
        return None
    if _is_per_channel(module, m):
        fused, shared = SALayer(2 * m * groups, groups), _PER_CHANNEL + ("gn",)
    elif _is_conv1x1(module, m):
        fused, shared = ShuffleAttention(2 * m * groups, groups), ("affine1", "affine2", "gn")
    else:
        return None
    for name in shared:  # take over the original's Parameters and submodules
        setattr(fused, name, getattr(module, name))
    for name in _HOOK_DICTS:  # and the hooks registered on it
        if hasattr(module, name) and hasattr(fused, name):
            setattr(fused, name, getattr(module, name))
    fused.train(module.training)
    return fused


def convert(model: nn.Module) -> int:
    """Replaces, in place, every Shuffle Attention submodule of ``model`` by its fused
    equivalent; returns how many were replaced. ``model`` itself is not replaced (use
    ``sa_cuda.fuse(model)`` for a single layer)."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            fused = fuse(child)
            if fused is not None:
                setattr(parent, name, fused)
                replaced += 1
    return replaced
