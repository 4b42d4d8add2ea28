"""Runs every entry point of sa_cuda on tensors of the given dtypes in every layout, in a child
process of tests/ops/test_hostile_inputs.py (a crash or a hang there cannot take pytest down).

Usage: python tests/hostile_inputs.py DTYPE [DTYPE ...]   (names of torch dtypes, e.g. float8_e4m3fn)

Prints "<dtype> BEGIN" before a dtype's cases, then one line per case: "<case> <exception type>"
after the call returned or raised; "<case> RETURNED" when a call accepted a tensor it must refuse
("<dtype> UNAVAILABLE" when this torch cannot make the dtype). The parent reads the lines: the
last BEGIN and the last case name where a child crashed or hung.
"""

from __future__ import annotations

import sys

import torch

import sa_cuda

SHAPE = (1, 4, 4, 4)  # B, C, H, W with groups = 1: m = 2
GROUPS = 1


def make(dtype: torch.dtype, shape=SHAPE):
    """A tensor of ``dtype`` (quantized dtypes through quantize_per_tensor), or None when this
    torch cannot make one."""
    if dtype in (torch.quint8, torch.qint8, torch.qint32, torch.quint4x2, torch.quint2x4):
        try:
            return torch.quantize_per_tensor(torch.rand(shape), 0.1, 0, dtype)
        except RuntimeError:
            return None
    try:
        return torch.zeros(shape, dtype=dtype)
    except (RuntimeError, TypeError):
        try:
            return torch.empty(shape, dtype=dtype)
        except (RuntimeError, TypeError):
            return None


def layouts(t: torch.Tensor):
    """(name, tensor) in the layouts the kernels' host code distinguishes: contiguous,
    channels_last, transposed (neither), expanded (stride 0), and a storage offset."""
    yield "contiguous", t
    for name, build in (
        ("channels_last", lambda: t.contiguous(memory_format=torch.channels_last)),
        ("transposed", lambda: t.transpose(2, 3)),
        ("expanded", lambda: t[:, :, :1, :1].expand(t.shape)),
        ("offset", lambda: torch.cat([t.flatten(), t.flatten()])[1 : 1 + t.numel()].view(t.shape)),
    ):
        try:
            yield name, build()
        except (RuntimeError, TypeError, NotImplementedError):
            continue


def params(variant: str, dtype=torch.float32):
    m = SHAPE[1] // (2 * GROUPS)
    matrix = variant == "shuffle_attention"
    shapes = [(m, m) if matrix else (m,), (m,), (m, m) if matrix else (m,), (m,), (m,), (m,)]
    out = []
    for shape in shapes:
        p = make(dtype, shape)
        out.append(p if p is not None else torch.zeros(shape))
    return out


def entry_points(variant: str, x: torch.Tensor, dtype: torch.dtype):
    """(name, call) for every way in: module, functional, raw ops, autograd; x or a parameter or
    grad_out or a statistic of ``dtype``."""
    good_x = torch.randn(SHAPE)
    good_p, bad_p = params(variant), params(variant, dtype)
    fwd = getattr(torch.ops.sa_cuda, f"{variant}_forward")
    bwd = getattr(torch.ops.sa_cuda, f"{variant}_backward")
    residual_fwd = getattr(torch.ops.sa_cuda, f"{variant}_residual_forward")
    residual_bwd = getattr(torch.ops.sa_cuda, f"{variant}_residual_backward")
    functional = getattr(sa_cuda, variant)
    module = (sa_cuda.SALayer if variant == "sa_layer" else sa_cuda.ShuffleAttention)(
        SHAPE[1], GROUPS
    )
    _, mean, rstd = fwd(good_x, GROUPS, *good_p, 1e-5)
    bad_stat = make(dtype, mean.shape)

    def backward_through_module():
        y = module(good_x.clone().requires_grad_(True))
        y.backward(x)

    yield "module(x)", lambda: module(x)
    yield "functional(x)", lambda: functional(x, GROUPS, *good_p)
    yield "functional(param)", lambda: functional(good_x, GROUPS, *bad_p)
    yield "forward_op(x)", lambda: fwd(x, GROUPS, *good_p, 1e-5)
    yield "forward_op(param)", lambda: fwd(good_x, GROUPS, *bad_p, 1e-5)
    yield "backward_op(x)", lambda: bwd(torch.randn(SHAPE), x, mean, rstd, GROUPS, *good_p)
    yield "backward_op(grad_out)", lambda: bwd(x, good_x, mean, rstd, GROUPS, *good_p)
    yield "backward_op(param)", lambda: bwd(torch.randn(SHAPE), good_x, mean, rstd, GROUPS, *bad_p)
    if bad_stat is not None:
        yield (
            "backward_op(mean)",
            lambda: bwd(torch.randn(SHAPE), good_x, bad_stat, rstd, GROUPS, *good_p),
        )
        yield (
            "backward_op(rstd)",
            lambda: bwd(torch.randn(SHAPE), good_x, mean, bad_stat, GROUPS, *good_p),
        )
    yield "autograd(grad_out)", backward_through_module
    # The residual epilogue: identity (forward) and out (backward) of the dtype, x good.
    out = residual_fwd(good_x, torch.randn(SHAPE), GROUPS, *good_p, 1e-5)[0]
    gy = torch.randn(SHAPE)
    yield "module(identity)", lambda: module(good_x, identity=x)
    yield "functional(identity)", lambda: functional(good_x, GROUPS, *good_p, identity=x)
    yield "residual_forward_op(x)", lambda: residual_fwd(x, good_x, GROUPS, *good_p, 1e-5)
    yield "residual_forward_op(identity)", lambda: residual_fwd(good_x, x, GROUPS, *good_p, 1e-5)
    yield (
        "residual_backward_op(out)",
        lambda: residual_bwd(gy, x, good_x, mean, rstd, GROUPS, *good_p),
    )
    yield (
        "residual_backward_op(grad_out)",
        lambda: residual_bwd(x, out, good_x, mean, rstd, GROUPS, *good_p),
    )


def main(names) -> None:
    for name in names:
        print(f"{name} BEGIN", flush=True)
        dtype = getattr(torch, name)
        t = make(dtype)
        if t is None:
            print(f"{name} UNAVAILABLE", flush=True)
            continue
        for layout, x in layouts(t):
            for variant in ("sa_layer", "shuffle_attention"):
                for entry, call in entry_points(variant, x, dtype):
                    case = f"{name}/{layout}/{variant}/{entry}"
                    try:
                        call()
                    except Exception as error:  # the type is what the parent checks
                        print(f"{case} {type(error).__name__}", flush=True)
                    else:
                        print(f"{case} RETURNED", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
