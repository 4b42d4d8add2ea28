"""``SALayer`` and ``ShuffleAttention`` (sa_cuda.variants), fused.

Each subclasses its reference in sa_cuda.reference, so parameters, initialisation, attribute names
and state_dict keys are the reference's by construction (strict loads work both ways). forward runs
the fused op when it is built for the input's device and the reference code elsewhere, and during
ONNX export (the exported graph then holds the reference math, which ONNX runtimes know).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..ops import KERNEL_DTYPES, SA_CUDA_LIBRARY, fused_available
from ..ops.checks import is_positive_int
from ..variants import SA_LAYER, SHUFFLE_ATTENTION, Variant


def _use_fused(x: Tensor) -> bool:
    """False only where the reference must run: a device without fused kernels, ONNX export. A
    non-tensor x goes to the fused path, whose checks name the problem. Both ONNX exporters trace
    (torch.jit's tracer, or torch.export), so the export flag is read only while tracing: it takes
    two imports a call."""
    if not isinstance(x, Tensor):
        return True
    if not (x.is_cpu or fused_available(x.device)):
        return False
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
    return not (tracing and torch.onnx.is_in_onnx_export())


def _check_layout(channel, groups) -> None:
    """ValueError unless channel is a positive multiple of 2 * groups (m >= 1 channels a branch)."""
    for name, value in (("channel", channel), ("groups", groups)):
        if not is_positive_int(value):
            raise ValueError(f"sa_cuda: {name} must be an int >= 1, got {value!r}")
    if channel % (2 * groups) != 0:
        raise ValueError(
            f"sa_cuda: channel ({channel}) must be a positive multiple of 2 * groups "
            f"(groups = {groups}): each group splits into two branches of "
            f"channel / (2 * groups) channels"
        )


def _child(module: torch.nn.Module, name: str):
    """``getattr(module, name)`` for a submodule, read from ``_modules`` where nn.Module keeps it
    (its ``__getattr__`` is Python: about half a microsecond a lookup)."""
    child = module._modules.get(name)
    return getattr(module, name) if child is None else child


def _parameters(module: torch.nn.Module, variant: Variant) -> tuple:
    """The variant's six parameters of ``module`` in op order, each what ``getattr`` finds under
    its state_dict key ("cweight", "gn.weight"): read from its owner's ``_parameters`` dict, where
    nn.Module keeps a registered parameter (eight ``__getattr__`` lookups a call otherwise), and
    by ``getattr`` where it is not there (a parametrization, weight_norm's plain attribute, a
    deleted parameter)."""
    found = []
    for owner_name, name in variant.param_paths:
        owner = module if owner_name is None else _child(module, owner_name)
        param = owner._parameters.get(name) if isinstance(owner, torch.nn.Module) else None
        found.append(getattr(owner, name) if param is None else param)
    return tuple(found)


_SHAPES: dict[tuple[str, int], tuple[tuple[int, ...], ...]] = {}


def _module_shapes(variant: Variant, m: int) -> tuple[tuple[int, ...], ...]:
    """The shapes the layer gives its six parameters at m channels a branch, in op order."""
    key = (variant.name, m)
    shapes = _SHAPES.get(key)
    if shapes is None:
        shapes = _SHAPES[key] = tuple(p.module_shape(m) for p in variant.params)
    return shapes


# Bound once: the short path below reads them on every call.
_jit_tracing = torch._C._is_tracing
_is_compiling = torch.compiler.is_compiling
_STRIDED = torch.strided


def _dense_like(t, dtype: torch.dtype, device: torch.device, shape: tuple) -> bool:
    """t is a dense (strided, not nested) tensor of dtype, on device, of shape."""
    return (
        isinstance(t, Tensor)
        and t.layout is _STRIDED
        and not t.is_nested
        and t.dtype == dtype
        and t.device == device
        and t.shape == shape
    )


def _short_path(layer: torch.nn.Module, x, identity) -> Tensor | None:
    """The layer's output without OpLibrary.apply's Python, or None where forward takes the full
    path.

    In a model this Python runs with cold caches (the convolutions between two SA layers evict
    it), and each line costs several times what it costs in a loop (docs/kernels.md,
    python-per-call). The short path is taken only where every check of ``apply``
    (``check_forward_args`` with the functionals' rules, checks.py) passes and ``apply``
    converts nothing, and then makes ``apply``'s last call, ``OpLibrary.dispatch``, with the same
    arguments: nothing traces or compiles (ONNX export takes the reference there: ``_use_fused``),
    x is a dense 4-D tensor of a kernel dtype on a device with kernels, with C = 2 * groups * m
    channels (m: gn's channel count) and a plane of at least one pixel; identity (if any) is a
    dense tensor of x's dtype, device and shape; every parameter is a dense tensor of x's dtype
    and device in the shape the layer gives it at m; groups is an int >= 1 and eps a float >= 0.
    Where any of that does not hold, the full path runs, and raises (or converts) as before: the
    short path catches nothing. The module's attributes are read in the full path's order."""
    # is_compiling first: Dynamo folds it to True, and cannot trace torch._C._is_tracing.
    if _is_compiling() or _jit_tracing() or not isinstance(x, Tensor):
        return None
    if not (x.is_cpu or fused_available(x.device)):
        return None
    variant = layer._variant
    params = _parameters(layer, variant)
    gn = _child(layer, "gn")
    eps, groups, m = gn.eps, layer.groups, getattr(gn, "num_channels", None)
    if not (type(eps) is float and eps >= 0 and type(groups) is int and type(m) is int):
        return None
    if not (x.layout is _STRIDED and not x.is_nested and x.dim() == 4):
        return None
    dtype, device, shape = x.dtype, x.device, x.shape
    if dtype not in KERNEL_DTYPES or groups < 1 or m < 1 or shape[1] != 2 * groups * m:
        return None
    if shape[2] < 1 or shape[3] < 1:
        return None
    if identity is not None and not _dense_like(identity, dtype, device, shape):
        return None
    for param, param_shape in zip(params, _module_shapes(variant, m)):
        if not _dense_like(param, dtype, device, param_shape):
            return None
    return SA_CUDA_LIBRARY.dispatch(variant.name, x, groups, params, eps, identity)


class _FusedLayer:
    """What both fused modules add to their reference: checked construction with ``device=`` and
    ``dtype=``, and a fused forward over the parameters of ``_variant``."""

    _variant: Variant

    def __init__(self, channel: int, groups: int = 64, *, device=None, dtype=None):
        """``device=`` and ``dtype=`` work as for PyTorch's own modules (timm passes both to an
        attention layer): parameters are created on ``device`` and converted to ``dtype``."""
        _check_layout(channel, groups)
        if dtype is not None and dtype not in KERNEL_DTYPES:
            raise ValueError(f"sa_cuda: dtype must be one of {KERNEL_DTYPES}, got {dtype!r}")
        if device is None:
            super().__init__(channel, groups)
        else:
            with torch.device(device):
                super().__init__(channel, groups)
        if dtype is not None:
            self.to(dtype=dtype)

    def forward(self, x: Tensor, identity: Tensor | None = None) -> Tensor:
        """The layer of x; with ``identity`` (a bottleneck's shortcut, x's shape) the whole tail
        ``relu(layer(x) + identity)`` in the same one pass (the residual epilogue)."""
        out = _short_path(self, x, identity)
        if out is not None:
            return out
        if not _use_fused(x):
            out = super().forward(x)
            return out if identity is None else torch.relu(out + identity)
        params = _parameters(self, self._variant)
        eps = _child(self, "gn").eps
        return SA_CUDA_LIBRARY.apply(self._variant.name, x, self.groups, params, eps, identity)


class SALayer(_FusedLayer, reference.SALayer):
    """Fused SALayer (SA-Net's ``sa_layer``): x [B, C, H, W] -> [B, C, H, W], C divisible by
    2 * groups."""

    _variant = SA_LAYER


class ShuffleAttention(_FusedLayer, reference.ShuffleAttention):
    """Fused ShuffleAttention (1x1-conv gates): x [B, C, H, W] -> [B, C, H, W], C divisible by
    2 * groups."""

    _variant = SHUFFLE_ATTENTION
