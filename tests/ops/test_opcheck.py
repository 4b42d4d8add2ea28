"""torch.library.opcheck on the four registered ops, plus direct value checks of the raw ops.

opcheck runs test_schema (no undeclared mutation/aliasing), test_autograd_registration,
test_faketensor (the Python fake kernels in sa_cuda/ops/shuffle_attention.py produce exactly the
real outputs' shapes, dtypes, devices and strides) and test_aot_dispatch_dynamic (the ops trace
under AOTAutograd with dynamic shapes, as torch.compile uses them).
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DEVICES,
    VARIANTS,
    bwd_op,
    fwd_op,
    make_input,
    make_ref,
    params_in_op_order,
    ref_functional,
)

from sa_cuda.testing import max_abs

# x dtype, parameter dtype
DTYPES = [
    pytest.param(torch.float32, torch.float32, id="x_fp32-p_fp32"),
    pytest.param(torch.float64, torch.float64, id="x_fp64-p_fp64"),
    pytest.param(torch.bfloat16, torch.float32, id="x_bf16-p_fp32"),
    pytest.param(torch.bfloat16, torch.bfloat16, id="x_bf16-p_bf16"),
    pytest.param(torch.float16, torch.float32, id="x_fp16-p_fp32"),
    pytest.param(torch.float16, torch.float16, id="x_fp16-p_fp16"),
]

# (B, C, H, W), groups: realistic (an SA-ResNet stage-4 layer, cut to batch 1) and small odd.
SHAPES = [
    pytest.param((1, 2048, 7, 7), 64, id="2048x7x7-g64"),
    pytest.param((2, 48, 5, 3), 4, id="48x5x3-g4"),
]


def _args(variant, shape, groups, x_dtype, p_dtype, device, *, memory_format=None):
    ref = make_ref(variant, shape[1], groups, seed=7, dtype=p_dtype, device=device)
    params = [p.detach() for p in params_in_op_order(variant, ref)]
    x = make_input(shape, seed=8, dtype=x_dtype, device=device)
    gy = make_input(shape, seed=9, dtype=x_dtype, device=device)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
        gy = gy.contiguous(memory_format=memory_format)
    return x, gy, params


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype,p_dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_opcheck_forward(variant, shape, groups, x_dtype, p_dtype, device):
    x, _, params = _args(variant, shape, groups, x_dtype, p_dtype, device)
    torch.library.opcheck(fwd_op(variant), (x, groups, *params, 1e-5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype,p_dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_opcheck_backward(variant, shape, groups, x_dtype, p_dtype, device):
    x, gy, params = _args(variant, shape, groups, x_dtype, p_dtype, device)
    _, mean, rstd = fwd_op(variant)(x, groups, *params, 1e-5)
    torch.library.opcheck(bwd_op(variant), (gy, x, mean, rstd, groups, *params))


@pytest.mark.parametrize("variant", VARIANTS)
def test_opcheck_channels_last_and_empty(variant):
    """Non-contiguous (channels_last) x and grad_out, and an empty batch."""
    x, gy, params = _args(
        variant,
        (2, 48, 5, 3),
        4,
        torch.float32,
        torch.float32,
        "cpu",
        memory_format=torch.channels_last,
    )
    torch.library.opcheck(fwd_op(variant), (x, 4, *params, 1e-5))
    _, mean, rstd = fwd_op(variant)(x, 4, *params, 1e-5)
    torch.library.opcheck(bwd_op(variant), (gy, x, mean, rstd, 4, *params))

    x0, gy0 = x[:0], gy[:0]
    torch.library.opcheck(fwd_op(variant), (x0, 4, *params, 1e-5))
    _, mean0, rstd0 = fwd_op(variant)(x0, 4, *params, 1e-5)
    torch.library.opcheck(bwd_op(variant), (gy0, x0, mean0, rstd0, 4, *params))


def test_opcheck_backward_transposed_weight():
    """A non-contiguous (transposed) 1x1-conv weight, as the functional accepts any (m, m) matrix:
    the fake kernel must report the same strides for its gradient as the real kernel."""
    variant, groups = "shuffle_attention", 4
    x, gy, params = _args(variant, (2, 48, 5, 3), groups, torch.float32, torch.float32, "cpu")
    m = 48 // (2 * groups)
    params[0] = params[0].reshape(m, m).t()
    params[2] = params[2].reshape(m, m).t()
    assert not params[0].is_contiguous()
    torch.library.opcheck(fwd_op(variant), (x, groups, *params, 1e-5))
    _, mean, rstd = fwd_op(variant)(x, groups, *params, 1e-5)
    torch.library.opcheck(bwd_op(variant), (gy, x, mean, rstd, groups, *params))


@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered:UserWarning")
@pytest.mark.parametrize("variant", VARIANTS)
def test_opcheck_forward_requires_grad_inputs(variant):
    """Inputs that require grad (as inside the modules). The raw ops have no autograd kernel
    (autograd lives in sa_cuda.ShuffleAttentionFunction); opcheck must still pass."""
    x, _, params = _args(variant, (2, 48, 5, 3), 4, torch.float32, torch.float32, "cpu")
    params = [p.clone().requires_grad_(True) for p in params]
    torch.library.opcheck(fwd_op(variant), (x.clone().requires_grad_(True), 4, *params, 1e-5))


@pytest.mark.parametrize("variant", VARIANTS)
def test_raw_ops_values(variant):
    """The raw ops' outputs: out equals the reference, mean/rstd are the per-plane statistics in
    fp32 (fp64 for fp64 x), and the backward op's outputs equal autograd of the reference."""
    shape, groups = (2, 48, 5, 3), 4
    for x_dtype, stat_dtype in (
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.bfloat16, torch.float32),
    ):
        p_dtype = torch.float64 if x_dtype == torch.float64 else torch.float32
        x, gy, params = _args(variant, shape, groups, x_dtype, p_dtype, "cpu")
        out, mean, rstd = fwd_op(variant)(x, groups, *params, 1e-5)
        assert out.dtype == x_dtype and out.shape == x.shape and out.is_contiguous()
        assert mean.dtype == stat_dtype and rstd.dtype == stat_dtype
        assert mean.shape == (2, 48) and rstd.shape == (2, 48)

        x64 = x.double()
        torch.testing.assert_close(mean.double(), x64.mean((2, 3)), rtol=1e-6, atol=1e-6)
        var = x64.var((2, 3), unbiased=False)
        torch.testing.assert_close(rstd.double(), (var + 1e-5).rsqrt(), rtol=1e-5, atol=0)

        p64 = [p.double().requires_grad_(True) for p in params]
        xr = x64.clone().requires_grad_(True)
        ref_out = ref_functional(variant)(xr, groups, *p64)
        tol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2}[x_dtype]
        torch.testing.assert_close(
            out.double(), ref_out.detach(), rtol=tol, atol=tol * max_abs(ref_out)
        )

        grads = bwd_op(variant)(gy, x, mean, rstd, groups, *params)
        assert len(grads) == 7
        ref_grads = torch.autograd.grad(ref_out, [xr, *p64], gy.double())
        assert grads[0].dtype == x_dtype and grads[0].shape == x.shape
        for g, p in zip(grads[1:], params):
            assert g.shape == p.shape and g.dtype == p.dtype
        for g, r in zip(grads, ref_grads):
            assert (g.double() - r).abs().max() <= tol * max(1.0, max_abs(r))
