// Shuffle Attention math shared by every kernel (C++ CPU and CUDA alike): the one place of the
// work-unit bookkeeping, the statistics, the gates, the input gradient and the parameter
// gradients. The kernels only choose the order of work and of each sum.
//
// Everything here is a small inline function of scalars (or of at::vec::Vectorized lanes on the
// CPU: the element-wise formulas are templates over the value type, so the vector body and the
// scalar tail of a loop run the same expression). docs/design.md gives the math.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#include "sa_params.h"

// Always inlined, on the host too: they are the bodies of the kernels' inner loops, and the CPU
// kernels' translation units are large enough that gcc's inliner runs out of its growth budget
// and leaves some of them calls (the gate's sigmoid a call per vector, with the vector registers
// spilled around it: SALayer's forward at stage 1 took 1.4x the instructions).
#if defined(__CUDACC__) || defined(__HIPCC__)
#define SA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SA_HOST_DEVICE C10_ALWAYS_INLINE
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

// The pre-shuffle channel that channel_shuffle(u, 2) stores at output channel o: the inverse of
// shuffle_dst (even o from the first half, odd o from the second).
SA_HOST_DEVICE int64_t shuffle_src(int64_t o, int64_t channels) {
  return (o % 2) * (channels / 2) + o / 2;
}

// Element i of a parameter stored in `dtype`, as T. The same conversion as PyTorch's .to(T) of
// the tensor (double -> float rounds to nearest; half and bfloat16 widen exactly).
template <typename T>
SA_HOST_DEVICE T param_value(const void* data, ParamDtype dtype, int64_t i) {
  switch (dtype) {
    case ParamDtype::kFloat64:
      return static_cast<T>(static_cast<const double*>(data)[i]);
    case ParamDtype::kFloat32:
      return static_cast<T>(static_cast<const float*>(data)[i]);
    case ParamDtype::kFloat16:
      return static_cast<T>(static_cast<float>(static_cast<const c10::Half*>(data)[i]));
    default:
      return static_cast<T>(static_cast<float>(static_cast<const c10::BFloat16*>(data)[i]));
  }
}

// One parameter of ForwardParams read as T (p[i]): the kernels read each parameter in its own
// dtype instead of the host casting it (a kernel launch per parameter and call). The dtype is the
// same for every thread, so the switch is a uniform branch; the CUDA kernels read each element a
// few times per block (or stage it in shared memory), the CPU kernels convert once per call
// (csrc/cpu/kernels_cpu.h).
template <typename T>
struct ParamView {
  const void* data;
  ParamDtype dtype;
  SA_HOST_DEVICE T operator[](int64_t i) const { return param_value<T>(data, dtype, i); }
};

template <typename T>
SA_HOST_DEVICE ParamView<T> param_view(const ForwardParams& f, int which) {
  return ParamView<T>{f.params[which], f.param_dtypes[which]};
}

// The tag of an acc_t (float or double) parameter, and whether every parameter is stored in acc_t
// (float32 models, and autocast's float32 parameters): then the kernels read them as plain arrays.
template <typename T>
constexpr ParamDtype acc_param_dtype() {
  return sizeof(T) == 8 ? ParamDtype::kFloat64 : ParamDtype::kFloat32;
}

template <typename T>
SA_HOST_DEVICE bool params_are_acc(const ForwardParams& f) {
  bool all = true;
  for (int i = 0; i < kParamCount; ++i) all = all && f.param_dtypes[i] == acc_param_dtype<T>();
  return all;
}

// The work unit of SALayer: plane b * C + c (batch item b, channel c) of the B * C.
struct PlaneUnit {
  int64_t plane;
  ChannelRole role;
  int64_t out_plane;  // b * C + shuffle_dst(c): its plane of out / grad_out

  // (b * G + g) * m + k: its slot of the backward's partials. A function, not a field: the CUDA
  // backward needs it only after the plane's sums, and a value held across them costs registers
  // (fp32, kVec = 1: 72 instead of 56).
  SA_HOST_DEVICE int64_t slot(const ForwardParams& f) const {
    return (plane / f.channels * f.groups + role.group) * f.branch_channels + role.k;
  }
};

SA_HOST_DEVICE PlaneUnit plane_unit(const ForwardParams& f, int64_t plane) {
  const int64_t C = f.channels, b = plane / C, c = plane % C;
  return PlaneUnit{plane, channel_role(c, f.branch_channels), b * C + shuffle_dst(c, C)};
}

// The SALayer unit whose result lands at plane out_plane of out (b * C + o): plane_unit of
// b * C + shuffle_src(o). The NCHW CPU kernels go through the planes in this order, so that out,
// grad_out and the residual epilogue's tensors (identity, out, grad_identity) are read and written
// in address order, and x, grad_x in two runs (channel k and C / 2 + k), instead of the shuffled
// tensors by every other plane.
// Built from b and c directly, not through plane_unit: two 64-bit divisions a plane instead of
// four (plane_unit's b * C + c over C again, and shuffle_dst), which are most of a 7x7 plane's
// bookkeeping.
SA_HOST_DEVICE PlaneUnit plane_unit_at_output(const ForwardParams& f, int64_t out_plane) {
  const int64_t C = f.channels, b = out_plane / C, c = shuffle_src(out_plane - b * C, C);
  return PlaneUnit{b * C + c, channel_role(c, f.branch_channels), out_plane};
}

// The work unit of ShuffleAttention: one branch of one (batch item b, group g) of the B * G * 2,
// i.e. m planes coupled by the m x m gate matrix. The unit's channels c0 .. c0 + m - 1 lie in one
// half of the channels (c0 and C / 2 = G m are multiples of m), so channel_shuffle sends channel
// c0 + j to shuffle_dst(c0) + 2 j: plane j of out / grad_out is 2 j planes after the first.
struct BranchUnit {
  bool spatial;
  int64_t plane0;      // b * C + c0: the unit's first plane of x (mean, rstd, grad_x alike)
  int64_t out_plane0;  // b * C + shuffle_dst(c0): its first plane of out / grad_out
  int64_t slot0;       // (b * G + g) * m: its first slot of the backward's partials
};

SA_HOST_DEVICE BranchUnit branch_unit(const ForwardParams& f, int64_t unit) {
  const int64_t m = f.branch_channels, C = f.channels, G = f.groups;
  const int64_t b = unit / (2 * G), g = (unit / 2) % G;
  const bool spatial = unit % 2 == 1;
  const int64_t c0 = g * 2 * m + (spatial ? m : 0);
  return BranchUnit{spatial, b * C + c0, b * C + shuffle_dst(c0, C), (b * G + g) * m};
}

// The ShuffleAttention units in the order of their output planes (as plane_unit_at_output): the
// unit of channels q m .. q m + m - 1 (unit q of its batch item) writes every other plane of out
// from 2 q m, and unit q + G fills the planes between, so units 0, G, 1, G + 1, ... (index r of
// the 2 G goes to unit shuffle_src(r, 2 G)) write out region after region.
SA_HOST_DEVICE BranchUnit branch_unit_at_output(const ForwardParams& f, int64_t index) {
  const int64_t units = 2 * f.groups;
  return branch_unit(f, index / units * units + shuffle_src(index % units, units));
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
// Vector lanes (at::vec::Vectorized on the CPU) bring their own exp; the AVX2 build's float lanes
// use exp_lanes (csrc/cpu/vec_exp.h, specialized in csrc/cpu/vec_loops.h).
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

// sigmoid(z) = 1 / (1 + exp(-z)): 0 for z = -inf (exp overflows to inf), 1 for z = +inf.
template <typename V>
SA_HOST_DEVICE V sigmoid(const V& z) {
  return V(1) / (V(1) + sa_exp(V(0) - z));
}

// The residual epilogue of a bottleneck's tail, out = relu(SA(x) + identity), element by element.
// relu(v) = (v <= 0 ? 0 : v) as PyTorch's relu: NaN passes. Its backward passes the gradient where
// out > 0, i.e. where !(out <= 0) (PyTorch's threshold_backward: NaN passes there too). Vector
// lanes (at::vec::Vectorized) select with a compare mask, lane for lane the same value.
SA_HOST_DEVICE float sa_relu(float v) { return v <= 0.0f ? 0.0f : v; }
SA_HOST_DEVICE double sa_relu(double v) { return v <= 0.0 ? 0.0 : v; }
template <typename V>
SA_HOST_DEVICE V sa_relu(const V& v) {
  return V::blendv(v, V(0), v <= V(0));
}
SA_HOST_DEVICE float relu_grad(float grad, float out) { return out <= 0.0f ? 0.0f : grad; }
SA_HOST_DEVICE double relu_grad(double grad, double out) { return out <= 0.0 ? 0.0 : grad; }
template <typename V>
SA_HOST_DEVICE V relu_grad(const V& grad, const V& out) {
  return V::blendv(grad, V(0), out <= V(0));
}
template <typename V>
SA_HOST_DEVICE V residual_relu(const V& y, const V& identity) {
  return sa_relu(y + identity);
}

// A mean as the nearest T (mean) and what that rounding left out (lo): the value is mean + lo.
template <typename T>
struct SplitMean {
  T mean, lo;
};

// shift + mean_d, the mean of values summed relative to shift, split exactly (TwoSum: mean + lo =
// shift + mean_d, no rounding; lo is 0 where the sum is not finite). mean rounded to T is off by up
// to u/2 |mean|, which centering by it alone would carry into every x - mean: on a plane far from
// zero (|mean| / std = 171 in fp32) the normalized value lost ten units of the output to it.
// It relies on IEEE rounding of every operation: a fast-math build would fold lo to 0.
#if defined(__FAST_MATH__) || defined(__USE_FAST_MATH__)
#error "sa_cuda: the statistics need IEEE arithmetic (split_mean); build without fast math"
#endif
template <typename T>
SA_HOST_DEVICE SplitMean<T> split_mean(T shift, T mean_d) {
  const T mean = shift + mean_d;
  const T part = mean - shift;
  const T lo = (shift - (mean - part)) + (mean_d - part);
  return SplitMean<T>{mean, sa_isfinite(lo) ? lo : T(0)};
}

// (x - mean) * input_scale for a mean of center + center_lo (in units of input_scale): x *
// input_scale
// - center rounded once (exact for x * input_scale within a factor 2 of center), then the rest.
// The one formula of every kernel's centering (Standardizer, SpatialGate, the CUDA
// ShuffleAttention's per-channel statistics in shared memory).
template <typename V, typename T>
SA_HOST_DEVICE V centered_value(const V& x, T input_scale, T center, T center_lo) {
  return sa_fma(x, V(input_scale), V(-center)) - V(center_lo);
}

// A plane's statistics, as stored and as the gate uses them.
//
// mean and rstd = 1 / sqrt(var + eps) are the plane's true statistics: stored for the backward and
// returned by the op. The gate needs the normalized value (x - mean) * rstd, computed as
//   (fma(x, input_scale, -center) - center_lo) * gate_rstd
// without forming x - mean. On the fast path input_scale = 1, center = mean, gate_rstd = rstd, and
// center_lo the part of the mean below mean's rounding (split_mean): fma(x, 1, -mean) is x - mean
// rounded once (exact for x within a factor 2 of mean), and subtracting center_lo centers on the
// plane's mean itself. center_lo is 0 where no rest is tracked: the channel branch's wide mean
// (only its gate uses the mean, and it is correctly rounded) and saved statistics (the backward
// centers on the stored mean). A plane whose
// statistics overflow the accumulation type (|x| near its largest finite value: x - shift or the
// squared deviations are not representable) is standardized scaled by input_scale = 2^-e, e from
// max|x| (scaled values below 1 in magnitude): center = mean * input_scale, gate_rstd = 1 /
// sqrt(var_s + eps s^2) with var_s the variance of the scaled values. Then rstd = gate_rstd *
// input_scale may be subnormal (it only feeds the backward) and the gate keeps full precision.
template <typename T>
struct Standardizer {
  T mean, rstd;  // the plane's true statistics
  // (x - mean) * rstd = (x * input_scale - center - center_lo) * gate_rstd
  T input_scale, center, center_lo, gate_rstd;

  // (x - mean) * input_scale.
  template <typename V>
  SA_HOST_DEVICE V centered(const V& x) const {
    return centered_value(x, input_scale, center, center_lo);
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
// mean_s (+ mean_lo, split_mean's rest; 0 where none is tracked) and (biased) variance var_s. e = 0
// (unscaled) gives today's statistics bit for bit.
template <typename T>
SA_HOST_DEVICE Standardizer<T> finish_stats(T mean_s, T var_s, T eps, int e, T mean_lo = T(0)) {
  if (e == 0) {
    const T r = rstd_from_var(var_s, eps);
    return Standardizer<T>{mean_s, r, T(1), mean_s, mean_lo, r};
  }
  const T gate_rstd = T(1) / sa_sqrt(var_s + sa_ldexp(eps, -2 * e));
  return Standardizer<T>{
      sa_ldexp(mean_s, e), sa_ldexp(gate_rstd, -e), sa_ldexp(T(1), -e), mean_s, mean_lo, gate_rstd};
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
  return Standardizer<T>{mean, rstd, T(1), mean, T(0), rstd};
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
// y = scale * xc + gb, xc = (x - mu) * input_scale, scale = gw * gate_rstd (docs/design.md
// folds this further into a * x + b; we do not): centering before the multiply keeps z accurate
// when |mu| >> std (r large; r = 1 / sqrt(eps) for a constant plane), and keeping sw outside keeps
// z = +-inf, not NaN, for an infinite sweight, as in the reference.
template <typename T>
struct SpatialGate {
  T scale, shift, weight, bias;      // gw * gate_rstd, gb, sw, sb
  T input_scale, center, center_lo;  // of the plane's Standardizer

  template <typename V>
  SA_HOST_DEVICE V z(const V& x) const {
    const V xc = centered_value(x, input_scale, center, center_lo);
    return V(weight) * (V(scale) * xc + V(shift)) + V(bias);
  }
};

template <typename T>
SA_HOST_DEVICE SpatialGate<T> spatial_gate(T sw, T sb, T gw, T gb, const Standardizer<T>& st) {
  return SpatialGate<T>{gw * st.gate_rstd, gb, sw, sb, st.input_scale, st.center, st.center_lo};
}

// The shift for summing a plane's values as x - shift (its first value): keeps a large common
// offset out of the sums. An infinite first value would make every term NaN: shift by 0 instead.
template <typename T>
SA_HOST_DEVICE T sum_shift(T first) {
  return sa_isfinite(first) ? first : T(0);
}

// (W v + bias)[j] and (W^T v)[i], W [m, m] row-major; W and bias are anything indexable as T
// (a T pointer, a ParamView<T>).
template <typename T, typename Weight, typename Bias>
SA_HOST_DEVICE T matvec_row(const Weight& W, const T* v, const Bias& bias, int64_t m, int64_t j) {
  T acc = bias[j];
  for (int64_t i = 0; i < m; ++i) acc += W[j * m + i] * v[i];
  return acc;
}

template <typename T, typename Weight>
SA_HOST_DEVICE T matvec_t_row(const Weight& W, const T* v, int64_t m, int64_t i) {
  T acc = T(0);
  for (int64_t j = 0; j < m; ++j) acc += W[j * m + i] * v[j];
  return acc;
}

template <typename T>
SA_HOST_DEVICE void matvec(const T* W, const T* v, const T* bias, int64_t m, T* y) {
  for (int64_t j = 0; j < m; ++j) y[j] = matvec_row(W, v, bias, m, j);
}

// d sigmoid(z) / dz expressed with s = sigmoid(z).
template <typename V>
SA_HOST_DEVICE V sigmoid_grad(const V& s) {
  return s * (V(1) - s);
}

// The backward (docs/design.md), per element: u = x * s, the gate's input gradient
//   t = dL/dz = gu * x * s (1 - s)
// and the input gradient of a plane, one formula for both variants and every kernel:
//   dx = gu * s + beta                                   (channel branch)
//   dx = gu * s + alpha * (dy - d1 - xh * d2)            (spatial branch)
// dy is the gradient at the GroupNorm output up to the factor alpha takes: t itself for SALayer
// (dy = sw t), W2^T t for ShuffleAttention. The channel branch has a constant gate s (its z
// depends on the mean only), dL/dmu = dmu and beta = dmu / N. The spatial branch, with
// coef = gw * r, is gu s + coef (dy - mean(dy) - xh mean(dy xh)): alpha = coef (times sw for
// SALayer), d1 = mean(dy), d2 = mean(dy xh) without that factor. dy - d1 is taken before the
// multiply by alpha: on a near-constant plane r (so alpha) is large and dy - d1 cancels, and
// alpha * dy - alpha * d1 would lose the difference to the rounding of the two products.
// The spatial terms are added only on spatial planes: a channel plane's rstd may be inf (eps = 0
// and a constant plane), and 0 * inf is NaN.
template <typename V>
SA_HOST_DEVICE V gate_input_grad(const V& gu, const V& x, const V& s) {
  return gu * x * sigmoid_grad(s);
}

// beta: the channel branch's constant term (0 on spatial planes); alpha, d1, d2: the spatial
// branch's (0 on channel planes).
template <typename T>
struct InputGradCoeffs {
  T alpha, beta, d1, d2;
};

template <typename T>
SA_HOST_DEVICE InputGradCoeffs<T> channel_grad_coeffs(T dmu, T inv_n) {
  return InputGradCoeffs<T>{T(0), dmu * inv_n, T(0), T(0)};
}

// d1_sum = N d1 and d2_sum = N d2 (SALayer: T1 = sum_p t and T2 = sum_p t xh;
// ShuffleAttention: shuffle_attention_spatial_coeffs).
template <typename T>
SA_HOST_DEVICE InputGradCoeffs<T> spatial_grad_coeffs(T alpha, T d1_sum, T d2_sum, T inv_n) {
  return InputGradCoeffs<T>{alpha, T(0), d1_sum * inv_n, d2_sum * inv_n};
}

// gu * s: the term of dx both branches share.
template <typename V>
SA_HOST_DEVICE V gated_grad(const V& gu, const V& s) {
  return gu * s;
}

template <typename V>
SA_HOST_DEVICE V channel_input_grad(const V& gu, const V& s, const V& beta) {
  return gated_grad(gu, s) + beta;
}

// What the spatial branch adds to channel_input_grad(gu, s, beta).
template <typename V, typename T>
SA_HOST_DEVICE V spatial_grad_terms(const V& dy, const V& xh, const InputGradCoeffs<T>& k) {
  return V(k.alpha) * (dy - V(k.d1) - xh * V(k.d2));
}

// From gated = gated_grad(gu, s), formed earlier (the CPU's channels_last backward keeps it).
template <typename V, typename T>
SA_HOST_DEVICE V spatial_input_grad_gated(const V& gated, const V& dy, const V& xh,
                                          const InputGradCoeffs<T>& k) {
  return (gated + V(k.beta)) + spatial_grad_terms(dy, xh, k);
}

template <typename V, typename T>
SA_HOST_DEVICE V spatial_input_grad(const V& gu, const V& s, const V& dy, const V& xh,
                                    const InputGradCoeffs<T>& k) {
  return spatial_input_grad_gated(gated_grad(gu, s), dy, xh, k);
}

// ShuffleAttention's spatial branch: dy(p) = W2^T t(p), so for channel i
//   N mean(dy_i) = sum_j W2[j, i] T1[j],   N mean(dy_i xh_i) = sum_j W2[j, i] A[j, i]
// with T1[j] = sum_p t_j and A[j, i] = sum_p t_j xh_i (W2 and A [m, m] row-major).
// W2: anything indexable as T (a T pointer, a ParamView<T>).
template <typename T, typename Weight>
SA_HOST_DEVICE InputGradCoeffs<T> shuffle_attention_spatial_coeffs(const Weight& W2, const T* T1,
                                                                   const T* A, int64_t m, int64_t i,
                                                                   T coef, T inv_n) {
  T d1 = 0, d2 = 0;
  for (int64_t j = 0; j < m; ++j) {
    d1 += W2[j * m + i] * T1[j];
    d2 += W2[j * m + i] * A[j * m + i];
  }
  return spatial_grad_coeffs(coef, d1, d2, inv_n);
}

// ---------------------------------------------------------------------------------------------
// The parameter gradients from the backward kernels' per-(batch item, group) partials
// (sa_params.h): the terms, their weighting and the stores, shared by the CPU loop
// (csrc/cpu/backward_cpu.cpp) and the CUDA kernel (csrc/cuda/param_grad_reduce.cuh), which only
// choose the order of each sum.
// ---------------------------------------------------------------------------------------------
//
// Each gradient entry is a short weighted list of slot sums,
//   grad = w_0 S_0 + w_1 S_1 + ...,   S_k = sum over the B * G slots s of term_k(s),
// every sum taken in double in a fixed order and weighted after it is complete (an infinite
// parameter times a zero sum is NaN, as in the reference; it must not meet a partial sum). With
// dz = gate_grad, T1 = sum_s t_sum, A = sum_s t_xh and mu the channel-branch plane means:
//   SALayer [k]:      d_cw = sum_s dz mu    d_cb = sum_s dz     d_sw = gw A + gb T1
//                     d_sb = T1             d_gw = sw A         d_gb = sw T1
//   ShuffleAttention
//             [j, i]: d_cw = sum_s dz_j mu_i                    d_sw = gw_i A[j, i] + gb_i T1[j]
//             [j]:    d_cb = sum_s dz_j     d_sb = T1[j]
//             [i]:    d_gw = sum_j W2[j, i] A[j, i]             d_gb = sum_j W2[j, i] T1[j]
// The entry is stored converted to its parameter's dtype (double -> float -> half/bfloat16, as
// PyTorch's conversion of a double tensor does).

// Elements of parameter `which` (schema order, kParamCount) and of its gradient: ShuffleAttention's
// two weights are [m, m], everything else [m].
SA_HOST_DEVICE int64_t param_numel(Variant variant, int64_t m, int which) {
  return variant == Variant::kShuffleAttention && (which == 0 || which == 2) ? m * m : m;
}

// Partials per slot of t_xh (sa_params.h): m for SALayer, m * m for ShuffleAttention.
SA_HOST_DEVICE int64_t t_xh_width(Variant variant, int64_t m) {
  return variant == Variant::kShuffleAttention ? m * m : m;
}

SA_HOST_DEVICE int64_t param_grad_entries(Variant variant, int64_t m) {
  return variant == Variant::kShuffleAttention ? 2 * m * m + 4 * m : 6 * m;
}

// term(s) = values[s * stride + offset], times mu[s * 2m + mu_offset] when mu is set.
template <typename acc_t>
struct SlotTerm {
  const acc_t* values;
  int64_t stride, offset;
  const acc_t* mu;
  int64_t mu_stride, mu_offset;
  double weight;

  SA_HOST_DEVICE double operator()(int64_t s) const {
    const double v = static_cast<double>(values[s * stride + offset]);
    return mu ? v * static_cast<double>(mu[s * mu_stride + mu_offset]) : v;
  }
};

// sum_{s = first, first + step, ... < slots} term(s) in double, in this order.
template <typename acc_t>
SA_HOST_DEVICE double slot_sum(const SlotTerm<acc_t>& term, int64_t first, int64_t step,
                               int64_t slots) {
  double sum = 0;
  for (int64_t s = first; s < slots; s += step) sum += term(s);
  return sum;
}

// One gradient entry: which gradient (0..5), its element, its weighted slot sums.
template <typename acc_t>
struct ParamGradEntry {
  const BackwardParams* p;
  Variant variant;
  int which;
  int64_t index;
  int terms;  // number of weighted sums

  SA_HOST_DEVICE SlotTerm<acc_t> term(int k) const {
    const ForwardParams& f = p->fwd;
    const int64_t m = f.branch_channels;
    const acc_t* dz = static_cast<const acc_t*>(p->gate_grad);
    const acc_t* t_sum = static_cast<const acc_t*>(p->t_sum);
    const acc_t* t_xh = static_cast<const acc_t*>(p->t_xh);
    const acc_t* mean = static_cast<const acc_t*>(f.mean);
    // The weights as the kernels' math reads them (acc_t), then widened.
    const ParamView<acc_t> sw = param_view<acc_t>(f, kSpatialWeight);
    const ParamView<acc_t> gw = param_view<acc_t>(f, kGnWeight);
    const ParamView<acc_t> gb = param_view<acc_t>(f, kGnBias);
    // The mean of channel-branch channel k of slot s = (b, g) sits at b * C + g * 2m + k = s * 2m +
    // k.
    if (variant == Variant::kSALayer) {
      const int64_t k_ = index;
      switch (which) {
        case 0:
          return {dz, m, k_, mean, 2 * m, k_, 1.0};
        case 1:
          return {dz, m, k_, nullptr, 0, 0, 1.0};
        case 2:
          return k == 0 ? SlotTerm<acc_t>{t_xh, m, k_, nullptr, 0, 0, double(gw[k_])}
                        : SlotTerm<acc_t>{t_sum, m, k_, nullptr, 0, 0, double(gb[k_])};
        case 3:
          return {t_sum, m, k_, nullptr, 0, 0, 1.0};
        case 4:
          return {t_xh, m, k_, nullptr, 0, 0, double(sw[k_])};
        default:
          return {t_sum, m, k_, nullptr, 0, 0, double(sw[k_])};
      }
    }
    const int64_t j = index / m, i = index % m;  // [j, i] of the matrices
    switch (which) {
      case 0:
        return {dz, m, j, mean, 2 * m, i, 1.0};
      case 1:
        return {dz, m, index, nullptr, 0, 0, 1.0};
      case 2:
        return k == 0 ? SlotTerm<acc_t>{t_xh, m * m, index, nullptr, 0, 0, double(gw[i])}
                      : SlotTerm<acc_t>{t_sum, m, j, nullptr, 0, 0, double(gb[i])};
      case 3:
        return {t_sum, m, index, nullptr, 0, 0, 1.0};
      // d_gw[i], d_gb[i]: term k is row j = k of column i.
      case 4:
        return {t_xh, m * m, k * m + index, nullptr, 0, 0, double(sw[k * m + index])};
      default:
        return {t_sum, m, k, nullptr, 0, 0, double(sw[k * m + index])};
    }
  }

  // total after term k's sum: w_0 S_0 first (no 0 + that would turn -0 into +0), then + w_k S_k.
  // `term` is term(k), which the caller formed for its sum (forming it costs some 100
  // instructions: the CPU reduction forms about a thousand a call).
  SA_HOST_DEVICE static double accumulate(double total, int k, const SlotTerm<acc_t>& term,
                                          double sum) {
    const double weighted = term.weight * sum;
    return k == 0 ? weighted : total + weighted;
  }

  // Stores the entry. An empty batch (no slots, no kernel ran) has exactly zero gradients: the
  // formulas would give 0 * inf = NaN for an infinite parameter.
  SA_HOST_DEVICE void store(double total) const {
    const double v = p->fwd.batch == 0 ? 0.0 : total;
    void* out = p->param_grads[which];
    switch (p->fwd.param_dtypes[which]) {
      case ParamDtype::kFloat64:
        static_cast<double*>(out)[index] = v;
        break;
      case ParamDtype::kFloat32:
        static_cast<float*>(out)[index] = static_cast<float>(v);
        break;
      case ParamDtype::kFloat16:
        static_cast<c10::Half*>(out)[index] = c10::Half(static_cast<float>(v));
        break;
      case ParamDtype::kBFloat16:
        static_cast<c10::BFloat16*>(out)[index] = c10::BFloat16(static_cast<float>(v));
        break;
    }
  }
};

// Entry e of the gradients laid end to end in schema order.
template <typename acc_t>
SA_HOST_DEVICE ParamGradEntry<acc_t> param_grad_entry(const BackwardParams& p, Variant variant,
                                                      int64_t e) {
  const int64_t m = p.fwd.branch_channels;
  int which = 0;
  while (e >= param_numel(variant, m, which)) e -= param_numel(variant, m, which++);
  const bool weighted_pair = which == 2;  // d_sw: A and T1
  const bool column = variant == Variant::kShuffleAttention && which >= 4;  // d_gw, d_gb: m rows
  return ParamGradEntry<acc_t>{&p, variant, which, e, weighted_pair ? 2 : column ? int(m) : 1};
}

}  // namespace sa_cuda
