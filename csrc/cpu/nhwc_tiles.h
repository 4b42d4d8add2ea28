// channels_last (NHWC) work units of the CPU kernels: tiles of channels of one batch item.
//
// In NHWC the channels of a pixel are contiguous and a plane is strided by C, so a plane is not a
// unit to read on its own (every element on another cache line). A tile is `width` channels of
// each half of the channels, [c0, c0 + width) and [C/2 + c0, C/2 + c0 + width), over all pixels:
// channel_shuffle sends exactly these 2 * width channels to the output channels
// [2 c0, 2 c0 + 2 width), so the tile's output is one contiguous run of every output pixel. A tile
// is read from x once (rows of `width` contiguous channels, pixel after pixel), transposed in cache
// into acc_t planes, and the NCHW kernels' unit bodies run on those planes unchanged: the same math
// in the same order, so NHWC gives NCHW's results bit for bit. The output planes are transposed
// back into out (grad_x) once. The tile is sized to stay in the L2 cache between the two.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../sa_math.h"
#include "vec_loops.h"

namespace sa_cuda::cpu {

struct ChannelTile {
  int64_t batch;  // b
  int64_t first;  // c0, in [0, C/2)
  int64_t width;  // channels taken from each half

  // The channel of the tile's plane `index` in input order (the first half's channels, then the
  // second's). Its output plane is shuffle_dst(channel) - 2 c0 in output order.
  int64_t channel(int64_t index, int64_t half) const {
    return index < width ? first + index : half + first + index - width;
  }
};

// The tiles of a [B, N, C] tensor. `align` divides every tile's width and first channel: 1 for
// SALayer (planes are independent), m for ShuffleAttention (a branch's m channels are coupled at
// each pixel and must share a tile; C/2 = G m is a multiple of m).
struct ChannelTiling {
  int64_t channels, plane_size, width, per_item;

  ChannelTiling(const ForwardParams& p, int64_t align)
      : channels(p.channels), plane_size(p.plane_size) {
    // About kTileValues values per half-tile in acc_t (x and the output planes of both halves:
    // 4 kTileValues acc_t values, 256 KiB for float, in a 512 KiB L2), at least 8 channels (a
    // 32-byte row of float) and at most 64.
    constexpr int64_t kTileValues = int64_t{1} << 14;
    const int64_t half = channels / 2;
    const int64_t target = std::clamp<int64_t>(kTileValues / plane_size, 8, 64);
    width = std::min(half, std::max<int64_t>(1, target / align) * align);
    per_item = (half + width - 1) / width;
  }

  int64_t count(int64_t batch) const { return batch * per_item; }

  ChannelTile tile(int64_t index) const {
    const int64_t half = channels / 2, c0 = index % per_item * width;
    return ChannelTile{index / per_item, c0, std::min(width, half - c0)};
  }
};

#if defined(CPU_CAPABILITY_AVX2)
// 8 x 8 blocks of float lanes, for the float and 16-bit dtypes (acc_t float): a row of 8 channels
// of a pixel in, a plane's 8 pixels out (and back), 24 shuffles per 64 values instead of 64
// scalar moves.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // exact: bfloat16 is float's upper half
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline __m256 load8(const c10::Half* p) {  // exact
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
template <typename scalar_t>
inline void store8(scalar_t* p, __m256 v) {  // rounded as at::vec::convert (the NCHW path) does
  const at::vec::Vectorized<float> lanes(v);
  const __m256i packed = at::vec::convert_from_float<scalar_t>(lanes, lanes);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

inline void transpose8x8(__m256 r[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // rows 0-3, rows 4-7
    for (int i = 0; i < 2; ++i) {
      s[4 * h + 2 * i] = _mm256_shuffle_ps(t[4 * h + i], t[4 * h + i + 2], _MM_SHUFFLE(1, 0, 1, 0));
      s[4 * h + 2 * i + 1] =
          _mm256_shuffle_ps(t[4 * h + i], t[4 * h + i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    }
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
  }
}
#endif

// planes[j * N + p] = src[p * C + j] as acc_t, for the `count` channels starting at src (rows
// of `count` contiguous values, C apart): one pass over the rows, each value read once.
template <typename scalar_t, typename acc_t>
inline void gather_planes(const scalar_t* src, int64_t C, int64_t pixels, int64_t count,
                          acc_t* planes, int64_t N) {
  int64_t p0 = 0, j0 = 0;
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    j0 = count / 8 * 8;
    for (; p0 + 8 <= pixels; p0 += 8) {
      for (int64_t j = 0; j < j0; j += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = load8(src + (p0 + i) * C + j);
        transpose8x8(r);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(planes + (j + i) * N + p0, r[i]);
      }
    }
  }
#endif
  // The rest: channels past the last block of 8 at every pixel, all channels of the last pixels.
  for (int64_t p = 0; p < pixels; ++p) {
    for (int64_t j = p < p0 ? j0 : 0; j < count; ++j)
      planes[j * N + p] = static_cast<acc_t>(src[p * C + j]);
  }
}

// dst[p * C + j] = planes[j * N + p] in scalar_t, for `count` planes: the inverse of
// gather_planes, each output row of `count` values written once. With `identity` (laid out as
// dst), the residual epilogue on the way: dst = relu(planes + identity) (sa_math.h).
template <typename scalar_t, typename acc_t>
inline void scatter_planes(const acc_t* planes, int64_t N, int64_t pixels, int64_t count,
                           scalar_t* dst, int64_t C, const scalar_t* identity = nullptr) {
  int64_t p0 = 0, j0 = 0;
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    using FloatVec = at::vec::Vectorized<float>;
    j0 = count / 8 * 8;
    for (; p0 + 8 <= pixels; p0 += 8) {
      for (int64_t j = 0; j < j0; j += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(planes + (j + i) * N + p0);
        transpose8x8(r);
        for (int i = 0; i < 8; ++i) {
          const int64_t at = (p0 + i) * C + j;
          if (identity != nullptr) {
            r[i] = residual_relu(FloatVec(r[i]), FloatVec(load8(identity + at)));
          }
          store8(dst + at, r[i]);
        }
      }
    }
  }
#endif
  for (int64_t p = 0; p < pixels; ++p) {
    for (int64_t j = p < p0 ? j0 : 0; j < count; ++j) {
      const acc_t v = planes[j * N + p];
      dst[p * C + j] = static_cast<scalar_t>(
          identity == nullptr ? v : residual_relu(v, static_cast<acc_t>(identity[p * C + j])));
    }
  }
}

// The tile's channels of one batch item of a [B, N, C] tensor as 2 * width planes in input
// order: the first half's, then the second half's.
template <typename scalar_t, typename acc_t>
inline void gather_tile(const scalar_t* item, const ChannelTiling& tiling, const ChannelTile& t,
                        acc_t* planes) {
  const int64_t C = tiling.channels, N = tiling.plane_size;
  gather_planes(item + t.first, C, N, t.width, planes, N);
  gather_planes(item + C / 2 + t.first, C, N, t.width, planes + t.width * N, N);
}

// The tile's 2 * width output planes (output order) into its run of output channels of one batch
// item of a [B, N, C] tensor; with the residual epilogue's identity (that item of it, or null).
template <typename scalar_t, typename acc_t>
inline void scatter_tile(const acc_t* planes, const ChannelTiling& tiling, const ChannelTile& t,
                         scalar_t* item, const scalar_t* identity_item) {
  const int64_t C = tiling.channels, N = tiling.plane_size, first = 2 * t.first;
  scatter_planes(planes, N, N, 2 * t.width, item + first, C,
                 identity_item == nullptr ? nullptr : identity_item + first);
}

}  // namespace sa_cuda::cpu
