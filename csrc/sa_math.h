// Shuffle Attention math shared by every kernel (C++ CPU and CUDA alike).
//
// Everything here is a small inline function of scalars (or of at::vec::Vectorized lanes on the
// CPU: the element-wise formulas are templates over the value type, so the vector body and the
// scalar tail of a loop run the same expression). docs/design.md gives the math.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SA_HOST_DEVICE inline
#endif

namespace sa_cuda {

// ---------------------------------------------------------------------------------------------
// Channel bookkeeping. x is [B, C, H, W] with G groups of 2m channels: m channel-branch channels
// followed by m spatial-branch channels. Parameters are indexed by k and shared by all groups.
// ---------------------------------------------------------------------------------------------
struct ChannelRole {
  int64_t group;  // g = c / (2m)
  int64_t k;      // parameter index inside the branch, 0 <= k < m
  bool spatial;   // false: channel branch (mean gate), true: spatial branch (GroupNorm gate)
};

SA_HOST_DEVICE ChannelRole channel_role(int64_t c, int64_t m) {
  const int64_t r = c % (2 * m);
  return ChannelRole{c / (2 * m), r < m ? r : r - m, r >= m};
}

// channel_shuffle(u, 2): pre-shuffle channel c is stored at output channel shuffle_dst(c).
// The shuffle is free in a fused kernel: it is only the address the result goes to.
SA_HOST_DEVICE int64_t shuffle_dst(int64_t c, int64_t channels) {
  const int64_t half = channels / 2;
  return 2 * (c % half) + c / half;
}

// ---------------------------------------------------------------------------------------------
// Element-wise math, templated over the value type V (float, double, or a vector of them).
// ---------------------------------------------------------------------------------------------
SA_HOST_DEVICE float sa_exp(float v) {
#if defined(__CUDA_ARCH__)
  return expf(v);
#else
  return std::exp(v);
#endif
}
SA_HOST_DEVICE double sa_exp(double v) {
#if defined(__CUDA_ARCH__)
  return ::exp(v);
#else
  return std::exp(v);
#endif
}
SA_HOST_DEVICE float sa_sqrt(float v) {
#if defined(__CUDA_ARCH__)
  return sqrtf(v);
#else
  return std::sqrt(v);
#endif
}
SA_HOST_DEVICE double sa_sqrt(double v) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(v);
#else
  return std::sqrt(v);
#endif
}
// Vector lanes (at::vec::Vectorized on the CPU) bring their own exp.
template <typename V>
SA_HOST_DEVICE V sa_exp(const V& v) {
  return v.exp();
}

// a * b + c rounded once. Vector lanes: at::vec's fmadd, found by argument-dependent lookup (a
// fused instruction in the AVX2 build; a * b + c in the portable one, which is the same value for
// the power-of-two b this file passes).
SA_HOST_DEVICE float sa_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return fmaf(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
SA_HOST_DEVICE double sa_fma(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return ::fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
template <typename V>
SA_HOST_DEVICE V sa_fma(const V& a, const V& b, const V& c) {
  return fmadd(a, b, c);
}

SA_HOST_DEVICE float sa_frexp(float v, int* e) {
#if defined(__CUDA_ARCH__)
  return frexpf(v, e);
#else
  return std::frexp(v, e);
#endif
}
SA_HOST_DEVICE double sa_frexp(double v, int* e) {
#if defined(__CUDA_ARCH__)
  return ::frexp(v, e);
#else
  return std::frexp(v, e);
#endif
}
SA_HOST_DEVICE float sa_ldexp(float v, int e) {
#if defined(__CUDA_ARCH__)
  return ldexpf(v, e);
#else
  return std::ldexp(v, e);
#endif
}
SA_HOST_DEVICE double sa_ldexp(double v, int e) {
#if defined(__CUDA_ARCH__)
  return ::ldexp(v, e);
#else
  return std::ldexp(v, e);
#endif
}

// Finite test that also works on the device and under any floating-point mode (inf - inf and
// NaN - NaN are NaN).
template <typename T>
SA_HOST_DEVICE bool sa_isfinite(T v) {
  return v - v == T(0);
}

// max(a, b) that propagates NaN (so that a plane holding a NaN has a non-finite max|x|).
template <typename T>
SA_HOST_DEVICE T max_nan(T a, T b) {
  return (a > b || a != a) ? a : b;
}

template <typename V>
SA_HOST_DEVICE V sigmoid(const V& z) {
  return V(1) / (V(1) + sa_exp(V(0) - z));
}

// A plane's statistics, as stored and as the gate uses them.
//
// mean and rstd = 1 / sqrt(var + eps) are the plane's true statistics: stored for the backward and
// returned by the op. The gate needs the normalized value (x - mean) * rstd, computed as
//   fma(x, input_scale, -center) * gate_rstd
// without forming x - mean. On the fast path input_scale = 1, center = mean, gate_rstd = rstd
// (fma(x, 1, -mean) is x - mean rounded once, bit for bit). A plane whose statistics overflow the
// accumulation type (|x| near its largest finite value: x - shift or the squared deviations are
// not representable) is standardized scaled by input_scale = 2^-e, e from max|x| (scaled values
// below 1 in magnitude): center = mean * input_scale, gate_rstd = 1 / sqrt(var_s + eps s^2) with
// var_s the variance of the scaled values. Then rstd = gate_rstd * input_scale may be subnormal
// (it only feeds the backward) and the gate keeps full precision.
template <typename T>
struct Standardizer {
  T mean, rstd;                      // the plane's true statistics
  T input_scale, center, gate_rstd;  // (x - mean) * rstd = (x * input_scale - center) * gate_rstd

  // (x - mean) * input_scale, rounded once.
  template <typename V>
  SA_HOST_DEVICE V centered(const V& x) const {
    return sa_fma(x, V(input_scale), V(-center));
  }

  // The normalized value xh = (x - mean) * rstd. Products with xh (t * xh in the backward) are
  // formed after normalizing: t * (x - mean) would be of order |x|^2 and overflow first.
  template <typename V>
  SA_HOST_DEVICE V normalized(const V& x) const {
    return centered(x) * V(gate_rstd);
  }
};

template <typename T>
SA_HOST_DEVICE T rstd_from_var(T var, T eps) {
  return T(1) / sa_sqrt(var + eps);
}

// The Standardizer of a plane whose moments were accumulated over the values x * 2^-e: their mean
// mean_s and (biased) variance var_s. e = 0 (unscaled) gives today's statistics bit for bit.
template <typename T>
SA_HOST_DEVICE Standardizer<T> finish_stats(T mean_s, T var_s, T eps, int e) {
  if (e == 0) {
    const T r = rstd_from_var(var_s, eps);
    return Standardizer<T>{mean_s, r, T(1), mean_s, r};
  }
  const T gate_rstd = T(1) / sa_sqrt(var_s + sa_ldexp(eps, -2 * e));
  return Standardizer<T>{sa_ldexp(mean_s, e), sa_ldexp(gate_rstd, -e), sa_ldexp(T(1), -e), mean_s,
                         gate_rstd};
}

// The mean of a channel-branch plane, whose gate sigmoid(cw * mu + cb) uses the mean itself: the
// sum of x * scale formed and summed in double (for float x every term is exact and the sum cannot
// overflow), divided once, so the float mean is correctly rounded but for near-ties. The shifted
// sum's mean is only accurate to u |mu - shift| (u * std for a centered plane, where |mu| << std),
// and that error reaches the output as |x| s (1 - s) |cw| d mu, which is not scale-invariant (at
// std ~ 1e4, ten times eager's error). The CPU kernels vectorize the same sum (vec_loops.h).
template <typename T>
SA_HOST_DEVICE double wide_term(T x, T scale) {
  return static_cast<double>(x) * static_cast<double>(scale);
}

template <typename T>
SA_HOST_DEVICE T wide_mean(double sum, int64_t n) {
  return static_cast<T>(sum / static_cast<double>(n));
}

// The Standardizer of saved statistics (the backward's), unscaled.
template <typename T>
SA_HOST_DEVICE Standardizer<T> saved_stats(T mean, T rstd) {
  return Standardizer<T>{mean, rstd, T(1), mean, rstd};
}

// Whether the unscaled statistics overflowed. Every term they sum is finite unless x - shift,
// x - mean or its square is out of range, and a sum with a non-finite term is not finite: so an
// overflow anywhere shows as a non-finite mean or variance (a plane holding inf or NaN too).
template <typename T>
SA_HOST_DEVICE bool stats_overflowed(T mean, T var) {
  return !(sa_isfinite(mean) && sa_isfinite(var));
}

// The exponent e of the rescale 2^-e for a plane with the given max|x| (frexp: max|x| = f 2^e,
// 0.5 <= f < 1, so every |x| 2^-e < 1, and x 2^-e - shift 2^-e and the squared deviations of the
// scaled values stay below 4), or 0 for "keep the unscaled statistics": a plane holding inf or
// NaN (max|x| not finite) keeps them, inf or NaN as in the reference.
template <typename T>
SA_HOST_DEVICE int rescale_exponent(T max_abs) {
  if (!sa_isfinite(max_abs)) return 0;
  int e = 0;
  sa_frexp(max_abs, &e);
  return e > 0 ? e : 0;
}

// The spatial branch multiplies x by sigmoid(z), z = sw * y + sb with the GroupNorm output
// y = scale * xc + gb, xc = (x - mu) * input_scale, scale = gw * gate_rstd (not folded further
// into a * x + b, docs/design.md#forward): centering before the multiply keeps z accurate
// when |mu| >> std (r large; r = 1 / sqrt(eps) for a constant plane), and keeping sw outside keeps
// z = +-inf, not NaN, for an infinite sweight, as in the reference.
template <typename T>
struct SpatialGate {
  T scale, shift, weight, bias;  // gw * gate_rstd, gb, sw, sb
  T input_scale, center;         // of the plane's Standardizer

  template <typename V>
  SA_HOST_DEVICE V z(const V& x) const {
    const V xc = sa_fma(x, V(input_scale), V(-center));
    return V(weight) * (V(scale) * xc + V(shift)) + V(bias);
  }
};

template <typename T>
SA_HOST_DEVICE SpatialGate<T> spatial_gate(T sw, T sb, T gw, T gb, const Standardizer<T>& st) {
  return SpatialGate<T>{gw * st.gate_rstd, gb, sw, sb, st.input_scale, st.center};
}

// The shift for summing a plane's values as x - shift (its first value): keeps a large common
// offset out of the sums. An infinite first value would make every term NaN: shift by 0 instead.
template <typename T>
SA_HOST_DEVICE T sum_shift(T first) {
  return sa_isfinite(first) ? first : T(0);
}

// (W v + bias)[j] (bias may be null) and (W^T v)[i], W [m, m] row-major.
template <typename T>
SA_HOST_DEVICE T matvec_row(const T* W, const T* v, const T* bias, int64_t m, int64_t j) {
  T acc = bias ? bias[j] : T(0);
  for (int64_t i = 0; i < m; ++i) acc += W[j * m + i] * v[i];
  return acc;
}

template <typename T>
SA_HOST_DEVICE T matvec_t_row(const T* W, const T* v, int64_t m, int64_t i) {
  T acc = T(0);
  for (int64_t j = 0; j < m; ++j) acc += W[j * m + i] * v[j];
  return acc;
}

template <typename T>
SA_HOST_DEVICE void matvec(const T* W, const T* v, const T* bias, int64_t m, T* y) {
  for (int64_t j = 0; j < m; ++j) y[j] = matvec_row(W, v, bias, m, j);
}

template <typename T>
SA_HOST_DEVICE void matvec_t(const T* W, const T* v, int64_t m, T* y) {
  for (int64_t i = 0; i < m; ++i) y[i] = matvec_t_row(W, v, m, i);
}

// Per-plane backward of the per-channel variant, given T1 = sum_p t and T2 = sum_p t * xh over the
// plane (t = gu * x * s (1 - s)):
//   dx = gu * s + beta                               (channel branch: alpha = gamma = 0)
//   dx = gu * s + beta + alpha * t + gamma * xh      (spatial branch)
// The channel branch has a constant gate s, so T1 = sum(gu x) s (1 - s) = dz and beta = cw dz / N.
// The spatial branch has dy = sw * t: alpha = gw r sw, beta = -alpha T1 / N, gamma = -alpha T2 / N.
template <typename T>
struct PlaneGradCoeffs {
  T alpha, beta, gamma;
};

template <typename T>
SA_HOST_DEVICE PlaneGradCoeffs<T> plane_grad_coeffs(bool spatial, T cw, T sw, T gw, T r, T T1, T T2,
                                                    T inv_n) {
  if (!spatial) return PlaneGradCoeffs<T>{T(0), cw * T1 * inv_n, T(0)};
  const T alpha = gw * r * sw;
  return PlaneGradCoeffs<T>{alpha, -alpha * T1 * inv_n, -alpha * T2 * inv_n};
}

// d sigmoid(z) / dz expressed with s = sigmoid(z).
template <typename V>
SA_HOST_DEVICE V sigmoid_grad(const V& s) {
  return s * (V(1) - s);
}

// Spatial branch backward, per element (docs/design.md#backward):
//   t  = dL/dz = gu * x * s * (1 - s)
//   dx = gu * s + coef * (dy - dy_mean - xh * dyxh_mean)
// with coef = gw * r and dy = dL/dy the gradient at the GroupNorm output (sw * t for the
// per-channel variant, W2^T t for the 1x1-conv variant).
template <typename V>
SA_HOST_DEVICE V gate_input_grad(const V& gu, const V& x, const V& s) {
  return gu * x * sigmoid_grad(s);
}

template <typename V>
SA_HOST_DEVICE V spatial_dx(const V& gu, const V& s, const V& dy, const V& xh, const V& coef,
                            const V& dy_mean, const V& dyxh_mean) {
  return gu * s + coef * (dy - dy_mean - xh * dyxh_mean);
}

}  // namespace sa_cuda
