"""The CUDA kernels on every launch path: executed on the CPU by the SIMT emulator (docs/emulator.md;
torch.ops.sa_cuda_emu.* is csrc/cuda's kernel and launch source compiled by the host compiler,
tests/emulation.py) and, where there is a GPU, on the GPU (the ``backend`` fixture).

Shapes are chosen to hit every launch path of launch_common.cuh; values and all gradients are
checked against the reference with sa_cuda.testing.assert_close_to_reference, and gradcheck runs
through the kernels' forward and backward in float64."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    VARIANTS,
    clone_as,
    forward_backward,
    input_at_offset,
    make_input,
    make_ref,
    params_in_op_order,
)

from sa_cuda.testing import assert_close_to_reference

# The CUDA kernels: emulated on the CPU, and on a GPU where there is one.
pytestmark = pytest.mark.parametrize("backend", ["emulated", "cuda"], indirect=True)

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


@pytest.mark.parametrize(
    "dtype",
    [torch.float64, torch.float32, torch.bfloat16, torch.float16],
    ids=["fp64", "fp32", "bf16", "fp16"],
)
@pytest.mark.parametrize("shape,groups,offset", PATHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_kernels_every_dtype(backend, variant, shape, groups, offset, dtype):
    """Output and all gradients against float64, within sa_cuda.testing.accuracy_bound: relative to
    the eager reference's error in the same dtype (fp64: the reference itself)."""
    dev = backend.device
    ref = make_ref(variant, shape[1], groups, seed=5, dtype=dtype, device=dev)
    ref64 = clone_as(ref, torch.float64)
    x = input_at_offset(shape, offset, dtype, 1, device=dev)
    gy = input_at_offset(shape, offset, dtype, 2, device=dev)
    F = forward_backward(backend.module_like(variant, ref), x, gy)
    R = forward_backward(ref64, x.double(), gy.double())
    E = R if dtype == torch.float64 else forward_backward(ref, x, gy)
    assert_close_to_reference(F, R, dtype, eager=E)


@pytest.mark.parametrize("shape,groups,offset", PATHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_kernels_fp32_large_mean(backend, variant, shape, groups, offset):
    """|mean| >> std (x = 100 + 0.1 randn): statistics without cancellation on every path."""
    dev = backend.device
    ref = make_ref(variant, shape[1], groups, seed=5, device=dev)
    x = input_at_offset(shape, offset, torch.float32, 1, offset=100.0, scale=0.1, device=dev)
    gy = input_at_offset(shape, offset, torch.float32, 2, device=dev)
    F = forward_backward(backend.module_like(variant, ref), x, gy)
    R = forward_backward(clone_as(ref, torch.float64), x.double(), gy.double())
    assert_close_to_reference(F, R, torch.float32, eager=forward_backward(ref, x, gy))


# gradcheck runs the forward twice per input element and the backward once per output element.
# SALayer: a warp per plane, 8 planes per block (cheap to emulate). ShuffleAttention: a block of
# 256 threads per (batch item, group, branch), so its cases are kept to the fewest blocks that
# still cover B > 1, G > 1 (odd G), m = 2 (4 pieces per plane) and m = 1 (8 pieces, some empty).
GRADCHECK_CASES = [
    pytest.param("sa_layer", (2, 8, 3, 4), 2, id="sa_layer-2x8x3x4-g2"),
    pytest.param("sa_layer", (1, 12, 2, 3), 3, id="sa_layer-1x12x2x3-g3"),
    pytest.param("sa_layer", (2, 8, 2, 2), 4, id="sa_layer-2x8x2x2-g4"),
    pytest.param("shuffle_attention", (2, 4, 3, 4), 1, id="shuffle_attention-m2-2x4x3x4-g1"),
    pytest.param("shuffle_attention", (1, 12, 1, 3), 3, id="shuffle_attention-m2-1x12x1x3-g3"),
    pytest.param("shuffle_attention", (1, 8, 2, 2), 4, id="shuffle_attention-m1-1x8x2x2-g4"),
]


@pytest.mark.slow
@pytest.mark.parametrize("variant,shape,groups", GRADCHECK_CASES)
def test_kernels_gradcheck(backend, variant, shape, groups):
    ref = make_ref(variant, shape[1], groups, seed=3, dtype=torch.float64, device=backend.device)
    params = [p.detach().clone().requires_grad_() for p in params_in_op_order(variant, ref)]
    x = make_input(shape, seed=4, dtype=torch.float64, device=backend.device).requires_grad_()

    def fn(x, *ps):
        return backend.apply(variant, x, groups, ps)

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kernels_op_contract_matches_cpu_op(backend, variant):
    """The CUDA forward returns what the CPU op returns (out and the per-plane mean/rstd saved for
    backward): shapes, dtypes, and values to fp32 rounding."""
    x = make_input((2, 16, 7, 9), seed=9)
    params = [p.detach() for p in params_in_op_order(variant, make_ref(variant, 16, 2, seed=9))]
    cpu = getattr(torch.ops.sa_cuda, f"{variant}_forward")(x, 2, *params, 1e-5)
    dev = backend.device
    kernels = backend.forward_op(variant)(x.to(dev), 2, *[p.to(dev) for p in params], 1e-5)
    for a, b in zip(cpu, kernels):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b.cpu(), rtol=1e-5, atol=1e-5)
