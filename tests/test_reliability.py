"""Reliability: edge inputs, non-finite values, bad arguments, determinism, thread safety, memory,
large tensors and double backward, for both variants, on the CPU fused op and (where cheap) on the
CUDA kernels run by the SIMT emulator (torch.ops.sa_cuda_emu, tests/emulation.py).

Accuracy criteria are the suite's (test_forward_backward.py): float32/float64 results against the
float64 reference with ``_check_high_precision``.
"""

from __future__ import annotations

import concurrent.futures
import gc
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import (CUDA_OK, CUDA_REASON, PARAM_ARG_NAMES, VARIANTS, bwd_op, clone_as,
                      forward_backward, fused_class, functional, fwd_op, make_fused_like, make_input,
                      make_ref, max_abs, max_err, params_in_op_order, ref_functional)
from emulation import emulated_library, load_emulation
from sa_cuda.reference import _merge
from test_emulated_kernels import emulated_like
from test_forward_backward import _check_high_precision

EMU = load_emulation()
EMULATED = emulated_library()  # the functionals' path over the emulated kernels
IMPLS = ["cpu", "emu"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def op_params(variant, channels, groups, seed, dtype=torch.float32):
    """Random parameters (detached) in the ops' argument order."""
    ref = make_ref(variant, channels, groups, seed=seed)
    return [p.detach().to(dtype) for p in params_in_op_order(variant, ref)]


def fused_module(variant, ref, impl, dtype=None):
    """The fused layer with ref's parameters (and GroupNorm eps): the CPU module, or the reference
    module's parameters run through the emulated CUDA kernels."""
    dtype = dtype or next(ref.parameters()).dtype
    if impl == "cpu":
        fused = make_fused_like(variant, ref, dtype=dtype)
        fused.gn.eps = ref.gn.eps
        return fused
    return emulated_like(variant, clone_as(ref, dtype))


def run_high_precision(variant, impl, shape, groups, *, dtype=torch.float32, seeds=(11, 1, 2),
                       offset=0.0, scale=1.0, x=None, eps=1e-5):
    """(fused, eager reference in dtype, float64 reference) results of forward + backward, the
    seeds of test_forward_backward._run_high_precision by default."""
    ref = make_ref(variant, shape[1], groups, seed=seeds[0], dtype=dtype)
    ref.gn.eps = eps
    if x is None:
        x = make_input(shape, seed=seeds[1], dtype=dtype, offset=offset, scale=scale)
    gy = make_input(shape, seed=seeds[2], dtype=dtype)
    Fu = forward_backward(fused_module(variant, ref, impl), x, gy)
    ref64 = clone_as(ref, torch.float64)
    R = forward_backward(ref64, x.double(), gy.double())
    E = R if dtype == torch.float64 else forward_backward(ref, x, gy)
    return Fu, E, R


# ================================================================================================
# Edge inputs
# ================================================================================================
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_empty_batch(variant, impl, dtype):
    """B = 0: an empty result of the right shape and dtype, an empty grad_x, and every parameter
    gradient present and exactly zero (the reference itself cannot run B = 0: it reshapes to
    [0, -1, H, W])."""
    ref = make_ref(variant, 16, 2, seed=3)
    fused = fused_module(variant, ref, impl, dtype=dtype)
    x = torch.randn(0, 16, 5, 6, dtype=dtype, requires_grad=True)
    y = fused(x)
    assert y.shape == (0, 16, 5, 6) and y.dtype == dtype
    y.backward(torch.randn(0, 16, 5, 6, dtype=dtype))
    assert x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == dtype
    for name, p in fused.named_parameters():
        assert p.grad is not None, name
        assert p.grad.shape == p.shape and p.grad.dtype == p.dtype, name
        assert torch.count_nonzero(p.grad) == 0, name
    params = [p.detach() for p in params_in_op_order(variant, ref)]
    lib = torch.ops.sa_cuda if impl == "cpu" else EMU
    out, mean, rstd = getattr(lib, f"{variant}_forward")(x.detach(), 2, *params, 1e-5)
    assert out.shape == x.shape and mean.shape == (0, 16) and rstd.shape == (0, 16)
    with torch.no_grad():
        assert fused(x).shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape,groups", [((3, 16, 1, 1), 4), ((2, 4, 1, 1), 2), ((4, 64, 1, 1), 8)],
                         ids=["m2", "m1", "m4"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_single_pixel_planes(variant, impl, shape, groups, dtype):
    """H * W = 1: variance 0, rstd = 1 / sqrt(eps), xh = 0, d gn.weight = 0 exactly."""
    Fu, E, R = run_high_precision(variant, impl, shape, groups, dtype=dtype)
    _check_high_precision(Fu, E, R, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_large_plane_512x512(variant, impl):
    """One 512 x 512 plane per channel (B = 1, C = 4, G = 1): 262144-element reductions, against
    the float64 reference with the fp32 criterion."""
    Fu, E, R = run_high_precision(variant, impl, (1, 4, 512, 512), 1)
    _check_high_precision(Fu, E, R, torch.float32)


# ------------------------------------------------------------------------------------------------
# Constant planes (variance 0)
# ------------------------------------------------------------------------------------------------
CONST_SHAPES = [
    pytest.param((2, 16, 6, 5), 2, id="warp-2x16x6x5"),
    pytest.param((2, 16, 40, 40), 2, id="block-2x16x40x40"),
    pytest.param((1, 8, 72, 64), 2, id="streamed-1x8x72x64"),
]
CONSTANTS = (0.5, -2.0, 3.0, 0.0, 1.25, -0.75, 7.0, 100.0)


def constant_planes_input(shape, groups):
    """Random x with constant planes: batch item 0's group 0 entirely constant (both branches,
    values 0.5, -2, 3, 0, ...: exactly representable, so the true variance is exactly 0), and
    in batch item 1 (if any) every channel-branch plane all zeros (a dead ReLU channel), and the
    spatial plane k = 0 of every group set to 3."""
    B, C, H, W = shape
    m = C // (2 * groups)
    x = make_input(shape, seed=1)
    for j in range(2 * m):
        x[0, j] = CONSTANTS[j % len(CONSTANTS)]
    if B > 1:
        v = x[1].view(groups, 2, m, H, W)
        v[:, 0] = 0.0
        v[:, 1, 0] = 3.0
    const = torch.zeros(B, C, dtype=torch.bool)
    const[0, :2 * m] = True
    if B > 1:
        const[1].view(groups, 2, m)[:, 0] = True
        const[1].view(groups, 2, m)[:, 1, 0] = True
    return x, const


def check_masks_and_values(Fu, R, E=None, rel=1e-5, what="reference"):
    """NaN and +-Inf exactly where ``R`` has them; the finite entries within
    max(rel * max(1, max|R finite|), 2 * eager error on those entries)."""
    problems = []
    for key in Fu:
        f, r = Fu[key].double(), R[key].double()
        if not torch.equal(f.isnan(), r.isnan()):
            differ = int((f.isnan() != r.isnan()).sum())
            problems.append(f"{key}: NaN at {int(f.isnan().sum())} entries, {what} at "
                            f"{int(r.isnan().sum())} (differ at {differ})")
            continue
        if not (torch.equal(f == math.inf, r == math.inf)
                and torch.equal(f == -math.inf, r == -math.inf)):
            problems.append(f"{key}: +-Inf at {int(f.isinf().sum())} entries, {what} at "
                            f"{int(r.isinf().sum())}")
            continue
        fin = torch.isfinite(r)
        if not fin.any():
            continue
        err = (f[fin] - r[fin]).abs().max().item()
        bound = rel * max(1.0, r[fin].abs().max().item())
        if E is not None:
            e = E[key].double()[fin]
            ok = torch.isfinite(e)
            if ok.any():
                bound = max(bound, 2.0 * (e[ok] - r[fin][ok]).abs().max().item())
        if not err <= bound:
            problems.append(f"{key}: finite entries max|fused - {what}| = {err:.3g} > {bound:.3g}")
    return problems


@pytest.mark.parametrize("eps", [1e-5, 0.0], ids=["eps1e-5", "eps0"])
@pytest.mark.parametrize("shape,groups", CONST_SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_constant_planes(variant, impl, shape, groups, eps):
    """Variance 0 behaves as in the reference: with eps > 0, rstd = 1 / sqrt(eps) and every output
    and gradient is finite and matches the float64 reference (fp32 criterion); with eps = 0 (allowed
    by the API), NaN/Inf appear exactly where the reference has them (the spatial branch of a
    constant plane, 0 * inf) and the rest matches. The channel branch never uses rstd, so a
    constant channel-branch plane gives finite results for any eps."""
    x, const = constant_planes_input(shape, groups)
    Fu, E, R = run_high_precision(variant, impl, shape, groups, x=x, eps=eps)
    if eps > 0:
        for key, t in Fu.items():
            assert torch.isfinite(t).all(), f"{key}: {int((~torch.isfinite(t)).sum())} non-finite"
        _check_high_precision(Fu, E, R, torch.float32)
        ref = make_ref(variant, shape[1], groups, seed=11)
        params = [p.detach() for p in params_in_op_order(variant, ref)]
        lib = torch.ops.sa_cuda if impl == "cpu" else EMU
        _, mean, rstd = getattr(lib, f"{variant}_forward")(x, groups, *params, eps)
        B, C = shape[:2]
        assert torch.equal(mean[const], x.view(B, C, -1)[..., 0][const]), "mean of a constant plane"
        torch.testing.assert_close(rstd[const], torch.full_like(rstd[const], 1.0 / math.sqrt(eps)),
                                   rtol=1e-6, atol=0)
    else:
        problems = check_masks_and_values(Fu, R, E)
        assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------
# Large magnitude, small spread: x = 1e4 + randn
# ------------------------------------------------------------------------------------------------
MAGNITUDE_CASES = [
    pytest.param("cpu", (2, 64, 16, 16), 8, id="cpu-2x64x16x16"),
    pytest.param("cpu", (3, 16, 1, 1), 4, id="cpu-hw1"),
    pytest.param("emu", (2, 16, 7, 9), 2, id="emu-warp-2x16x7x9"),
    pytest.param("emu", (1, 4, 64, 72), 1, id="emu-streamed-1x4x64x72"),
]


@pytest.mark.parametrize("impl,shape,groups", MAGNITUDE_CASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_large_magnitude_small_spread(variant, impl, shape, groups):
    """x = 1e4 + randn in float32 (ulp(1e4) ~ 1e-3 = 1e-3 of the spread): the fused result's
    error against the float64 reference must be no worse than 2x the eager float32 reference's.

    The comparison is pooled over 4 independent draws (sum of max errors per output/gradient):
    at this magnitude every float32 implementation's error is dominated by the rounding of the
    per-plane mean to float32 (up to ~5e-4 of the spread), so for ONE draw the ratio of two
    implementations' errors on a parameter gradient (a sum over planes, where those per-plane
    errors cancel by chance) ranges over 0.1..2.5 (measured over 6 draws); the sum over draws
    estimates the typical error. One float32 unit at the largest magnitude is added per draw (for
    gradients the eager reference gets exactly, e.g. 0)."""
    keys, err_fused, err_eager, unit = None, {}, {}, {}
    for s in range(4):
        Fu, E, R = run_high_precision(variant, impl, shape, groups, seeds=(s, 100 + s, 200 + s),
                                      offset=1e4)
        for key in Fu:
            assert torch.isfinite(Fu[key]).all(), key
            err_fused[key] = err_fused.get(key, 0.0) + max_err(Fu[key], R[key])
            err_eager[key] = err_eager.get(key, 0.0) + max_err(E[key], R[key])
            unit[key] = unit.get(key, 0.0) + torch.finfo(torch.float32).eps * max_abs(R[key])
    bad = [f"{k}: sum of max|fused - ref64| = {err_fused[k]:.3g} > 2 * eager {err_eager[k]:.3g} "
           f"+ {unit[k]:.3g}" for k in err_fused if not err_fused[k] <= 2 * err_eager[k] + unit[k]]
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------------------------------------
# NaN / Inf propagation
# ------------------------------------------------------------------------------------------------
def literal_layer(variant, x, groups, p0, p1, p2, p3, gn_weight, gn_bias, eps=1e-5):
    """The published layer evaluated literally, op by op (GroupNorm written out as
    (x - mean) / sqrt(var + eps) * gamma + beta). Same function as sa_cuda.reference; it differs
    only in how non-finite values propagate where torch's group_norm kernel folds gamma * rstd
    into one scale (gamma = inf: inf * x - inf * mean = NaN, where the literal form gives +-inf)."""
    b, c, h, w = x.shape
    x0, x1 = x.reshape(b * groups, -1, h, w).chunk(2, dim=1)
    m = x0.shape[1]

    def gate(v, weight, bias):
        if variant == "sa_layer":
            return weight.reshape(1, m, 1, 1) * v + bias.reshape(1, m, 1, 1)
        return F.conv2d(v, weight.reshape(m, m, 1, 1), bias.reshape(m))

    mu0 = x0.mean((2, 3), keepdim=True)
    xn = x0 * torch.sigmoid(gate(mu0, p0, p1))
    mu1 = x1.mean((2, 3), keepdim=True)
    var1 = ((x1 - mu1) ** 2).mean((2, 3), keepdim=True)
    y = (x1 - mu1) / torch.sqrt(var1 + eps) * gn_weight.reshape(1, m, 1, 1) + gn_bias.reshape(1, m, 1, 1)
    return _merge(xn, x1 * torch.sigmoid(gate(y, p2, p3)), b)


def all_grads(fn, x, params, gy):
    x = x.detach().clone().requires_grad_(True)
    ps = [p.detach().clone().requires_grad_(True) for p in params]
    out = fn(x, *ps)
    gs = torch.autograd.grad(out, [x, *ps], gy)
    return {"out": out.detach(), "x": gs[0], **{f"p{i}": g for i, g in enumerate(gs[1:])}}


def nonfinite_check(variant, impl, x, groups, params, gy):
    """The fused result must have the NaN/Inf pattern of the reference (sa_cuda.reference) or of the
    literal evaluation of the same formula, and the finite entries must match that oracle
    (against float64, bound 2x the float32 oracle's own error or 1e-5 relative)."""
    if impl == "cpu":
        f = functional(variant)
        Fu = all_grads(lambda x_, *p: f(x_, groups, *p), x, params, gy)
    else:
        Fu = all_grads(lambda x_, *p: EMULATED.apply(variant, x_, groups, tuple(p), 1e-5),
                       x, params, gy)
    reports = []
    for name, fn in (("reference", ref_functional(variant)),
                     ("literal formula", lambda x_, g, *p: literal_layer(variant, x_, g, *p))):
        O32 = all_grads(lambda x_, *p: fn(x_, groups, *p), x, params, gy)
        O64 = all_grads(lambda x_, *p: fn(x_, groups, *p), x.double(), [p.double() for p in params],
                        gy.double())
        # the NaN/Inf pattern of the float32 oracle (float64 can round differently at saturation)
        problems = [p for p in check_masks_and_values(Fu, O32, what=name) if "finite entries" not in p]
        if not problems:
            for key in O64:  # values: float64 oracle where both oracles are finite
                keep = torch.isfinite(O32[key])
                O64[key] = torch.where(keep, O64[key], O32[key].double())
            problems = check_masks_and_values(Fu, O64, O32, what=name + " (fp64)")
        if not problems:
            return
        reports.append(f"vs the {name}:\n  " + "\n  ".join(problems))
    pytest.fail("fused result matches neither oracle\n" + "\n".join(reports))


NONFINITE_X_CASES = [
    pytest.param((2, 16, 5, 6), "first", id="warp-first"),
    pytest.param((2, 16, 5, 6), "middle", id="warp-middle"),
    pytest.param((1, 16, 40, 40), "first", id="block-first"),
    pytest.param((1, 16, 40, 40), "middle", id="block-middle"),
    pytest.param((1, 16, 72, 64), "middle", id="streamed-middle"),
    pytest.param((2, 16, 1, 1), "first", id="hw1"),
]
VALUES = [pytest.param(math.nan, id="nan"), pytest.param(math.inf, id="inf"),
          pytest.param(-math.inf, id="-inf")]


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("shape,where", NONFINITE_X_CASES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_nonfinite_x_propagates_like_reference(variant, impl, shape, where, value):
    """NaN / +-Inf in x: one value in a channel-branch plane (batch 0, channel 3) and one in a
    spatial-branch plane (last batch item, channel 12), at the plane's first or middle element.
    The reference: a NaN poisons its plane's mean (and, 1x1-conv variant, its group's gate); an Inf
    makes the channel-branch mean +-Inf, which saturates the gate (s = 0 or 1: the plane's other
    outputs stay finite), and the spatial-branch variance NaN (whole plane NaN)."""
    ref = make_ref(variant, 16, 2, seed=1)
    params = [p.detach() for p in params_in_op_order(variant, ref)]
    x = make_input(shape, seed=0)
    idx = 0 if where == "first" else (shape[2] * shape[3]) // 2
    x[0, 3].view(-1)[idx] = value
    x[-1, 12].view(-1)[idx] = value
    nonfinite_check(variant, impl, x, 2, params, make_input(shape, seed=1))


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("index", range(6), ids=["p0-channel_w", "p1-channel_b", "p2-spatial_w",
                                                 "p3-spatial_b", "p4-gn_w", "p5-gn_b"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_nonfinite_parameter_propagates_like_reference(variant, impl, index, value):
    """NaN / +-Inf in one entry (k = 1) of one parameter. The oracle is the reference or, where
    they differ (gn.weight = +-Inf: torch's group_norm folds gamma * rstd, inf * x - inf * mu =
    NaN), the literal evaluation of the formula."""
    ref = make_ref(variant, 16, 2, seed=1)
    params = [p.detach().clone() for p in params_in_op_order(variant, ref)]
    params[index].view(-1)[1] = value
    shape = (2, 16, 5, 6)
    nonfinite_check(variant, impl, make_input(shape, seed=0), 2, params, make_input(shape, seed=1))


# ================================================================================================
# Bad arguments (complements test_errors.py)
# ================================================================================================
C, G = 32, 4
M = C // (2 * G)
SHAPE = (2, C, 5, 7)


def _setup(variant, dtype=torch.float32):
    ref = make_ref(variant, C, G, seed=1)
    params = [p.detach() for p in params_in_op_order(variant, ref)]
    return make_input(SHAPE, seed=2, dtype=dtype), params


@pytest.mark.parametrize("variant", VARIANTS)
def test_x_on_meta_params_on_cpu(variant):
    """x on another device than the parameters (meta stands in for a GPU): ValueError naming the
    first parameter, from the functional and the module; RuntimeError from the raw op."""
    x, params = _setup(variant)
    first = PARAM_ARG_NAMES[variant][0]
    with pytest.raises(ValueError, match=rf"^{first} is on cpu but x is on meta"):
        functional(variant)(x.to("meta"), G, *params)
    module = fused_class(variant)(C, G)
    with pytest.raises(ValueError, match=rf"^{first} is on cpu but x is on meta"):
        module(x.to("meta"))
    with pytest.raises(ValueError, match=rf"{first} is on cpu but x is on meta"):
        fwd_op(variant)(x.to("meta"), G, *params, 1e-5)


@pytest.mark.parametrize("index", range(6))
@pytest.mark.parametrize("variant", VARIANTS)
def test_raw_ops_parameter_on_meta(variant, index):
    x, params = _setup(variant)
    name = PARAM_ARG_NAMES[variant][index]
    bad = list(params)
    bad[index] = params[index].to("meta")
    with pytest.raises(ValueError, match=rf"{name} is on meta but x is on cpu"):
        fwd_op(variant)(x, G, *bad, 1e-5)
    _, mean, rstd = fwd_op(variant)(x, G, *params, 1e-5)
    with pytest.raises(ValueError, match=rf"{name} is on meta but x is on cpu"):
        bwd_op(variant)(torch.randn(SHAPE), x, mean, rstd, G, *bad)


@pytest.mark.parametrize("variant", VARIANTS)
def test_raw_backward_mixed_meta(variant):
    x, params = _setup(variant)
    _, mean, rstd = fwd_op(variant)(x, G, *params, 1e-5)
    gy = make_input(SHAPE, seed=3)
    op = bwd_op(variant)
    cases = [
        ((gy, x.to("meta"), mean, rstd, G, *params), "grad_out is on cpu but x is on meta"),
        ((gy, x, mean.to("meta"), rstd, G, *params), "mean is on meta but x is on cpu"),
        ((gy.to("meta"), x.to("meta"), mean.to("meta"), rstd.to("meta"), G, *params),
         f"{PARAM_ARG_NAMES[variant][0]} is on cpu but x is on meta"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            op(*args)


@pytest.mark.parametrize("variant", VARIANTS)
def test_all_on_meta_gives_shapes(variant):
    """Everything on meta is not an error: shapes and dtypes only (the fake kernels)."""
    x, params = _setup(variant)
    mx, mp = x.to("meta"), [p.to("meta") for p in params]
    out, mean, rstd = fwd_op(variant)(mx, G, *mp, 1e-5)
    assert out.device.type == "meta" and out.shape == SHAPE and out.dtype == x.dtype
    assert mean.shape == (2, C) and rstd.shape == (2, C) and mean.dtype == torch.float32
    grads = bwd_op(variant)(torch.empty(SHAPE, device="meta"), mx, mean, rstd, G, *mp)
    assert grads[0].shape == SHAPE
    assert all(g.shape == p.shape and g.dtype == p.dtype for g, p in zip(grads[1:], mp))
    assert functional(variant)(mx, G, *mp).shape == SHAPE


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
@pytest.mark.parametrize("index", range(6))
@pytest.mark.parametrize("variant", VARIANTS)
def test_raw_backward_parameter_wrong_dtype(variant, index, dtype):
    x, params = _setup(variant)
    _, mean, rstd = fwd_op(variant)(x, G, *params, 1e-5)
    name = PARAM_ARG_NAMES[variant][index]
    bad = list(params)
    bad[index] = torch.ones(params[index].shape, dtype=dtype)
    with pytest.raises(ValueError, match=rf"{name} must be float64, float32, float16 or bfloat16"):
        bwd_op(variant)(make_input(SHAPE, seed=3), x, mean, rstd, G, *bad)


@pytest.mark.parametrize("variant", VARIANTS)
def test_raw_backward_grad_out_wrong_shape(variant):
    x, params = _setup(variant)
    _, mean, rstd = fwd_op(variant)(x, G, *params, 1e-5)
    B, C_, H, W = SHAPE
    for shape in [(B, C_, W, H), (B, C_, H * W), (B, C_ + 2 * 2 * G, H, W), (B + 1, C_, H, W),
                  (B, C_, H, W, 1), (B * C_ * H * W,), (1, C_, H, W), ()]:
        with pytest.raises(ValueError, match=re.escape("grad_out must have x's shape")):
            bwd_op(variant)(torch.randn(shape), x, mean, rstd, G, *params)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, torch.bool], ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_raw_backward_grad_out_not_floating(variant, dtype):
    """grad_out must be a floating tensor (any floating dtype is converted to x's): a complex
    grad_out would lose its imaginary part, an integer/bool one is not a gradient."""
    x, params = _setup(variant)
    _, mean, rstd = fwd_op(variant)(x, G, *params, 1e-5)
    gy = torch.ones(SHAPE, dtype=dtype)
    with pytest.raises(ValueError, match="grad_out"):
        bwd_op(variant)(gy, x, mean, rstd, G, *params)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_raw_backward_statistics_wrong(variant, x_dtype):
    """mean / rstd must be the forward's [B, C] statistics: float32 (float64 for float64 x)."""
    x, params = _setup(variant, x_dtype)
    _, mean, rstd = fwd_op(variant)(x, G, *params, 1e-5)
    stat = torch.float64 if x_dtype == torch.float64 else torch.float32
    assert mean.dtype == stat and rstd.dtype == stat
    other = torch.float32 if stat == torch.float64 else torch.float64
    wrong = [mean.to(other), mean.half(), mean.bfloat16(), mean.to(torch.int64), mean.t(),
             mean.reshape(-1), mean[..., None], mean[None], torch.cat([mean, mean]),
             mean[:, :C // 2], torch.zeros((), dtype=stat)]
    gy = make_input(SHAPE, seed=3, dtype=x_dtype)
    op = bwd_op(variant)
    for bad in wrong:
        for args in ((gy, x, bad, rstd, G, *params), (gy, x, mean, bad, G, *params)):
            with pytest.raises(ValueError, match=r"(mean|rstd) must be"):
                op(*args)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8, torch.int64])
@pytest.mark.parametrize("variant", VARIANTS)
def test_integer_x(variant, dtype):
    """An integer x cannot require grad in torch; the functional, the module and the raw ops
    refuse it as x (not by failing somewhere inside)."""
    x = torch.ones(SHAPE, dtype=dtype)
    with pytest.raises(RuntimeError, match="floating point"):
        x.clone().requires_grad_(True)
    _, params = _setup(variant)
    rule = re.escape(f"x must be float64, float32, float16 or bfloat16, got {dtype}")
    with pytest.raises(ValueError, match=rule):
        functional(variant)(x, G, *[p.clone().requires_grad_() for p in params])
    with pytest.raises(ValueError, match=rule):
        fused_class(variant)(C, G)(x)
    with pytest.raises(ValueError, match="x must be float64, float32, float16 or bfloat16"):
        fwd_op(variant)(x, G, *params, 1e-5)


@pytest.mark.parametrize("eps", ["1e-5", None, [1e-5]], ids=["str", "None", "list"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_eps_not_a_number(variant, eps):
    """eps of a wrong type: ValueError/RuntimeError naming eps (like groups = "4" does)."""
    x, params = _setup(variant)
    with pytest.raises((ValueError, RuntimeError), match="eps"):
        functional(variant)(x, G, *params, eps=eps)


# ================================================================================================
# Determinism and thread safety
# ================================================================================================
def _fwd_bwd_functional(variant, impl, x, groups, params, gy):
    if impl == "cpu":
        fn = functional(variant)
        return all_grads(lambda x_, *p: fn(x_, groups, *p), x, params, gy)
    return all_grads(lambda x_, *p: EMULATED.apply(variant, x_, groups, tuple(p), 1e-5),
                     x, params, gy)


def _assert_bitwise(a, b, what):
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{what}: {key} differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("shape,groups", [((2, 64, 16, 16), 8), ((1, 8, 72, 64), 2), ((3, 16, 1, 1), 4)],
                         ids=["2x64x16x16", "1x8x72x64", "hw1"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cpu_bitwise_repeatable_across_threads(variant, shape, groups, dtype):
    """Forward, backward and every parameter gradient are bitwise identical over repeated runs
    with 2 threads and with 1 thread (parameter gradients are reduced in a fixed order)."""
    params = op_params(variant, shape[1], groups, 7, dtype)
    x, gy = make_input(shape, seed=8, dtype=dtype), make_input(shape, seed=9, dtype=dtype)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (2, 1, 2, 1):
            torch.set_num_threads(n)
            runs.append((n, _fwd_bwd_functional(variant, "cpu", x, groups, params, gy)))
    finally:
        torch.set_num_threads(threads)
    for n, res in runs[1:]:
        _assert_bitwise(runs[0][1], res, f"{n} thread(s) vs 2 threads")


@pytest.mark.parametrize("shape,groups,offset", [
    pytest.param((2, 16, 7, 9), 2, 0, id="warp"),
    pytest.param((1, 8, 30, 32), 2, 1, id="block-misaligned"),
    pytest.param((1, 4, 65, 67), 1, 0, id="streamed"),
    pytest.param((1, 64, 9, 7), 1, 0, id="m32"),
])
@pytest.mark.parametrize("variant", VARIANTS)
def test_emulated_bitwise_repeatable(variant, shape, groups, offset):
    params = op_params(variant, shape[1], groups, 7)
    n = torch.Size(shape).numel()
    x = make_input((n + offset,), seed=8)[offset:].view(shape)
    gy = make_input(shape, seed=9)
    first = _fwd_bwd_functional(variant, "emu", x, groups, params, gy)
    for _ in range(2):
        _assert_bitwise(first, _fwd_bwd_functional(variant, "emu", x, groups, params, gy), "rerun")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_concurrent_python_threads_match_serial(variant, impl):
    """4 Python threads, each running forward + backward on its own input with shared parameters
    (torch.autograd.grad: no shared .grad accumulation), give the serial results bitwise."""
    shapes = [((2, 32, 12, 12), 4), ((1, 32, 20, 20), 4), ((3, 32, 5, 7), 4), ((2, 32, 1, 1), 4)]
    if impl == "emu":
        shapes = [((1, 16, 7, 9), 2), ((1, 16, 20, 20), 2), ((2, 16, 5, 3), 2), ((1, 16, 1, 1), 2)]
    params = [p.detach() for p in params_in_op_order(variant, make_ref(variant, shapes[0][0][1],
                                                                     shapes[0][1], seed=5))]
    tasks = []
    for i, (shape, groups) in enumerate(shapes * 2):
        tasks.append((make_input(shape, seed=20 + i), groups, make_input(shape, seed=40 + i)))

    def work(task):
        x, groups, gy = task
        return _fwd_bwd_functional(variant, impl, x, groups, params, gy)

    serial = [work(t) for t in tasks]
    rounds = 3 if impl == "cpu" else 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        for r in range(rounds):
            for i, res in enumerate(pool.map(work, tasks)):
                _assert_bitwise(serial[i], res, f"round {r}, task {i}")


# ================================================================================================
# Memory
# ================================================================================================
def saved_bytes(module, x):
    """(bytes of tensors saved for backward whose storage is neither a parameter's nor x's,
    list of those tensors, all saved tensors)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    known = {p.untyped_storage().data_ptr() for p in module.parameters()}
    known.add(x.untyped_storage().data_ptr())
    new, seen = [], set()
    for t in saved:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in known and ptr not in seen:
            seen.add(ptr)
            new.append(t)
    return sum(t.untyped_storage().nbytes() for t in new), new, saved


@pytest.mark.parametrize("dtype,stat_bytes",
                         [(torch.float32, 4), (torch.float64, 8), (torch.bfloat16, 4)],
                         ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_autograd_saves_only_x_and_statistics(variant, dtype, stat_bytes):
    """The fused forward saves x itself (no copy), the parameters, and 2 * B * C statistics
    (float32; float64 for float64 x): exactly 2 * B * C * 4 new bytes for float32 input. The eager
    reference saves several x-sized intermediates."""
    B, C_, H, W = 4, 64, 14, 14
    ref = make_ref(variant, C_, 8, seed=1, dtype=dtype)
    fused = make_fused_like(variant, ref)
    x = make_input((B, C_, H, W), seed=2, dtype=dtype).requires_grad_(True)
    nbytes, new, saved = saved_bytes(fused, x)
    assert nbytes == 2 * B * C_ * stat_bytes, [(tuple(t.shape), t.dtype) for t in new]
    assert any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in saved)
    ref_bytes, _, _ = saved_bytes(ref, x)
    x_bytes = x.numel() * x.element_size()
    assert ref_bytes >= x_bytes, (ref_bytes, x_bytes)  # the difference the fused op makes
    print(f"{variant} {dtype}: fused saves {nbytes} new bytes, the reference {ref_bytes} "
          f"({ref_bytes / x_bytes:.2f} x the input's {x_bytes})")


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm")
@pytest.mark.parametrize("variant", VARIANTS)
def test_no_memory_growth_over_1000_calls(variant):
    """Resident memory does not grow over 1000 forward + backward calls (after 100 warm-up
    calls): < 10 MB, i.e. no leak of even ~10 KB per call."""
    ref = make_ref(variant, 32, 4, seed=1)
    fused = make_fused_like(variant, ref)
    x0, gy = make_input((2, 32, 8, 8), seed=2), make_input((2, 32, 8, 8), seed=3)

    def step():
        x = x0.clone().requires_grad_(True)
        fused(x).backward(gy)
        fused.zero_grad(set_to_none=True)

    for _ in range(100):
        step()
    gc.collect()
    before = _rss_bytes()
    for _ in range(1000):
        step()
    gc.collect()
    growth = _rss_bytes() - before
    assert growth < 10 * 2**20, f"RSS grew by {growth / 2**20:.1f} MB over 1000 calls"


# ================================================================================================
# Large tensors
# ================================================================================================
def check_in_chunks(variant, x, groups, params, gy, *, by="group", eps=1e-5, chunks=None):
    """The fused raw ops on the whole x against the reference evaluated chunk by chunk, so that no
    reference tensor is larger than one chunk: ``by="group"``: one (batch item, group) at a time
    (groups = 1 on its 2m channels); ``by="batch"``: one batch item at a time. The reference runs
    in float32 on x's values. ``chunks``: the chunks whose out/grad_x are compared ((b, g) pairs or
    batch indices; all by default). Parameter gradients need every chunk: checked only then.

    Channel c of the pre-shuffle result goes to output channel 2 * (c % (C/2)) + c // (C/2); in a
    group chunk's own (2m-channel) reference output, local channel j is at 2 * (j % m) + j // m.
    Bounds, with u = eps(x.dtype) (one unit of the input dtype, the suite's low-precision term):
    out, grad_x within rtol u, atol u * max(1, max|ref|) (the fused result is one rounding of an
    fp32 computation); mean, rstd within u; parameter gradients within u * max(1, max|ref|).
    An indexing error gives O(1) differences."""
    B, C_, H, W = x.shape
    m, half = C_ // (2 * groups), C_ // 2
    fwd, bwd = fwd_op(variant), bwd_op(variant)
    out, mean, rstd = fwd(x, groups, *params, eps)
    grad_x, *pgrads = bwd(gy, x, mean, rstd, groups, *params)
    unit = torch.finfo(x.dtype).eps if x.dtype != torch.float64 else torch.finfo(torch.float32).eps
    everything = chunks is None
    if by == "group":
        chunks = [(b, g) for b in range(B) for g in range(groups)] if everything else chunks
    else:
        chunks = list(range(B)) if everything else chunks
    psum = [torch.zeros(p.shape, dtype=torch.float64, device=x.device) for p in params]
    j = torch.arange(2 * m, device=x.device)
    local = 2 * (j % m) + j // m                      # chunk-local output position of u_j
    for chunk in chunks:
        ps = [p.detach().float().requires_grad_(True) for p in params]
        if by == "group":
            b, g = chunk
            cs = g * 2 * m + j                        # input (pre-shuffle) channels of the chunk
            dst = 2 * (cs % half) + cs // half        # their output channels
            xc = x[b:b + 1, g * 2 * m:(g + 1) * 2 * m].float().requires_grad_(True)
            yc = ref_functional(variant)(xc, 1, *ps, eps=eps)
            gyc = torch.empty_like(yc)
            gyc[0, local] = gy[b, dst].float()
            gs = torch.autograd.grad(yc, [xc, *ps], gyc)
            pairs = (("out", out[b, dst], yc.detach()[0, local]), ("grad_x", grad_x[b, cs], gs[0][0]))
            stats = (mean[b, cs], rstd[b, cs])
        else:
            b, cs = chunk, slice(None)
            xc = x[b:b + 1].float().requires_grad_(True)
            yc = ref_functional(variant)(xc, groups, *ps, eps=eps)
            gs = torch.autograd.grad(yc, [xc, *ps], gy[b:b + 1].float())
            pairs = (("out", out[b], yc.detach()[0]), ("grad_x", grad_x[b], gs[0][0]))
            stats = (mean[b], rstd[b])
        for name, got, want in pairs:
            torch.testing.assert_close(got.float(), want, rtol=unit, atol=unit * max(1.0, max_abs(want)),
                                       msg=lambda s: f"{name} of chunk {chunk}: {s}")
        var, mu = torch.var_mean(xc.detach()[0], dim=(1, 2), unbiased=False)
        torch.testing.assert_close(stats[0].float(), mu, rtol=0, atol=unit * max(1.0, max_abs(xc)),
                                   msg=lambda s: f"mean of chunk {chunk}: {s}")
        torch.testing.assert_close(stats[1].float(), torch.rsqrt(var + eps), rtol=unit, atol=0,
                                   msg=lambda s: f"rstd of chunk {chunk}: {s}")
        for acc, gp in zip(psum, gs[1:]):
            acc += gp.double()
        del xc, ps, yc, gs, pairs
    if everything:
        for i, (acc, got) in enumerate(zip(psum, pgrads)):
            assert got.shape == params[i].shape and got.dtype == params[i].dtype
            bound = unit * max(1.0, max_abs(acc))
            assert max_err(got, acc) <= bound, (f"{PARAM_ARG_NAMES[variant][i]}: max|fused - ref| = "
                                                f"{max_err(got, acc):.3g} > {bound:.3g}")


@pytest.mark.parametrize("by,shape,groups", [
    ("group", (2, 16, 24, 20), 8), ("group", (1, 16, 9, 33), 2), ("group", (3, 8, 5, 5), 4),
    ("batch", (3, 32, 12, 10), 4), ("batch", (2, 16, 1, 1), 8),
])
@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_checker_on_cpu(variant, by, shape, groups):
    """The chunked checker of the > 2^31-element CUDA test, run here on the CPU kernels (fp16 x,
    fp32 parameters as in that test) so that its index bookkeeping is itself tested without a GPU
    (a wrong channel map would fail here)."""
    params = op_params(variant, shape[1], groups, 4)
    x = make_input(shape, seed=5, dtype=torch.float16)
    gy = make_input(shape, seed=6, dtype=torch.float16)
    check_in_chunks(variant, x, groups, params, gy, by=by)
    last = (shape[0] - 1, groups - 1) if by == "group" else shape[0] - 1
    check_in_chunks(variant, x, groups, params, gy, by=by, chunks=[last])


@pytest.mark.skipif(not CUDA_OK, reason=CUDA_REASON)
@pytest.mark.parametrize("by,shape,groups", [
    # 65536 planes of 256 x 256 (G = 64, m = 8 as in SA-ResNet): batch items 32..63 start beyond
    # element 2^31; reference per batch item (64M elements).
    pytest.param("batch", (64, 1024, 256, 256), 64, id="many-planes-64x1024x256x256"),
    # 16 planes of 2^28 elements (G = 8, m = 1): planes 8..15 start beyond element 2^31;
    # reference per group (2 planes, 2 GiB in fp32).
    pytest.param("group", (1, 16, 16384, 16384), 8, id="huge-planes-1x16x16384x16384"),
])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_more_than_2_31_elements(variant, by, shape, groups):
    """x float16 with 2^32 elements (8 GiB; x, grad_out, out and grad_x: 32 GiB), fp32 parameters:
    forward and backward of the raw ops on the GPU, every chunk compared with the reference (any
    32-bit element offset overflows past 2^31)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 60 * 2**30:
        pytest.skip(f"needs ~60 GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    assert torch.Size(shape).numel() > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)
    try:
        x = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float16)
        gy = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float16)
        params = [p.cuda() for p in op_params(variant, shape[1], groups, 4)]
        check_in_chunks(variant, x, groups, params, gy, by=by)
    finally:
        x = gy = None
        gc.collect()
        torch.cuda.empty_cache()


@pytest.mark.parametrize("variant", VARIANTS)
def test_cpu_largest_quick_shape(variant):
    """(1, 64, 256, 256): 4.2M elements, 65536 per plane (a couple of seconds with the float64
    reference), fp32 criterion against the float64 reference."""
    Fu, E, R = run_high_precision(variant, "cpu", (1, 64, 256, 256), 8)
    _check_high_precision(Fu, E, R, torch.float32)


# ================================================================================================
# Double backward
# ================================================================================================
@pytest.mark.parametrize("how", ["squared-loss", "grad-out-requires-grad"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_double_backward_raises(variant, how):
    """Differentiating a gradient of the fused op raises (create_graph=True alone works: the first
    derivative is right, torch.func.grad needs it)."""
    ref = make_ref(variant, 16, 2, seed=1)
    fused = make_fused_like(variant, ref)
    x = make_input((2, 16, 5, 6), seed=2).requires_grad_(True)
    y = fused(x)
    if how == "squared-loss":
        g, = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        want, = torch.autograd.grad((y * y).sum(), x, retain_graph=True)
    else:
        gy = make_input(y.shape, seed=3).requires_grad_(True)
        g, = torch.autograd.grad(y, x, gy, create_graph=True)
        want, = torch.autograd.grad(y, x, gy.detach())
    torch.testing.assert_close(g.detach(), want, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="double backward"):
        g.pow(2).sum().backward()


@pytest.mark.parametrize("variant", VARIANTS)
def test_double_backward_never_silently_wrong(variant):
    """A gradient penalty (WGAN-GP style: grad of y.sum() with create_graph=True, its norm added to
    the loss) needs the second derivative. The fused op must raise, never return a gradient that
    silently has no graph (the penalty's parameter gradient would then be dropped without a word).
    README: "differentiating the gradient raises an error"."""
    ref = make_ref(variant, 16, 2, seed=1)
    fused = make_fused_like(variant, ref)
    x = make_input((2, 16, 5, 6), seed=2).requires_grad_(True)
    with pytest.raises(RuntimeError, match="double backward"):
        y = fused(x)
        g, = torch.autograd.grad(y.sum(), x, create_graph=True)
        (y.mean() + g.pow(2).sum()).backward()


def test_readme_documents_double_backward():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = " ".join(f.read().split())
    assert "Double backward is not supported" in text
