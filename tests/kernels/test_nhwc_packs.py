"""The channels_last kernels of the CUDA source move packs of channels (csrc/cuda/nhwc_tiles.cuh).

A lane takes kVec consecutive channels of a pixel row, one 16-byte pack (4 float, 8 bfloat16 or
half, 2 double), wherever C is a multiple of kVec and every tensor's base is 16-byte aligned; else
one channel. SALayer's gate and backward kernels take kVec output channels, whose pre-shuffle
channels are two half packs, one in each half of the row. Each channel sees its pixels in the same
order either way, so the two paths must give the same bits: here the same values go through both
(a tensor one element past a 16-byte boundary takes the one-channel path), forward and backward,
with the tiles, idle lanes and packs that straddle a branch boundary the shapes below make.

The emulator faults on a misaligned pack as the hardware does ("misaligned address"), so a pack
taken where the bases do not allow it fails here too; and its launch log shows the grid each call
chose (kVec times fewer tiles with packs).
"""

from __future__ import annotations

import pytest
import torch
from conftest import EMULATED, VARIANTS, make_input, op_params

CL = torch.channels_last

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp64", "fp32", "bf16", "fp16"]

# (B, C, H, W), groups. Packs: 2 (fp64), 4 (fp32), 8 (bf16, fp16) channels; a tile is 32 packs.
SHAPES = [
    # 272 channels: tiles of 128 + 128 + 16 (fp32), 256 + 16 (bf16), 5 tiles (fp64); 2 chunks
    pytest.param((1, 272, 17, 19), 2, id="C272-tiles-chunks2"),
    # m = 5: packs of 4 and 8 channels straddle the branches and the groups
    pytest.param((2, 40, 3, 7), 4, id="m5-straddling"),
    # one pack of 8 channels: 31 idle lanes (bf16)
    pytest.param((3, 8, 5, 5), 2, id="C8-one-pack"),
]


def _pack(dtype):
    return 16 // torch.empty((), dtype=dtype).element_size()


def _misaligned(t):
    """The same values, channels_last, its data one element past a 16-byte boundary."""
    B, C, H, W = t.shape
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    rows = storage[1:].view(B, H, W, C)
    rows.copy_(t.permute(0, 2, 3, 1))
    shifted = rows.permute(0, 3, 1, 2)
    assert shifted.is_contiguous(memory_format=CL) and shifted.data_ptr() % 16 != 0
    assert torch.equal(shifted, t)
    return shifted


def _calls(backend, variant, x, gy, groups, params, saved=None):
    """(out, mean, rstd) and the backward's 7 results; the backward takes `saved` (mean, rstd)
    when given, so that both runs of a comparison see the same statistics."""
    out, mean, rstd = backend.forward_op(variant)(x, groups, *params, 1e-5)
    mean, rstd = saved if saved is not None else (mean, rstd)
    grads = backend.backward_op(variant)(gy, x, mean, rstd, groups, *params)
    return (out, mean, rstd), grads


def _assert_identical(got, want, what):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, (what, i)
        assert torch.equal(g, w), (
            f"{what} result {i}: max diff {(g.double() - w.double()).abs().max()}"
        )


@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", ["emulated", "cuda"], indirect=True)
def test_packs_give_the_one_channel_bits(backend, variant, dtype, shape, groups):
    """Packs of channels (aligned tensors) and one channel a lane (x, or only grad_out, one element
    off 16 bytes): the same out, statistics and gradients, bit for bit."""
    assert shape[1] % _pack(dtype) == 0  # every shape here takes packs when aligned
    params = [p.to(backend.device) for p in op_params(variant, shape[1], groups, seed=5)]
    x = make_input(shape, seed=1, dtype=dtype, offset=0.5, device=backend.device)
    gy = make_input(shape, seed=2, dtype=dtype, device=backend.device)
    x, gy = x.contiguous(memory_format=CL), gy.contiguous(memory_format=CL)
    packed_fwd, packed_bwd = _calls(backend, variant, x, gy, groups, params)
    saved = packed_fwd[1:]
    one_fwd, one_bwd = _calls(backend, variant, _misaligned(x), gy, groups, params, saved)
    _assert_identical(one_fwd, packed_fwd, "x misaligned: forward")
    _assert_identical(one_bwd, packed_bwd, "x misaligned: backward")
    _, gy_off_bwd = _calls(backend, variant, x, _misaligned(gy), groups, params, saved)
    _assert_identical(gy_off_bwd, packed_bwd, "grad_out misaligned: backward")
    for result in (one_fwd[0], one_bwd[0], gy_off_bwd[0]):
        assert result.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_packs_where_c_and_the_bases_allow(dtype):
    """SALayer's channels_last forward on the emulated kernels: the moments kernel takes one tile
    of 32 packs of 16 bytes, the gate kernel of 32 packs of at most 4 channels (its per-channel
    state: csrc/cuda/nhwc_tiles.cuh, kNhwcStateVec), where C is a multiple of the pack and x is
    aligned; 32 channels a tile otherwise (C not a multiple, or x one element off)."""
    moments_pack = _pack(dtype)
    gate_pack = min(moments_pack, 4)
    B, H, W, groups = 1, 3, 5, 1  # one chunk: a kernel's blocks are its tiles
    for channels in (64 * moments_pack, 64 * moments_pack + 2):
        params = op_params("sa_layer", channels, groups, seed=5)
        x = make_input((B, channels, H, W), seed=1, dtype=dtype).contiguous(memory_format=CL)
        for xin in (x, _misaligned(x)):
            torch.ops.sa_cuda_emu.emulated_launch_blocks()  # forget earlier launches
            EMULATED.forward_op("sa_layer")(xin, groups, *params, 1e-5)
            moments, finish, gate = torch.ops.sa_cuda_emu.emulated_launch_blocks()
            aligned = xin.data_ptr() % 16 == 0
            tiles = [
                -(-channels // (32 * (pack if channels % pack == 0 and aligned else 1)))
                for pack in (moments_pack, gate_pack)
            ]
            assert [moments, gate] == tiles, (channels, xin.data_ptr() % 16)
            assert finish == -(-channels // 256)  # a lane per (item, channel): one chunk
