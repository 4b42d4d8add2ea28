"""Argument checks of the fused ops, shared by the fake kernels and the functionals.

The same rules, in the same order, as the C++ host code (csrc/host.cpp), whose messages say the
same with a "sa_cuda: " prefix: the fake kernels run these, so torch.compile and the meta device
refuse what the real kernels refuse, with a ValueError naming the same argument and rule.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..variants import Variant

# The dtypes the kernels are built for (csrc/dispatch.h); every tensor argument must be one.
KERNEL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def is_positive_int(value: object) -> bool:
    """An int >= 1 (a bool is not one): the rule for groups and channel counts everywhere."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def stat_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the per-plane mean/rstd the forward saves: float64 for float64 x, else
    float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_tensor(t, name: str, x_device: torch.device | None = None) -> None:
    """A dense tensor of a kernel dtype; on x's device when ``x_device`` is given."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_nested:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{name} must be float64, float32, float16 or bfloat16, got {t.dtype}")
    if x_device is not None and t.device != x_device:
        raise ValueError(f"{name} is on {t.device} but x is on {x_device}")


def _check_x(x, groups) -> int:
    """x and groups; returns m = C / (2 * groups)."""
    _check_tensor(x, "x")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [B, C, H, W], got shape {tuple(x.shape)}")
    if not is_positive_int(groups):
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


def _check_params(
    variant: Variant, x: Tensor, m: int, params: tuple, *, param_shapes: bool = False
) -> None:
    """param_shapes: the functionals' rule (non-unit sizes (m,) or (m, m)) instead of the op's
    element count."""
    x_device = x.device
    for param, p in zip(variant.params, params):
        _check_tensor(p, param.name, x_device)
        expected = m * m if param.is_matrix else m
        if param_shapes:
            # The module's ((1, m, 1, 1), (m, m, 1, 1), (m,)) or any with that many elements whose
            # non-unit sizes are (m,) or (m, m).
            sizes = [s for s in p.shape if s != 1]
            if p.numel() != expected or (m > 1 and sizes != ([m, m] if param.is_matrix else [m])):
                shape = "(m, m, 1, 1) or (m, m)" if param.is_matrix else "(1, m, 1, 1) or (m,)"
                raise ValueError(
                    f"{param.name} must have shape {shape} with m = C / (2 * groups) "
                    f"= {m}, got {tuple(p.shape)}"
                )
        elif p.numel() != expected:
            raise ValueError(
                f"{param.name} must have {expected} elements (m = C / (2 * groups) = "
                f"{m}), got shape {tuple(p.shape)}"
            )


def check_forward_args(
    variant: Variant, x, groups, params: tuple, eps, *, param_shapes: bool = False, identity=None
) -> None:
    """The forward op's rules; ``param_shapes=True``: the functionals' rules, the op's with
    parameter shapes that say (m,) or (m, m). With ``identity``: the residual forward op's
    (identity of x's shape and dtype; of any kernel dtype for the functionals)."""
    m = _check_x(x, groups)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    if identity is not None:
        _check_like_x(identity, "identity", x, same_dtype=not param_shapes)
    _check_params(variant, x, m, params, param_shapes=param_shapes)


def _check_like_x(t, name: str, x: Tensor, *, same_dtype: bool = True) -> None:
    """A tensor of the residual epilogue (identity, or the forward's out): x's shape and dtype
    (the functionals cast identity to the compute dtype: ``same_dtype=False``)."""
    _check_tensor(t, name, x.device)
    if t.shape != x.shape:
        raise ValueError(f"{name} must have x's shape {list(x.shape)}, got {list(t.shape)}")
    if same_dtype and t.dtype != x.dtype:
        raise ValueError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")


def check_backward_args(
    variant: Variant, grad_out, x, mean, rstd, groups, params: tuple, *, out=None
) -> None:
    """The backward op's rules; with ``out``, the residual backward op's (out like x)."""
    m = _check_x(x, groups)
    _check_tensor(grad_out, "grad_out", x.device)
    if grad_out.shape != x.shape:
        raise ValueError(
            f"grad_out must have x's shape {list(x.shape)}, got {list(grad_out.shape)}"
        )
    if out is not None:
        _check_like_x(out, "out", x)
    want = (x.shape[0], x.shape[1])
    for name, stat in (("mean", mean), ("rstd", rstd)):
        _check_tensor(stat, name, x.device)
        if tuple(stat.shape) != want or stat.dtype != stat_dtype(x):
            stat_name = str(stat_dtype(x)).removeprefix("torch.")
            raise ValueError(
                f"{name} must be the forward's [B, C] = {list(want)} {stat_name} "
                f"statistics, got {tuple(stat.shape)} {stat.dtype}"
            )
    _check_params(variant, x, m, params)
