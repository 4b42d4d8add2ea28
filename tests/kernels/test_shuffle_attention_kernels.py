"""The ShuffleAttention CUDA kernels, executed on the CPU by the SIMT emulator, on the
launch choices of csrc/cuda/shuffle_attention_forward.cuh and launch_shuffle_attention (launch_common.cuh):

* the statistics' pieces: m < 8 splits each plane over 8 / gcd(m, 8) warps (m = 1, 2, 3, 6: planes
  of 8, 4, 8, 4 pieces, some of them empty for N < 8 * 32), m a multiple of 8 gives whole planes;
* the access width: 16-byte packs (N and every plane start aligned), 8- and 4-byte packs (storage
  offsets of 2 or 4 elements), scalars (offset 1, or N odd);
* the tiles: the plane in one tile (pass 2 of the backward reuses it) or several (N > tile);
* the backward's A = sum_p t xh^T: pixel slices (m <= 22: (ceil(m / 2))^2 2 x 2 blocks of
  entries times slices of pixels), one block per thread (m = 24), several blocks per thread (m = 48),
  odd m (a block row past m);
* the shared-memory opt-in path (> 48 KiB: fp32 backward m = 48, fp64 backward m = 16) and the
  error for an m beyond the device's shared memory.

Values and all gradients against the float64 reference (sa_cuda.testing.assert_close_to_reference);
bitwise determinism; planes whose statistics overflow fp32 next to ordinary planes of the same unit
(the rescale rounds run on the overflowed planes only), with the criteria of
test_extreme_magnitudes.py (sa_cuda.testing.assert_extreme_close, assert_true_statistics).
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    EMULATED,
    clone_as,
    forward_backward,
    input_at_offset,
    make_ref,
    params_in_op_order,
)

from sa_cuda.testing import assert_close_to_reference, assert_extreme_close, assert_true_statistics

EMU = EMULATED.ops
VARIANT = "shuffle_attention"

# (B, C, H, W), groups, storage offset in elements, dtype
CASES = [
    pytest.param((1, 4, 5, 5), 2, 0, torch.float32, id="m1-N25-scalar"),
    pytest.param((2, 8, 1, 1), 2, 0, torch.float32, id="m2-N1"),
    pytest.param((1, 8, 8, 8), 2, 0, torch.float32, id="m2-16byte"),
    pytest.param((1, 12, 3, 7), 2, 0, torch.float32, id="m3-N21-empty-pieces"),
    pytest.param((1, 6, 30, 25), 1, 0, torch.float32, id="m3-two-tiles"),
    pytest.param((1, 8, 6, 8), 1, 1, torch.float32, id="m4-misaligned-scalar"),
    pytest.param((1, 10, 8, 8), 1, 0, torch.float32, id="m5-16byte"),
    pytest.param((1, 12, 6, 7), 1, 2, torch.float32, id="m6-8byte"),
    pytest.param((1, 32, 15, 11), 1, 0, torch.float32, id="m16-two-tiles"),
    pytest.param((1, 48, 5, 5), 1, 0, torch.float32, id="m24-block-per-thread"),
    pytest.param((1, 96, 4, 5), 1, 0, torch.float32, id="m48-blocks-per-thread-optin"),
    pytest.param((1, 10, 4, 5), 1, 0, torch.float64, id="fp64-m5-16byte"),
    pytest.param((1, 6, 3, 5), 1, 1, torch.float64, id="fp64-m3-scalar"),
    pytest.param((1, 32, 7, 7), 1, 0, torch.float64, id="fp64-m16-optin"),
]


@pytest.mark.parametrize("shape,groups,offset,dtype", CASES)
def test_shuffle_attention_kernels_fp32_fp64(shape, groups, offset, dtype):
    ref = make_ref(VARIANT, shape[1], groups, seed=7, dtype=dtype)
    x, gy = input_at_offset(shape, offset, dtype, 1), input_at_offset(shape, offset, dtype, 2)
    F = forward_backward(EMULATED.module_like(VARIANT, ref), x, gy)
    R = forward_backward(clone_as(ref, torch.float64), x.double(), gy.double())
    E = R if dtype == torch.float64 else forward_backward(ref, x, gy)
    assert_close_to_reference(F, R, dtype, eager=E)


# bf16 / fp16 packs: 16 bytes (8 elements), 8 bytes (offset 4), 4 bytes (offset 2), scalars (offset 1).
@pytest.mark.parametrize("offset", [0, 4, 2, 1], ids=["16byte", "8byte", "4byte", "scalar"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_shuffle_attention_kernels_low_precision(dtype, offset):
    """The low-precision criterion (error at most 2x eager's + one unit: accuracy_bound)."""
    shape, groups = (1, 12, 4, 8), 2  # m = 3, N = 32
    low = make_ref(VARIANT, shape[1], groups, seed=7, dtype=dtype)
    x, gy = input_at_offset(shape, offset, dtype, 1), input_at_offset(shape, offset, dtype, 2)
    F = forward_backward(EMULATED.module_like(VARIANT, low), x, gy)
    R = forward_backward(clone_as(low, torch.float64), x.double(), gy.double())
    E = forward_backward(low, x, gy)
    assert_close_to_reference(F, R, dtype, eager=E)


@pytest.mark.parametrize(
    "shape,groups",
    [((2, 12, 30, 25), 2), ((1, 32, 15, 11), 1)],
    ids=["m3-two-tiles", "m16-two-tiles"],
)
def test_shuffle_attention_kernels_bitwise_deterministic(shape, groups):
    """Fixed-order reductions (pieces, pixel slices, warps): the same input gives the same bits."""
    ref = make_ref(VARIANT, shape[1], groups, seed=8)
    x, gy = input_at_offset(shape, 0, torch.float32, 3), input_at_offset(shape, 0, torch.float32, 4)
    module = EMULATED.module_like(VARIANT, ref)
    first, second = forward_backward(module, x, gy), forward_backward(module, x, gy)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    params = [p.detach() for p in params_in_op_order(VARIANT, ref)]
    a, b = (EMU.shuffle_attention_forward(x, groups, *params, 1e-5) for _ in range(2))
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_shuffle_attention_kernels_overflow_next_to_ordinary_planes():
    """One unit holds planes whose fp32 statistics overflow (the rescale rounds select them) next to
    ordinary planes: every output plane and the statistics meet test_extreme_magnitudes.py's
    criteria 1-4."""
    C, H, W, G = 12, 5, 7, 2  # m = 3: each plane in 8 pieces
    mags = torch.tensor(
        [3e38, 1.0, 1e-3, 1e36, 2e38, 1e4, 1.0, 3e38, 1e20, 1e-30, 2e38, 1.0], dtype=torch.float64
    ).view(1, C, 1, 1)
    gen = torch.Generator().manual_seed(5)
    u = torch.rand((1, C, H, W), generator=gen, dtype=torch.float64) * 2 - 1
    x = ((0.9 + 0.1 * u) * mags).float()
    x[:, 1::2] = (u[:, 1::2] * mags[:, 1::2]).float()  # centered planes in between
    params = [p.detach() for p in params_in_op_order(VARIANT, make_ref(VARIANT, C, G, seed=3))]
    out, mean, rstd = EMU.shuffle_attention_forward(x, G, *params, 1e-5)
    from sa_cuda.reference import shuffle_attention as ref

    ref64 = ref(x.double(), G, *[p.double() for p in params])
    eager = ref(x, G, *params)
    for c in range(C):
        assert_extreme_close(
            out[0, c], eager[0, c], ref64[0, c], torch.float32, f"output plane {c}"
        )
    assert_true_statistics(mean, rstd, x, 1e-5, "mixed unit")


@pytest.mark.slow
def test_shuffle_attention_kernels_gradcheck_pieces_and_tiles():
    """gradcheck through the emulated kernels at m = 3 (pieces, odd m) in float64."""
    shape, groups = (1, 6, 2, 3), 1
    ref = make_ref(VARIANT, shape[1], groups, seed=3, dtype=torch.float64)
    params = [p.detach().clone().requires_grad_() for p in params_in_op_order(VARIANT, ref)]
    x = torch.randn(
        shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64
    ).requires_grad_()

    def fn(x, *ps):
        return EMULATED.apply(VARIANT, x, groups, ps)

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_shuffle_attention_kernels_shared_memory_error():
    """An m whose backward tiles exceed the device's shared memory (the emulator's budget is an
    H100's 227 KiB): a clear error naming m and the bytes, not a failed launch."""
    m, G = 160, 1
    x = torch.randn(1, 2 * G * m, 1, 2)
    params = [
        p.detach() for p in params_in_op_order(VARIANT, make_ref(VARIANT, 2 * G * m, G, seed=1))
    ]
    out, mean, rstd = EMU.shuffle_attention_forward(x, G, *params, 1e-5)  # the forward fits
    with pytest.raises(
        RuntimeError, match=r"m = C / \(2 \* groups\) = 160 needs \d+ bytes of shared memory"
    ):
        EMU.shuffle_attention_backward(torch.ones_like(x), x, mean, rstd, G, *params)
