"""The branch sizes compiled into ShuffleAttention's CPU unit bodies (csrc/cpu/kernels_cpu.h,
with_branch_channels, with_branch_shape): branches of m = 2, 4, 8 and 16 channels (SA-ResNet-50's
stages 1-4 at G = 64) run the forward and backward branch bodies with m a compile-time constant,
their m x m gate matrix rows several at a time (matrix_rows) and the backward's sums against xh
several at a time (vec_loops.h, dots); (m, H W) = (8, 196) and (16, 49) with the plane size
compiled in as well; every other m runs the same source with m read at run time. They must compute
the same function:

* every compiled m, at planes of 49 and 196 pixels and others, and the m beside them (1, 3, 5, 12,
  32: the run-time bodies), every dtype, x NCHW and channels_last: out and every gradient against
  the float64 reference (the criteria of test_forward_backward.py), centered and at an offset of
  3 std;
* NHWC tiles equal NCHW bit for bit, forward and backward, plain and with the residual epilogue:
  both run the same compiled body.

Elsewhere at these m: the residual epilogue against the reference (test_residual.py, "branch-m16-
N49", "branch-m8-N196"), the columns (test_channels_last.py), 7x7 and 14x14 planes with m = 8
(test_plane_sizes.py).
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DTYPE_IDS,
    DTYPES,
    assert_identical,
    check_cpu_against_reference,
    make_input,
    op_params,
)

VARIANT = "shuffle_attention"
G = 3
# For the tiles: a half of 17 m channels is never a multiple of 2 max(8, m) (no columns) and from
# m = 2 on at least 32 channels (tiles of 32 or more: no rows; csrc/cpu/forward_cpu.cpp,
# forward_by_rows). m = 1 goes by rows in the forward, which sums in an order of its own.
TILE_G = 17
# (m, (H, W)): the compiled m with the compiled plane sizes, with other sizes, and m read at run time
CASES = [
    (16, (7, 7)),
    (8, (14, 14)),
    (16, (14, 14)),
    (8, (7, 7)),
    (4, (7, 7)),
    (2, (14, 14)),
    (4, (5, 6)),
    (2, (9, 11)),
    (16, (1, 1)),
    (8, (3, 17)),
    (1, (7, 7)),
    (3, (14, 14)),
    (5, (7, 7)),
    (12, (7, 7)),
    (32, (7, 7)),
]
PARAMS = [pytest.param(m, hw, id=f"m{m}-{hw[0]}x{hw[1]}") for m, hw in CASES]
FORMATS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


@pytest.mark.parametrize("offset", [0.0, 3.0], ids=["centered", "offset3"])
@pytest.mark.parametrize("memory_format", list(FORMATS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m,hw", PARAMS)
def test_against_reference(m, hw, dtype, memory_format, offset):
    shape = (2, 2 * G * m, *hw)
    check_cpu_against_reference(VARIANT, shape, G, dtype, FORMATS[memory_format], offset)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m,hw", PARAMS)
def test_tiles_equal_nchw_bit_for_bit(m, hw, dtype, residual):
    """channels_last by NHWC tiles against NCHW: out, mean, rstd, grad_x, grad_identity and every
    parameter gradient, bit for bit (the backward given the same statistics and, with the epilogue,
    the same out)."""
    ops = torch.ops.sa_cuda
    G = TILE_G
    shape = (2, 2 * G * m, *hw)
    params = op_params(VARIANT, shape[1], G, seed=3, dtype=dtype)
    x = make_input(shape, seed=1, dtype=dtype, offset=0.5)
    gy = make_input(shape, seed=2, dtype=dtype)
    identity = make_input(shape, seed=4, dtype=dtype)

    def run(fmt, saved=None):
        """forward, backward; the backward from the forward ``saved`` (out, mean, rstd) if given."""
        xf, gf, idf = (t.contiguous(memory_format=fmt) for t in (x, gy, identity))
        if not residual:
            fwd = ops.shuffle_attention_forward(xf, G, *params, 1e-5)
            out, mean, rstd = saved or fwd
            return fwd, ops.shuffle_attention_backward(gf, xf, mean, rstd, G, *params)
        fwd = ops.shuffle_attention_residual_forward(xf, idf, G, *params, 1e-5)
        out, mean, rstd = saved or fwd
        out = out.contiguous(memory_format=fmt)
        return fwd, ops.shuffle_attention_residual_backward(gf, out, xf, mean, rstd, G, *params)

    want_fwd, want_bwd = run(FORMATS["nchw"])
    got_fwd, got_bwd = run(FORMATS["cl"], saved=want_fwd)
    assert got_fwd[0].is_contiguous(memory_format=torch.channels_last) or shape[2:] == (1, 1)
    if m > 1 or dtype == torch.float64:  # float64 always takes the tiles
        assert_identical(got_fwd, want_fwd, "forward")
    assert_identical(got_bwd, want_bwd, "backward")
