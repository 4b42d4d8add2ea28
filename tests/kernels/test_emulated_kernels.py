"""The CUDA kernels, executed on the CPU by the SIMT emulator (DESIGN.md section 6).

torch.ops.sa_cuda_emu.* is csrc/cuda's kernel and launch source compiled by the host compiler
(tests/emulation.py). Shapes are chosen to hit every launch path of launch_common.cuh; values and
all gradients are checked against the reference with the criteria of test_forward_backward.py, and
gradcheck runs through the emulated forward and backward in float64."""

from __future__ import annotations

import pytest
import torch

from conftest import (VARIANTS, assert_low_precision_close, clone_as, forward_backward, make_input, make_ref,
                      params_in_op_order)
from emulation import load_emulation
from sa_cuda.ops.shuffle_attention import _apply
from test_forward_backward import _check_high_precision

EMU = load_emulation()

# (B, C, H, W), groups, storage offset in elements (1: every plane pointer misaligned)
PATHS = [
    pytest.param((2, 16, 7, 9), 2, 0, id="warp-per-plane-scalar"),
    pytest.param((2, 16, 8, 8), 4, 0, id="warp-per-plane-vector"),
    pytest.param((3, 16, 1, 1), 4, 0, id="hw1"),
    pytest.param((1, 8, 30, 32), 2, 0, id="block-per-plane-vector"),
    pytest.param((1, 8, 31, 29), 2, 0, id="block-per-plane-scalar"),
    pytest.param((1, 8, 30, 32), 2, 1, id="block-per-plane-misaligned"),
    pytest.param((1, 4, 64, 72), 1, 0, id="streamed-vector"),
    pytest.param((1, 4, 65, 67), 1, 1, id="streamed-scalar-misaligned"),
    pytest.param((2, 8, 5, 6), 4, 0, id="m1"),
    pytest.param((1, 64, 9, 7), 1, 0, id="m32-conv-tiles"),
]


def emulated_like(variant, ref):
    """A module with ref's parameters (and dtype) whose forward runs the emulated CUDA kernels."""

    class Emulated(type(ref)):
        def forward(self, x):
            return _apply(f"sa_cuda_emu::{variant}", x, self.groups,
                          tuple(params_in_op_order(variant, self)), self.gn.eps)

    module = Emulated(2 * ref.groups * ref.gn.num_channels, ref.groups)
    module.load_state_dict(ref.state_dict(), strict=True)
    module.gn.eps = ref.gn.eps
    return module.to(next(ref.parameters()).dtype)


def _input(shape, storage_offset, dtype, seed, **kwargs):
    n = torch.Size(shape).numel()
    flat = make_input((n + storage_offset,), seed=seed, dtype=dtype, **kwargs)
    return flat[storage_offset:].view(shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape,groups,offset", PATHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_emulated_fp32_fp64(variant, shape, groups, offset, dtype):
    ref = make_ref(variant, shape[1], groups, seed=5, dtype=dtype)
    ref64 = clone_as(ref, torch.float64)
    x, gy = _input(shape, offset, dtype, 1), _input(shape, offset, dtype, 2)
    F = forward_backward(emulated_like(variant, ref), x, gy)
    R = forward_backward(ref64, x.double(), gy.double())
    E = R if dtype == torch.float64 else forward_backward(ref, x, gy)
    _check_high_precision(F, E, R, dtype)


@pytest.mark.parametrize("shape,groups,offset", PATHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_emulated_fp32_large_mean(variant, shape, groups, offset):
    """|mean| >> std (x = 100 + 0.1 randn): statistics without cancellation on every path."""
    ref = make_ref(variant, shape[1], groups, seed=5)
    x = _input(shape, offset, torch.float32, 1, offset=100.0, scale=0.1)
    gy = _input(shape, offset, torch.float32, 2)
    F = forward_backward(emulated_like(variant, ref), x, gy)
    R = forward_backward(clone_as(ref, torch.float64), x.double(), gy.double())
    _check_high_precision(F, forward_backward(ref, x, gy), R, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape,groups,offset", PATHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_emulated_low_precision(variant, shape, groups, offset, dtype):
    """DESIGN.md section 5: error vs float64 at most 2x the eager reference's in the same dtype
    (+ one unit of the dtype at the largest magnitude, see test_forward_backward.py)."""
    low = make_ref(variant, shape[1], groups, seed=5, dtype=dtype)
    ref64 = clone_as(low, torch.float64)
    x, gy = _input(shape, offset, dtype, 1), _input(shape, offset, dtype, 2)
    F = forward_backward(emulated_like(variant, low), x, gy)
    R = forward_backward(ref64, x.double(), gy.double())
    E = forward_backward(low, x, gy)
    assert_low_precision_close(F, E, R, dtype)


@pytest.mark.parametrize("shape,groups", [((2, 8, 3, 4), 2), ((1, 12, 2, 3), 3), ((2, 8, 2, 2), 4)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_emulated_gradcheck(variant, shape, groups):
    ref = make_ref(variant, shape[1], groups, seed=3, dtype=torch.float64)
    params = [p.detach().clone().requires_grad_() for p in params_in_op_order(variant, ref)]
    x = make_input(shape, seed=4, dtype=torch.float64).requires_grad_()

    def fn(x, *ps):
        return _apply(f"sa_cuda_emu::{variant}", x, groups, ps, 1e-5)

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_emulated_op_contract_matches_cpu_op(variant):
    """The emulated CUDA forward returns what the CPU op returns (out and the per-plane mean/rstd
    saved for backward): shapes, dtypes, and values to fp32 rounding."""
    x = make_input((2, 16, 7, 9), seed=9)
    params = [p.detach() for p in params_in_op_order(variant, make_ref(variant, 16, 2, seed=9))]
    cpu = getattr(torch.ops.sa_cuda, f"{variant}_forward")(x, 2, *params, 1e-5)
    emu = getattr(EMU, f"{variant}_forward")(x, 2, *params, 1e-5)
    for a, b in zip(cpu, emu):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
