// channels_last (NHWC) on the GPU: the work decomposition of the SALayer NHWC kernels
// (sa_layer_nhwc_forward.cuh, sa_layer_nhwc_backward.cuh).
//
// x is [B, N, C]: a pixel's C channels are one contiguous row, and a channel's plane is strided by
// C, so no plane is a unit to read by itself (apex's and PyTorch's NHWC GroupNorm face the same).
// A block of kNhwcThreads = 256 threads (8 warps) takes one *tile*: 32 consecutive channels of one
// batch item, one per lane, so that a warp reads 32 consecutive values of a row (one coalesced
// access), over one *chunk* of kNhwcChunkPixels consecutive pixels, of which warp w takes w, w + 8,
// w + 16, ... A thread keeps its channel for the whole block, and with it the channel's parameters
// and statistics. Per call:
//   1. a reduction kernel writes one partial per (batch item, chunk, channel): the statistics'
//      moments in the forward, the gradient sums in the backward;
//   2. a finishing kernel combines each channel's partials in chunk order (an order fixed by the
//      shape, so every run gives the same bits), and stores what the last kernel needs per channel;
//   3. an element-wise kernel applies it: the gate, or the input gradient.
// x is read twice (by 1 and 3; the second read of a tensor larger than L2 comes from DRAM), the
// result written once.
#pragma once

#include <cstdint>

#include "../sa_math.h"
#include "../sa_params.h"
#include "team.cuh"

namespace sa_cuda::SA_GPU_NS {

constexpr int kNhwcWarps = 8;
constexpr int kNhwcThreads = kNhwcWarps * kWarpSize;
constexpr int64_t kNhwcChunkPixels = 256;  // 32 pixels a thread
constexpr int kNhwcLoads = 4;  // pixels a thread has in flight
constexpr int kFinishThreads = 256;  // threads of a finishing kernel's block

// The grid of the reduction and element-wise kernels: B * chunks * tiles blocks, tile fastest
// (the blocks of one chunk read neighbouring bytes of the same rows).
struct NhwcGrid {
  int64_t batch, channels, pixels, tiles, chunks;

  SA_HOST_DEVICE explicit NhwcGrid(const ForwardParams& f)
      : batch(f.batch),
        channels(f.channels),
        pixels(f.plane_size),
        tiles((f.channels + kWarpSize - 1) / kWarpSize),
        chunks((f.plane_size + kNhwcChunkPixels - 1) / kNhwcChunkPixels) {}

  SA_HOST_DEVICE int64_t blocks() const { return batch * chunks * tiles; }
  SA_HOST_DEVICE int64_t planes() const { return batch * channels; }  // (batch item, channel)
  SA_HOST_DEVICE int64_t partials() const { return batch * chunks * channels; }
  // Slot of the per-(batch item, chunk, channel) partials.
  SA_HOST_DEVICE int64_t partial(int64_t item, int64_t chunk, int64_t channel) const {
    return (item * chunks + chunk) * channels + channel;
  }
};

// This thread's share of its block: a channel (the tile's lane-th; past the last channel in the
// last tile of a C that is not a multiple of 32: the thread then takes no part but the block's
// collectives) and the chunk's pixels warp, warp + 8, ... < end_pixel.
struct NhwcThread {
  int64_t item, chunk, channel;
  int64_t first_pixel, end_pixel;  // this thread's first pixel; the chunk's end
  int warp, lane;
  bool active;  // channel < C

  SA_DEVICE explicit NhwcThread(const NhwcGrid& grid) {
    const int64_t block = blockIdx.x;
    const int64_t tile = block % grid.tiles;
    chunk = block / grid.tiles % grid.chunks;
    item = block / (grid.tiles * grid.chunks);
    warp = static_cast<int>(threadIdx.x) / kWarpSize;
    lane = static_cast<int>(threadIdx.x) % kWarpSize;
    channel = tile * kWarpSize + lane;
    active = channel < grid.channels;
    const int64_t chunk_start = chunk * kNhwcChunkPixels;
    first_pixel = chunk_start + warp;
    end_pixel =
        chunk_start + kNhwcChunkPixels < grid.pixels ? chunk_start + kNhwcChunkPixels : grid.pixels;
  }

  // Offset of (pixel, channel c) of this thread's batch item in a [B, N, C] tensor.
  SA_DEVICE int64_t at(const NhwcGrid& grid, int64_t pixel, int64_t c) const {
    return (item * grid.pixels + pixel) * grid.channels + c;
  }

  // Visits this thread's pixels, kNhwcLoads loads in flight (unrolled_stream): load(pixel, slot),
  // then use(pixel, slot).
  template <typename Slot, typename Load, typename Use>
  SA_DEVICE void for_each_pixel(const Load& load, const Use& use) const {
    unrolled_stream<kNhwcLoads, Slot>(first_pixel, kNhwcWarps, end_pixel, load, use);
  }
};

// A Partial (plain data with merge(other), which folds other into it, and shuffled(src, width),
// lane src's copy within an aligned group of width lanes) is combined in two fixed orders: the 8
// warps of a block in warp order (combine_warps), then a channel's chunks in chunk order
// (combine_chunks).

// The per-thread partials of a block's 8 warps, combined per channel by warp 0. Every thread of the
// block calls it (it synchronizes the block), once per kernel and Partial type: warp 0 reads the
// shared array after the one barrier, so a second call would overwrite it under warp 0's reads.
// Returns the block's partial in warp 0's lanes.
template <typename Partial>
SA_DEVICE Partial combine_warps(const Partial& own) {
  SA_SHARED_ARRAY(Partial, warp_partials, kNhwcThreads);
  warp_partials[threadIdx.x] = own;
  __syncthreads();
  Partial total = own;
  if (threadIdx.x < kWarpSize) {
    for (int w = 1; w < kNhwcWarps; ++w) total.merge(warp_partials[w * kWarpSize + threadIdx.x]);
  }
  return total;
}

// The lanes a finishing kernel gives one (batch item, channel): its chunks rounded up to a power
// of two, at most a warp. Each lane loads one chunk's partial at a time, so a channel's partials
// are read at once instead of one dependent load after another (13 of them at 56x56), and a plane
// of one chunk (7x7) takes one lane: 32 channels a warp. A power of two <= 32 divides the warp,
// and a block is whole warps, so a team never straddles a warp.
SA_HOST_DEVICE int finish_lanes(int64_t chunks) {
  int lanes = 1;
  while (lanes < chunks && lanes < kWarpSize) lanes *= 2;
  return lanes;
}

// This thread's team in a finishing kernel: `lanes` consecutive lanes per (batch item, channel),
// the thread's rank in it. Teams past the last plane take the last plane (their reads stay
// valid) and store nothing; they still take part in the warp's collectives.
struct FinishTeam {
  int lanes, rank;
  int64_t plane, item, channel;
  bool active;

  SA_DEVICE FinishTeam(const NhwcGrid& grid, int lanes_) : lanes(lanes_) {
    const int64_t thread = int64_t(blockIdx.x) * kFinishThreads + threadIdx.x;
    rank = static_cast<int>(thread % lanes);
    active = thread / lanes < grid.planes();
    plane = active ? thread / lanes : grid.planes() - 1;
    item = plane / grid.channels;
    channel = plane % grid.channels;
  }
  // Whether this thread stores its plane's results (one per plane).
  SA_DEVICE bool writer() const { return active && rank == 0; }
};

// Blocks of a finishing kernel over every plane, `lanes` threads each.
SA_HOST_DEVICE int64_t finish_blocks(const NhwcGrid& grid, int lanes) {
  return (grid.planes() * lanes + kFinishThreads - 1) / kFinishThreads;
}

// The team's channel: its chunks' partials (NhwcGrid::partial slots) combined in chunk order,
// whatever the lanes (the same bits as one thread adding them up). Per round of `lanes` chunks,
// lane r loads chunk round + r, then every lane folds the round's partials in from the lanes'
// registers, in lane order; every lane of the team returns the total. Every lane of the warp
// calls it (shuffles).
template <typename Partial>
SA_DEVICE Partial combine_chunks(const Partial* partials, const NhwcGrid& grid,
                                 const FinishTeam& team) {
  Partial total{};
  for (int64_t round = 0; round < grid.chunks; round += team.lanes) {
    const int64_t chunk = round + team.rank < grid.chunks ? round + team.rank : round;
    const Partial own = partials[grid.partial(team.item, chunk, team.channel)];
    const int64_t count = grid.chunks - round < team.lanes ? grid.chunks - round : team.lanes;
    for (int k = 0; k < count; ++k) {
      const Partial next = own.shuffled(k, team.lanes);
      if (round + k == 0) {
        total = next;
      } else {
        total.merge(next);
      }
    }
  }
  return total;
}

}  // namespace sa_cuda::SA_GPU_NS
