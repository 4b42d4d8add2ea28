// channels_last (NHWC) by columns: the CPU's forward (forward_nhwc_columns.cpp) and backward
// (backward_nhwc_cpu.cpp) of both variants in float lanes (float, bfloat16 and half tensors) where
// m divides L and C / 2 is a multiple of 2L (by_columns: SA-ResNet-50's stages 1 to 3).
//
// A column is 2L channels of each half of one batch item, [c, c + 2L) and [C/2 + c, C/2 + c + 2L),
// over all N pixels: 4 x 64 bytes a pixel in float. channel_shuffle sends exactly these channels to
// the 4L output channels from 2c (c and C/2 + c to 2c and 2c + 1), so a column's output is one
// contiguous run of each output row. At SA-ResNet-50's stage 1 a column of x is 400 KiB (x and
// grad_out: 800 KiB), which the 1 MiB L2 cache keeps between the passes over it: x comes from
// memory once. Columns run in parallel; within one every sum goes in a fixed order, so the results
// do not depend on the thread count. A column holds whole groups (2L channels of a half are whole
// groups for m dividing L): its statistics, gates and partials are its own.
//
// Lanes: the 2L channels of each half are split by role (split_roles: L channel-branch lanes,
// then L spatial-branch lanes), so that the spatial gate's exp runs on spatial lanes only, as in
// NCHW, and a vector of spatial lanes holds L / m whole branches in channel order (BranchMixer).
// Lane h 2L + l of a column holds a channel-branch channel of half h, lane h 2L + L + l a
// spatial one (ColumnGeometry::channel says which).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

#include "../sa_math.h"
#include "nhwc_rows.h"
#include "vec_loops.h"

namespace sa_cuda::cpu {

// Whether a channels_last call in float lanes goes by columns: m dividing L (pairs of vectors
// split by role, split_roles) and C / 2 a multiple of 2L (whole columns).
inline bool by_columns(const ForwardParams& p) {
  const int64_t L = FloatVec::size(), m = p.branch_channels;
  return p.channels_last && L % m == 0 && (p.channels / 2) % (2 * L) == 0;
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
  bool swapped[2];  // ColumnGeometry::swapped

  // Row p of an item.
  template <typename T>
  T* row(T* item, int64_t p) const {
    return item + p * C;
  }
  // The 2L channels from h half + c (x, grad_x) and the 2L output channels from 2 (c + v L)
  // (out, grad_out) in a row.
  int64_t input(int h) const { return h * half + c; }
  int64_t output(int v) const { return 2 * (c + v * L); }
};

// Where the columns lie in a batch item: the channel of each lane, the partials' slots.
struct ColumnGeometry {
  static constexpr int64_t L = FloatVec::size();
  static constexpr int64_t kLanes = 4 * L;  // 2L of each half
  static constexpr int64_t kBlockRows = 16;  // rows a pass holds in registers at once

  int64_t C, half, N, m, groups, columns;
  bool swapped[2];  // per half: its first channel is a spatial-branch one (split_roles)
  int64_t lane_offset[kLanes];  // the channel of each lane from the column's first of its half
  float inv_n;

  explicit ColumnGeometry(const ForwardParams& f)
      : C(f.channels),
        half(C / 2),
        N(f.plane_size),
        m(f.branch_channels),
        groups(f.groups),
        columns(half / (2 * L)),
        inv_n(1.0f / static_cast<float>(N)) {
    TORCH_CHECK(by_columns(f), "by columns: m must divide ", L, " and C / 2 be a multiple of ",
                2 * L);
    // Every column of a half starts a group (c is a multiple of 2L, hence of 2m), so its lanes
    // hold the same offsets: those of split_roles applied to the offsets themselves, as int32 bit
    // patterns (the shuffles move bits and compute nothing).
    for (int h = 0; h < 2; ++h) {
      swapped[h] = channel_role(h * half, m).spatial;
      alignas(64) int32_t offsets[2 * L];
      for (int32_t l = 0; l < 2 * L; ++l) offsets[l] = l;
      const auto bits = [&](int64_t l) { return FloatVec::loadu(offsets + l); };
      const RoleSplit split =
          dispatch_m(m, [&](auto M) { return split_roles<M()>(bits(0), bits(L), swapped[h]); });
      split.channel.store(offsets);
      split.spatial.store(offsets + L);
      std::copy(offsets, offsets + 2 * L, lane_offset + h * 2 * L);
    }
  }
  // The channel of lane `lane` of the column at c (split_roles' order; position h 2L + l is row
  // position h half + c + l).
  int64_t channel(int64_t c, int64_t lane) const {
    return lane / (2 * L) * half + c + lane_offset[lane];
  }
  // The position of channel ch of the column at c in the row's order: h 2L + ch - (h half + c).
  int64_t position(int64_t c, int64_t ch) const {
    const int64_t h = ch >= half;
    return h * 2 * L + ch - h * half - c;
  }
  ColumnAt at(int64_t c) const { return ColumnAt{C, half, c, {swapped[0], swapped[1]}}; }
  // The first partial slot of channel ch's branch in item b: (b G + g) m.
  int64_t slot0(int64_t b, int64_t ch) const { return (b * groups + ch / (2 * m)) * m; }
};

// The column's half h of one row of x, split by role. (One half a call: returning both halves as
// an array of RoleSplit cost the backward about 20% more instructions, through memory.)
template <int M, typename scalar_t>
inline RoleSplit column_x(const scalar_t* row, int h, ColumnAt col) {
  const auto [x0, x1] = load_pair(row + col.input(h));
  return split_roles<M>(x0, x1, col.swapped[h]);
}

// sums[0 .. L) += v, in double.
inline void add_wide(double* sums, const FloatVec& v) {
  using VecD = at::vec::Vectorized<double>;
  constexpr int64_t L = FloatVec::size();
  alignas(64) float lanes[L];
  v.store(lanes);
  for (int64_t l = 0; l < L; l += VecD::size()) {
    (VecD::loadu(sums + l) + load_wide(lanes + l)).store(sums + l);
  }
}

}  // namespace sa_cuda::cpu
