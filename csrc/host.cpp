// Backend-independent host code of the sa_cuda ops (declared in ops.h).
// Only the operators used here are included, not <ATen/ATen.h> (every operator's declaration):
// the build is faster.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "ops.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>

#include <cstdint>
#include <string>

#include "sa_math.h"

namespace sa_cuda {
namespace {

const char* param_name(Variant variant, int index) {
  return variant_ops(variant).param_names[index];
}

// ", Tensor <name>" for each of the variant's parameters, in schema order.
std::string param_schema(const VariantOps& ops) {
  std::string params;
  for (const char* name : ops.param_names) params += std::string(", Tensor ") + name;
  return params;
}

struct Shape {
  int64_t B, C, G, m, N;
};

// The dtypes the kernels are instantiated for (csrc/dispatch.h). Everything else (float8 kinds,
// complex, integer, bool, quantized) is refused before any memory is touched.
bool is_kernel_dtype(c10::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Every tensor argument: defined, dense (strided, not sparse or nested), a kernel dtype, on x's
// device. Views with the negative bit set are resolved by the caller (resolve_neg).
void check_tensor(const at::Tensor& t, const char* name, const at::Tensor* x) {
  TORCH_CHECK_VALUE(t.defined(), "sa_cuda: ", name, " is undefined");
  TORCH_CHECK_VALUE(t.layout() == at::kStrided && !t.is_nested(), "sa_cuda: ", name,
                    " must be a dense (strided) tensor, got layout ", t.layout());
  TORCH_CHECK_VALUE(is_kernel_dtype(t.scalar_type()), "sa_cuda: ", name,
                    " must be float64, float32, float16 or bfloat16, got ", t.scalar_type());
  if (x != nullptr) {
    TORCH_CHECK_VALUE(t.device() == x->device(), "sa_cuda: ", name, " is on ", t.device(),
                      " but x is on ", x->device());
  }
}

Shape check_input(const at::Tensor& x, int64_t groups) {
  check_tensor(x, "x", nullptr);
  TORCH_CHECK_VALUE(x.dim() == 4, "sa_cuda: x must be 4-D [B, C, H, W], got shape ", x.sizes());
  TORCH_CHECK_VALUE(groups >= 1, "sa_cuda: groups must be an int >= 1, got ", groups);
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(C >= 1, "sa_cuda: C must be positive, got ", C);
  // groups > C / 2 first: then 2 * groups may not even fit in int64.
  TORCH_CHECK_VALUE(groups <= C / 2, "sa_cuda: C (", C, ") must be divisible by 2 * groups (2 * ",
                    groups, " > C)");
  TORCH_CHECK_VALUE(C % (2 * groups) == 0, "sa_cuda: C (", C,
                    ") must be divisible by 2 * groups (2 * ", groups, " = ", 2 * groups, ")");
  TORCH_CHECK_VALUE(x.size(2) >= 1 && x.size(3) >= 1, "sa_cuda: H * W must be >= 1, got ",
                    x.size(2), " x ", x.size(3));
  return Shape{x.size(0), C, groups, C / (2 * groups), x.size(2) * x.size(3)};
}

// A tensor of the residual epilogue (identity, or the forward's out): x's shape and dtype, on x's
// device (the kernels read it at out's positions, in out's dtype).
void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_tensor(t, name, &x);
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), "sa_cuda: ", name, " must have x's shape ", x.sizes(),
                    ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), "sa_cuda: ", name, " must have x's dtype ",
                    x.scalar_type(), ", got ", t.scalar_type());
}

// t in dtype: t itself when it already is (no dispatch of a no-op .to: host time per call).
at::Tensor as_dtype(const at::Tensor& t, c10::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// The kernels' tag for a parameter dtype (check_tensor admits only these four).
ParamDtype param_dtype(c10::ScalarType t) {
  switch (t) {
    case at::kDouble:
      return ParamDtype::kFloat64;
    case at::kFloat:
      return ParamDtype::kFloat32;
    case at::kHalf:
      return ParamDtype::kFloat16;
    case at::kBFloat16:
      return ParamDtype::kBFloat16;
    default:
      TORCH_CHECK(false, "sa_cuda: no kernel parameter dtype ", t);  // unreachable
  }
}

// acc_t of the kernels: float64 for float64 x, else float32 (statistics, partials).
c10::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A new acc_t tensor on x's device.
at::Tensor empty_acc(at::IntArrayRef sizes, const at::Tensor& x) {
  return at::empty(sizes, x.options().dtype(acc_type(x)));
}

// The parameters checked, contiguous, in their own dtypes: the kernels convert on read
// (sa_math.h: ParamView), so a bfloat16 model's call launches no cast kernel.
std::vector<at::Tensor> kernel_params(Variant variant, const LayerParams& p, const at::Tensor& x,
                                      int64_t m) {
  std::vector<at::Tensor> out;
  for (int i = 0; i < kParamCount; ++i) {
    const at::Tensor& t = p[i];
    const int64_t expected = param_numel(variant, m, i);
    check_tensor(t, param_name(variant, i), &x);
    TORCH_CHECK_VALUE(t.numel() == expected, "sa_cuda: ", param_name(variant, i), " must have ",
                      expected, " elements (m = C / (2 * groups) = ", m, "), got shape ",
                      t.sizes());
    out.push_back(t.resolve_neg().contiguous());
  }
  return out;
}

// The memory layout the kernels read and write. NHWC when x is channels_last and not also
// NCHW-contiguous (C = 1 or H = W = 1: then both are the same bytes and the NCHW planes are
// taken); NCHW for everything else (contiguous or not: other strides are copied to NCHW).
bool is_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::MemoryFormat memory_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// A new tensor like the kernels' x (shape, dtype, device, layout): out, grad_x, grad_identity.
at::Tensor empty_in_layout(const at::Tensor& x, bool channels_last) {
  return at::empty(x.sizes(), x.options().memory_format(memory_format(channels_last)));
}

// t in the kernels' layout (a no-op when it already is): dense NCHW or dense NHWC.
at::Tensor in_layout(const at::Tensor& t, bool channels_last) {
  return t.resolve_neg().contiguous(memory_format(channels_last));
}

ForwardParams fill_forward(const Shape& s, double eps, const at::Tensor& x,
                           const std::vector<at::Tensor>& p, bool nhwc) {
  ForwardParams f{};
  f.batch = s.B;
  f.channels = s.C;
  f.groups = s.G;
  f.branch_channels = s.m;
  f.plane_size = s.N;
  f.eps = eps;
  f.channels_last = nhwc;
  f.x = x.const_data_ptr();
  for (int i = 0; i < kParamCount; ++i) {
    f.params[i] = p[i].const_data_ptr();
    f.param_dtypes[i] = param_dtype(p[i].scalar_type());
  }
  return f;
}

}  // namespace

void define_ops(torch::Library& library) {
  for (const VariantOps& ops : kVariantOps) {
    const std::string name = ops.name, params = param_schema(ops);
    const std::string param_grads = "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor";
    library.def((name + "_forward(Tensor x, int groups" + params +
                 ", float eps) -> (Tensor, Tensor, Tensor)")
                    .c_str());
    library.def((name +
                 "_backward(Tensor grad_out, Tensor x, Tensor mean, Tensor rstd, int groups" +
                 params + ") -> (Tensor, " + param_grads + ")")
                    .c_str());
    library.def((name + "_residual_forward(Tensor x, Tensor identity, int groups" + params +
                 ", float eps) -> (Tensor, Tensor, Tensor)")
                    .c_str());
    library.def((name +
                 "_residual_backward(Tensor grad_out, Tensor out, Tensor x, Tensor mean, "
                 "Tensor rstd, int groups" +
                 params + ") -> (Tensor, Tensor, " + param_grads + ")")
                    .c_str());
  }
}

ForwardResult run_forward(Variant variant, const at::Tensor& x_in, int64_t groups,
                          const LayerParams& params, double eps, ForwardLauncher launch,
                          const at::Tensor* identity_in) {
  const Shape s = check_input(x_in, groups);
  const c10::DeviceGuard device_guard(x_in.device());  // kernels launch on x's device
  TORCH_CHECK_VALUE(eps >= 0, "sa_cuda: eps must be a number >= 0, got ", eps);
  if (identity_in != nullptr) check_like_x(*identity_in, "identity", x_in);
  const auto p = kernel_params(variant, params, x_in, s.m);
  const bool nhwc = is_channels_last(x_in);
  const at::Tensor x = in_layout(x_in, nhwc);
  const at::Tensor identity = identity_in != nullptr ? in_layout(*identity_in, nhwc) : at::Tensor();
  at::Tensor out = empty_in_layout(x, nhwc);
  at::Tensor mean = empty_acc({s.B, s.C}, x);
  at::Tensor rstd = empty_acc({s.B, s.C}, x);
  if (x.numel() > 0) {
    ForwardParams f = fill_forward(s, eps, x, p, nhwc);
    f.out = out.mutable_data_ptr();
    f.identity = identity.defined() ? identity.const_data_ptr() : nullptr;
    f.mean = mean.mutable_data_ptr();
    f.rstd = rstd.mutable_data_ptr();
    launch(variant, x.scalar_type(), f);
  }
  return {out, mean, rstd};
}

BackwardGrads run_backward(Variant variant, const at::Tensor& grad_out_in, const at::Tensor& x_in,
                           const at::Tensor& mean_in, const at::Tensor& rstd_in, int64_t groups,
                           const LayerParams& params, BackwardLauncher launch,
                           const at::Tensor* out_in) {
  const Shape s = check_input(x_in, groups);
  const c10::DeviceGuard device_guard(x_in.device());
  check_tensor(grad_out_in, "grad_out", &x_in);
  TORCH_CHECK_VALUE(grad_out_in.sizes() == x_in.sizes(), "sa_cuda: grad_out must have x's shape ",
                    x_in.sizes(), ", got ", grad_out_in.sizes());
  if (out_in != nullptr) check_like_x(*out_in, "out", x_in);
  const char* stat_names[] = {"mean", "rstd"};
  const at::Tensor* stats[] = {&mean_in, &rstd_in};
  for (int i = 0; i < 2; ++i) {
    check_tensor(*stats[i], stat_names[i], &x_in);
    TORCH_CHECK_VALUE(stats[i]->sizes() == at::IntArrayRef({s.B, s.C}) &&
                          stats[i]->scalar_type() == acc_type(x_in),
                      "sa_cuda: ", stat_names[i], " must be the forward's [B, C] = [", s.B, ", ",
                      s.C, "] ", acc_type(x_in) == at::kDouble ? "float64" : "float32",
                      " statistics, got ", stats[i]->sizes(), " ", stats[i]->scalar_type());
  }
  const auto p = kernel_params(variant, params, x_in, s.m);
  const bool nhwc = is_channels_last(x_in);
  const at::Tensor x = in_layout(x_in, nhwc);
  const at::Tensor grad_out = in_layout(as_dtype(grad_out_in, x.scalar_type()), nhwc);
  const at::Tensor mean = mean_in.resolve_neg().contiguous();
  const at::Tensor rstd = rstd_in.resolve_neg().contiguous();
  BackwardGrads grads;
  grads.grad_x = empty_in_layout(x, nhwc);
  // The residual epilogue's: the forward's out in the kernels' layout, and the identity's gradient.
  const at::Tensor out = out_in != nullptr ? in_layout(*out_in, nhwc) : at::Tensor();
  if (out_in != nullptr) grads.grad_identity = empty_in_layout(x, nhwc);

  // The per-(batch item, group) partials of the parameter gradients (layout in sa_params.h), in
  // one allocation: every slot is written by the backward kernel before the reduction reads it.
  const int64_t slots = s.B * s.G;
  at::Tensor partials = empty_acc({slots * (2 * s.m + t_xh_width(variant, s.m))}, x);

  BackwardParams b{};
  b.fwd = fill_forward(s, 0.0, x, p, nhwc);
  b.fwd.mean = const_cast<void*>(mean.const_data_ptr());
  b.fwd.rstd = const_cast<void*>(rstd.const_data_ptr());
  b.grad_out = grad_out.const_data_ptr();
  b.grad_x = grads.grad_x.mutable_data_ptr();
  b.out = out.defined() ? out.const_data_ptr() : nullptr;
  b.grad_identity = out.defined() ? grads.grad_identity.mutable_data_ptr() : nullptr;
  b.gate_grad = partials.mutable_data_ptr();
  b.t_sum = static_cast<char*>(b.gate_grad) + slots * s.m * partials.element_size();
  b.t_xh = static_cast<char*>(b.t_sum) + slots * s.m * partials.element_size();
  for (int i = 0; i < kParamCount; ++i) {
    // Written in full by the reduction, in the parameter's own shape and dtype.
    grads.params[i] = at::empty(params[i].sizes(), x.options().dtype(params[i].scalar_type()));
    b.param_grads[i] = grads.params[i].mutable_data_ptr();
  }
  // The backward kernel (none for B = 0), then one fixed-order reduction of the partials into
  // the six gradients (sa_math.h; exact zeros for B = 0).
  launch(variant, x.scalar_type(), b);
  return grads;
}

}  // namespace sa_cuda
