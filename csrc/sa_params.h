// Plain parameter structs filled by the host code (csrc/host.cpp) and read by every kernel.
//
// Layouts (all dense):
//   x, out, grad_out, grad_x,  [B, C, N] in the input dtype (N = H * W; NCHW), or [B, N, C]
//   identity, grad_identity
//                              (channels_last, NHWC) when ForwardParams::channels_last is set
//                              (csrc/host.cpp: a channels_last-contiguous x)
//   mean, rstd                 [B, C] in acc_t (float; double for float64 input)
//   parameters                 each in its own dtype (param_dtypes; any of the four kernel
//                              dtypes, independently of x's), read as acc_t through ParamView
//                              (sa_math.h): no cast kernel per call for a bfloat16 model.
//                              SALayer: every tensor (m); ShuffleAttention: the channel and
//                              spatial weights (m, m) as [out, in], every other tensor (m)
//   backward partials          acc_t, one slot per (batch item, group), every slot written by the
//                              backward kernel, then reduced in a fixed order (no float atomics)
//                              into the parameter gradients (sa_math.h):
//     gate_grad   [B, G, m]       dL/dz of the channel gate
//     t_sum       [B, G, m]       sum_p t_j(p)              (t = dL/dz of the spatial gate)
//     t_xh        [B, G, m]       sum_p t_k(p) xh_k(p)       (SALayer)
//                 [B, G, m, m]    sum_p t_j(p) xh_i(p)       (ShuffleAttention, [j, i])
#pragma once

#include <cstdint>

namespace sa_cuda {

enum class Variant {
  kSALayer,  // SALayer (the paper's layer): cweight/cbias/sweight/sbias, one per channel
  kShuffleAttention,  // ShuffleAttention: the gates are the 1x1 convolutions affine1/affine2
};

// The layer's parameters (and their gradients), in the order of the op schemas and of
// ForwardParams::params.
constexpr int kParamCount = 6;
enum ParamIndex : int {
  kChannelWeight,
  kChannelBias,
  kSpatialWeight,
  kSpatialBias,
  kGnWeight,
  kGnBias,
};

// The dtype of one parameter (and of its gradient): each may differ from x's and from the others.
enum class ParamDtype : int8_t { kFloat64, kFloat32, kFloat16, kBFloat16 };

struct ForwardParams {
  int64_t batch;
  int64_t channels;
  int64_t groups;
  int64_t branch_channels;  // m = C / (2G)
  int64_t plane_size;  // N = H * W
  double eps;

  const void* x;
  void* out;
  // The residual epilogue of a bottleneck's tail, out = relu(SA(x) + identity), when not null:
  // identity is read at out's positions and added before the one store of out.
  const void* identity;
  void* mean;
  void* rstd;

  const void* params[kParamCount];  // ParamIndex order, contiguous
  ParamDtype param_dtypes[kParamCount];

  bool channels_last;  // x, out, grad_out, grad_x are [B, N, C] (NHWC), else [B, C, N]
};

struct BackwardParams {
  ForwardParams fwd;  // shapes, x, parameters; mean/rstd read (saved by the forward); out unused

  const void* grad_out;
  void* grad_x;

  // The residual epilogue's backward, when `out` (the forward's output) is not null: the gradient
  // of SA(x) and of identity is grad_out where out > 0 and 0 elsewhere (relu's mask; NaN passes,
  // as in PyTorch). A kernel reads grad_out and out at a region once, writes the masked gradient
  // to grad_identity, and reads it back from there as the gradient of SA(x) where it reads the
  // region again (CPU: BackwardTensors, MaskedGradPlane; CUDA: sa_grad.cuh).
  const void* out;
  void* grad_identity;

  void* gate_grad;
  void* t_sum;
  void* t_xh;

  // The parameter gradients in schema order, each in its parameter's shape and dtype
  // (fwd.param_dtypes).
  void* param_grads[kParamCount];
};

}  // namespace sa_cuda
