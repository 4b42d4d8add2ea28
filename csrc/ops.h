// Host side of the sa_cuda ops, shared by every backend: argument checks, allocation, filling the
// params struct. A backend (CPU, CUDA) supplies only its kernel launchers; the backward launcher
// also reduces the parameter-gradient partials into the gradients (param_grads.h), and is called
// for an empty batch too (it then writes zero gradients).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "sa_params.h"

namespace sa_cuda {

using ForwardLauncher = void (*)(Variant, c10::ScalarType, const ForwardParams&);
using BackwardLauncher = void (*)(Variant, c10::ScalarType, const BackwardParams&);

// Parameters in the order of the op schemas: channel weight, channel bias, spatial weight,
// spatial bias, gn weight, gn bias (cweight, cbias, sweight, sbias, gn.weight, gn.bias for the
// per-channel variant; affine1.weight, affine1.bias, affine2.weight, affine2.bias, gn.weight,
// gn.bias for the 1x1-conv variant).
struct LayerParams {
  at::Tensor channel_weight, channel_bias, spatial_weight, spatial_bias, gn_weight, gn_bias;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_forward(Variant variant, const at::Tensor& x,
                                                           int64_t groups, const LayerParams& params,
                                                           double eps, ForwardLauncher launch);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
run_backward(Variant variant, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
             const at::Tensor& rstd, int64_t groups, const LayerParams& params, BackwardLauncher launch);

// Defines the four op schemas in a TORCH_LIBRARY block (namespace sa_cuda, or sa_cuda_emu for the
// emulation build of the CUDA kernels).
#define SA_DEFINE_OPS(m)                                                                      \
  m.def(                                                                                  \
  "sa_layer_forward(Tensor x, int groups, Tensor cweight, Tensor cbias, Tensor sweight, " \
  "Tensor sbias, Tensor gn_weight, Tensor gn_bias, float eps) -> (Tensor, Tensor, Tensor)");\
  m.def(                                                                                  \
  "sa_layer_backward(Tensor grad_out, Tensor x, Tensor mean, Tensor rstd, int groups, "   \
  "Tensor cweight, Tensor cbias, Tensor sweight, Tensor sbias, Tensor gn_weight, "        \
  "Tensor gn_bias) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");         \
  m.def(                                                                                  \
  "shuffle_attention_forward(Tensor x, int groups, Tensor affine1_weight, "               \
  "Tensor affine1_bias, Tensor affine2_weight, Tensor affine2_bias, Tensor gn_weight, "   \
  "Tensor gn_bias, float eps) -> (Tensor, Tensor, Tensor)");                              \
  m.def(                                                                                  \
  "shuffle_attention_backward(Tensor grad_out, Tensor x, Tensor mean, Tensor rstd, "      \
  "int groups, Tensor affine1_weight, Tensor affine1_bias, Tensor affine2_weight, "       \
  "Tensor affine2_bias, Tensor gn_weight, Tensor gn_bias) -> (Tensor, Tensor, Tensor, "   \
  "Tensor, Tensor, Tensor, Tensor)");                                                     \
  static_assert(true)

// Registers the four ops of one dispatch key (CPU, CUDA) with that backend's launchers.
#define SA_REGISTER_BACKEND(NS, KEY, FORWARD_LAUNCHER, BACKWARD_LAUNCHER)                              \
  TORCH_LIBRARY_IMPL(NS, KEY, m) {                                                             \
    m.impl("sa_layer_forward", [](const at::Tensor& x, int64_t groups, const at::Tensor& cw,        \
                                  const at::Tensor& cb, const at::Tensor& sw, const at::Tensor& sb, \
                                  const at::Tensor& gw, const at::Tensor& gb, double eps) {         \
      return ::sa_cuda::run_forward(::sa_cuda::Variant::kSALayer, x, groups,                     \
                                    {cw, cb, sw, sb, gw, gb}, eps, FORWARD_LAUNCHER);               \
    });                                                                                             \
    m.impl("shuffle_attention_forward",                                                             \
           [](const at::Tensor& x, int64_t groups, const at::Tensor& w1, const at::Tensor& b1,      \
              const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& gw,                     \
              const at::Tensor& gb, double eps) {                                                   \
             return ::sa_cuda::run_forward(::sa_cuda::Variant::kShuffleAttention, x, groups,                 \
                                           {w1, b1, w2, b2, gw, gb}, eps, FORWARD_LAUNCHER);        \
           });                                                                                      \
    m.impl("sa_layer_backward",                                                                     \
           [](const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,              \
              const at::Tensor& rstd, int64_t groups, const at::Tensor& cw, const at::Tensor& cb,   \
              const at::Tensor& sw, const at::Tensor& sb, const at::Tensor& gw,                     \
              const at::Tensor& gb) {                                                               \
             return ::sa_cuda::run_backward(::sa_cuda::Variant::kSALayer, grad_out, x, mean,     \
                                            rstd, groups, {cw, cb, sw, sb, gw, gb},                 \
                                            BACKWARD_LAUNCHER);                                     \
           });                                                                                      \
    m.impl("shuffle_attention_backward",                                                            \
           [](const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,              \
              const at::Tensor& rstd, int64_t groups, const at::Tensor& w1, const at::Tensor& b1,   \
              const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& gw,                     \
              const at::Tensor& gb) {                                                               \
             return ::sa_cuda::run_backward(::sa_cuda::Variant::kShuffleAttention, grad_out, x, mean, rstd,  \
                                            groups, {w1, b1, w2, b2, gw, gb}, BACKWARD_LAUNCHER);   \
           });                                                                                      \
  }

}  // namespace sa_cuda
