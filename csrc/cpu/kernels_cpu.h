// C++ CPU kernels: one fused pass per work unit (docs/design.md), at::parallel_for over
// units, at::vec inner loops, acc_t = at::opmath_type<scalar_t> (float; double for float64).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>

#include <type_traits>
#include <utility>
#include <vector>

#include "../sa_math.h"
#include "../sa_params.h"
#include "vec_loops.h"

namespace sa_cuda::cpu {

// The six parameters as plain acc_t arrays for the vectorized loops (ForwardParams gives each in
// its own dtype): a parameter already in acc_t is read in place, any other is converted once per
// call (a few KiB). Not copyable: the arrays may point into `converted_`.
template <typename acc_t>
struct ParamArrays {
  const acc_t *cw, *cb, *sw, *sb, *gw, *gb;

  ParamArrays(const ForwardParams& f, Variant variant) {
    const acc_t** arrays[kParamCount] = {&cw, &cb, &sw, &sb, &gw, &gb};
    for (int i = 0; i < kParamCount; ++i) {
      if (f.param_dtypes[i] == acc_param_dtype<acc_t>()) {
        *arrays[i] = static_cast<const acc_t*>(f.params[i]);
        continue;
      }
      const ParamView<acc_t> view = param_view<acc_t>(f, i);
      std::vector<acc_t>& converted = converted_[i];
      converted.resize(param_numel(variant, f.branch_channels, i));
      for (size_t e = 0; e < converted.size(); ++e) converted[e] = view[int64_t(e)];
      *arrays[i] = converted.data();
    }
  }
  ParamArrays(const ParamArrays&) = delete;
  ParamArrays& operator=(const ParamArrays&) = delete;

 private:
  std::vector<acc_t> converted_[kParamCount];
};

// The forward's tensors, typed: x, out and identity in the input dtype, the rest in acc_t.
template <typename scalar_t>
struct ForwardTensors {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  scalar_t* out;
  const scalar_t* identity;  // the residual epilogue's (sa_params.h), or null
  acc_t* mean;
  acc_t* rstd;
  ParamArrays<acc_t> w;

  ForwardTensors(const ForwardParams& p, Variant variant)
      : x(static_cast<const scalar_t*>(p.x)),
        out(static_cast<scalar_t*>(p.out)),
        identity(static_cast<const scalar_t*>(p.identity)),
        mean(static_cast<acc_t*>(p.mean)),
        rstd(static_cast<acc_t*>(p.rstd)),
        w(p, variant) {}

  // Batch item b of identity ([B, C, N] or [B, N, C]: item_size = C N), or null without one.
  const scalar_t* identity_item(int64_t b, int64_t item_size) const {
    return identity == nullptr ? nullptr : identity + b * item_size;
  }
};

// The backward's tensors, typed: the forward's (x, the saved mean and rstd, the parameters; its out
// and identity are unused), grad_out, grad_x and the residual epilogue's out and grad_identity in
// the input dtype, the partials in acc_t.
template <typename scalar_t>
struct BackwardTensors {
  using acc_t = at::opmath_type<scalar_t>;
  ForwardTensors<scalar_t> fwd;
  const scalar_t* grad_out;
  scalar_t* grad_x;
  const scalar_t* out;     // the residual epilogue's forward output (sa_params.h), or null
  scalar_t* grad_identity;  // with out: relu's masked gradient, the gradient of SA(x) too
  acc_t* gate_grad;
  acc_t* t_sum;
  acc_t* t_xh;

  BackwardTensors(const BackwardParams& p, Variant variant)
      : fwd(p.fwd, variant),
        grad_out(static_cast<const scalar_t*>(p.grad_out)),
        grad_x(static_cast<scalar_t*>(p.grad_x)),
        out(static_cast<const scalar_t*>(p.out)),
        grad_identity(static_cast<scalar_t*>(p.grad_identity)),
        gate_grad(static_cast<acc_t*>(p.gate_grad)),
        t_sum(static_cast<acc_t*>(p.t_sum)),
        t_xh(static_cast<acc_t*>(p.t_xh)) {}

  // The gradient of SA(x) on `rows` runs of `count` values, `stride` apart, from `offset` (of
  // grad_out's elements): grad_out itself, or with the residual epilogue relu's masked gradient,
  // which is written to grad_identity here (grad_out and out read once) and read back from there
  // by the caller, from cache. The kernels read grad_out through this, once per element, except
  // SALayer's NCHW float planes of 128 values and more, which mask in the body's first pass
  // (MaskedGradPlane, masks_in_body).
  const scalar_t* sa_grad(int64_t offset, int64_t count, int64_t rows = 1,
                          int64_t stride = 0) const {
    if (out == nullptr) return grad_out + offset;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t at = offset + r * stride;
      relu_grad_run(grad_out + at, out + at, grad_identity + at, count);
    }
    return grad_identity + offset;
  }

  // sa_grad on one run for a streamed grad_identity (stream_planes: the NCHW kernels): the masked
  // gradient goes to grad_identity by streaming stores and to `copy` (count values of the
  // caller's scratch), which is returned, to be read from cache.
  const scalar_t* sa_grad_streamed(int64_t offset, int64_t count, scalar_t* copy) const {
    if (out == nullptr) return grad_out + offset;
    relu_grad_streamed(grad_out + offset, out + offset, grad_identity + offset, copy, count);
    return copy;
  }
};

// Plane sizes compiled in as constants: f(std::integral_constant<int64_t, N>) for the 7x7 and 14x14
// planes (ResNet-50's stages 4 and 3 at 224x224), f(std::integral_constant<int64_t, 0>) for any
// other size (read at run time). On small planes a plane's fixed cost is most of its instructions
// (loop set-up, remainders, block and lane reductions: in the 7x7 SALayer forward ~280 of ~470 a
// plane with the size read at run time); with the size a constant the loops are unrolled and their
// remainders known (docs/kernels.md, "Plane sizes compiled in").
template <typename F>
decltype(auto) with_plane_size(int64_t n, const F& f) {
  switch (n) {
    case 49:
      return f(std::integral_constant<int64_t, 49>{});
    case 196:
      return f(std::integral_constant<int64_t, 196>{});
    default:
      return f(std::integral_constant<int64_t, 0>{});
  }
}

// The plane size of a unit body compiled for kN (with_plane_size): kN, or p.plane_size for 0.
template <int64_t kN>
inline int64_t plane_size(const ForwardParams& p) {
  return kN > 0 ? kN : p.plane_size;
}

// ShuffleAttention's branch sizes compiled in as constants: f(std::integral_constant<int64_t, m>)
// for m = 2, 4, 8 and 16 (SA-ResNet-50's stages 1-4 at G = 64), f(std::integral_constant<int64_t,
// 0>) for any other m (read at run time). A branch's m x m gate matrix runs in loops over m inside
// the loops over pixels: with m a constant they are unrolled and the matrix entries are addressed
// at fixed offsets (docs/kernels.md, "Branch sizes compiled in").
template <typename F>
decltype(auto) with_branch_channels(int64_t m, const F& f) {
  switch (m) {
    case 2:
      return f(std::integral_constant<int64_t, 2>{});
    case 4:
      return f(std::integral_constant<int64_t, 4>{});
    case 8:
      return f(std::integral_constant<int64_t, 8>{});
    case 16:
      return f(std::integral_constant<int64_t, 16>{});
    default:
      return f(std::integral_constant<int64_t, 0>{});
  }
}

// ShuffleAttention's forward branch body compiled for a branch shape: f(kM, kN) as integral
// constants, the branch size of with_branch_channels with the plane size of with_plane_size (each
// 0 where read at run time), every pair. Either alone leaves some shape worse off: m = 8 at 49
// pixels took 1.08x the forward's instructions with m alone than with the plane size alone, m = 16
// at 196 pixels 1.26x with the plane size alone than with m alone; with both, 0.74x and 0.73x of
// the plane size alone (callgrind).
template <typename F>
decltype(auto) with_branch_shape(int64_t m, int64_t n, const F& f) {
  return with_branch_channels(m, [&](auto branch) {
    return with_plane_size(n, [&](auto size) { return f(branch, size); });
  });
}

// The same for the backward branch body, with the plane size compiled in only at SA-ResNet-50's
// stages 3 and 4 at G = 64 ((m, pixels) = (8, 196), (16, 49)): its bodies never had the plane size
// alone (see with_plane_size), so no shape loses it, and every pair costs compile time (the two
// kernel files built side by side on 2 cores: 36 s before the branch sizes, 61 s with these, 68 s
// with every pair in the backward too).
template <typename F>
decltype(auto) with_backward_branch_shape(int64_t m, int64_t n, const F& f) {
  if (m == 8 && n == 196) {
    return f(std::integral_constant<int64_t, 8>{}, std::integral_constant<int64_t, 196>{});
  }
  if (m == 16 && n == 49) {
    return f(std::integral_constant<int64_t, 16>{}, std::integral_constant<int64_t, 49>{});
  }
  return with_branch_channels(
      m, [&](auto branch) { return f(branch, std::integral_constant<int64_t, 0>{}); });
}

// The branch size of a unit body compiled for kM (with_branch_channels): kM, or m for 0.
template <int64_t kM>
inline int64_t branch_size(int64_t m) {
  return kM > 0 ? kM : m;
}

// How many rows of a branch's m x m gate matrix the ShuffleAttention bodies take at once per
// vector of pixels (kM: with_branch_channels): each row's sum is a chain of m dependent FMAs, and
// rows side by side in the loop run their chains in each other's latency, sharing the loads of
// the vector they multiply. Every row is summed over the same terms in the same order either way.
constexpr int64_t matrix_rows(int64_t kM) { return kM > 0 && kM % 4 == 0 ? 4 : (kM == 2 ? 2 : 1); }

// How many planes SALayer's forward body takes at once (sa_layer_planes, forward_cpu.cpp): two at
// the compiled sizes, whose planes are short enough that one plane's chain of dependent steps
// leaves the core idle, one elsewhere. (The backward takes one: docs/kernels.md, "Two planes at
// once".)
constexpr int64_t planes_at_once(int64_t kN) { return kN > 0 ? 2 : 1; }

// f(std::integral_constant<int64_t, u>) for each slot u < kSlots of a unit body that takes several
// planes at once, written out: a loop over the slots kept every slot's statistics in memory (the
// 7x7 forward: 1.03x the instructions).
template <typename F, int64_t... u>
C10_ALWAYS_INLINE void for_each_slot_of(const F& f, std::integer_sequence<int64_t, u...>) {
  (f(std::integral_constant<int64_t, u>{}), ...);
}
template <int64_t kSlots, typename F>
C10_ALWAYS_INLINE void for_each_slot(const F& f) {
  for_each_slot_of(f, std::make_integer_sequence<int64_t, kSlots>{});
}

// The forward on channels_last rows (nhwc_rows.h, forward_nhwc_cpu.cpp) for float lanes: scalar_t
// float, BFloat16, Half.
template <typename scalar_t>
void forward_sa_layer_rows(const ForwardParams& p);
template <typename scalar_t>
void forward_shuffle_attention_rows(const ForwardParams& p);

// The forward of either variant by columns of a channels_last tensor (nhwc_columns.h,
// forward_nhwc_columns.cpp), float lanes, where by_columns says.
template <typename scalar_t>
void forward_columns(Variant variant, const ForwardParams& p);

// The backward of either variant by columns of a channels_last tensor (nhwc_columns.h,
// backward_nhwc_cpu.cpp), float lanes, where by_columns says.
template <typename scalar_t>
void backward_columns(Variant variant, const BackwardParams& p);

void forward(Variant variant, c10::ScalarType dtype, const ForwardParams& params);
void backward(Variant variant, c10::ScalarType dtype, const BackwardParams& params);

}  // namespace sa_cuda::cpu
