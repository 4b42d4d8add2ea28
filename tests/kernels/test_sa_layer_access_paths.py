"""The SALayer CUDA kernels' access paths, executed by the SIMT emulator.

launch_common.cuh picks, per launch, the widest pack (16, 8 or 4 bytes, else one element) that N
and every plane pointer allow; a warp team whose planes allow no pack wider than one element
stages its block's 8 consecutive planes through shared memory as one chunk (16-byte loads,
however the chunk lies against 16 bytes); the streamed path (N > 4096) keeps several loads in
flight per thread, with a tail when a thread's packs are not a multiple of the unroll. The cases
below select each of these by N, dtype and the storage offset of x and grad_out (the comment of
each case says which); values and every gradient are checked against the float64 reference with
sa_cuda.testing.assert_close_to_reference, and a second run must give the same bits."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    EMULATED,
    clone_as,
    forward_backward,
    input_at_offset,
    make_input,
    make_ref,
    params_in_op_order,
)

from sa_cuda.testing import assert_close_to_reference

EMU = EMULATED.ops

# dtype, (B, C, H, W), groups, storage offset in elements of x and grad_out
CASES = [
    # warp team (N <= 256), per-plane packs
    pytest.param(torch.float16, (2, 8, 8, 8), 2, 0, id="warp-fp16-16B"),
    pytest.param(torch.float16, (2, 8, 14, 14), 2, 0, id="warp-fp16-8B"),  # 196 % 8 = 4
    pytest.param(torch.bfloat16, (2, 8, 14, 14), 2, 2, id="warp-bf16-4B-offset"),  # 4-byte offset
    pytest.param(torch.float32, (2, 8, 7, 14), 2, 0, id="warp-fp32-8B"),  # 98 % 4 = 2
    pytest.param(torch.float32, (2, 8, 8, 8), 2, 2, id="warp-fp32-8B-offset"),  # 8-byte offset
    # warp team, no pack wider than one element: the block's planes staged as one chunk
    pytest.param(torch.float32, (3, 12, 7, 7), 3, 0, id="staged-fp32-7x7"),  # B*C = 36
    pytest.param(torch.bfloat16, (5, 4, 7, 7), 1, 3, id="staged-bf16-7x7-offset"),  # B*C = 20
    pytest.param(torch.float16, (1, 6, 7, 7), 3, 1, id="staged-fp16-one-block"),  # B*C = 6 < 8
    pytest.param(torch.float64, (3, 4, 7, 7), 1, 1, id="staged-fp64-7x7-offset"),
    pytest.param(torch.float32, (2, 10, 15, 17), 5, 0, id="staged-fp32-255"),  # 8 * 255 per chunk
    pytest.param(torch.float32, (3, 2, 1, 3), 1, 1, id="staged-fp32-n3"),  # chunk inside one pack
    # block team (256 < N <= 4096)
    pytest.param(torch.float32, (1, 4, 30, 31), 1, 0, id="block-fp32-8B"),  # 930 % 4 = 2
    pytest.param(torch.bfloat16, (1, 4, 20, 30), 1, 4, id="block-bf16-8B-offset"),  # 8-byte offset
    pytest.param(torch.float16, (1, 4, 17, 18), 1, 0, id="block-fp16-4B"),  # 306 % 4 = 2
    pytest.param(torch.float64, (1, 4, 17, 19), 1, 0, id="block-fp64-scalar"),
    # streamed (N > 4096), few planes (low B * C): unrolled loads with a tail
    pytest.param(torch.float32, (1, 4, 96, 100), 1, 0, id="streamed-fp32-16B"),  # 2400 packs / 512
    pytest.param(torch.float32, (1, 2, 66, 70), 1, 2, id="streamed-fp32-8B-offset"),
    pytest.param(torch.float16, (1, 2, 65, 66), 1, 0, id="streamed-fp16-4B"),  # 4290 % 4 = 2
    pytest.param(
        torch.float32, (1, 2, 97, 99), 1, 0, id="streamed-fp32-scalar"
    ),  # 9603 packs / 512
    pytest.param(torch.float64, (1, 2, 65, 65), 1, 1, id="streamed-fp64-scalar"),
]


@pytest.mark.parametrize("dtype,shape,groups,offset", CASES)
def test_sa_layer_paths_match_reference_bitwise_repeatable(dtype, shape, groups, offset):
    ref = make_ref("sa_layer", shape[1], groups, seed=5, dtype=dtype)
    x, gy = input_at_offset(shape, offset, dtype, 1), input_at_offset(shape, offset, dtype, 2)
    emulated = EMULATED.module_like("sa_layer", ref)
    F = forward_backward(emulated, x, gy)
    R = forward_backward(clone_as(ref, torch.float64), x.double(), gy.double())
    E = R if dtype == torch.float64 else forward_backward(ref, x, gy)
    assert_close_to_reference(F, R, dtype, eager=E)
    again = forward_backward(emulated, x, gy)
    for key in F:
        assert torch.equal(F[key], again[key]), f"{key}: a rerun gives other bits"


@pytest.mark.parametrize(
    "dtype,shape,groups,offset",
    [
        pytest.param(torch.float32, (1, 4, 96, 100), 1, 0, id="streamed"),
        pytest.param(torch.float32, (3, 12, 7, 7), 3, 0, id="staged"),
    ],
)
def test_sa_layer_paths_large_mean(dtype, shape, groups, offset):
    """|mean| >> std (x = 100 + 0.1 randn) on the streamed and staged paths."""
    ref = make_ref("sa_layer", shape[1], groups, seed=5, dtype=dtype)
    x = input_at_offset(shape, offset, dtype, 1, offset=100.0, scale=0.1)
    gy = input_at_offset(shape, offset, dtype, 2)
    F = forward_backward(EMULATED.module_like("sa_layer", ref), x, gy)
    R = forward_backward(clone_as(ref, torch.float64), x.double(), gy.double())
    assert_close_to_reference(F, R, dtype, eager=forward_backward(ref, x, gy))


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape,groups,offset",
    [
        pytest.param((3, 4, 3, 3), 1, 1, id="staged"),
        pytest.param((1, 4, 5, 6), 2, 0, id="warp-scalar-pack"),
    ],
)
def test_sa_layer_paths_gradcheck(shape, groups, offset):
    ref = make_ref("sa_layer", shape[1], groups, seed=3, dtype=torch.float64)
    params = [p.detach().clone().requires_grad_() for p in params_in_op_order("sa_layer", ref)]
    n = torch.Size(shape).numel()
    x = make_input((n + offset,), seed=4, dtype=torch.float64)[offset:].view(shape).requires_grad_()

    def fn(x, *ps):
        return EMULATED.apply("sa_layer", x, groups, ps)

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


# (H, W): the lanes of a warp team (launch_common.cuh): N <= 64 -> 8 lanes, 4 planes a warp (4x4
# and 8x8: 16-byte packs, 7x7: staged), else the whole warp (9x9).
@pytest.mark.parametrize("hw", [(4, 4), (7, 7), (8, 8), (9, 9)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_teams_sharing_a_warp_are_independent(backend, dtype, hw):
    """Teams of 8 lanes share a warp: neighbours of other magnitudes (one whose
    statistics overflow and are redone scaled, one subnormal), of the other branch (m = 1: channel
    and spatial planes alternate) and past the last plane (B * C = 3 * 6 = 18: a partly filled
    warp, and a block of 18 planes) must not change a plane's bits. Each plane of a mixed input
    equals, bit for bit, the same plane of an input whose planes are all at its magnitude."""
    B, C, groups = 3, 6, 3
    shape = (B, C) + hw
    params = [
        p.detach().to(dtype)
        for p in params_in_op_order("sa_layer", make_ref("sa_layer", C, groups, seed=5))
    ]
    params = [p.to(backend.device) for p in params]
    unit = make_input(shape, seed=6, dtype=torch.float64, device=backend.device) / 4
    magnitudes = (1.0, 3e38, 1e-30, 1e4)
    pick = torch.arange(B * C, device=backend.device).view(B, C, 1, 1) % len(magnitudes)
    mag = torch.tensor(magnitudes, dtype=torch.float64, device=backend.device)[pick]
    gy = make_input(shape, seed=7, dtype=dtype, device=backend.device)
    # out is channel-shuffled: input channel c is written to output channel shuffle_dst(c).
    half = C // 2
    shuffle_dst = torch.tensor([2 * (c % half) + c // half for c in range(C)], device=unit.device)

    def run(x):
        out, mean, rstd = backend.forward_op("sa_layer")(x, groups, *params, 1e-5)
        grads = backend.backward_op("sa_layer")(gy, x, mean, rstd, groups, *params)
        return {"out": out[:, shuffle_dst], "mean": mean, "rstd": rstd, "grad_x": grads[0]}

    mixed = run((unit * mag).to(dtype))
    for k, m in enumerate(magnitudes):
        alone = run((unit * m).to(dtype))
        mine = (pick == k).view(B, C)
        for key in mixed:
            torch.testing.assert_close(
                mixed[key][mine],
                alone[key][mine],
                rtol=0,
                atol=0,
                equal_nan=True,
                msg=lambda msg, key=key, m=m: f"{key}, planes at {m}: {msg}",
            )
