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
from . import vmap as _vmap

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


# The dtypes the kernels are built for (csrc/dispatch.h); every tensor argument must be one.
KERNEL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


# ---- argument checks ---------------------------------------------------------------------------
# The same rules, in the same order, as the C++ host code (csrc/host.cpp), whose messages say the
# same with a "sa_cuda: " prefix: the fake kernels run these, so torch.compile and the meta device
# refuse what the real kernels refuse, with a ValueError naming the same argument and rule.

def _check_tensor(t, name: str, x: Tensor | None = None) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_nested:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{name} must be float64, float32, float16 or bfloat16, got {t.dtype}")
    if x is not None and t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_x(x, groups) -> int:
    """x and groups; returns m = C / (2 * groups)."""
    _check_tensor(x, "x")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [B, C, H, W], got shape {tuple(x.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    C = x.shape[1]
    if C < 1:
        raise ValueError(f"C must be positive, got {C}")
    if C % (2 * groups) != 0:
        relation = f"= {2 * groups}" if 2 * groups <= C else "> C"
        raise ValueError(f"C ({C}) must be divisible by 2 * groups (2 * {groups} {relation})")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"H * W must be >= 1, got {x.shape[2]} x {x.shape[3]}")
    return C // (2 * groups)


def _check_params(variant: str, x: Tensor, m: int, params: tuple, *, param_shapes=False) -> None:
    """param_shapes: the functionals' rule (non-unit sizes (m,) or (m, m)) instead of the op's
    element count."""
    for (name, is_matrix), p in zip(_PARAMS[variant], params):
        _check_tensor(p, name, x)
        expected = m * m if is_matrix else m
        if param_shapes:
            # The module's ((1, m, 1, 1), (m, m, 1, 1), (m,)) or any with that many elements whose
            # non-unit sizes are (m,) or (m, m).
            sizes = [s for s in p.shape if s != 1]
            if p.numel() != expected or (m > 1 and sizes != ([m, m] if is_matrix else [m])):
                shape = "(m, m, 1, 1) or (m, m)" if is_matrix else "(1, m, 1, 1) or (m,)"
                raise ValueError(f"{name} must have shape {shape} with m = C / (2 * groups) = {m}, "
                                 f"got {tuple(p.shape)}")
        elif p.numel() != expected:
            raise ValueError(f"{name} must have {expected} elements (m = C / (2 * groups) = "
                             f"{m}), got shape {tuple(p.shape)}")


def _check_forward_args(variant: str, x, groups, params: tuple, eps, *, param_shapes=False) -> None:
    m = _check_x(x, groups)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    _check_params(variant, x, m, params, param_shapes=param_shapes)


def _check_backward_args(variant: str, grad_out, x, mean, rstd, groups, params: tuple) -> None:
    m = _check_x(x, groups)
    _check_tensor(grad_out, "grad_out", x)
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out must have x's shape {list(x.shape)}, got "
                         f"{list(grad_out.shape)}")
    want = (x.shape[0], x.shape[1])
    for name, stat in (("mean", mean), ("rstd", rstd)):
        _check_tensor(stat, name, x)
        if tuple(stat.shape) != want or stat.dtype != _stat_dtype(x):
            stat_dtype = str(_stat_dtype(x)).removeprefix("torch.")
            raise ValueError(f"{name} must be the forward's [B, C] = {list(want)} {stat_dtype} "
                             f"statistics, got {tuple(stat.shape)} {stat.dtype}")
    _check_params(variant, x, m, params)


def _check(variant: str, x: Tensor, groups: int, params: tuple, eps: float) -> None:
    """The functionals' rules: the op's, with parameter shapes that say (m,) or (m, m)."""
    _check_forward_args(variant, x, groups, params, eps, param_shapes=True)


# ---- autograd ----------------------------------------------------------------------------------

class _NoSecondDerivative(torch.autograd.Function):
    """The identity on the gradients of the fused backward, hung on the graph of x and the
    parameters when a backward runs with create_graph=True: differentiating those gradients again
    (a gradient penalty, grad of grad) reaches this node and raises, instead of silently giving a
    second derivative without the kernel's part. First-order uses of create_graph=True (which
    torch.func.grad makes) are unaffected."""

    generate_vmap_rule = True

    @staticmethod
    def forward(n_grads: int, *grads_then_inputs: Tensor):
        return tuple(g.clone() for g in grads_then_inputs[:n_grads])

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "sa_cuda: double backward (differentiating a gradient) through the fused Shuffle "
            "Attention op is not supported: its backward is a fused kernel. Use the sa_cuda.reference "
            "layers for higher-order gradients")


class ShuffleAttentionFunction(torch.autograd.Function):
    """Autograd over the fused ops: saves x and the per-plane mean/rstd, nothing else.

    ``apply(variant, x, groups, eps, *params) -> (out, mean, rstd)`` with variant "sa_layer" or
    "shuffle_attention" (optionally prefixed by an op namespace, see ``_ops``); mean and rstd are
    not differentiable. Works under torch.func (``vmap``, ``grad``, ``vjp``, their compositions):
    the vmap rules of the ops (sa_cuda/ops/vmap.py) fold a mapped x into the batch.
    The backward is a fused kernel and is not itself differentiable: first-order gradients work
    with create_graph=True, and differentiating them again raises (_NoSecondDerivative).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(variant: str, x: Tensor, groups: int, eps: float, *params: Tensor):
        return _ops(variant)[0](x, groups, *params, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        variant, x, groups, _, *params = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, mean, rstd, *params)
        ctx.variant, ctx.groups = variant, groups

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_mean, _grad_rstd):
        create_graph = torch.is_grad_enabled()
        x, mean, rstd, *params = ctx.saved_tensors
        with torch.no_grad():
            grad_x, *param_grads = _ops(ctx.variant)[1](grad_out, x, mean, rstd, ctx.groups, *params)
        needs = ctx.needs_input_grad
        grads = [grad_x if needs[1] else None] + [g if needs[4 + i] else None
                                                   for i, g in enumerate(param_grads)]
        if create_graph:
            inputs = [t for t in (x, *params) if t.requires_grad]
            kept = [g for g in grads if g is not None]
            if inputs and kept:
                wrapped = iter(_NoSecondDerivative.apply(len(kept), *kept, *inputs))
                grads = [None if g is None else next(wrapped) for g in grads]
        return (None, grads[0], None, None, *grads[1:])


@torch.compiler.assume_constant_result
def _autocast_available(device_type: str) -> bool:
    """Whether autocast knows the device type (torch.is_autocast_enabled raises for one it does
    not, e.g. meta). A constant per device type; Dynamo before 2.14 cannot trace the check itself
    (a graph break), so it takes the value at trace time."""
    return torch.amp.is_autocast_available(device_type)


def _compute_dtype(x: Tensor, params: tuple) -> torch.dtype:
    """Outside autocast the layer computes in the promoted dtype of x and its parameters, as the
    eager layer does (bf16 x with fp32 parameters gives fp32). Under autocast it keeps x's dtype
    (the parameters are used in fp32 anyway), which is what the next autocast op wants."""
    device_type = x.device.type
    if _autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return x.dtype
    dtype = x.dtype
    for p in params:
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def _is_channels_last(x: Tensor) -> bool:
    """x.is_contiguous(memory_format=torch.channels_last) and not NCHW-contiguous, from the strides
    (the memory-format query is not implemented inside torch.func.vmap)."""
    if x.is_contiguous():
        return False
    expected = 1
    for dim in (1, 3, 2, 0):  # C, W, H, B from the innermost out; size-1 dims have any stride
        if x.shape[dim] != 1 and x.stride(dim) != expected:
            return False
        expected *= x.shape[dim]
    return True


def _apply(variant: str, x: Tensor, groups: int, params: tuple, eps: float) -> Tensor:
    _check(variant.rpartition("::")[2], x, groups, params, eps)
    dtype = _compute_dtype(x, params)
    if dtype != x.dtype:
        x = x.to(dtype)
    out = ShuffleAttentionFunction.apply(variant, x, groups, float(eps), *params)[0]
    if _is_channels_last(x):
        # The kernels work on NCHW planes: a channels_last x is read through one copy to NCHW
        # (in the op) and the result is handed back channels_last (one more copy; written as an
        # NHWC permute so that it also works inside torch.func.vmap).
        out = out.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
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


def _make_fake_kernels(variant: str):
    def fake_forward(x, groups, *params_and_eps):
        *params, eps = params_and_eps
        _check_forward_args(variant, x, groups, tuple(params), eps)
        B, C = x.shape[0], x.shape[1]
        stat = x.new_empty((B, C), dtype=_stat_dtype(x))
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        return out, stat, torch.empty_like(stat)

    def fake_backward(grad_out, x, mean, rstd, groups, *params):
        _check_backward_args(variant, grad_out, x, mean, rstd, groups, params)
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


_vmap.register(_VARIANTS)
