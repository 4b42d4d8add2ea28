// Shuffle Attention math shared by every kernel (C++ CPU and CUDA alike).
//
// Everything here is a small inline function of scalars (or of at::vec::Vectorized lanes on the
// CPU: the element-wise formulas are templates over the value type, so the vector body and the
// scalar tail of a loop run the same expression). DESIGN.md sections 1-3 give the math.
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

template <typename V>
SA_HOST_DEVICE V sigmoid(const V& z) {
  return V(1) / (V(1) + sa_exp(V(0) - z));
}

// The spatial branch multiplies x by sigmoid(z), z = sw * y + sb with the GroupNorm output
// y = scale * (x - mu) + gb, scale = gw * r (DESIGN.md section 2 folds this further into
// a * x + b; we do not): centering before the multiply keeps z accurate when |mu| >> std (r large;
// r = 1 / sqrt(eps) for a constant plane), and keeping sw outside keeps z = +-inf, not NaN, for an
// infinite sweight, as in the reference.
template <typename T>
struct SpatialGate {
  T scale, shift, weight, bias;  // gw * r, gb, sw, sb

  template <typename V>
  SA_HOST_DEVICE V z(const V& x_minus_mu) const {
    return V(weight) * (V(scale) * x_minus_mu + V(shift)) + V(bias);
  }
};

template <typename T>
SA_HOST_DEVICE SpatialGate<T> spatial_gate(T sw, T sb, T gw, T gb, T r) {
  return SpatialGate<T>{gw * r, gb, sw, sb};
}

// The shift for summing a plane's values as x - shift (its first value): keeps a large common
// offset out of the sums. An infinite first value would make every term NaN: shift by 0 instead.
template <typename T>
SA_HOST_DEVICE T sum_shift(T first) {
  return (first - first == T(0)) ? first : T(0);  // finite test that also works on the device
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

template <typename T>
SA_HOST_DEVICE T rstd_from_var(T var, T eps) {
  return T(1) / sa_sqrt(var + eps);
}

// d sigmoid(z) / dz expressed with s = sigmoid(z).
template <typename V>
SA_HOST_DEVICE V sigmoid_grad(const V& s) {
  return s * (V(1) - s);
}

// Spatial branch backward, per element (DESIGN.md sections 2-3):
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
