// The parameter gradients from the backward kernels' per-(batch item, group) partials
// (sa_params.h): the terms, their weighting and the stores, shared by the CPU loop
// (csrc/cpu/backward_cpu.cpp) and the CUDA kernel (csrc/cuda/param_grad_reduce.cuh), which only
// choose the order of each sum.
//
// Each gradient entry is a short weighted list of slot sums,
//   grad = w_0 S_0 + w_1 S_1 + ...,   S_k = sum over the B * G slots s of term_k(s),
// every sum taken in double in a fixed order and weighted after it is complete (an infinite
// parameter times a zero sum is NaN, as in the reference; it must not meet a partial sum). With
// dz = gate_grad, T1 = sum_s t_sum, A = sum_s t_xh and mu the channel-branch plane means:
//   per-channel [k]:  d_cw = sum_s dz mu    d_cb = sum_s dz     d_sw = gw A + gb T1
//                     d_sb = T1             d_gw = sw A         d_gb = sw T1
//   1x1-conv [j, i]:  d_cw = sum_s dz_j mu_i                    d_sw = gw_i A[j, i] + gb_i T1[j]
//             [j]:    d_cb = sum_s dz_j     d_sb = T1[j]
//             [i]:    d_gw = sum_j W2[j, i] A[j, i]             d_gb = sum_j W2[j, i] T1[j]
// The entry is stored converted to its parameter's dtype (double -> float -> half/bfloat16, as
// PyTorch's conversion of a double tensor does).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "sa_math.h"
#include "sa_params.h"

namespace sa_cuda {

// Gradients in the order of the op schemas: channel weight, channel bias, spatial weight,
// spatial bias, gn weight, gn bias. The 1x1-conv weights are [m, m], everything else [m].
SA_HOST_DEVICE int64_t param_grad_numel(Variant variant, int64_t m, int which) {
  return variant == Variant::kShuffleAttention && (which == 0 || which == 2) ? m * m : m;
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
SA_HOST_DEVICE double slot_sum(const SlotTerm<acc_t>& term, int64_t first, int64_t step, int64_t slots) {
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
    const acc_t* sw = static_cast<const acc_t*>(f.spatial_weight);
    const acc_t* gw = static_cast<const acc_t*>(f.gn_weight);
    const acc_t* gb = static_cast<const acc_t*>(f.gn_bias);
    // The mean of channel-branch channel k of slot s = (b, g) sits at b * C + g * 2m + k = s * 2m + k.
    if (variant == Variant::kSALayer) {
      const int64_t k_ = index;
      switch (which) {
        case 0: return {dz, m, k_, mean, 2 * m, k_, 1.0};
        case 1: return {dz, m, k_, nullptr, 0, 0, 1.0};
        case 2: return k == 0 ? SlotTerm<acc_t>{t_xh, m, k_, nullptr, 0, 0, double(gw[k_])}
                              : SlotTerm<acc_t>{t_sum, m, k_, nullptr, 0, 0, double(gb[k_])};
        case 3: return {t_sum, m, k_, nullptr, 0, 0, 1.0};
        case 4: return {t_xh, m, k_, nullptr, 0, 0, double(sw[k_])};
        default: return {t_sum, m, k_, nullptr, 0, 0, double(sw[k_])};
      }
    }
    const int64_t j = index / m, i = index % m;  // [j, i] of the matrices
    switch (which) {
      case 0: return {dz, m, j, mean, 2 * m, i, 1.0};
      case 1: return {dz, m, index, nullptr, 0, 0, 1.0};
      case 2: return k == 0 ? SlotTerm<acc_t>{t_xh, m * m, index, nullptr, 0, 0, double(gw[i])}
                            : SlotTerm<acc_t>{t_sum, m, j, nullptr, 0, 0, double(gb[i])};
      case 3: return {t_sum, m, index, nullptr, 0, 0, 1.0};
      // d_gw[i], d_gb[i]: term k is row j = k of column i.
      case 4: return {t_xh, m * m, k * m + index, nullptr, 0, 0, double(sw[k * m + index])};
      default: return {t_sum, m, k, nullptr, 0, 0, double(sw[k * m + index])};
    }
  }

  // total after term k's sum: w_0 S_0 first (no 0 + that would turn -0 into +0), then + w_k S_k.
  SA_HOST_DEVICE double accumulate(double total, int k, double sum) const {
    const double weighted = term(k).weight * sum;
    return k == 0 ? weighted : total + weighted;
  }

  // Stores the entry. An empty batch (no slots, no kernel ran) has exactly zero gradients: the
  // formulas would give 0 * inf = NaN for an infinite parameter.
  SA_HOST_DEVICE void store(double total) const {
    const double v = p->fwd.batch == 0 ? 0.0 : total;
    void* out = p->param_grads[which];
    switch (p->param_grad_dtypes[which]) {
      case ParamDtype::kFloat64: static_cast<double*>(out)[index] = v; break;
      case ParamDtype::kFloat32: static_cast<float*>(out)[index] = static_cast<float>(v); break;
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
SA_HOST_DEVICE ParamGradEntry<acc_t> param_grad_entry(const BackwardParams& p, Variant variant, int64_t e) {
  const int64_t m = p.fwd.branch_channels;
  int which = 0;
  while (e >= param_grad_numel(variant, m, which)) e -= param_grad_numel(variant, m, which++);
  const bool weighted_pair = which == 2;                             // d_sw: A and T1
  const bool column = variant == Variant::kShuffleAttention && which >= 4;   // d_gw, d_gb: m rows
  return ParamGradEntry<acc_t>{&p, variant, which, e, weighted_pair ? 2 : column ? int(m) : 1};
}

}  // namespace sa_cuda
