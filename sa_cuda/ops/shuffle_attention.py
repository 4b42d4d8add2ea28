"""The fused Shuffle Attention ops: argument checks, fake kernels, autograd, functionals.

Ops (registered by sa_cuda._C with TORCH_LIBRARY, namespace ``sa_cuda``):

- ``sa_layer_forward(x, groups, cweight, cbias, sweight, sbias, gn_weight, gn_bias, eps)``
  and ``shuffle_attention_forward(x, groups, affine1_weight, affine1_bias, affine2_weight,
  affine2_bias, gn_weight, gn_bias, eps)`` return ``(out, mean, rstd)``: out like x (contiguous),
  mean/rstd [B, C] per-plane statistics in float32 (float64 for float64 x).
- ``sa_layer_backward`` / ``shuffle_attention_backward(grad_out, x, mean, rstd, groups, *params)``
  return ``(grad_x, *param_grads)``, each parameter gradient with its parameter's shape and dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (loads the library that registers the ops)

__all__ = ["sa_layer", "shuffle_attention", "fused_available", "ShuffleAttentionFunction"]

_VARIANTS = ("sa_layer", "shuffle_attention")


def _ops(variant: str):
    """(forward op, backward op) of "sa_layer" or "shuffle_attention"; "namespace::variant" picks
    another library with the same schemas (the tests' sa_cuda_emu, the emulated CUDA kernels)."""
    namespace, _, name = variant.rpartition("::")
    library = getattr(torch.ops, namespace or "sa_cuda")
    return getattr(library, f"{name}_forward"), getattr(library, f"{name}_backward")

# Parameter names in op order, and whether each is an (m, m) matrix (else it holds m values).
_PARAMS = {
    "sa_layer": (("cweight", False), ("cbias", False), ("sweight", False), ("sbias", False),
                 ("gn_weight", False), ("gn_bias", False)),
    "shuffle_attention": (("affine1_weight", True), ("affine1_bias", False),
                          ("affine2_weight", True), ("affine2_bias", False),
                          ("gn_weight", False), ("gn_bias", False)),
}


_DISPATCH_KEYS = {"meta": "Meta", "privateuseone": "PrivateUse1"}


def fused_available(device: torch.device | str) -> bool:
    """True when the fused kernels are built for ``device``'s type (CPU always; CUDA when built)."""
    device_type = torch.device(device).type
    if device_type == "cpu":
        return True
    # Dispatch key names are not always the upper-cased device type ("meta" -> "Meta").
    key = _DISPATCH_KEYS.get(device_type, device_type.upper())
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("sa_cuda::sa_layer_forward", key)
    except RuntimeError:  # no dispatch key of that name: no fused kernel for this device type
        return False


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check(variant: str, x: Tensor, groups: int, params: tuple, eps: float) -> None:
    """ValueError naming the argument and the rule; the C++ side checks again (RuntimeError)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [B, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be float64, float32, float16 or bfloat16, got {x.dtype}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    C = x.shape[1]
    if C % (2 * groups) != 0:
        raise ValueError(f"C ({C}) must be divisible by 2 * groups (2 * {groups} = {2 * groups})")
    if x.shape[2] * x.shape[3] < 1:
        raise ValueError(f"H * W must be >= 1, got {x.shape[2]} x {x.shape[3]}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    m = C // (2 * groups)
    for (name, is_matrix), p in zip(_PARAMS[variant], params):
        if not isinstance(p, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(p).__name__}")
        if not p.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {p.dtype}")
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}")
        expected = m * m if is_matrix else m
        # Accepted shapes: the module's ((1, m, 1, 1), (m, m, 1, 1), (m,)) or any with that many
        # elements whose non-unit sizes are (m,) or (m, m).
        sizes = [s for s in p.shape if s != 1]
        want = [m, m] if is_matrix else [m]
        if p.numel() != expected or (m > 1 and sizes != want):
            shape = "(m, m, 1, 1) or (m, m)" if is_matrix else "(1, m, 1, 1) or (m,)"
            raise ValueError(f"{name} must have shape {shape} with m = C / (2 * groups) = {m}, "
                             f"got {tuple(p.shape)}")


class ShuffleAttentionFunction(torch.autograd.Function):
    """Autograd over the fused ops: saves x and the per-plane mean/rstd, nothing else.

    ``apply(variant, x, groups, eps, *params)`` with variant "sa_layer" or "shuffle_attention"
    (optionally prefixed by an op namespace, see ``_ops``).
    Double backward is not supported (the backward is a fused kernel, not differentiable): a
    backward with create_graph=True raises instead of returning gradients without a graph.
    """

    @staticmethod
    def forward(ctx, variant: str, x: Tensor, groups: int, eps: float, *params: Tensor) -> Tensor:
        out, mean, rstd = _ops(variant)[0](x, groups, *params, eps)
        ctx.save_for_backward(x, mean, rstd, *params)
        ctx.variant, ctx.groups = variant, groups
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: a graph of this backward is wanted
            raise RuntimeError(
                "sa_cuda: double backward (create_graph=True) through the fused Shuffle Attention "
                "op is not supported; use the sa_cuda.reference layers for higher-order gradients")
        x, mean, rstd, *params = ctx.saved_tensors
        grad_x, *param_grads = _ops(ctx.variant)[1](grad_out, x, mean, rstd, ctx.groups, *params)
        needs = ctx.needs_input_grad
        grads = [g if needs[4 + i] else None for i, g in enumerate(param_grads)]
        return (None, grad_x if needs[1] else None, None, None, *grads)


def _apply(variant: str, x: Tensor, groups: int, params: tuple, eps: float) -> Tensor:
    _check(variant.rpartition("::")[2], x, groups, params, eps)
    out = ShuffleAttentionFunction.apply(variant, x, groups, float(eps), *params)
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        # The kernels work on NCHW planes: a channels_last x is read through one copy to NCHW
        # (in the op) and the result is handed back channels_last (one more copy).
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def sa_layer(x: Tensor, groups: int, cweight: Tensor, cbias: Tensor, sweight: Tensor, sbias: Tensor,
             gn_weight: Tensor, gn_bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Fused official SA layer (SA-Net ``sa_layer``).

    x: [B, C, H, W] float64/32/16 or bfloat16, C divisible by 2 * groups; with m = C / (2 * groups):
    cweight, cbias, sweight, sbias: (1, m, 1, 1) or (m,); gn_weight, gn_bias: (m,).
    Returns [B, C, H, W] in x's dtype and memory format (NCHW-contiguous, or channels_last when
    x is), already channel-shuffled.
    """
    return _apply("sa_layer", x, groups, (cweight, cbias, sweight, sbias, gn_weight, gn_bias), eps)


def shuffle_attention(x: Tensor, groups: int, affine1_weight: Tensor, affine1_bias: Tensor,
                      affine2_weight: Tensor, affine2_bias: Tensor, gn_weight: Tensor,
                      gn_bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Fused seed ``ShuffleAttention`` (1x1-conv gates).

    x: [B, C, H, W]; with m = C / (2 * groups): affine1_weight, affine2_weight: (m, m, 1, 1) or
    (m, m) as [out, in]; affine1_bias, affine2_bias, gn_weight, gn_bias: (m,).
    Returns [B, C, H, W] in x's dtype and memory format, already channel-shuffled.
    """
    return _apply("shuffle_attention", x, groups,
                  (affine1_weight, affine1_bias, affine2_weight, affine2_bias, gn_weight, gn_bias), eps)


def _check_same_device(x: Tensor, named) -> None:
    # The fake kernels are also the ops' Meta kernels: a call with one argument on the meta device
    # and the others on the CPU dispatches here, and must fail like the real kernel's device check
    # instead of returning uninitialized CPU tensors.
    for name, t in named:
        if t.device != x.device:
            raise RuntimeError(f"sa_cuda: {name} is on {t.device} but x is on {x.device}")


def _make_fake_kernels(variant: str):
    names = [name for name, _ in _PARAMS[variant]]

    def fake_forward(x, groups, *params_and_eps):
        _check_same_device(x, zip(names, params_and_eps[:-1]))
        B, C = x.shape[0], x.shape[1]
        stat = x.new_empty((B, C), dtype=_stat_dtype(x))
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        return out, stat, torch.empty_like(stat)

    def fake_backward(grad_out, x, mean, rstd, groups, *params):
        _check_same_device(x, zip(("grad_out", "mean", "rstd", *names),
                                  (grad_out, mean, rstd, *params)))
        # The real kernel returns every gradient contiguous (also for a non-contiguous parameter,
        # e.g. a transposed (m, m) weight): plain empty_like(p) would keep p's strides and mislead
        # Inductor.
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                *(torch.empty_like(p, memory_format=torch.contiguous_format) for p in params))

    return fake_forward, fake_backward


for _name in _VARIANTS:
    _fake_fwd, _fake_bwd = _make_fake_kernels(_name)
    torch.library.register_fake(f"sa_cuda::{_name}_forward")(_fake_fwd)
    torch.library.register_fake(f"sa_cuda::{_name}_backward")(_fake_bwd)
