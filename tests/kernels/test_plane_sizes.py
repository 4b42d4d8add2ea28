"""The plane sizes compiled into the CPU kernels' unit bodies (csrc/cpu/kernels_cpu.h,
with_plane_size): planes of 49 and 196 pixels (7x7 and 14x14, SA-ResNet-50's stages 4 and 3 at
224x224) run SALayer's plane bodies (forward and backward) and ShuffleAttention's forward branch
body with the size a compile-time constant; every other size runs the same source with the size
read at run time (ShuffleAttention's m = 8 here with its branch size compiled in too:
with_branch_shape, test_branch_sizes.py). The compiled sizes must compute the same function,
whatever H and W make them:

* every H x W of 49 and 196 pixels, and the sizes beside them (48, 50, 195, 197: the run-time
  bodies), both variants, every dtype, x NCHW and channels_last: out and every gradient against
  the float64 reference (the criteria of test_forward_backward.py), centered and at an offset of
  3 std; the statistics from an offset against the true ones. (At an offset of 100 std
  ShuffleAttention's channel gates saturate, |z| up to 500 here, where the gate's derivative
  s (1 - s) of a float s is ill-conditioned in eager and fused alike: d affine1 then misses the
  float64 value by 2.4x eager's error at 7x7, on the parent commit too; the statistics at such
  offsets: test_extreme_magnitudes.py.)

At the compiled sizes SALayer's bodies take two planes at once (kernels_cpu.h, planes_at_once):
a plane's bits must not depend on its slot, its partner, or where a thread's task ends (an odd
task's last plane fills both slots), which test_pairs_do_not_depend_on_the_task_split checks
against the float64 reference and bit for bit across thread counts.

Elsewhere at these sizes: NHWC tiles equal NCHW bit for bit (test_channels_last.py, "N49-m12",
"N196-m12": both run the same compiled bodies), the planes at the range's edges and the rescaled
statistics (test_extreme_magnitudes.py, "cpu-7x7", "cpu-14x14"), the residual epilogue
(test_residual.py, "planes-N49", "planes-N196").
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    BACKENDS,
    DTYPE_IDS,
    DTYPES,
    VARIANTS,
    assert_identical,
    check_cpu_against_reference,
    make_input,
    op_params,
    run_high_precision,
)

from sa_cuda.ops import SA_CUDA_LIBRARY
from sa_cuda.testing import assert_close_to_reference, assert_true_statistics

COMPILED = [(7, 7), (1, 49), (49, 1), (14, 14), (7, 28), (4, 49), (196, 1)]
BESIDE = [(6, 8), (5, 10), (13, 15), (197, 1)]  # 48, 50, 195, 197 pixels
PLANES = [pytest.param(hw, id=f"{hw[0]}x{hw[1]}") for hw in COMPILED + BESIDE]
FORMATS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}
# C = 48, G = 3: m = 8 planes a branch (ShuffleAttention's 8 x 8 gate), 24 channels a half (not a
# multiple of 16: channels_last goes by NHWC tiles or rows, not columns, at every size here).
C, G = 48, 3


@pytest.mark.parametrize("offset", [0.0, 3.0], ids=["centered", "offset3"])
@pytest.mark.parametrize("memory_format", list(FORMATS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("hw", PLANES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_against_reference(variant, hw, dtype, memory_format, offset):
    check_cpu_against_reference(variant, (2, C, *hw), G, dtype, FORMATS[memory_format], offset)


@pytest.mark.parametrize("memory_format", list(FORMATS))
@pytest.mark.parametrize("hw", PLANES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_statistics_are_the_true_ones(variant, hw, memory_format):
    """The saved mean and rstd of every plane, from a large common offset, against float64."""
    shape = (3, C, *hw)
    params = op_params(variant, C, G, seed=3)
    x = make_input(shape, seed=4, offset=3.0).contiguous(memory_format=FORMATS[memory_format])
    _, mean, rstd = SA_CUDA_LIBRARY.forward_op(variant)(x, G, *params, 1e-5)
    assert_true_statistics(mean, rstd, x, 1e-5, f"{variant} {hw} {memory_format}")


# 1342 planes (G = 11, m = 61): one task for one thread; two tasks of 671 planes for two threads
# (the forward's and the backward's grains are at most 668 planes at 7x7), so thread 0's last
# plane fills both slots of a pair and thread 1's pairs start on an odd plane, partnering every
# plane with the other neighbour; three threads: tasks of 448, 448 and 446 planes.
SPLIT_C, SPLIT_G = 1342, 11


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hw", [(7, 7), (14, 14)], ids=["7x7", "14x14"])
def test_pairs_do_not_depend_on_the_task_split(hw, dtype, residual):
    """SALayer NCHW at the paired sizes: forward (out, mean, rstd) and backward (grad_x, the
    identity's gradient, every parameter gradient) with 1, 2 and 3 threads, bit for bit, and the
    two-thread run against the float64 reference."""
    cpu = BACKENDS["cpu"]
    shape = (1, SPLIT_C, *hw)
    params = op_params("sa_layer", SPLIT_C, SPLIT_G, seed=5, dtype=dtype)
    x = make_input(shape, seed=6, dtype=dtype)
    gy = make_input(shape, seed=7, dtype=dtype)
    identity = make_input(shape, seed=8, dtype=dtype) if residual else None

    def run():
        if identity is None:
            forward = cpu.forward_op("sa_layer")(x, SPLIT_G, *params, 1e-5)
            grads = cpu.backward_op("sa_layer")(gy, x, *forward[1:], SPLIT_G, *params)
        else:
            forward = torch.ops.sa_cuda.sa_layer_residual_forward(
                x, identity, SPLIT_G, *params, 1e-5
            )
            grads = torch.ops.sa_cuda.sa_layer_residual_backward(
                gy, forward[0], x, *forward[1:], SPLIT_G, *params
            )
        return forward, grads

    threads = torch.get_num_threads()
    try:
        runs = {}
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs[n] = run()
        if dtype == torch.float32 and not residual:
            torch.set_num_threads(2)
            F, E, R = run_high_precision("sa_layer", cpu, shape, SPLIT_G, seeds=(5, 6, 7))
            assert_close_to_reference(F, R, dtype, eager=E)
    finally:
        torch.set_num_threads(threads)
    for n in (2, 3):
        for got, want in zip(runs[n], runs[1]):  # forward, backward
            assert_identical(got, want, f"{n} threads against 1")
