// channels_last (NHWC) on the GPU: the work decomposition of the SALayer NHWC kernels
// (sa_layer_nhwc_forward.cuh, sa_layer_nhwc_backward.cuh) and of the statistics of both variants.
//
// x is [B, N, C]: a pixel's C channels are one contiguous row, and a channel's plane is strided by
// C, so no plane is a unit to read by itself (apex's and PyTorch's NHWC GroupNorm face the same).
// A lane takes kVec consecutive channels of a row, one pack (kNhwcVec: 4 float in 16 bytes, 4
// bfloat16 or half in 8, 2 double in 16) where C, every tensor's base and the grid's size allow it,
// else one channel (kVec = 1). A block of kNhwcThreads = 256 threads (8 warps) takes one *tile*:
// 32 kVec consecutive channels of one batch item, so that a warp reads 32 kVec consecutive values
// of a row (32 packs of one access), over one *chunk* of consecutive pixels (256; SALayer's
// backward fewer on small grids: nhwc_chunk_pixels), of which warp w takes w, w + 8, w + 16, ...
// A thread keeps its channels for the whole block, and with them their parameters and
// statistics. A channel sees its pixels in the same order whatever kVec, so the results do not
// depend on it. Per call:
//   1. a reduction kernel writes one partial per (batch item, chunk, channel): the statistics'
//      moments in the forward, the gradient sums in the backward;
//   2. a finishing kernel combines each channel's partials in chunk order (an order fixed by the
//      shape, so every run gives the same bits), and stores what the last kernel needs per channel;
//   3. an element-wise kernel applies it: the gate, or the input gradient.
// x is read twice (by 1 and 3; the second read of a tensor larger than L2 comes from DRAM), the
// result written once.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "../sa_math.h"
#include "../sa_params.h"
#include "team.cuh"

namespace sa_cuda::SA_GPU_NS {

constexpr int kNhwcWarps = 8;
constexpr int kNhwcThreads = kNhwcWarps * kWarpSize;
constexpr int64_t kNhwcChunkPixels = 256;  // the largest chunk: 32 pixels a thread
constexpr int kNhwcLoads = 4;  // pixels a thread has in flight
constexpr int kFinishThreads = 256;  // threads of a finishing kernel's block

// The kVec of a launch with packs: a pack of at most 16 bytes and 4 channels (float 4, bfloat16 and
// half 4 in 8 bytes, double 2). A thread keeps each channel's statistics, gate or coefficients:
// 8 channels took 124 to 156 registers a thread on sm_90 (one or two blocks an SM), 4 take 76 to
// 112.
template <typename scalar_t>
constexpr int kNhwcVec = 16 / int(sizeof(scalar_t)) < 4 ? 16 / int(sizeof(scalar_t)) : 4;

// How each direction sizes its grid, from the H200's timings of both choices at the SA-ResNet-50
// stage shapes (docs/gpu.md, sections 11 and 12):
// - the forward (the statistics' moments, SALayer's gate) keeps chunks of 256 pixels: its partial
//   moments (24 bytes a channel) and their merge cost more at 64 pixels than the blocks gain (the
//   B = 8 forwards lost 10-34%); it takes packs where they leave 256 blocks (about 2 an SM of
//   132): on 208 blocks the packed moments and gate kernels took 20.2 and 27.5 us in float32, 28.0
//   and 26.8 us in bfloat16, against 20.5 / 23.3 and 19.4 / 21.4 us one channel a lane on 832
//   (SALayer's bfloat16 forward at (8, 256, 56, 56): 56.6 us against 45.8), and packs on 64 to 128
//   blocks ran up to 1.8x slower; with 1664 (B = 64) they took 0.88x the time in float32;
// - SALayer's backward halves its chunks, down to 64 pixels, until the grid with packs has 512
//   blocks, and takes packs where it does: its bfloat16 kernels took 0.6-0.7x the time of one
//   channel a lane with 256-pixel chunks at B = 8, its float32 ones 0.8-1.1x.
enum class NhwcPass { kForward, kBackward };
constexpr int64_t kNhwcForwardPackBlocks = 256;
constexpr int64_t kNhwcMinChunkPixels = 64;  // a float channel's 8-byte sums against 256 bytes of x
constexpr int64_t kNhwcBackwardBlocks = 512;

// The least blocks a launch with packs must have (else one channel a lane, kVec times the blocks);
// 1 in the emulator, whose tests run small grids and take packs wherever C and the tensors allow.
#if defined(__CUDACC__)
constexpr bool kNhwcPackBlockRule = true;
#else
constexpr bool kNhwcPackBlockRule = false;
#endif
SA_HOST_DEVICE constexpr int64_t nhwc_pack_min_blocks(NhwcPass pass) {
  if (!kNhwcPackBlockRule) return 1;
  return pass == NhwcPass::kForward ? kNhwcForwardPackBlocks : kNhwcBackwardBlocks;
}

// The grid of the reduction and element-wise kernels: B * chunks * tiles blocks, tile fastest
// (the blocks of one chunk read neighbouring bytes of the same rows).
struct NhwcGrid {
  int64_t batch, channels, pixels, chunk_pixels, tiles, chunks;

  // lane_channels: the kVec of the kernels launched on this grid (1 for those without tiles)
  SA_HOST_DEVICE NhwcGrid(const ForwardParams& f, int lane_channels, int64_t chunk_pixels_)
      : batch(f.batch),
        channels(f.channels),
        pixels(f.plane_size),
        chunk_pixels(chunk_pixels_),
        tiles((f.channels + kWarpSize * lane_channels - 1) / (kWarpSize * lane_channels)),
        chunks((f.plane_size + chunk_pixels_ - 1) / chunk_pixels_) {}

  SA_HOST_DEVICE int64_t blocks() const { return batch * chunks * tiles; }
  SA_HOST_DEVICE int64_t planes() const { return batch * channels; }  // (batch item, channel)
  SA_HOST_DEVICE int64_t partials() const { return batch * chunks * channels; }
  // Slot of the per-(batch item, chunk, channel) partials.
  SA_HOST_DEVICE int64_t partial(int64_t item, int64_t chunk, int64_t channel) const {
    return (item * chunks + chunk) * channels + channel;
  }
};

// The chunk of a direction's grid (NhwcPass): a function of the shape, dtype and direction alone,
// not of the kVec a launch takes, so the packed and the one-channel kernels sum each channel's
// pixels in the same order (the same bits).
template <typename scalar_t>
SA_HOST_DEVICE int64_t nhwc_chunk_pixels(const ForwardParams& f, NhwcPass pass) {
  int64_t chunk = kNhwcChunkPixels;
  while (pass == NhwcPass::kBackward && chunk > kNhwcMinChunkPixels &&
         NhwcGrid(f, kNhwcVec<scalar_t>, chunk).blocks() < kNhwcBackwardBlocks) {
    chunk /= 2;
  }
  return chunk;
}

template <typename scalar_t>
SA_HOST_DEVICE NhwcGrid nhwc_grid(const ForwardParams& f, NhwcPass pass, int lane_channels) {
  return NhwcGrid(f, lane_channels, nhwc_chunk_pixels<scalar_t>(f, pass));
}

// Calls go(std::integral_constant<int, kVec>()) with kVec = kNhwcVec where C is a multiple of it,
// every tensor's base is aligned to its bytes (then every thread's packs are: rows start C apart)
// and the direction's grid with packs keeps nhwc_pack_min_blocks blocks; else kVec = 1.
template <typename scalar_t, typename Go>
void with_lane_channels(const ForwardParams& f, NhwcPass pass,
                        std::initializer_list<const void*> tensors, const Go& go) {
  constexpr int kMax = kNhwcVec<scalar_t>;
  bool fits = f.channels % kMax == 0 &&
              nhwc_grid<scalar_t>(f, pass, kMax).blocks() >= nhwc_pack_min_blocks(pass);
  for (const void* t : tensors)
    fits = fits && reinterpret_cast<uintptr_t>(t) % (kMax * sizeof(scalar_t)) == 0;
  if (fits) {
    go(std::integral_constant<int, kMax>());
  } else {
    go(std::integral_constant<int, 1>());
  }
}

// This thread's share of its block: kVec channels (the tile's lane-th pack; past the last channel
// in the last tile of a C that is not a multiple of 32 kVec: the thread then takes no part but the
// block's collectives) and the chunk's pixels warp, warp + 8, ... < end_pixel.
template <int kVec>
struct NhwcThread {
  int64_t item, chunk, channel;  // channel: the first of the thread's kVec
  int64_t first_pixel, end_pixel;  // this thread's first pixel; the chunk's end
  int warp, lane;
  bool active;  // channel < C (kVec divides C: all of the thread's channels are, or none)

  SA_DEVICE explicit NhwcThread(const NhwcGrid& grid) {
    const int64_t block = blockIdx.x;
    const int64_t tile = block % grid.tiles;
    chunk = block / grid.tiles % grid.chunks;
    item = block / (grid.tiles * grid.chunks);
    warp = static_cast<int>(threadIdx.x) / kWarpSize;
    lane = static_cast<int>(threadIdx.x) % kWarpSize;
    channel = (tile * kWarpSize + lane) * kVec;
    active = channel < grid.channels;
    const int64_t chunk_start = chunk * grid.chunk_pixels;
    first_pixel = chunk_start + warp;
    end_pixel = chunk_start + grid.chunk_pixels < grid.pixels ? chunk_start + grid.chunk_pixels
                                                              : grid.pixels;
  }

  // The first of this thread's channels, or, on an idle thread, the last kVec channels (valid
  // addresses for the reads of a kernel with collectives).
  SA_DEVICE int64_t readable_channel(const NhwcGrid& grid) const {
    return active ? channel : grid.channels - kVec;
  }

  // Row `pixel` of this thread's batch item in a [B, N, C] tensor: its first element, and its
  // address from the tensor's.
  SA_DEVICE int64_t row_start(const NhwcGrid& grid, int64_t pixel) const {
    return (item * grid.pixels + pixel) * grid.channels;
  }
  template <typename T>
  SA_DEVICE T* row(T* base, const NhwcGrid& grid, int64_t pixel) const {
    return base + row_start(grid, pixel);
  }

  // Visits this thread's pixels, kPixelLoads pixels' packs in flight (unrolled_stream):
  // load(pixel, slot), then use(pixel, slot).
  template <typename Slot, typename Load, typename Use>
  SA_DEVICE void for_each_pixel(const Load& load, const Use& use) const {
    unrolled_stream<kPixelLoads, Slot>(first_pixel, kNhwcWarps, end_pixel, load, use);
  }
  // Pixels in flight in for_each_pixel: 16 bytes or more of each tensor a thread (more in flight
  // only holds more registers).
  static constexpr int kPixelLoads = kVec == 1 ? kNhwcLoads : 2;
};

// Output channels o0 .. o0 + kVec - 1 of a row come from the pre-shuffle channels shuffle_src(o):
// channel_shuffle(u, 2) interleaves the halves, so the even ones are kVec / 2 consecutive channels
// of the first half from o0 / 2, the odd ones as many of the second half from C / 2 + o0 / 2: two
// packs of kVec / 2 (8 bytes for float), aligned where o0 and C are multiples of kVec.
template <typename scalar_t, typename acc_t, int kVec>
SA_DEVICE void load_unshuffled(const scalar_t* row, int64_t channels, int64_t o0,
                               acc_t (&v)[kVec]) {
  if constexpr (kVec == 1) {
    v[0] = static_cast<acc_t>(row[shuffle_src(o0, channels)]);
  } else {
    constexpr int kHalf = kVec / 2;
    acc_t first[kHalf], second[kHalf];
    load_acc<scalar_t, acc_t, kHalf>(row + o0 / 2, 0, first);
    load_acc<scalar_t, acc_t, kHalf>(row + channels / 2 + o0 / 2, 0, second);
#pragma unroll
    for (int i = 0; i < kHalf; ++i) {
      v[2 * i] = first[i];
      v[2 * i + 1] = second[i];
    }
  }
}

// The inverse of load_unshuffled: v[j] to channel shuffle_src(o0 + j) of the row.
template <typename scalar_t, typename acc_t, int kVec>
SA_DEVICE void store_unshuffled(scalar_t* row, int64_t channels, int64_t o0,
                                const acc_t (&v)[kVec]) {
  if constexpr (kVec == 1) {
    row[shuffle_src(o0, channels)] = static_cast<scalar_t>(v[0]);
  } else {
    constexpr int kHalf = kVec / 2;
    acc_t first[kHalf], second[kHalf];
#pragma unroll
    for (int i = 0; i < kHalf; ++i) {
      first[i] = v[2 * i];
      second[i] = v[2 * i + 1];
    }
    store_acc<scalar_t, acc_t, kHalf>(row + o0 / 2, 0, first);
    store_acc<scalar_t, acc_t, kHalf>(row + channels / 2 + o0 / 2, 0, second);
  }
}

// A Partial (plain data with merge(other), which folds other into it, and shuffled(src, width),
// lane src's copy within an aligned group of width lanes) is combined in two fixed orders: the 8
// warps of a block in warp order (combine_warps), then a channel's chunks in chunk order
// (combine_chunks).

// The per-thread partials of a block's 8 warps, combined per channel by warp 0, one of the thread's
// kVec channels after another: in place, warp 0's lanes end with the block's partials. Every thread
// of the block calls it (it synchronizes the block); it ends with warp 0 reading the shared array,
// so a kernel calls it once per Partial type (a second call would overwrite the array under warp
// 0's reads).
template <typename Partial, int kVec>
SA_DEVICE void combine_warps(Partial (&own)[kVec]) {
  SA_SHARED_ARRAY(Partial, warp_partials, kNhwcThreads);
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    if (j > 0) __syncthreads();  // warp 0 is done with channel j - 1's
    warp_partials[threadIdx.x] = own[j];
    __syncthreads();
    if (threadIdx.x < kWarpSize) {
      for (int w = 1; w < kNhwcWarps; ++w) own[j].merge(warp_partials[w * kWarpSize + threadIdx.x]);
    }
  }
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
