"""Property tests (hypothesis, derandomized): the fused op against the reference on random problems.

Random: batch B (0..3), groups, channels per branch m, plane H x W (1..20 each), dtype (float32,
float64, bfloat16), eps, the layout of x (contiguous, channels_last, sliced views with gaps,
transposed H/W, storage offset (misaligned), strided batch, zero-stride expand) and of grad_out,
whether x requires grad, and (bf16) whether the parameters are bf16 or fp32 (AMP style).
Checked: output and every gradient (x and all six parameters), on

* the CPU fused op (sa_cuda.sa_layer / sa_cuda.shuffle_attention), and
* the CUDA kernels compiled for the CPU SIMT emulator (torch.ops.sa_cuda_emu, through the same
  autograd Function); these examples are kept small (every CUDA thread runs on one core),

and, through the raw forward ops, the per-plane statistics (mean, rstd).

Criteria are the suite's (sa_cuda.testing.assert_close_to_reference): float32/float64 against the
float64 reference (1e-5 / 1e-10 relative to max(1, max|ref|), or 2x the eager reference's own error
where that is larger); bfloat16 with the flash-attention rule, error vs
float64 <= 2x the eager bf16 reference's error + one bf16 unit at the largest magnitude.
B = 0 has no reference (the reference cannot reshape an empty batch): there the result must be
empty with the right shape/dtype and every parameter gradient exactly zero.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import (
    BACKENDS,
    VARIANTS,
    autocast_if_mixed,
    make_ref,
    params_in_op_order,
    ref_functional,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sa_cuda.testing import assert_close_to_reference, max_abs, max_err

LAYOUTS = (
    "contiguous",
    "channels_last",
    "slice",
    "transpose_hw",
    "storage_offset",
    "batch_stride",
    "expand_h",
)
GRAD_LAYOUTS = ("contiguous", "channels_last", "transpose_hw", "slice")
DTYPES = (torch.float32, torch.float64, torch.bfloat16)

SETTINGS = dict(
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ------------------------------------------------------------------------------------------------
# Inputs in a given memory layout
# ------------------------------------------------------------------------------------------------
def strided(shape, layout, dtype, seed, *, requires_grad=False):
    """(leaf, view): ``view`` has ``shape`` and the requested layout, values randn (seeded) in
    ``dtype``; it is a differentiable view of ``leaf`` (so autograd.grad w.r.t. ``view`` works and
    the fused op sees the non-contiguous tensor itself, not a contiguous copy)."""
    B, C, H, W = shape
    gen = torch.Generator().manual_seed(seed)

    def randn(*size):
        t = torch.randn(size, generator=gen, dtype=torch.float64).to(dtype)
        return t.requires_grad_(requires_grad)

    if layout == "contiguous":
        leaf = randn(B, C, H, W)
        view = leaf
    elif layout == "channels_last":
        leaf = randn(B, H, W, C)
        view = leaf.permute(0, 3, 1, 2)
    elif layout == "slice":  # gaps in every dimension but B, offset 1 + row offset
        leaf = randn(B, C + 1, H + 2, 2 * W)
        view = leaf[:, 1:, 1 : H + 1, ::2]
    elif layout == "transpose_hw":
        leaf = randn(B, C, W, H)
        view = leaf.transpose(2, 3)
    elif layout == "storage_offset":  # contiguous but every plane pointer misaligned
        leaf = randn(B * C * H * W + 3)
        view = leaf[3:].view(B, C, H, W)
    elif layout == "batch_stride":
        leaf = randn(2 * B, C, H, W)
        view = leaf[1::2]
    elif layout == "expand_h":  # stride 0 along H (each plane constant along H)
        leaf = randn(B, C, 1, W)
        view = leaf.expand(B, C, H, W)
    else:
        raise AssertionError(layout)
    assert view.shape == shape, (view.shape, shape)
    return leaf, view


def grads(fn, x, params, gy, x_requires_grad):
    """{"out", "x" (if x requires grad), "p0".."p5"}: fn(x, *params) and its gradients."""
    params = [p.detach().clone().requires_grad_(True) for p in params]
    with autocast_if_mixed(x, params):
        out = fn(x, *params)
    inputs = ([x] if x_requires_grad else []) + params
    gs = torch.autograd.grad(out, inputs, gy, allow_unused=False)
    res = {"out": out.detach()}
    if x_requires_grad:
        res["x"] = gs[0]
        gs = gs[1:]
    res.update({f"p{i}": g for i, g in enumerate(gs)})
    return res


def ref_grads(variant, x_values, groups, params, gy, eps, x_requires_grad, dtype):
    """The reference functional in ``dtype`` on the same values (a contiguous copy of x)."""
    x = x_values.detach().to(dtype)
    gy = gy.detach().to(dtype)
    ps = [p.detach().to(dtype) for p in params]
    fn = ref_functional(variant)
    B, _, H, W = x.shape
    if B * groups * H * W == 1:
        # F.group_norm refuses a single value per channel ("Expected more than 1 value per channel
        # when training"); the layer is still defined (xh = 0). Evaluate it on the batch doubled
        # with a zero incoming gradient for the copy: the first half and every gradient are the
        # same function of (x, gy).
        x, gy = torch.cat([x, x]), torch.cat([gy, torch.zeros_like(gy)])
    x = x.clone().requires_grad_(x_requires_grad)
    res = grads(lambda x_, *p: fn(x_, groups, *p, eps=eps), x, ps, gy, x_requires_grad)
    for key in ("out", "x"):
        if key in res:
            res[key] = res[key][:B]
    return res


def fused_fn(variant, impl, groups, eps):
    return lambda x, *p: BACKENDS[impl].apply(variant, x, groups, p, eps)


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------
@st.composite
def cases(draw, small=False):
    """A whole problem from one drawn integer. Drawing each choice separately makes hypothesis
    spend a ~25-example budget on near-copies of a few cases (it mutates one draw at a time and
    favours the first option of every sampled_from); one seed gives 25 distinct problems spread
    over all options, still derandomized, and a failure prints the complete case."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = random.Random(seed)

    def size(lo, hi):  # the bounds a quarter of the time each, else uniform
        return rng.choice([lo, hi, rng.randint(lo, hi), rng.randint(lo, hi)])

    dtype = rng.choice(DTYPES)
    G = size(1, 3 if small else 4)
    m = size(1, 3 if small else 4)
    return dict(
        variant=rng.choice(VARIANTS),
        shape=(
            0 if rng.random() < 0.125 else size(1, 2 if small else 3),
            2 * G * m,
            size(1, 20),
            size(1, 20),
        ),
        groups=G,
        dtype=dtype,
        eps=rng.choice((1e-5, 1e-3, 0.25)),
        layout=rng.choice(LAYOUTS),
        gy_layout=rng.choice(GRAD_LAYOUTS),
        x_requires_grad=rng.random() < 0.75,
        params_lowp=dtype == torch.bfloat16 and rng.random() < 0.5,
        seed=seed % 2**31,
    )


def check_case(case, impl):
    variant, shape, G, dtype = case["variant"], case["shape"], case["groups"], case["dtype"]
    eps, xrg, seed = case["eps"], case["x_requires_grad"], case["seed"]
    ref = make_ref(variant, shape[1], G, seed=seed)
    base = [p.detach() for p in params_in_op_order(variant, ref)]
    low_params = case["params_lowp"] or dtype == torch.float64
    fused_params = [p.to(dtype) for p in base] if low_params else base

    _, x = strided(shape, case["layout"], dtype, seed + 1, requires_grad=xrg)
    _, gy = strided(shape, case["gy_layout"], dtype, seed + 2)
    F = grads(fused_fn(variant, impl, G, eps), x, fused_params, gy, xrg)

    # contract of the op: out like x (dtype, shape), dense (contiguous, or channels_last for a
    # channels_last x); gradients in their inputs' shapes and dtypes
    out = F["out"]
    assert out.shape == shape and out.dtype == dtype
    assert out.is_contiguous() or out.is_contiguous(memory_format=torch.channels_last), out.stride()
    if xrg:
        assert F["x"].shape == shape and F["x"].dtype == dtype
    for i, p in enumerate(fused_params):
        assert F[f"p{i}"].shape == p.shape and F[f"p{i}"].dtype == p.dtype, i

    if shape[0] == 0:  # empty batch: nothing to compare with, every parameter gradient is 0
        for i in range(6):
            assert torch.count_nonzero(F[f"p{i}"]) == 0, i
        return

    R = ref_grads(variant, x, G, fused_params, gy, eps, xrg, torch.float64)
    if dtype in (torch.float32, torch.float64):
        E = (
            R
            if dtype == torch.float64
            else ref_grads(variant, x, G, fused_params, gy, eps, xrg, torch.float32)
        )
        assert_close_to_reference(F, R, dtype, eager=E)
        return

    # bfloat16: flash-attention criterion against the eager reference run entirely in bf16,
    # each judged against the float64 function of its own (possibly rounded) parameters.
    low = [p.to(dtype) for p in base]
    E = ref_grads(variant, x, G, low, gy, eps, xrg, dtype)
    RE = ref_grads(variant, x, G, low, gy, eps, xrg, torch.float64)
    assert_close_to_reference(
        F, R, dtype, eager=E, eager_ref64=RE, param_dtype=fused_params[0].dtype
    )


@settings(max_examples=30, **SETTINGS)
@given(case=cases())
def test_cpu_fused_matches_reference(case):
    check_case(case, "cpu")


@pytest.mark.slow
@settings(max_examples=25, **SETTINGS)
@given(case=cases(small=True))
def test_emulated_cuda_matches_reference(case):
    check_case(case, "emulated")


# ------------------------------------------------------------------------------------------------
# Per-plane statistics of the raw forward ops
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["cpu", "emulated"])
@settings(max_examples=25, **SETTINGS)
@given(case=cases(small=True))
def test_forward_statistics(impl, case):
    """mean = plane mean, rstd = 1 / sqrt(biased var + eps) (float32; float64 for float64 x), for
    every plane, against float64 statistics of the same values. Bounds: |mean error| <= u * 2 *
    max(1, max|x|) * 32 and rstd relative error <= 32 u, u the accumulation type's unit roundoff
    (the planes here have <= 400 elements; the kernels sum <= ~50 terms per accumulator)."""
    variant, shape, G, dtype = case["variant"], case["shape"], case["groups"], case["dtype"]
    eps = case["eps"]
    params = [
        p.detach()
        for p in params_in_op_order(variant, make_ref(variant, shape[1], G, seed=case["seed"]))
    ]
    _, x = strided(shape, case["layout"], dtype, case["seed"] + 1)
    out, mean, rstd = BACKENDS[impl].forward_op(variant)(x, G, *params, eps)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    B, C = shape[:2]
    assert mean.shape == (B, C) and rstd.shape == (B, C)
    assert mean.dtype == stat_dtype and rstd.dtype == stat_dtype
    if B == 0:
        return
    x64 = x.double()
    mu64 = x64.mean((2, 3))
    r64 = 1.0 / torch.sqrt(x64.var((2, 3), unbiased=False) + eps)
    u = torch.finfo(stat_dtype).eps / 2
    mean_tol = 32 * u * 2 * max(1.0, max_abs(x64))
    assert max_err(mean, mu64) <= mean_tol, f"mean error {max_err(mean, mu64):.3g} > {mean_tol:.3g}"
    rel = ((rstd.double() - r64) / r64).abs().max().item()
    assert rel <= 32 * u, f"rstd relative error {rel:.3g} > {32 * u:.3g}"
    assert math.isfinite(rel)
