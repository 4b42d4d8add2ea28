// exp on a vector of float lanes, written out in the kernels' own loops (AVX2 + FMA builds).
//
// Every gate of both variants is sigmoid(z) = 1 / (1 + exp(-z)) (sa_math.h), and at::vec's
// Vectorized<float>::exp is a call into Sleef (Sleef_expf8_u10): about 43 instructions a vector
// with the call, and a call makes gcc spill every live vector register around it, which is why
// the kernels by columns used to take their exps in loops of their own. exp_lanes is a Cody-Waite
// reduction and Cephes' degree-7 polynomial, inlined: 22 instructions, no call.
//
// Accuracy, measured on all 2^32 floats against float64 exp: within 1.01 units in the last place
// of the exact value (Sleef's u10, which eager PyTorch's sigmoid uses: within 1.0); +inf above
// ln(FLT_MAX); subnormal results within one subnormal spacing, 0 below about -103.97; NaN for NaN.
// tests/kernels/test_vec_exp.py checks every 61st float: tests/native/vec_exp_check.cpp compiles
// this header on its own (it needs no ATen).
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace sa_cuda::cpu {

// exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2 / 2, ln2 / 2] (ln 2 in two
// parts, so that n ln2_hi is exact), exp(r) = 1 + r + r^2 P(r) with Cephes' expf coefficients.
// 2^n is formed from the exponent bits in two factors 2^(n >> 1) 2^(n - (n >> 1)): after the clamp
// n lies in [-150, 128], so each factor is a normal float, the product rounds once to a
// subnormal at the low end and overflows to inf at the top. Always inlined (sa_math.h,
// SA_HOST_DEVICE, says why).
__attribute__((always_inline)) inline __m256 exp_lanes(__m256 x) {
  // min / max return their second operand when either is NaN: x, so NaN goes on through.
  const __m256 hi = _mm256_set1_ps(88.72283935546875f);  // above ln(FLT_MAX): exp rounds to inf
  const __m256 lo = _mm256_set1_ps(-104.0f);             // exp(-104) rounds to 0
  x = _mm256_max_ps(lo, _mm256_min_ps(hi, x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2_hi: 9 bits, exact
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);     // ln2 - ln2_hi
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 scale1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 scale2 =
      _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, n1), bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, scale1), scale2);
}

}  // namespace sa_cuda::cpu
#endif
