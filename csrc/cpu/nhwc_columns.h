// channels_last (NHWC) by columns: the CPU's forward (forward_nhwc_columns.cpp) and backward
// (backward_nhwc_cpu.cpp) of both variants in float lanes (float, bfloat16 and half tensors) where
// m divides L or is 2L, and C / 2 is a multiple of a column's width (by_columns: every stage of
// SA-ResNet-50, m = 2, 4, 8, 16).
//
// A column is `width` = 2 max(L, m) channels of each half of one batch item, [c, c + width) and
// [C/2 + c, C/2 + c + width), over all N pixels: 2 x 64 bytes of each half a pixel in float (2 x
// 128 for m = 16). channel_shuffle sends exactly these channels to the 2 width output channels
// from 2c (c and C/2 + c to 2c and 2c + 1), so a column's output is one contiguous run of each
// output row. At SA-ResNet-50's stage 1 a column of x is 400 KiB, which the 1 MiB L2 cache keeps
// between the forward's passes over it: x comes from memory once (the backward reads x and
// grad_out, 800 KiB, once, and its second pass reads back the terms its first kept). Columns run in
// parallel; within one every sum goes in a fixed order, so the results do not depend on the thread
// count. A column holds whole groups (c is a multiple of the width, hence of 2m): its statistics,
// gates and partials are its own, and each half's first channel starts a channel-branch run.
//
// Lanes: each half of a column is split by role into slices (split_half): a vector of L
// channel-branch lanes and a vector of L spatial-branch lanes each, so that the spatial gate's exp
// runs on spatial lanes only, as in NCHW, and a branch's lanes lie in channel order (BranchMixer).
// One slice per half for m dividing L (split_roles of the half's two vectors), two for m = 2L (the
// half's four vectors are two of each role). Slice q = h kSlices + s of a column holds its channel
// lanes at 2 q L .. 2 q L + L - 1, its spatial lanes L further (ColumnGeometry::channel says which
// channel each lane holds).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "../sa_math.h"
#include "nhwc_rows.h"
#include "vec_loops.h"

namespace sa_cuda::cpu {

// Whether a channels_last call in float lanes goes by columns: m dividing L or m = 2L (the slices
// below) and C / 2 a multiple of a column's width 2 max(L, m) (whole columns of whole groups).
inline bool by_columns(const ForwardParams& p) {
  const int64_t L = FloatVec::size(), m = p.branch_channels;
  return p.channels_last && (L % m == 0 || m == 2 * L) &&
         (p.channels / 2) % (2 * std::max(L, m)) == 0;
}

// A column's half in registers: kSlices<M> slices, each a vector of channel-branch lanes and a
// vector of spatial-branch lanes (RoleSplit), so that the spatial gate's exp runs on spatial lanes
// only, as in NCHW, and a branch's M lanes lie in channel order. For M dividing L one slice, split
// from the half's two vectors (split_roles); for M = 2L two, the half's four vectors being two of
// each role (one branch: slice s holds its channels s L .. s L + L - 1). The loops keep slices in
// arrays of RoleSplit and pass a half's as a pointer (a std::array of them was copied through
// general registers, 64 bits at a time: 9% more instructions in the forward).
template <int M>
inline constexpr int kSlices = M > FloatVec::size() ? M / FloatVec::size() : 1;
// A column's width, channels of each half, for M known at compile time (ColumnGeometry::width).
template <int M>
inline constexpr int64_t kColumnWidth = 2 * FloatVec::size() * kSlices<M>;

// The half's 2 kSlices<M> vectors in row order to its slices, and back.
template <int M>
inline void split_half(const FloatVec* rows, RoleSplit* slices) {
  if constexpr (kSlices<M> == 1) {
    slices[0] = split_roles<M>(rows[0], rows[1], false);
  } else {
    static_assert(kSlices<M> == 2);
    slices[0] = RoleSplit{rows[0], rows[2]};
    slices[1] = RoleSplit{rows[1], rows[3]};
  }
}
template <int M>
inline void merge_half(const RoleSplit* slices, FloatVec* rows) {
  if constexpr (kSlices<M> == 1) {
    std::tie(rows[0], rows[1]) = merge_roles<M>(slices[0], false);
  } else {
    rows[0] = slices[0].channel, rows[1] = slices[1].channel;
    rows[2] = slices[0].spatial, rows[3] = slices[1].spatial;
  }
}

// One column's place in a row, by value: the loops take a copy, which the vector stores cannot
// alias (at::vec's vectors may alias anything: a ColumnGeometry read through a reference is read
// again after each store; it cost the backward about 20% more instructions). The loops address a
// row as item + p C and the column from there: indexing the item with p C + offset in one
// expression measured 15% slower in the bf16 backward (memory stalls on the first load of a row),
// with fewer instructions.
struct ColumnAt {
  static constexpr int64_t L = FloatVec::size();
  int64_t C, half, c;

  // Row p of an item.
  template <typename T>
  T* row(T* item, int64_t p) const {
    return item + p * C;
  }
  // The column's channels from h half + c (x, grad_x), and the 2L output channels from
  // 2 (c + v L) of both halves' vectors v (out, grad_out) in a row.
  int64_t input(int h) const { return h * half + c; }
  int64_t output(int v) const { return 2 * (c + v * L); }
};

// Where the columns lie in a batch item: the channel of each lane, the partials' slots. A column is
// `width` = 2L kSlices<m> channels of each half; its lanes are its slices', half by half (slice
// q = h kSlices + s at lanes 2 q L: L channel-branch lanes, then L spatial-branch lanes).
struct ColumnGeometry {
  static constexpr int64_t L = FloatVec::size();
  static constexpr int64_t kMaxLanes = 8 * L;  // two slices of each half
  // Rows over which a pass sums in float registers before adding the block's totals in double;
  // the forward's gating pass takes its rows block by block.
  static constexpr int64_t kBlockRows = 16;

  int64_t C, half, N, m, groups, width, lanes, columns;
  int64_t lane_offset[kMaxLanes];  // the channel of each lane from the column's first of its half
  float inv_n;

  explicit ColumnGeometry(const ForwardParams& f)
      : C(f.channels),
        half(C / 2),
        N(f.plane_size),
        m(f.branch_channels),
        groups(f.groups),
        width(2 * std::max(L, m)),
        lanes(2 * width),
        columns(half / width),
        inv_n(1.0f / static_cast<float>(N)) {
    TORCH_CHECK(by_columns(f), "by columns: m must divide ", L, " or be ", 2 * L,
                ", and C / 2 be a multiple of 2 max(", L, ", m)");
    // Every column of a half starts a group (c is a multiple of the width, hence of 2m), so every
    // column's lanes hold the same offsets: those of split_half applied to the offsets
    // themselves, as int32 bit patterns (the shuffles move bits and compute nothing).
    alignas(64) int32_t offsets[kMaxLanes / 2];
    for (int32_t l = 0; l < width; ++l) offsets[l] = l;
    dispatch_m(m, [&](auto M) {
      FloatVec rows[2 * kSlices<M()>];
      for (int i = 0; i < 2 * kSlices<M()>; ++i) rows[i] = FloatVec::loadu(offsets + i * L);
      RoleSplit slices[kSlices<M()>];
      split_half<M()>(rows, slices);
      for (int s = 0; s < kSlices<M()>; ++s) {
        slices[s].channel.store(offsets + 2 * s * L);
        slices[s].spatial.store(offsets + 2 * s * L + L);
      }
    });
    for (int h = 0; h < 2; ++h) std::copy(offsets, offsets + width, lane_offset + h * width);
  }
  // The channel of lane `lane` of the column at c.
  int64_t channel(int64_t c, int64_t lane) const {
    return lane / width * half + c + lane_offset[lane];
  }
  // The position of channel ch of the column at c in the row's order: h width + ch - (h half + c).
  int64_t position(int64_t c, int64_t ch) const {
    const int64_t h = ch >= half;
    return h * width + ch - h * half - c;
  }
  ColumnAt at(int64_t c) const { return ColumnAt{C, half, c}; }
  // The first partial slot of channel ch's branch in item b: (b G + g) m.
  int64_t slot0(int64_t b, int64_t ch) const { return (b * groups + ch / (2 * m)) * m; }
};

// The column's half h of one row of x as its slices.
template <int M, typename scalar_t>
inline void column_x(const scalar_t* row, int h, ColumnAt col, RoleSplit* slices) {
  constexpr int64_t L = FloatVec::size();
  FloatVec rows[2 * kSlices<M>];
  for (int i = 0; i < kSlices<M>; ++i) {
    std::tie(rows[2 * i], rows[2 * i + 1]) = load_pair(row + col.input(h) + 2 * i * L);
  }
  split_half<M>(rows, slices);
}

// Asks for the cache lines of kCount values from row + offset (kCount known at compile time: a
// loop over a run-time count cost 36 instructions a row). A hint: no effect on any value.
//   kNonTemporal  to be read soon and once: the backward's pass 1 asks for a column's row of x
//                 (both halves) and of grad_out kPrefetchRows rows ahead. A column reads three
//                 streams a row (C values) apart, which the hardware prefetchers followed less well
//                 than NCHW's planes; non-temporal, so that they do not push the kept terms out of
//                 the L2 cache. At stage 1 (fp32, batch 8, 2 threads) it took the backward (with
//                 its pass 2 in reverse order) from 1.28 to 1.20x the NCHW backward's time
//                 (medians of 4 runs). The forward's first pass, prefetching into every level 12
//                 rows ahead, measured slower (1.31 against 1.23x the NCHW forward).
//   kIntoL2       to be read later, from L2: the forward's gating pass asks for its thread's next
//                 column, for that column's pass 1 (gate_column).
constexpr int kNonTemporal = 0, kIntoL2 = 2;
constexpr int64_t kPrefetchRows = 12;
template <int64_t kCount, int kLocality, bool kForWrite = false, typename scalar_t>
inline void prefetch_run(const scalar_t* row, int64_t offset) {
  prefetch_span<kForWrite, kLocality>(row + offset, kCount);
}

// ShuffleAttention's channel-branch gates sigmoid(W1 mu + b1) of half h's slices, gate[0 .. S),
// from the means mu of a column's lanes (read on its channel lanes: whole branches in channel
// order, as its spatial lanes; channel_mixer holds W1 and b1). The forward and the backward by
// columns form the gate this one way, so the backward's is the forward's.
template <int M>
inline void channel_gates(const BranchMixer& channel_mixer, const float* mu, int h,
                          FloatVec* gate) {
  constexpr int S = kSlices<M>;
  constexpr int64_t L = FloatVec::size();
  FloatVec means[S], z[S];
  for (int s = 0; s < S; ++s) means[s] = FloatVec::loadu(mu + 2 * (h * S + s) * L);
  channel_mixer.mix<M>(means, z);
  for (int s = 0; s < S; ++s) gate[s] = sigmoid(z[s]);
}

// sums[0 .. L) += v, in double; = v when `first` (the sums need no zeros before).
inline void add_wide(double* sums, const FloatVec& v, bool first = false) {
  using VecD = at::vec::Vectorized<double>;
  constexpr int64_t L = FloatVec::size();
  alignas(64) float lanes[L];
  v.store(lanes);
  for (int64_t l = 0; l < L; l += VecD::size()) {
    const VecD wide = load_wide(lanes + l);
    (first ? wide : VecD::loadu(sums + l) + wide).store(sums + l);
  }
}

}  // namespace sa_cuda::cpu
