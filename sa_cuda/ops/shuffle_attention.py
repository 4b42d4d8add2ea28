"""The fused Shuffle Attention functionals over the ops of sa_cuda._C.

Ops (registered with TORCH_LIBRARY, namespace ``sa_cuda``; the schemas are in csrc/ops.h):

- ``sa_layer_forward(x, groups, cweight, cbias, sweight, sbias, gn_weight, gn_bias, eps)``
  and ``shuffle_attention_forward(x, groups, affine1_weight, affine1_bias, affine2_weight,
  affine2_bias, gn_weight, gn_bias, eps)`` return ``(out, mean, rstd)``: out like x (dtype,
  shape; channels_last when x is channels_last-contiguous and not also NCHW-contiguous, else
  NCHW-contiguous), mean/rstd [B, C] per-plane statistics in float32 (float64 for float64 x).
  The CPU kernels read and write channels_last tensors as they are (csrc/cpu/nhwc_rows.h,
  nhwc_tiles.h); so do the CUDA kernels of sa_layer (csrc/cuda/sa_layer_nhwc_*.cuh).
- ``sa_layer_backward`` / ``shuffle_attention_backward(grad_out, x, mean, rstd, groups, *params)``
  return ``(grad_x, *param_grads)``: grad_x in x's memory format (as out), each parameter
  gradient with its parameter's shape and dtype.
- ``<variant>_residual_forward(x, identity, groups, *params, eps)``: the residual epilogue of a
  bottleneck's tail, ``out = relu(SA(x) + identity)`` in one pass (identity: x's shape and
  dtype), returning ``(out, mean, rstd)``; ``<variant>_residual_backward(grad_out, out, x, mean,
  rstd, groups, *params)`` returns ``(grad_x, grad_identity, *param_grads)``, where grad_identity
  is grad_out masked by ``out > 0`` (relu's backward) and is also the gradient SA(x) receives.

Their fake kernels, vmap rules and autograd are registered per namespace by library.py. The
functionals take ``library=`` (an OpLibrary, default: sa_cuda's) so that the tests run the
emulated CUDA kernels (tests/emulation.py) through the same path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (loads the library that registers the ops)
from .library import OpLibrary, register_library

__all__ = [
    "sa_layer",
    "shuffle_attention",
    "fused_available",
    "ShuffleAttentionFunction",
    "ShuffleAttentionResidualFunction",
    "SA_CUDA_LIBRARY",
]

#: The ops of sa_cuda._C (namespace ``sa_cuda``), the default of every functional and module.
SA_CUDA_LIBRARY = register_library("sa_cuda")

#: The autograd.Function over the sa_cuda ops: ``apply(variant, x, groups, eps, *params)``.
ShuffleAttentionFunction = SA_CUDA_LIBRARY.function

#: The autograd.Function over the residual sa_cuda ops:
#: ``apply(variant, x, identity, groups, eps, *params)``.
ShuffleAttentionResidualFunction = SA_CUDA_LIBRARY.residual_function


def fused_available(device: torch.device | str) -> bool:
    """True when the fused kernels are built for ``device``'s type (CPU always; CUDA when built)."""
    return torch.device(device).type == "cpu" or SA_CUDA_LIBRARY.available(device)


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
    *,
    identity: Tensor | None = None,
    library: OpLibrary | None = None,
) -> Tensor:
    """Fused SALayer (SA-Net's ``sa_layer``).

    x: [B, C, H, W] float64/32/16 or bfloat16, C divisible by 2 * groups; with m = C / (2 * groups):
    cweight, cbias, sweight, sbias: (1, m, 1, 1) or (m,); gn_weight, gn_bias: (m,).
    Returns [B, C, H, W] in x's dtype and memory format (NCHW-contiguous, or channels_last when
    x is), already channel-shuffled. ``identity`` (x's shape): the residual epilogue, returns
    ``relu(sa_layer(x) + identity)`` in one pass, in eager's result dtype. ``library``: whose ops
    run (default sa_cuda's).
    """
    return (library or SA_CUDA_LIBRARY).apply(
        "sa_layer", x, groups, (cweight, cbias, sweight, sbias, gn_weight, gn_bias), eps, identity
    )


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
    *,
    identity: Tensor | None = None,
    library: OpLibrary | None = None,
) -> Tensor:
    """Fused ShuffleAttention (1x1-conv gates).

    x: [B, C, H, W]; with m = C / (2 * groups): affine1_weight, affine2_weight: (m, m, 1, 1) or
    (m, m) as [out, in]; affine1_bias, affine2_bias, gn_weight, gn_bias: (m,).
    Returns [B, C, H, W] in x's dtype and memory format, already channel-shuffled. ``identity``
    (x's shape): the residual epilogue, returns ``relu(shuffle_attention(x) + identity)`` in one
    pass, in eager's result dtype. ``library``: whose ops run (default sa_cuda's).
    """
    return (library or SA_CUDA_LIBRARY).apply(
        "shuffle_attention",
        x,
        groups,
        (affine1_weight, affine1_bias, affine2_weight, affine2_bias, gn_weight, gn_bias),
        eps,
        identity,
    )
