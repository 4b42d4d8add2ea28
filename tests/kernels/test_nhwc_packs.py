"""The channels_last kernels of the CUDA source move packs of channels (csrc/cuda/nhwc_tiles.cuh).

A lane takes kVec consecutive channels of a pixel row, one pack (4 float in 16 bytes, 4 bfloat16
or half in 8, 2 double in 16), wherever C is a multiple of kVec, every tensor's base is aligned to
the pack and (on a GPU) the grid keeps enough blocks; else one channel. SALayer's gate and
backward kernels take kVec output channels, whose pre-shuffle channels are two half packs, one in
each half of the row. Each channel sees its pixels in the same order either way (the chunks do not
depend on kVec), so the two paths must give the same bits: here the same values go through both
(a tensor one element past a pack's boundary takes the one-channel path), forward and backward,
with the tiles, idle lanes and packs that straddle a branch boundary the shapes below make.

The emulator faults on a misaligned pack as the hardware does ("misaligned address"), so a pack
taken where the bases do not allow it fails here too; and its launch log shows the grid each call
chose (kVec times fewer tiles with packs).
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DTYPE_IDS,
    DTYPES,
    EMULATED,
    VARIANTS,
    assert_identical,
    make_input,
    misaligned_copy,
    op_params,
    run_raw_ops,
)

CL = torch.channels_last


# (B, C, H, W), groups. Packs: 2 (fp64) or 4 channels; a tile is 32 packs; chunks of 256 pixels in
# the forward, 64 in SALayer's backward here (small grids: nhwc_chunk_pixels).
SHAPES = [
    # 272 channels: tiles of 128 + 128 + 16 (4 channels a pack), 5 tiles (fp64); 2 chunks (the
    # backward's: 6, the last of 3 pixels)
    pytest.param((1, 272, 17, 19), 2, id="C272-tiles-chunks"),
    # m = 5: packs of 2 and 4 channels straddle the branches and the groups
    pytest.param((2, 40, 3, 7), 4, id="m5-straddling"),
    # two packs of 4 channels: 30 idle lanes
    pytest.param((3, 8, 5, 5), 2, id="C8-two-packs"),
    # a GPU takes packs only where they leave enough blocks (nhwc_pack_min_blocks): the forward's
    # 64 * 2 chunks * 2 tiles = 256 >= 256, the backward's 64 * 5 chunks of 64 pixels * 2 = 640 >=
    # 512 (fp64: 4 tiles of 64 channels and 2 chunks of 256 pixels, 512 blocks, in both); the GPU
    # alone
    pytest.param((64, 256, 17, 17), 32, id="gpu-grid-packs"),
]


def _pack(dtype):
    """Channels a pack (csrc/cuda/nhwc_tiles.cuh, kNhwcVec): at most 16 bytes and 4 channels."""
    return min(16 // torch.empty((), dtype=dtype).element_size(), 4)


def _misaligned(t):
    """The same values, channels_last, its data one element past a pack's boundary."""
    shifted = misaligned_copy(t.contiguous(memory_format=CL))
    pack_bytes = _pack(t.dtype) * t.element_size()
    assert shifted.is_contiguous(memory_format=CL) and shifted.data_ptr() % pack_bytes != 0
    assert torch.equal(shifted, t)
    return shifted


@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", ["emulated", "cuda"], indirect=True)
def test_packs_give_the_one_channel_bits(backend, variant, dtype, shape, groups):
    """Packs of channels (aligned tensors) and one channel a lane (x, or only grad_out, one element
    off a pack): the same out, statistics and gradients, bit for bit."""
    if backend.name == "emulated" and shape[0] == 64:
        pytest.skip("a GPU-sized grid: the emulator takes packs on the small shapes already")
    assert shape[1] % _pack(dtype) == 0  # every shape here takes packs when aligned
    params = [p.to(backend.device) for p in op_params(variant, shape[1], groups, seed=5)]
    x = make_input(shape, seed=1, dtype=dtype, offset=0.5, device=backend.device)
    gy = make_input(shape, seed=2, dtype=dtype, device=backend.device)
    x, gy = x.contiguous(memory_format=CL), gy.contiguous(memory_format=CL)
    packed_fwd, packed_bwd = run_raw_ops(backend, variant, x, gy, groups, params)
    saved = packed_fwd[1:]
    one_fwd, one_bwd = run_raw_ops(
        backend, variant, _misaligned(x), gy, groups, params, saved=saved
    )
    assert_identical(one_fwd, packed_fwd, "x misaligned: forward")
    assert_identical(one_bwd, packed_bwd, "x misaligned: backward")
    _, gy_off_bwd = run_raw_ops(backend, variant, x, _misaligned(gy), groups, params, saved=saved)
    assert_identical(gy_off_bwd, packed_bwd, "grad_out misaligned: backward")
    for result in (one_fwd[0], one_bwd[0], gy_off_bwd[0]):
        assert result.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_packs_where_c_and_the_bases_allow(dtype):
    """SALayer's channels_last forward on the emulated kernels (which take packs from one block up:
    nhwc_pack_min_blocks): the moments and gate kernels take one tile of 32 packs per 32 kVec
    channels where C is a multiple of kVec and x is aligned; 32 channels a tile otherwise (C not a
    multiple, or x one element off)."""
    pack = _pack(dtype)
    B, H, W, groups = 1, 3, 5, 1  # one chunk: a kernel's blocks are its tiles
    for channels in (64 * pack, 64 * pack + 2):
        params = op_params("sa_layer", channels, groups, seed=5)
        x = make_input((B, channels, H, W), seed=1, dtype=dtype).contiguous(memory_format=CL)
        for xin in (x, _misaligned(x)):
            torch.ops.sa_cuda_emu.emulated_launch_blocks()  # forget earlier launches
            EMULATED.forward_op("sa_layer")(xin, groups, *params, 1e-5)
            moments, finish, gate = torch.ops.sa_cuda_emu.emulated_launch_blocks()
            packed = channels % pack == 0 and xin.data_ptr() % (pack * xin.element_size()) == 0
            tiles = -(-channels // (32 * (pack if packed else 1)))
            assert (moments, gate) == (tiles, tiles), (channels, xin.data_ptr() % 16)
            assert finish == -(-channels // 256)  # a lane per (item, channel): one chunk


@pytest.mark.parametrize("batch,backward_chunks", [(512, 1), (511, 2)])
def test_backward_chunks_shrink_on_small_grids(batch, backward_chunks):
    """The chunks of the NHWC kernels (nhwc_chunk_pixels): the forward's are 256 pixels; SALayer's
    backward halves its own, down to 64 pixels, while its grid with packs has fewer than 512 blocks.
    At 65 pixels and C = 8 (one tile) a batch of 512 has 512 blocks of one 256-pixel chunk; a batch
    of 511 halves it to 64 pixels, 2 chunks. Read from the launches on the emulated kernels: the
    forward's moments kernel, the backward's sums kernel."""
    C, H, W = 8, 5, 13
    params = op_params("sa_layer", C, 1, seed=5)
    x = make_input((batch, C, H, W), seed=1).contiguous(memory_format=CL)
    torch.ops.sa_cuda_emu.emulated_launch_blocks()  # forget earlier launches
    out, mean, rstd = EMULATED.forward_op("sa_layer")(x, 1, *params, 1e-5)
    assert torch.ops.sa_cuda_emu.emulated_launch_blocks()[0] == batch  # one chunk
    EMULATED.backward_op("sa_layer")(out, x, mean, rstd, 1, *params)
    assert torch.ops.sa_cuda_emu.emulated_launch_blocks()[0] == batch * backward_chunks
