// channels_last (NHWC) by rows: the direct forward of the CPU for float lanes (float, bfloat16
// and half x) where the columns of nhwc_columns.h do not apply (by_columns: m neither dividing 8
// nor 16, or C / 2 not a multiple of a column's width) and a tile of nhwc_tiles.h would be narrower
// than 32 channels (forward_cpu.cpp, forward_by_rows; ShuffleAttention only for m dividing 4); and
// the row helpers the columns share (split_roles, BranchMixer, load_pair / store_pair, the lane
// fields). float64, the rest of the backward, ShuffleAttention's other m and wider tiles keep the
// tiles (docs/kernels.md says why).
//
// In NHWC the C channels of a pixel are one contiguous row. The kernel reads x row after row, as
// it lies in memory, and writes each output row once:
//   pass 1  per-channel sums over a chunk of pixels, vectorized over the channels of the row;
//   finish  per channel, the chunks' sums added in chunk order: the statistics, then the channel's
//           gate coefficients as lanes (ChannelLanes);
//   pass 2  the gate row by row. The output row is the two channel halves interleaved
//           (channel_shuffle sends c and C/2 + c to 2c and 2c + 1).
// The chunks are fixed by the shape, not by the thread count, and every sum is taken in one fixed
// order: the results do not depend on the number of threads.
//
// A wave of batch items whose rows fit a few MiB runs the three steps before the next wave starts,
// so that pass 2 re-reads the rows from the L3 cache: x comes from memory once, as in NCHW. The
// tiles of nhwc_tiles.h read strided runs of 32-256 bytes per row instead, which stream at a
// quarter to half the speed of a contiguous read here.
//
// A channel's role alternates in runs of m channels (m channel-branch, m spatial-branch), so a
// vector of channels may hold both. For m = 1, 2, 4 pairs of vectors are split by role
// (split_roles), so that the spatial gate's exp runs on spatial lanes only, as in NCHW; for m a
// multiple of 8 every vector is of one role; otherwise a mixed vector computes both gates and
// blends them (an exp on every lane).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "../sa_math.h"
#include "kernels_cpu.h"
#include "vec_loops.h"

namespace sa_cuda::cpu {

// The partition of the work: waves of batch items, each item's N pixels in chunks of `pixels`.
struct RowChunks {
  int64_t batch, plane_size;
  int64_t pixels;  // per chunk (an item's last chunk may be shorter)
  int64_t per_item;  // chunks per item
  int64_t wave_items;  // items per wave

  // value_bytes: the size of one value of x.
  RowChunks(const ForwardParams& p, int64_t value_bytes)
      : batch(p.batch), plane_size(p.plane_size) {
    const int64_t channels = p.channels;
    // A chunk holds about kChunkValues values (128 KiB of float: the parallel tasks
    // and the first level of the sums); a wave about kWaveBytes, which the L3 keeps for pass 2.
    constexpr int64_t kChunkValues = int64_t{1} << 15;
    constexpr int64_t kWaveBytes = int64_t{4} << 20;
    pixels = std::clamp<int64_t>(kChunkValues / channels, 1, plane_size);
    per_item = (plane_size + pixels - 1) / pixels;
    const int64_t item_bytes = value_bytes * plane_size * channels;
    wave_items = std::clamp<int64_t>(kWaveBytes / item_bytes, 1, std::max<int64_t>(batch, 1));
  }

  int64_t waves() const { return (batch + wave_items - 1) / wave_items; }
  int64_t first_item(int64_t wave) const { return wave * wave_items; }
  int64_t items(int64_t wave) const { return std::min(wave_items, batch - first_item(wave)); }
  // Chunk `chunk` of the items from `first`: [begin, end) pixels of item `item`.
  struct Chunk {
    int64_t item, index, begin, end;
  };
  Chunk chunk(int64_t first, int64_t chunk) const {
    const int64_t q = chunk % per_item, begin = q * pixels;
    return Chunk{first + chunk / per_item, q, begin, std::min(plane_size, begin + pixels)};
  }
};

// Role split of 2L consecutive channels of one half whose first channel starts a run of m
// channel-branch channels (c mod 2m = 0; `swapped`: a run of spatial ones, c mod 2m = m), for m
// dividing L (1, 2, 4, 8 for 8 float lanes): their L channel-branch lanes and L spatial-branch
// lanes as one vector each, so that the spatial gate's exp runs on spatial lanes only, as in
// NCHW (for m = L the two vectors already are one role each). merge_roles is the inverse. The lanes
// come out in an order of their own: a channel's coefficients are packed the same way
// (RowRoles::pack) before the loops read them.
struct RoleSplit {
  FloatVec channel, spatial;
};

// M known at compile time (the loops that run per element dispatch on m once).
template <int M>
inline RoleSplit split_roles(const FloatVec& a, const FloatVec& b, bool swapped) {
  static_assert(FloatVec::size() % M == 0);
  RoleSplit r;
#if defined(CPU_CAPABILITY_AVX2)
  static_assert(FloatVec::size() == 8);
  if constexpr (M == 1) {  // c s c s ...: even and odd lanes
    r = {_mm256_shuffle_ps(a, b, 0x88), _mm256_shuffle_ps(a, b, 0xDD)};
  } else if constexpr (M == 2) {  // c c s s ...: even and odd pairs
    r = {_mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(a), _mm256_castps_pd(b))),
         _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(a), _mm256_castps_pd(b)))};
  } else if constexpr (M == 4) {  // c c c c s s s s: low and high halves
    r = {_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31)};
  } else {  // a vector of each role
    r = {a, b};
  }
#else
  constexpr int64_t L = FloatVec::size();
  float in[2 * L], out[2][L];
  a.store(in);
  b.store(in + L);
  int64_t n[2] = {0, 0};
  for (int64_t l = 0; l < 2 * L; ++l) {
    const int role = l % (2 * M) >= M;
    out[role][n[role]++] = in[l];
  }
  r = {FloatVec::loadu(out[0]), FloatVec::loadu(out[1])};
#endif
  if (swapped) std::swap(r.channel, r.spatial);
  return r;
}

template <int M>
inline std::pair<FloatVec, FloatVec> merge_roles(const RoleSplit& split, bool swapped) {
  static_assert(FloatVec::size() % M == 0);
  const FloatVec& lo = swapped ? split.spatial : split.channel;
  const FloatVec& hi = swapped ? split.channel : split.spatial;
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (M == 1) {
    return {_mm256_unpacklo_ps(lo, hi), _mm256_unpackhi_ps(lo, hi)};
  } else if constexpr (M == 2) {
    return {_mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(lo), _mm256_castps_pd(hi))),
            _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(lo), _mm256_castps_pd(hi)))};
  } else if constexpr (M == 4) {
    return {_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31)};
  } else {
    return {lo, hi};
  }
#else
  constexpr int64_t L = FloatVec::size();
  float in[2][L], out[2 * L];
  lo.store(in[0]);
  hi.store(in[1]);
  int64_t n[2] = {0, 0};
  for (int64_t l = 0; l < 2 * L; ++l) {
    const int role = l % (2 * M) >= M;
    out[l] = in[role][n[role]++];
  }
  return {FloatVec::loadu(out), FloatVec::loadu(out + L)};
#endif
}

// body(std::integral_constant<int, m>{}) for m = 1, 2, 4, 8, 16: the m dividing L, and 2L (both
// builds, AVX2 and the default ISA, have 8 float lanes).
template <typename Body>
inline auto dispatch_m(int64_t m, const Body& body) {
  static_assert(FloatVec::size() == 8);
  switch (m) {
    case 1:
      return body(std::integral_constant<int, 1>{});
    case 2:
      return body(std::integral_constant<int, 2>{});
    case 4:
      return body(std::integral_constant<int, 4>{});
    case 8:
      return body(std::integral_constant<int, 8>{});
    default:
      TORCH_CHECK(m == 16, "dispatch_m: m must be 1, 2, 4, 8 or 16, got ", m);
      return body(std::integral_constant<int, 16>{});
  }
}

// split_roles and merge_roles for an m known at run time (dividing L).
inline RoleSplit split_roles(const FloatVec& a, const FloatVec& b, int64_t m, bool swapped) {
  return dispatch_m(m, [&](auto M) {
    TORCH_CHECK(FloatVec::size() % M() == 0, "split_roles: m must divide ", FloatVec::size());
    return split_roles<std::min<int>(M(), FloatVec::size())>(a, b, swapped);
  });
}

inline std::pair<FloatVec, FloatVec> merge_roles(const RoleSplit& split, int64_t m, bool swapped) {
  return dispatch_m(m, [&](auto M) {
    TORCH_CHECK(FloatVec::size() % M() == 0, "merge_roles: m must divide ", FloatVec::size());
    return merge_roles<std::min<int>(M(), FloatVec::size())>(split, swapped);
  });
}

// The roles of a row's channels for the vector loops. With m dividing L/2, each half's
// channels [0, split_end) go by pairs of vectors through split_roles; every other vector of
// channels c .. c + L - 1 is of one role (kind[c]) or mixed, then computes both gates and blends
// them by spatial_mask (all bits set on spatial-branch lanes).
struct RowRoles {
  enum Kind : uint8_t { kChannel, kSpatial, kMixed };
  int64_t m, half;
  int64_t split_end;  // channels of each half taken by pairs of vectors
  bool swapped[2];  // per half: its first channel is a spatial-branch one
  std::vector<float> spatial_mask;  // [C]
  std::vector<uint8_t> kind;  // [C]

  RowRoles(int64_t C, int64_t m_) : m(m_), half(C / 2), spatial_mask(C), kind(C) {
    constexpr int64_t L = FloatVec::size();
    const bool split = m < L && (L / 2) % m == 0;
    split_end = split ? half / (2 * L) * (2 * L) : 0;
    for (int h = 0; h < 2; ++h) swapped[h] = channel_role(h * half, m).spatial;
    const uint32_t ones = ~uint32_t{0};
    for (int64_t c = 0; c < C; ++c) {
      if (channel_role(c, m).spatial) std::memcpy(&spatial_mask[c], &ones, sizeof(float));
    }
    for (int64_t c = 0; c < C; ++c) {
      bool any_spatial = false, any_channel = false;
      for (int64_t l = c; l < std::min(C, c + L); ++l) {
        (channel_role(l, m).spatial ? any_spatial : any_channel) = true;
      }
      kind[c] = any_spatial && any_channel ? kMixed : any_spatial ? kSpatial : kChannel;
    }
  }

  // Reorders a row of per-channel values (C) the way split_roles reorders x: the channel lanes of
  // the pair at c to [c, c + L), its spatial lanes to [c + L, c + 2 L).
  void pack(float* values) const {
    for_each_pair(
        [&](float* pair, bool swap) {
          const RoleSplit r =
              split_roles(FloatVec::loadu(pair), FloatVec::loadu(pair + L), m, swap);
          r.channel.store(pair);
          r.spatial.store(pair + L);
        },
        values);
  }

 private:
  static constexpr int64_t L = FloatVec::size();
  template <typename F>
  void for_each_pair(const F& f, float* values) const {
    for (int h = 0; h < 2; ++h) {
      for (int64_t c = h * half; c < h * half + split_end; c += 2 * L) f(values + c, swapped[h]);
    }
  }
};

// Every channel of a row, c of the first half with its partner C/2 + c: pair(c) for the pairs of
// vectors [c, c + 2L) of both halves below split_end, then rest(c, V{}) for the others, in
// vectors, then one by one.
template <typename Pair, typename Rest>
inline void for_each_row_block(const RowRoles& roles, const Pair& pair, const Rest& rest) {
  constexpr int64_t L = FloatVec::size();
  for (int64_t c = 0; c < roles.split_end; c += 2 * L) pair(c);
  int64_t c = roles.split_end;
  for (; c + L <= roles.half; c += L) rest(c, FloatVec());
  for (; c < roles.half; ++c) rest(c, float());
}

// Per-channel coefficients of a wave's items as float lanes: field f of item i's channel c at
// data[(f * items + i) * C + c], read as vectors of channels. A field of the other role holds 0
// in a channel's lane (finite values for the lanes a blend discards).
template <int kFields>
struct ChannelLanes {
  int64_t items, channels;
  std::vector<float> data;

  ChannelLanes(int64_t items_, int64_t channels_)
      : items(items_), channels(channels_), data(kFields * items_ * channels_, 0.0f) {}
  float* field(int f, int64_t item) { return data.data() + (f * items + item) * channels; }
  // Every field of an item, in field order.
  std::array<float*, kFields> fields(int64_t item) {
    std::array<float*, kFields> all;
    for (int f = 0; f < kFields; ++f) all[f] = field(f, item);
    return all;
  }
};

// A SpatialGate (sa_math.h) as lanes: its seven fields, kGateFieldCount consecutive lane fields
// from fields[0].
enum SpatialGateField {
  kGateScale,
  kGateShift,
  kGateWeight,
  kGateBias,
  kGateInputScale,
  kGateCenter,
  kGateCenterLo,
  kGateFieldCount
};

// The rows of a [K][N] array of lane fields as the field pointers the helpers below take.
template <size_t K, size_t N>
inline std::array<float*, K> lane_fields(float (&field)[K][N]) {
  std::array<float*, K> fields;
  for (size_t k = 0; k < K; ++k) fields[k] = field[k];
  return fields;
}

template <typename V>
inline SpatialGate<V> spatial_gate_at(float* const* fields, int64_t c) {
  return SpatialGate<V>{load<V>(fields[kGateScale] + c),      load<V>(fields[kGateShift] + c),
                        load<V>(fields[kGateWeight] + c),     load<V>(fields[kGateBias] + c),
                        load<V>(fields[kGateInputScale] + c), load<V>(fields[kGateCenter] + c),
                        load<V>(fields[kGateCenterLo] + c)};
}

inline void set_spatial_gate(float* const* fields, int64_t c, const SpatialGate<float>& g) {
  const float values[kGateFieldCount] = {g.scale,       g.shift,  g.weight,   g.bias,
                                         g.input_scale, g.center, g.center_lo};
  for (int f = 0; f < kGateFieldCount; ++f) fields[f][c] = values[f];
}

// The gate coefficients of a SALayer channel as lanes: the spatial branch's SpatialGate
// (sa_math.h), then the channel branch's constant gate.
enum SALayerField { kConstantGate = kGateFieldCount, kSALayerFields };

// The GroupNorm output y = scale * (x - mean) * input_scale + shift of a ShuffleAttention spatial
// channel as lanes (scale = gw * gate_rstd, shift = gb: the NCHW kernel's formula, with the
// Standardizer's centering), then the channel branch's constant gate.
enum ShuffleAttentionField {
  kNormScale,
  kNormShift,
  kNormInputScale,
  kNormCenter,
  kNormCenterLo,
  kChannelGate,
  kShuffleAttentionFields
};

inline void set_group_norm_output(float* const* field, int64_t c, float gw, float gb,
                                  const Standardizer<float>& st) {
  const float values[kChannelGate] = {gw * st.gate_rstd, gb, st.input_scale, st.center,
                                      st.center_lo};
  for (int f = 0; f < kChannelGate; ++f) field[f][c] = values[f];
}

template <typename V>
inline V group_norm_output_at(float* const* field, const V& x, int64_t c) {
  const V xc = centered_value(x, load<V>(field[kNormInputScale] + c),
                              load<V>(field[kNormCenter] + c), load<V>(field[kNormCenterLo] + c));
  return load<V>(field[kNormScale] + c) * xc + load<V>(field[kNormShift] + c);
}

// A channel's gate coefficients as lanes, at position `lane` of the fields: channel ch, its
// statistics st. The rows (by channel) and the columns (split_roles' order) both set them here.
// SALayer: the channel branch's constant gate sigmoid(cw mu + cb), or the SpatialGate.
inline void set_sa_layer_lanes(float* const* field, int64_t lane, int64_t ch, int64_t m,
                               const Standardizer<float>& st, const ParamArrays<float>& w) {
  const ChannelRole role = channel_role(ch, m);
  const int64_t k = role.k;
  if (!role.spatial) {
    field[kConstantGate][lane] = sigmoid(w.cw[k] * st.mean + w.cb[k]);
    return;
  }
  set_spatial_gate(field, lane, spatial_gate(w.sw[k], w.sb[k], w.gw[k], w.gb[k], st));
}

// ShuffleAttention (m up to 2L): the channel branch's gate sigmoid(W1 mu + b1)[k] over the
// branch's means (branch_mean(i): the mean of its channel i, as NCHW), or the GroupNorm output.
template <typename BranchMean>
inline void set_shuffle_attention_lanes(float* const* field, int64_t lane, int64_t ch, int64_t m,
                                        const Standardizer<float>& st,
                                        const BranchMean& branch_mean,
                                        const ParamArrays<float>& w) {
  const ChannelRole role = channel_role(ch, m);
  const int64_t k = role.k;
  if (!role.spatial) {
    constexpr int64_t kMaxM = 2 * FloatVec::size();  // dispatch_m's largest m
    float mu[kMaxM];
    TORCH_CHECK(m <= kMaxM, "set_shuffle_attention_lanes: m must be at most ", kMaxM);
    for (int64_t i = 0; i < m; ++i) mu[i] = branch_mean(i);
    field[kChannelGate][lane] = sigmoid(matvec_row(w.cw, mu, w.cb, m, k));
    return;
  }
  set_group_norm_output(field, lane, w.gw[k], w.gb[k], st);
}

// The value of the lanes from c by their roles: channel() or spatial() for lanes of one role (a
// scalar lane has its own), both blended by spatial_mask for a mixed vector.
template <typename V, typename Channel, typename Spatial>
inline V by_role(const RowRoles& roles, int64_t c, const Channel& channel, const Spatial& spatial) {
  if constexpr (is_vec<V>::value) {
    switch (roles.kind[c]) {
      case RowRoles::kChannel:
        return channel();
      case RowRoles::kSpatial:
        return spatial();
      default:
        return V::blendv(channel(), spatial(), V::loadu(roles.spatial_mask.data() + c));
    }
  } else {
    return channel_role(c, roles.m).spatial ? spatial() : channel();
  }
}

// rot_D(y): lane l of each run of R lanes takes the run's lane (l + D) mod R. R and D are known at
// compile time, so AVX2 rotates by immediates: within 128-bit lanes (vpermilps) for R = 2, 4, and
// for R = 8 the swapped halves once plus a byte alignment (vpalignr) per D. An index vector
// (vpermps) was reloaded before every rotation where the loops ran out of registers (m = 8, 16:
// 102 reloads a row of a column in ShuffleAttention's backward, callgrind).
template <int R>
constexpr int rotated_lane(int l, int d) {
  return l - l % R + (l % R + d) % R;
}
template <int R, int D>
C10_ALWAYS_INLINE FloatVec rotate(const FloatVec& y) {
  constexpr int64_t L = FloatVec::size();
  static_assert(L % R == 0 && 0 <= D && D < R);
  if constexpr (D == 0) {
    return y;
  } else {
#if defined(CPU_CAPABILITY_AVX2)
    static_assert(L == 8);
    if constexpr (R < 8) {
      constexpr int kImm = rotated_lane<R>(0, D) | rotated_lane<R>(1, D) << 2 |
                           rotated_lane<R>(2, D) << 4 | rotated_lane<R>(3, D) << 6;
      return _mm256_permute_ps(y, kImm);
    } else {
      // swapped = y's 128-bit halves exchanged; per half, the bytes of (hi : lo) from 4 D.
      const __m256i lo = _mm256_castps_si256(y);
      const __m256i swapped = _mm256_castps_si256(_mm256_permute2f128_ps(y, y, 0x01));
      if constexpr (D == 4) return _mm256_castsi256_ps(swapped);
      if constexpr (D < 4) return _mm256_castsi256_ps(_mm256_alignr_epi8(swapped, lo, 4 * D));
      if constexpr (D > 4) return _mm256_castsi256_ps(_mm256_alignr_epi8(lo, swapped, 4 * D - 16));
    }
#else
    alignas(64) float in[L], out[L];
    y.store(in);
    for (int l = 0; l < L; ++l) out[l] = in[rotated_lane<R>(l, D)];
    return FloatVec::loadu(out);
#endif
  }
}

// f(D, rot_D(y)) for D = 0 .. R - 1 in order, D as a std::integral_constant.
template <int R, typename F, int... D>
C10_ALWAYS_INLINE void for_each_rotation(const FloatVec& y, const F& f,
                                         std::integer_sequence<int, D...>) {
  (f(std::integral_constant<int, D>{}, rotate<R, D>(y)), ...);
}
template <int R, typename F>
C10_ALWAYS_INLINE void for_each_rotation(const FloatVec& y, const F& f) {
  for_each_rotation<R>(y, f, std::make_integer_sequence<int, R>{});
}

// ShuffleAttention's m x m matrices on vectors of whole branches: for m dividing L, a vector of
// L / m branches (split_roles keeps each branch in m aligned lanes, in channel order); for m = 2L,
// one branch in two vectors ("slices": slice s holds its channels s L .. s L + L - 1). With runs of
// r = min(m, L) lanes and the slices' vectors y_s, the gate's pre-activation z = b2 + W2 y is
//   z_s = b2 + sum_{s', d} W2_{s, s', d} * rot_d(y_s'),
// rot_d rotating each run of r lanes by d: lane l (channel j = s r + l mod r) of rot_d(y_s')
// holds channel k = s' r + (l mod r + d) mod r, and of W2_{s, s', d} the weight W2[j, k]. m FMAs
// per vector and r - 1 lane permutations per slice (each serves every z_s), against the m^2 FMAs
// per L pixels of the NCHW kernel's planes. The backward's dy = W2^T t is the mixer of the
// transpose (W2[k, j]) without a bias, and its A[j, k] = sum t_j xh_k sums t_s * rot_d(xh_s')
// lane by lane. The lanes of the weights are laid out once per call.
class BranchMixer {
 public:
  static constexpr int64_t L = FloatVec::size();

  // bias: m values, or nullptr for none. m divides L or is 2L.
  BranchMixer(const float* W2, const float* bias, int64_t m, bool transposed = false) : m_(m) {
    TORCH_CHECK(L % m == 0 || m == 2 * L, "BranchMixer: m must divide ", L, " or be ", 2 * L);
    const int64_t run = std::min(m, L), slices = m > L ? m / L : 1;  // mix's R and S
    weight_.assign(slices * slices * run * L, 0.0f);
    bias_.assign(slices * L, 0.0f);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t lane = l % run;
      for (int64_t s = 0; s < slices; ++s) {
        const int64_t j = s * run + lane;
        if (bias != nullptr) bias_[s * L + l] = bias[j];
        for (int64_t s2 = 0; s2 < slices; ++s2) {
          for (int64_t d = 0; d < run; ++d) {
            const int64_t k = s2 * run + (lane + d) % run;
            weight_[((s * slices + s2) * run + d) * L + l] =
                transposed ? W2[k * m + j] : W2[j * m + k];
          }
        }
      }
    }
  }

  // z[0 .. S) of a half's slices y[0 .. S) (S = kSlices: 2 for M = 2L, else 1), M = m.
  template <int M>
  C10_ALWAYS_INLINE void mix(const FloatVec* y, FloatVec* z) const {
    constexpr int R = M < L ? M : L, S = M > L ? M / L : 1;
    for (int s = 0; s < S; ++s) z[s] = FloatVec::loadu(bias_.data() + s * L);
    for (int s2 = 0; s2 < S; ++s2) {
      for_each_rotation<R>(y[s2], [&](auto D, const FloatVec& rotated) {
        for (int s = 0; s < S; ++s) {
          const float* weight = weight_.data() + ((s * S + s2) * R + D()) * L;
          z[s] = at::vec::fmadd(FloatVec::loadu(weight), rotated, z[s]);
        }
      });
    }
  }
  // One vector of whole branches, m (dividing L) known at run time.
  FloatVec mix(const FloatVec& y) const {
    return dispatch_m(m_, [&](auto M) {
      constexpr int kM = std::min<int>(M(), L);
      TORCH_CHECK(M() == kM, "BranchMixer::mix: m must divide ", L);
      FloatVec z;
      mix<kM>(&y, &z);
      return z;
    });
  }

 private:
  int64_t m_;
  std::vector<float> weight_, bias_;
};

// The statistics of channel c of an item (N pixels, C apart) by the NCHW kernels' plane_stats,
// the channel gathered into a plane: for a channel whose statistics overflow float in the rows'
// or the columns' own sums (|x| near float's largest values, or inf/NaN in it; rare: a strided
// read).
template <typename scalar_t>
Standardizer<float> gathered_stats(const scalar_t* item, int64_t C, int64_t N, int64_t c, float eps,
                                   bool spatial) {
  std::vector<float> plane(N);
  for (int64_t p = 0; p < N; ++p) plane[p] = static_cast<float>(item[p * C + c]);
  return plane_stats(plane.data(), N, eps, !spatial);
}

// The Standardizer of channel c of an item (N pixels, C apart) from its mean and variance in
// double (from the rows' or the columns' own sums): the float mean and variance, centered on the
// double mean (center_lo in sa_math.h's Standardizer: what rounding the mean left out);
// gathered_stats where they overflow float.
template <typename scalar_t>
Standardizer<float> moment_stats(const scalar_t* item, int64_t C, int64_t N, double mean_d,
                                 double var_d, int64_t c, float eps, bool spatial) {
  const float mean = static_cast<float>(mean_d);
  const float var = static_cast<float>(var_d < 0 ? 0.0 : var_d);  // rounding; NaN stays NaN
  if (!stats_overflowed(mean, var)) {
    return finish_stats(mean, var, eps, 0, static_cast<float>(mean_d - static_cast<double>(mean)));
  }
  return gathered_stats(item, C, N, c, eps, spatial);
}

// The waves, one after the other: pass 1 over the wave's chunks (in parallel), finish(wave) (which
// turns the wave's sums into its lanes), pass 2 over its chunks, each task ending with
// stream_fence(). (Running the next wave's pass 1
// beside this wave's pass 2, to overlap its reads with the gate arithmetic, was slower here: the
// next wave's rows evict this wave's from the cache before pass 2 re-reads them.)
//   make_wave(first_item, items) -> Wave   (Wave has .first and .items)
//   pass1(wave, chunk, scratch), finish(wave), pass2(wave, chunk, scratch)
// scratch: `scratch_floats` floats per task.
template <typename MakeWave, typename Pass1, typename Finish, typename Pass2>
void run_waves(const RowChunks& rows, int64_t scratch_floats, const MakeWave& make_wave,
               const Pass1& pass1, const Finish& finish, const Pass2& pass2) {
  for (int64_t w = 0; w < rows.waves(); ++w) {
    auto wave = make_wave(rows.first_item(w), rows.items(w));
    const int64_t chunks = wave.items * rows.per_item;
    auto region = [&](const auto& pass) {
      at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scratch(scratch_floats);
        for (int64_t q = begin; q < end; ++q) pass(wave, rows.chunk(wave.first, q), scratch.data());
        stream_fence();
      });
    };
    region(pass1);
    finish(wave);
    region(pass2);
  }
}

// For each channel of a wave's items (in parallel, a few hundred channels per task):
// body(item, c) with item relative to the wave.
template <typename Body>
inline void for_each_channel(int64_t items, int64_t C, const Body& body) {
  at::parallel_for(0, items * C, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) body(i / C, i % C);
  });
}

// totals[i * width + w] = sum over q of sums[(i * per_item + q) * width + w], in chunk order.
inline void chunk_totals(const double* sums, int64_t items, int64_t per_item, int64_t width,
                         double* totals) {
  for (int64_t i = 0; i < items; ++i) {
    double* total = totals + i * width;
    std::copy(sums + i * per_item * width, sums + (i * per_item + 1) * width, total);
    for (int64_t q = 1; q < per_item; ++q) {
      const double* s = sums + (i * per_item + q) * width;
      for (int64_t w = 0; w < width; ++w) total[w] += s[w];
    }
  }
}

}  // namespace sa_cuda::cpu
