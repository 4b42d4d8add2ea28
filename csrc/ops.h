// The op contract of sa_cuda, shared by every backend: the eight op schemas (built from one table
// of the two variants: forward and backward, plain and with the residual epilogue), the host code
// (argument checks, allocation, filling the params struct), and the registration of a backend's
// kernel launchers. A backend (CPU, CUDA, the emulated CUDA) only supplies its launchers; the
// backward launcher also reduces the parameter-gradient partials into the gradients (sa_math.h),
// and is called for an empty batch too (it then writes zero gradients).
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "sa_params.h"

namespace sa_cuda {

using ForwardLauncher = void (*)(Variant, c10::ScalarType, const ForwardParams&);
using BackwardLauncher = void (*)(Variant, c10::ScalarType, const BackwardParams&);

// One variant's ops: <name>_forward and <name>_backward, and <name>_residual_forward and
// <name>_residual_backward (the residual epilogue of a bottleneck's tail: out = relu(SA(x) +
// identity)), whose schemas take the six parameters
// under these names, in this order: channel weight, channel bias, spatial weight, spatial bias,
// GroupNorm weight, GroupNorm bias (the order of ForwardParams and of the returned gradients).
struct VariantOps {
  Variant variant;
  const char* name;
  std::array<const char*, kParamCount> param_names;
};

inline constexpr VariantOps kVariantOps[] = {
    {Variant::kSALayer,
     "sa_layer",
     {"cweight", "cbias", "sweight", "sbias", "gn_weight", "gn_bias"}},
    {Variant::kShuffleAttention,
     "shuffle_attention",
     {"affine1_weight", "affine1_bias", "affine2_weight", "affine2_bias", "gn_weight", "gn_bias"}},
};

constexpr const VariantOps& variant_ops(Variant variant) {
  return kVariantOps[static_cast<int>(variant)];
}

// The six parameter tensors of one call, in schema order.
struct LayerParams {
  std::array<at::Tensor, kParamCount> tensors;
  const at::Tensor& operator[](int i) const { return tensors[i]; }
};

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // out, mean, rstd
// grad_x, then the six parameter gradients in schema order.
using BackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// grad_x, grad_identity, then the six parameter gradients in schema order.
using ResidualBackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                          at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// What run_backward computes: grad_identity is undefined without the residual epilogue.
struct BackwardGrads {
  at::Tensor grad_x, grad_identity;
  std::array<at::Tensor, kParamCount> params;
};

// Every backend's launchers take a channels_last x (and grad_out) as they are
// (ForwardParams::channels_last); any other layout is copied to NCHW. The output and grad_x are in
// x's memory format. identity (forward) and out (backward), when not null, select the residual
// epilogue: tensors of x's shape and dtype, taken in x's layout.
ForwardResult run_forward(Variant variant, const at::Tensor& x, int64_t groups,
                          const LayerParams& params, double eps, ForwardLauncher launch,
                          const at::Tensor* identity = nullptr);

BackwardGrads run_backward(Variant variant, const at::Tensor& grad_out, const at::Tensor& x,
                           const at::Tensor& mean, const at::Tensor& rstd, int64_t groups,
                           const LayerParams& params, BackwardLauncher launch,
                           const at::Tensor* out = nullptr);

// Defines the eight op schemas in a TORCH_LIBRARY block (namespace sa_cuda, or sa_cuda_emu for the
// emulation build of the CUDA kernels).
void define_ops(torch::Library& library);

// The ops' kernels: one signature per direction, instantiated per variant and backend (stateless,
// so the dispatcher takes them as plain functions).
template <Variant kVariant, ForwardLauncher kLaunch>
ForwardResult forward_op(const at::Tensor& x, int64_t groups, const at::Tensor& channel_weight,
                         const at::Tensor& channel_bias, const at::Tensor& spatial_weight,
                         const at::Tensor& spatial_bias, const at::Tensor& gn_weight,
                         const at::Tensor& gn_bias, double eps) {
  const LayerParams params{
      {channel_weight, channel_bias, spatial_weight, spatial_bias, gn_weight, gn_bias}};
  return run_forward(kVariant, x, groups, params, eps, kLaunch);
}

template <Variant kVariant, BackwardLauncher kLaunch>
BackwardResult backward_op(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                           const at::Tensor& rstd, int64_t groups, const at::Tensor& channel_weight,
                           const at::Tensor& channel_bias, const at::Tensor& spatial_weight,
                           const at::Tensor& spatial_bias, const at::Tensor& gn_weight,
                           const at::Tensor& gn_bias) {
  const LayerParams params{
      {channel_weight, channel_bias, spatial_weight, spatial_bias, gn_weight, gn_bias}};
  const BackwardGrads g = run_backward(kVariant, grad_out, x, mean, rstd, groups, params, kLaunch);
  return {g.grad_x, g.params[0], g.params[1], g.params[2], g.params[3], g.params[4], g.params[5]};
}

template <Variant kVariant, ForwardLauncher kLaunch>
ForwardResult residual_forward_op(const at::Tensor& x, const at::Tensor& identity, int64_t groups,
                                  const at::Tensor& channel_weight, const at::Tensor& channel_bias,
                                  const at::Tensor& spatial_weight, const at::Tensor& spatial_bias,
                                  const at::Tensor& gn_weight, const at::Tensor& gn_bias,
                                  double eps) {
  const LayerParams params{
      {channel_weight, channel_bias, spatial_weight, spatial_bias, gn_weight, gn_bias}};
  return run_forward(kVariant, x, groups, params, eps, kLaunch, &identity);
}

template <Variant kVariant, BackwardLauncher kLaunch>
ResidualBackwardResult residual_backward_op(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t groups, const at::Tensor& channel_weight,
    const at::Tensor& channel_bias, const at::Tensor& spatial_weight,
    const at::Tensor& spatial_bias, const at::Tensor& gn_weight, const at::Tensor& gn_bias) {
  const LayerParams params{
      {channel_weight, channel_bias, spatial_weight, spatial_bias, gn_weight, gn_bias}};
  const BackwardGrads g =
      run_backward(kVariant, grad_out, x, mean, rstd, groups, params, kLaunch, &out);
  return {g.grad_x,    g.grad_identity, g.params[0], g.params[1],
          g.params[2], g.params[3],     g.params[4], g.params[5]};
}

// Registers the eight ops of one dispatch key with that backend's launchers; called in the
// backend's TORCH_LIBRARY_IMPL block.
template <ForwardLauncher kForward, BackwardLauncher kBackward>
void register_backend(torch::Library& library) {
  auto register_variant = [&](auto variant) {
    constexpr Variant kVariant = decltype(variant)::value;
    const std::string name = variant_ops(kVariant).name;
    library.impl((name + "_forward").c_str(), TORCH_FN((forward_op<kVariant, kForward>)));
    library.impl((name + "_backward").c_str(), TORCH_FN((backward_op<kVariant, kBackward>)));
    library.impl((name + "_residual_forward").c_str(),
                 TORCH_FN((residual_forward_op<kVariant, kForward>)));
    library.impl((name + "_residual_backward").c_str(),
                 TORCH_FN((residual_backward_op<kVariant, kBackward>)));
  };
  register_variant(std::integral_constant<Variant, Variant::kSALayer>());
  register_variant(std::integral_constant<Variant, Variant::kShuffleAttention>());
}

}  // namespace sa_cuda
