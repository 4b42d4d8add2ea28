"""channels_last (NHWC) tensors through the fused ops, on every backend.

The CPU kernels read and write NHWC as it is. In float, bfloat16 and half, both variants' forward
and backward go by columns where m divides 8 or is 16 and C / 2 is a multiple of 2 max(8, m)
(csrc/cpu/nhwc_columns.h; _by_columns: every SA-ResNet-50 stage), and the forward by rows on other
large planes (csrc/cpu/nhwc_rows.h; ShuffleAttention where m divides 4; _by_rows): their sums go in
orders of their own (the statistics in double), so their results are held to the float64 reference
(and their statistics to the true ones) instead of to NCHW's bits. Every other CPU path (float64, the other
shapes) goes by tiles of channels (csrc/cpu/nhwc_tiles.h) that run the NCHW kernels' unit bodies on
the same planes in the same order: given the same statistics, their results equal the NCHW call's
bit for bit. The CUDA source (on a GPU, and through the emulator) reads both variants' NHWC as it
is, forward and backward (csrc/cuda/sa_layer_nhwc_*.cuh, shuffle_attention_nhwc_*.cuh: per-chunk
partials merged in chunk order, so its bits are its own: held to the float64 reference, its
statistics to the true ones). On every backend the output and grad_x come back in x's memory
format. The NCHW results are held to the reference by test_forward_backward.py; here the NHWC ones
are also compared with the float64 reference directly.

Shapes are chosen for the tiling's edges: channel halves that are not a multiple of the tile width
or of the 8-channel transpose blocks, pixel counts that are not a multiple of 8, tiles narrower
than 8 channels, branches as wide as the tile (ShuffleAttention), and size-1 dims. ROW_SHAPES cover
the rows' lane roles: m = 1, 2, 4 (vectors split by role), with the second half starting on a
spatial run (G odd), halves with a vector or scalar tail, m = 3, 6, 12 (vectors mixing roles),
m = 8, 16 (vectors of one role). ShuffleAttention's rows take those with m dividing 4: the split
vectors of spatial lanes hold whole branches, the m x m gate mixes them by lane rotations, and a
half's tail goes one branch at a time.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    BACKENDS,
    DTYPE_IDS,
    DTYPES,
    VARIANTS,
    all_grads,
    assert_identical,
    clone_as,
    forward_backward,
    low_precision_runs,
    make_input,
    make_ref,
    op_params,
    params_in_op_order,
    ref_functional,
    run_raw_ops,
)

from sa_cuda.ops import SA_CUDA_LIBRARY
from sa_cuda.testing import assert_close_to_reference, assert_true_statistics

CL = torch.channels_last

# (B, C, H, W), groups. The CPU tile is `width` channels of each half, width = clamp(16384 / N,
# 8, 64) (a multiple of m for ShuffleAttention), so these cover: full and partial 8x8 transpose
# blocks, a last tile narrower than the others, and tiles of one branch.
SHAPES = [
    pytest.param((2, 32, 7, 9), 4, id="N63-half16"),  # pixel tail after blocks of 8
    pytest.param((2, 24, 5, 3), 3, id="half12-N15"),  # a channel tail inside the tile
    pytest.param((2, 256, 20, 20), 64, id="m2-width40"),  # tiles 40, 40, 40, 8
    pytest.param((2, 96, 40, 41), 6, id="m8-width9"),  # SALayer tiles of 9: 8 + a tail of 1
    pytest.param((1, 32, 64, 70), 2, id="N4480-width8"),  # the narrowest tile, long planes
    pytest.param((2, 128, 9, 11), 2, id="m32"),  # ShuffleAttention: 2 branches per tile
    pytest.param((1, 1024, 7, 7), 8, id="m64-g8"),  # ShuffleAttention: one branch per tile
    # plane sizes compiled into the unit bodies (csrc/cpu/kernels_cpu.h), tiles of 48 channels
    pytest.param((2, 96, 7, 7), 4, id="N49-m12"),
    pytest.param((2, 96, 14, 14), 4, id="N196-m12"),
    pytest.param((1, 48, 3, 1), 3, id="b1-w1"),
    pytest.param((2, 16, 1, 5), 1, id="h1-g1"),
]
# (B, C, H, W), groups for the rows of the forward (each would make tiles narrower than 32
# channels: _by_rows): m = C / (2 G), half = C / 2 channels, taken by pairs of 8-float vectors
# (16 channels) where m divides 4. Those with m dividing 4 and C / 2 a multiple of 16 go by
# columns instead (_by_columns).
ROW_SHAPES = [
    pytest.param((2, 64, 24, 25), 8, id="m4-half32"),
    pytest.param((2, 36, 5, 7), 9, id="m2-Godd-tail2"),  # second half starts on a spatial run
    pytest.param((2, 128, 24, 30), 64, id="m1"),
    pytest.param((2, 40, 3, 11), 5, id="m4-Godd-tail4"),
    pytest.param((2, 72, 20, 30), 12, id="m3-mixed"),
    pytest.param((1, 120, 25, 25), 10, id="m6-mixed-tail4"),
    pytest.param((1, 96, 23, 25), 4, id="m12"),
    pytest.param((1, 48, 30, 31), 3, id="m8-Godd"),  # C / 2 = 24: not columns
    pytest.param((1, 96, 32, 20), 3, id="m16-Godd"),  # C / 2 = 48: not columns
    pytest.param((2, 2, 3, 3), 1, id="C2"),
    pytest.param((1, 48, 1, 1000), 6, id="N1000"),  # several chunks per item
]
# By columns (_by_columns: m dividing 8 or m = 16, C / 2 a multiple of 2 max(8, m)), forward and
# backward: columns of 16 channels of each half (whole branches: ShuffleAttention's m x m products
# by lane rotations; for m = 8 a column of a half is one group, a vector of each role), of 32 for
# m = 16 (one group: two vectors of each role), by blocks of 16 rows with a tail.
COLUMN_SHAPES = [
    pytest.param((2, 64, 24, 25), 8, id="m4-2cols-N600"),  # 37 blocks and 8 rows
    pytest.param((2, 128, 24, 30), 64, id="m1-4cols"),
    pytest.param((3, 32, 5, 3), 8, id="m2-1col-N15"),  # fewer rows than a block
    pytest.param((2, 96, 9, 7), 12, id="m4-3cols"),
    pytest.param((2, 64, 1, 17), 16, id="m2-h1"),
    pytest.param((1, 32, 1, 1000), 4, id="m4-N1000"),
    pytest.param((2, 256, 7, 9), 16, id="m8-8cols-N63"),
    pytest.param((3, 32, 5, 7), 2, id="m8-1col-N35"),
    pytest.param((2, 192, 14, 14), 12, id="m8-6cols-N196"),
    pytest.param((2, 256, 7, 7), 8, id="m16-4cols-N49"),
    pytest.param((3, 64, 3, 7), 2, id="m16-1col-N21"),
    pytest.param((1, 128, 1, 40), 4, id="m16-h1-N40"),
    # columns of more than 256 KiB in float
    pytest.param((2, 64, 47, 45), 16, id="m2-N2115"),
    pytest.param((1, 64, 33, 35), 2, id="m16-N1155"),
]
# The columns' statistics: m = 2 (32 floats a row) and 16 (64), a column of 91 KiB and of 270 and
# 295 KiB in float.
COLUMN_STATS_SHAPES = [
    pytest.param((2, 64, 23, 31), 16, id="m2-N713"),
    pytest.param((2, 64, 47, 45), 16, id="m2-N2115"),
    pytest.param((1, 64, 33, 35), 2, id="m16-N1155"),
]
# ShuffleAttention's rows: the shapes above with m dividing 4.
SHUFFLE_ROW_SHAPES = [
    case for case in ROW_SHAPES if 4 % (case.values[0][1] // (2 * case.values[1])) == 0
]
# The CUDA source runs in the emulator slowly: its cases stay small.
EMULATED_SHAPES = SHAPES[:2] + SHAPES[-2:]
# The NHWC kernels in the CUDA source: the statistics (and SALayer's gate and backward) in tiles of
# 32 lanes of one channel or of a pack of them (4, or 2 for fp64: tests/kernels/test_nhwc_packs.py)
# by chunks of 256 pixels (SALayer's backward: 64 on grids as small as these;
# csrc/cuda/nhwc_tiles.cuh); ShuffleAttention's gate and backward in windows of whole branches,
# `width` channels of each half (16 rounded down to a multiple of m, or m), by chunks of 256 pixels
# walked in staged tiles of `tile` pixels (64 for 32 window channels, 32 for 34 to 64;
# csrc/cuda/nhwc_windows.cuh). The ids name the chunks (forward / SALayer's backward), then the
# windows.
GPU_NHWC_SHAPES = [
    # 323 pixels: a partial chunk; windows 16 + 4 (G odd: the halves start on different roles)
    pytest.param((2, 40, 17, 19), 5, id="chunks2/6-win16+4"),
    pytest.param((1, 8, 30, 30), 2, id="C8-chunks4/15-win4"),  # one tile, 24 or 30 idle lanes
    pytest.param((2, 64, 16, 16), 8, id="chunks1/4-win16x2-tiles4"),
    pytest.param((3, 24, 5, 3), 3, id="b3-N15-win12"),
    pytest.param((1, 48, 3, 1), 3, id="w1-win16+8"),  # m = 8
    pytest.param((1, 68, 5, 7), 2, id="m17-win17x2-tiles32+3"),  # a branch wider than 16
    pytest.param((2, 30, 4, 5), 5, id="m3-win15"),
    # 13 chunks: the finishing kernels' teams of 16 lanes, 3 of them idle in the one round; 33
    # chunks: teams of 32 lanes in two rounds (3136 and 8281 pixels in the forward, 812 and 2070 in
    # SALayer's backward)
    pytest.param((1, 8, 56, 56), 2, id="C8-chunks13/49"),
    pytest.param((1, 8, 91, 91), 2, id="C8-chunks33/130"),
    pytest.param((1, 8, 28, 29), 2, id="C8-chunks4/13"),
    pytest.param((1, 8, 45, 46), 2, id="C8-chunks9/33"),
]


def _shapes_for(backend):
    return EMULATED_SHAPES if backend.name == "emulated" else SHAPES


def _against_reference(backend, variant, shape, groups, dtype, offset=0.0):
    """The backend's module on a channels_last x and gradient in float32 or float64 against the
    float64 reference (the criterion of test_forward_backward.test_fp32_fp64; float64 is its own
    eager). Returns the module's results."""
    ref = make_ref(variant, shape[1], groups, seed=11, dtype=dtype)
    module = backend.module_like(variant, ref)
    x = make_input(shape, seed=1, dtype=dtype, offset=offset).contiguous(memory_format=CL)
    gy = make_input(shape, seed=2, dtype=dtype).contiguous(memory_format=CL)
    F = forward_backward(module, x.to(backend.device), gy.to(backend.device))
    R = forward_backward(clone_as(ref, torch.float64), x.double(), gy.double())
    E = R if dtype == torch.float64 else forward_backward(ref, x, gy)
    assert_close_to_reference({k: v.cpu() for k, v in F.items()}, R, dtype, eager=E)
    return F


def _assert_true_nhwc_statistics(backend, variant, shape, groups, dtype, what):
    """The statistics from a channels_last x with a large offset are the true ones."""
    params = [p.to(backend.device) for p in op_params(variant, shape[1], groups, seed=3)]
    x = make_input(shape, seed=4, dtype=dtype, offset=3.0, device=backend.device)
    x = x.contiguous(memory_format=CL)
    _, mean, rstd = backend.forward_op(variant)(x, groups, *params, 1e-5)
    assert_true_statistics(mean.cpu(), rstd.cpu(), x.cpu(), 1e-5, what)


def _assert_cpu_own_order_results(variant, shape, groups, dtype, what):
    """A CPU path whose sums go in an order of its own (rows, columns) on a channels_last x: the
    module's output and every gradient against the float64 reference (the criteria of
    test_forward_backward; fp32 with an offset, the 16-bit dtypes with low_precision_runs), out and
    grad_x in channels_last, the returned statistics against the true ones."""
    cpu = BACKENDS["cpu"]
    if dtype == torch.float32:
        F = _against_reference(cpu, variant, shape, groups, dtype, offset=0.5)
    else:
        F, R, E, RE, param_dtype = low_precision_runs(
            variant, shape, groups, dtype, memory_format=CL
        )
        assert_close_to_reference(F, R, dtype, eager=E, eager_ref64=RE, param_dtype=param_dtype)
    for key in ("out", "x"):
        assert F[key].is_contiguous(memory_format=CL) and not F[key].is_contiguous(), key
    _assert_true_nhwc_statistics(cpu, variant, shape, groups, dtype, f"{what} {shape} {dtype}")


def _own_order(backend, variant, dtype, shape, groups):
    """(forward, backward): whether the NHWC call sums in an order of its own, so that its bits
    are not the NCHW call's: on the CPU the forward by columns or rows (_by_rows), the backward by
    columns (_by_columns); the forward and backward of the CUDA source."""
    if backend.name == "cpu":
        return (
            _by_rows(backend, variant, dtype, shape, groups),
            _by_columns(backend, variant, dtype, shape, groups),
        )
    return True, True


def _by_rows(backend, variant, dtype, shape, groups):
    """Whether the forward sums in an order of its own (its bits are not NCHW's): on the CPU in
    float lanes, by columns (_by_columns) or by rows, where a tile would be narrower than 32
    channels (csrc/cpu/forward_cpu.cpp, forward_by_rows; the tile width rule of
    csrc/cpu/nhwc_tiles.h, ChannelTiling: a multiple of m for ShuffleAttention), ShuffleAttention
    only where m divides 4."""
    if backend.name != "cpu" or dtype == torch.float64:
        return False
    if _by_columns(backend, variant, dtype, shape, groups):
        return True
    half, pixels = shape[1] // 2, shape[2] * shape[3]
    m = half // groups
    align = 1 if variant == "sa_layer" else m
    if variant == "shuffle_attention" and 4 % m != 0:
        return False
    target = min(max(16384 // pixels, 8), 64)
    return min(half, max(1, target // align) * align) < 32


def _by_columns(backend, variant, dtype, shape, groups):
    """Whether the forward and the backward go by columns (csrc/cpu/nhwc_columns.h, by_columns): on
    the CPU in float lanes, either variant, where m divides 8 or is 16 and columns of 2 max(8, m)
    channels cover each half."""
    if backend.name != "cpu" or dtype == torch.float64:
        return False
    half = shape[1] // 2
    m = half // groups
    return (8 % m == 0 or m == 16) and half % (2 * max(8, m)) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_nhwc_equals_nchw_bit_for_bit(backend, variant, dtype):
    """The NCHW call's bits where the NHWC call sums in the same order: the forward's where it goes
    by tiles or copies, the backward's on the CPU (given the NCHW forward's statistics). The
    other paths are checked against the reference below."""
    if backend.name != "cpu":
        pytest.skip(f"{backend.name}: NHWC kernels with sums of their own order")
    for case in _shapes_for(backend):
        shape, groups = case.values
        params = [p.to(backend.device) for p in op_params(variant, shape[1], groups, seed=3)]
        x = make_input(shape, seed=1, dtype=dtype, device=backend.device, offset=0.5)
        gy = make_input(shape, seed=2, dtype=dtype, device=backend.device)
        want_fwd, want_bwd = run_raw_ops(backend, variant, x, gy, groups, params)
        x_cl, gy_cl = x.contiguous(memory_format=CL), gy.contiguous(memory_format=CL)
        got_fwd = backend.forward_op(variant)(x_cl, groups, *params, 1e-5)
        _, mean, rstd = want_fwd
        got_bwd = backend.backward_op(variant)(gy_cl, x_cl, mean, rstd, groups, *params)
        if not _by_rows(backend, variant, dtype, shape, groups):
            assert_identical(got_fwd, want_fwd)
        if not _by_columns(backend, variant, dtype, shape, groups):
            assert_identical(got_bwd, want_bwd)
        assert got_fwd[0].is_contiguous(memory_format=CL), (case.id, got_fwd[0].stride())
        assert got_bwd[0].is_contiguous(memory_format=CL), (case.id, got_bwd[0].stride())


ROW_CASES = [
    pytest.param("sa_layer", *case.values, id=f"sa_layer-{case.id}") for case in ROW_SHAPES
] + [
    pytest.param("shuffle_attention", *case.values, id=f"shuffle_attention-{case.id}")
    for case in SHUFFLE_ROW_SHAPES
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS[1:])
@pytest.mark.parametrize("variant,shape,groups", ROW_CASES)
def test_rows_against_reference(variant, shape, groups, dtype):
    """The forward by rows: the module's output and every gradient against the float64 reference
    (the criteria of test_forward_backward), and the returned statistics against the true ones."""
    assert _by_rows(BACKENDS["cpu"], variant, dtype, shape, groups)
    _assert_cpu_own_order_results(variant, shape, groups, dtype, "rows")


def test_shuffle_attention_rows_only_where_m_divides_4():
    """ShuffleAttention's other m keep the tiles (whose bits are NCHW's): the rows' m x m gate
    needs whole branches in a vector's split lanes."""
    cpu = BACKENDS["cpu"]
    for case in ROW_SHAPES:
        shape, groups = case.values
        rows = _by_rows(cpu, "shuffle_attention", torch.float32, shape, groups)
        columns = _by_columns(cpu, "shuffle_attention", torch.float32, shape, groups)
        assert rows == (case in SHUFFLE_ROW_SHAPES or columns), case.id
        params = op_params("shuffle_attention", shape[1], groups, seed=3)
        x = make_input(shape, seed=1, offset=0.5)
        forward = SA_CUDA_LIBRARY.forward_op("shuffle_attention")
        got = forward(x.contiguous(memory_format=CL), groups, *params, 1e-5)
        want = forward(x, groups, *params, 1e-5)
        # rows sum the statistics in their own order: the mean differs in some channel
        same = all(torch.equal(g, w) for g, w in zip(got, want))
        assert same != rows, case.id


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS[1:])
@pytest.mark.parametrize("shape,groups", COLUMN_SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_columns_against_reference(variant, shape, groups, dtype):
    """The forward and the backward by columns: the output and every gradient against the float64
    reference (the criteria of test_forward_backward), out and grad_x in channels_last, the
    statistics against the true ones."""
    assert _by_columns(BACKENDS["cpu"], variant, dtype, shape, groups)
    _assert_cpu_own_order_results(variant, shape, groups, dtype, "columns")


HARD_PLANES = ["first-pixel-outlier", "offset-1e4", "offset-1e6-spread-0.01", "near-constant"]


@pytest.mark.parametrize("plane", HARD_PLANES)
@pytest.mark.parametrize("shape,groups", COLUMN_STATS_SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_column_statistics_of_hard_planes(variant, shape, groups, plane):
    """The columns' statistics are the true ones where their sums are hardest: a first pixel far
    from the rest, a mean far above the spread, a spread below the float spacing of the mean
    (centering on the rounded mean alone adds (mean - float mean)^2 to the variance: 2% of rstd
    at 1e6 + 0.01 N(0, 1)), a near-constant plane."""
    assert _by_columns(BACKENDS["cpu"], variant, torch.float32, shape, groups)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if plane == "first-pixel-outlier":
        x[:, :, 0, 0] = 1e3
    elif plane == "offset-1e4":
        x = x + 1e4
    elif plane == "offset-1e6-spread-0.01":
        x = 1e6 + 0.01 * x
    else:
        x = 3.0 + 1e-6 * x
    x = x.float().contiguous(memory_format=CL)
    params = op_params(variant, shape[1], groups, seed=3)
    _, mean, rstd = SA_CUDA_LIBRARY.forward_op(variant)(x, groups, *params, 1e-5)
    assert_true_statistics(mean, rstd, x, 1e-5, f"{variant} {shape} {plane}")


def test_columns_only_where_the_rule_says():
    """The forward and the backward by columns sum in orders of their own (their bits are not
    NCHW's), and so does the forward by rows; every other shape keeps the tiles and NCHW's bits
    (the backward's given the same statistics), in both variants. _by_columns and _by_rows are the
    C++ rules (by_columns, forward_by_rows)."""
    cpu = BACKENDS["cpu"]
    cases = [c.values for c in SHAPES + ROW_SHAPES + COLUMN_SHAPES]
    seen = set()
    for variant in VARIANTS:
        for shape, groups in cases:
            columns = _by_columns(cpu, variant, torch.float32, shape, groups)
            own_forward = _by_rows(cpu, variant, torch.float32, shape, groups)
            seen.add((columns, own_forward))
            params = op_params(variant, shape[1], groups, seed=3)
            x = make_input(shape, seed=1, offset=0.5)
            gy = make_input(shape, seed=2)
            x_cl, gy_cl = x.contiguous(memory_format=CL), gy.contiguous(memory_format=CL)
            forward = SA_CUDA_LIBRARY.forward_op(variant)
            want_fwd = forward(x, groups, *params, 1e-5)
            got_fwd = forward(x_cl, groups, *params, 1e-5)
            # rows and columns sum the statistics in their own order: the mean differs somewhere
            same = all(torch.equal(g, w) for g, w in zip(got_fwd, want_fwd))
            assert same != own_forward, (variant, shape, groups, "forward")
            _, mean, rstd = want_fwd
            backward = SA_CUDA_LIBRARY.backward_op(variant)
            want = backward(gy, x, mean, rstd, groups, *params)
            got = backward(gy_cl, x_cl, mean, rstd, groups, *params)
            same = all(torch.equal(g, w) for g, w in zip(got, want))
            assert same != columns, (variant, shape, groups, "backward")
    assert seen == {(True, True), (False, True), (False, False)}


@pytest.mark.parametrize(
    "shape,groups,columns",
    [
        pytest.param((3, 64, 20, 30), 8, True, id="columns"),
        pytest.param((3, 128, 9, 10), 4, True, id="columns-m16"),  # two slices a half
        pytest.param((3, 40, 20, 30), 5, False, id="rows"),  # m = 4, C / 2 = 20
    ],
)
@pytest.mark.parametrize("variant", VARIANTS)
def test_rows_do_not_depend_on_the_thread_count(variant, shape, groups, columns):
    """The columns, the rows' chunks and the order of every sum are fixed by the shape: one thread
    and two give the same bits, forward and backward."""
    cpu = BACKENDS["cpu"]
    assert _by_rows(cpu, variant, torch.float32, shape, groups)
    assert _by_columns(cpu, variant, torch.float32, shape, groups) == columns
    params = op_params(variant, shape[1], groups, seed=3)
    x = make_input(shape, seed=1).contiguous(memory_format=CL)
    gy = make_input(shape, seed=2).contiguous(memory_format=CL)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run_raw_ops(cpu, variant, x, gy, groups, params))
    finally:
        torch.set_num_threads(threads)
    for got in results[1:]:
        for got_pass, want_pass in zip(got, results[0]):  # forward, backward
            assert_identical(got_pass, want_pass)


@pytest.mark.parametrize(
    "variant,shape,groups,dtype",
    [
        pytest.param("sa_layer", (1, 64, 200, 205), 8, torch.float32, id="fp32-aligned-rows"),
        # 144-byte rows: every other row starts off a 32-byte boundary (plain stores there)
        pytest.param("sa_layer", (1, 36, 250, 251), 3, torch.float32, id="fp32-odd-rows"),
        pytest.param("sa_layer", (1, 96, 220, 221), 6, torch.bfloat16, id="bf16"),
        pytest.param("shuffle_attention", (1, 64, 200, 205), 8, torch.float32, id="sa-fp32"),
        # m = 2, G odd, 144-byte rows
        pytest.param("shuffle_attention", (1, 36, 250, 251), 9, torch.float32, id="sa-fp32-odd"),
        pytest.param("shuffle_attention", (1, 96, 220, 221), 12, torch.bfloat16, id="sa-bf16"),
        # the backward by rows too (m = 4, C / 2 = 64; m = 2, C / 2 = 32)
        pytest.param("sa_layer", (1, 128, 200, 205), 16, torch.bfloat16, id="bf16-backward-rows"),
        pytest.param(
            "shuffle_attention", (1, 64, 200, 205), 16, torch.float32, id="sa-fp32-backward-rows"
        ),
        # m = 16: columns of two slices a half
        pytest.param("shuffle_attention", (1, 64, 200, 205), 2, torch.float32, id="sa-fp32-m16"),
        pytest.param("sa_layer", (1, 64, 290, 290), 2, torch.bfloat16, id="bf16-m16"),
    ],
)
def test_rows_streaming_stores(variant, shape, groups, dtype):
    """Results above 8 MiB are written with streaming stores (csrc/cpu/nhwc_rows.h): the forward's
    output by rows or columns, and grad_x of the backward by columns, against the float64
    reference."""
    cpu = BACKENDS["cpu"]
    params = op_params(variant, shape[1], groups, seed=3)
    x = make_input(shape, seed=1, dtype=dtype).contiguous(memory_format=CL)
    assert x.numel() * x.element_size() > 8 << 20 and _by_rows(cpu, variant, dtype, shape, groups)
    forward = SA_CUDA_LIBRARY.forward_op(variant)
    out, _, _ = forward(x, groups, *params, 1e-5)
    ref = ref_functional(variant)
    ref64 = ref(x.double(), groups, *[p.double() for p in params])
    eager = ref(x, groups, *[p.to(dtype) for p in params])
    assert_close_to_reference({"out": out}, {"out": ref64}, dtype, eager={"out": eager})
    assert out.is_contiguous(memory_format=CL)
    if not _by_columns(cpu, variant, dtype, shape, groups):
        return
    gy = make_input(shape, seed=2, dtype=dtype).contiguous(memory_format=CL)
    low = [p.to(dtype) for p in params]  # x's dtype: the op computes in it
    fused = all_grads(lambda x_, *p: cpu.apply(variant, x_, groups, p), x, low, gy)["x"]
    ref64 = all_grads(
        lambda x_, *p: ref(x_, groups, *p), x.double(), [p.double() for p in low], gy.double()
    )["x"]
    eager = all_grads(lambda x_, *p: ref(x_, groups, *p), x, low, gy)["x"]
    assert_close_to_reference({"x": fused}, {"x": ref64}, dtype, eager={"x": eager})
    assert fused.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_nhwc_against_reference(variant, shape, groups, dtype):
    """The module on channels_last input and gradient, against the float64 reference (the
    criterion of test_forward_backward.test_fp32_fp64)."""
    F = _against_reference(BACKENDS["cpu"], variant, shape, groups, dtype)
    assert F["out"].is_contiguous(memory_format=CL) and F["x"].is_contiguous(memory_format=CL)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,groups", GPU_NHWC_SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", ["emulated", "cuda"], indirect=True)
def test_gpu_nhwc_against_reference(backend, variant, shape, groups, dtype):
    """The NHWC kernels in the CUDA source: the output and every gradient against the float64
    reference (the criteria of test_forward_backward: fp32 and fp64 with their eager bound, bf16
    and fp16 under autocast with fp32 parameters), out and grad_x channels_last, and the returned
    statistics the true ones."""
    if dtype in (torch.float32, torch.float64):
        F = _against_reference(backend, variant, shape, groups, dtype, offset=0.5)
    else:
        F, R, E, RE, param_dtype = low_precision_runs(
            variant, shape, groups, dtype, memory_format=CL, backend=backend
        )
        assert_close_to_reference(F, R, dtype, eager=E, eager_ref64=RE, param_dtype=param_dtype)
    assert F["out"].is_contiguous(memory_format=CL) and F["x"].is_contiguous(memory_format=CL)
    _assert_true_nhwc_statistics(
        backend, variant, shape, groups, dtype, f"{backend.name} {variant} {shape} {dtype}"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape,groups",
    [
        pytest.param((2, 8, 2, 3), 2, id="one-tile-win4"),
        pytest.param((1, 36, 1, 2), 3, id="tiles32+4-win12+6"),  # m = 6
    ],
)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", ["emulated", "cuda"], indirect=True)
def test_gpu_nhwc_gradcheck(backend, variant, shape, groups):
    """gradcheck (float64) through the NHWC kernels of the CUDA source: a channels_last x, and
    gradcheck's grad_out (NCHW, brought to x's layout by the host code)."""
    ref = make_ref(variant, shape[1], groups, seed=3, dtype=torch.float64, device=backend.device)
    params = [p.detach().clone().requires_grad_() for p in params_in_op_order(variant, ref)]
    x = make_input(shape, seed=4, dtype=torch.float64, device=backend.device)
    x = x.contiguous(memory_format=CL).requires_grad_()

    def fn(x, *ps):
        out = backend.apply(variant, x, groups, ps)
        assert out.is_contiguous(memory_format=CL)
        return out

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


def _layouts():
    """(name, x or grad_out -> the same values in that layout)."""
    return {
        "nchw": lambda t: t.contiguous(),
        "channels_last": lambda t: t.contiguous(memory_format=CL),
        # dense in neither format: the kernels get an NCHW copy
        "transposed_hw": lambda t: t.transpose(2, 3).contiguous().transpose(2, 3),
        # a channels_last slice that is not dense: the same
        "channels_last_slice": lambda t: torch.cat([t, t], 1).contiguous(memory_format=CL)[
            :, : t.shape[1]
        ],
        # size-1 dims (B = H = 1 here) with strides no dense tensor would have: still
        # channels_last for PyTorch, and read as such
        "channels_last_odd_unit_strides": lambda t: t.contiguous(memory_format=CL).as_strided(
            t.shape, (7, 1, 1000, t.shape[1])
        ),
    }


@pytest.mark.parametrize("gy_layout", ["nchw", "channels_last", "transposed_hw"])
@pytest.mark.parametrize("x_layout", list(_layouts()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_layout_pair(backend, variant, dtype, x_layout, gy_layout):
    """Any layout of x with any layout of grad_out: the NCHW call's values (where the NHWC call
    sums in an order of its own: the dense channels_last call's; the backward given the same
    statistics), out and grad_x in x's layout (channels_last when x is channels_last-contiguous,
    else NCHW-contiguous)."""
    shape, groups = (1, 24, 1, 13), 3  # B = H = 1: the odd unit strides apply
    layouts = _layouts()
    params = [p.to(backend.device) for p in op_params(variant, shape[1], groups, seed=5)]
    x = make_input(shape, seed=1, dtype=dtype, device=backend.device)
    gy = make_input(shape, seed=2, dtype=dtype, device=backend.device)
    xl, gyl = layouts[x_layout](x), layouts[gy_layout](gy)
    assert torch.equal(xl, x) and torch.equal(gyl, gy)
    channels_last = x_layout.startswith("channels_last") and x_layout != "channels_last_slice"
    assert xl.is_contiguous(memory_format=CL) == channels_last
    own_forward, own_backward = _own_order(backend, variant, dtype, shape, groups)
    # The reference calls: NCHW, or dense channels_last where those sum in an order of their own.
    x_want = x.contiguous(memory_format=CL) if channels_last and own_forward else x
    want_fwd = backend.forward_op(variant)(x_want, groups, *params, 1e-5)
    got_fwd = backend.forward_op(variant)(xl, groups, *params, 1e-5)
    _, mean, rstd = want_fwd
    got_bwd = backend.backward_op(variant)(gyl, xl, mean, rstd, groups, *params)
    if channels_last and own_backward:
        x, gy = x.contiguous(memory_format=CL), gy.contiguous(memory_format=CL)
    want_bwd = backend.backward_op(variant)(gy, x, mean, rstd, groups, *params)
    assert_identical(got_fwd, want_fwd)
    assert_identical(got_bwd, want_bwd)
    for result in (got_fwd[0], got_bwd[0]):
        if channels_last:
            assert result.is_contiguous(memory_format=CL) and not result.is_contiguous()
        else:
            assert result.is_contiguous()


@pytest.mark.parametrize("variant", VARIANTS)
def test_ambiguous_layout_is_read_as_nchw(backend, variant):
    """H = W = 1: a channels_last tensor is NCHW-contiguous too (the same bytes); both calls give
    the same values, and the result is dense."""
    shape, groups = (3, 16, 1, 1), 2
    params = [p.to(backend.device) for p in op_params(variant, shape[1], groups, seed=5)]
    x = make_input(shape, seed=1, device=backend.device)
    gy = make_input(shape, seed=2, device=backend.device)
    xl = x.contiguous(memory_format=CL)
    assert xl.is_contiguous() and xl.is_contiguous(memory_format=CL)
    want_fwd, want_bwd = run_raw_ops(backend, variant, x, gy, groups, params)
    got_fwd, got_bwd = run_raw_ops(backend, variant, xl, gy, groups, params)
    assert_identical(got_fwd, want_fwd)
    assert_identical(got_bwd, want_bwd)
    assert got_fwd[0].is_contiguous() and got_bwd[0].is_contiguous()


@pytest.mark.parametrize("variant", VARIANTS)
def test_nhwc_kernels_read_channels_last_without_a_copy(backend, variant):
    """Every backend's ops take a channels_last x (and grad_out) as they are: no copy or clone of
    a tensor anywhere in the forward and backward (the profiler sees every ATen op the host code
    calls). An NCHW-contiguous grad_out with a channels_last x is copied once, to x's layout."""
    shape, groups = (2, 32, 6, 5), 4
    params = [p.to(backend.device) for p in op_params(variant, shape[1], groups, seed=5)]
    x = make_input(shape, seed=1, device=backend.device).contiguous(memory_format=CL)
    gy = make_input(shape, seed=2, device=backend.device).contiguous(memory_format=CL)
    forward, backward = backend.forward_op(variant), backend.backward_op(variant)

    def copies(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        names = [e.name for e in prof.events()]
        return [
            n for n in names if n in ("aten::copy_", "aten::clone", "aten::to", "aten::_to_copy")
        ]

    out, mean, rstd = forward(x, groups, *params, 1e-5)
    assert copies(lambda: forward(x, groups, *params, 1e-5)) == []
    assert copies(lambda: backward(gy, x, mean, rstd, groups, *params)) == []
    assert "aten::copy_" in copies(
        lambda: backward(gy.contiguous(), x, mean, rstd, groups, *params)
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_channels_last_errors_name_the_argument(variant):
    """Bad arguments with a channels_last x raise the NCHW call's ValueError, before any kernel."""
    params = op_params(variant, 24, 3, seed=5)
    forward, backward = SA_CUDA_LIBRARY.forward_op(variant), SA_CUDA_LIBRARY.backward_op(variant)
    x = make_input((2, 24, 5, 4), seed=1).contiguous(memory_format=CL)
    with pytest.raises(ValueError, match=r"C \(24\) must be divisible by 2 \* groups"):
        forward(x, 5, *params, 1e-5)
    out, mean, rstd = forward(x, 3, *params, 1e-5)
    gy = make_input((2, 24, 4, 5), seed=2).contiguous(memory_format=CL)
    with pytest.raises(ValueError, match="grad_out must have x's shape"):
        backward(gy, x, mean, rstd, 3, *params)
    with pytest.raises(ValueError, match="mean must be the forward's"):
        backward(out, x, mean[:1], rstd, 3, *params)


@pytest.mark.parametrize(
    "shape,dtype",
    [
        pytest.param((1, 256, 2, 3), torch.float32, id="m128-fp32"),
        pytest.param((1, 176, 3, 2), torch.float64, id="m88-fp64"),
    ],
)
def test_gpu_nhwc_large_m_takes_smaller_tiles(shape, dtype):
    """ShuffleAttention's NHWC backward at an m whose window needs more shared memory than the
    device has at the usual tile of pixels (csrc/cuda/nhwc_windows.cuh, window_grid): it takes
    smaller tiles, and gives the reference's results, wherever the NCHW kernels fit too."""
    F = _against_reference(BACKENDS["emulated"], "shuffle_attention", shape, 1, dtype, offset=0.5)
    assert F["x"].is_contiguous(memory_format=CL)


def test_gpu_nhwc_shared_memory_error():
    """ShuffleAttention's NHWC window kernels hold whole branches in shared memory (W2 and the
    backward's m + 1 sums per channel): an m beyond the device's (the emulator's budget is an
    H100's 227 KiB) is a clear error naming m and the bytes, not a failed launch, as for NCHW."""
    emulated = BACKENDS["emulated"]
    variant, m, groups = "shuffle_attention", 160, 1
    x = make_input((1, 2 * groups * m, 1, 2), seed=1).contiguous(memory_format=CL)
    params = op_params(variant, 2 * groups * m, groups, seed=1)
    out, mean, rstd = emulated.forward_op(variant)(x, groups, *params, 1e-5)  # the forward fits
    assert out.is_contiguous(memory_format=CL)
    with pytest.raises(
        RuntimeError, match=r"m = C / \(2 \* groups\) = 160 needs \d+ bytes of shared memory"
    ):
        emulated.backward_op(variant)(torch.ones_like(x), x, mean, rstd, groups, *params)
