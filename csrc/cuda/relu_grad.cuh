// The residual epilogue's backward on the CUDA backend: relu's mask of grad_out into grad_identity
// (sa_math.h: relu_grad), one element-wise pass launched before the backward kernel, which then
// reads grad_identity as its grad_out (backward_launch.cuh).
//
// Bytes moved: grad_out and out read, grad_identity written; the backward kernel then reads
// grad_identity where it would have read grad_out. Against a mask fused into the backward kernels'
// reads (as the CPU kernels do: BackwardTensors::sa_grad) that is one more read of n elements,
// from L2 where the tensor fits. The forward's epilogue is fused (team.cuh: store_out).
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

#include "../sa_math.h"
#include "../sa_params.h"
#include "launch_common.cuh"
#include "team.cuh"

namespace sa_cuda::SA_GPU_NS {

constexpr int kReluGradThreads = 256;
constexpr int64_t kReluGradMaxBlocks = 4096;  // a grid-stride loop past that

template <typename scalar_t>
SA_KERNEL_BOUNDS(kReluGradThreads)
void relu_grad_kernel(const scalar_t* grad_out, const scalar_t* out, scalar_t* grad_identity,
                      int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    grad_identity[i] = static_cast<scalar_t>(
        relu_grad(static_cast<acc_t>(grad_out[i]), static_cast<acc_t>(out[i])));
  }
}

// grad_identity = relu_grad(grad_out, out) over the whole tensor (b.out and b.grad_identity set).
template <typename scalar_t>
void launch_relu_grad(const BackwardParams& b) {
  const int64_t n = b.fwd.batch * b.fwd.channels * b.fwd.plane_size;
  const int64_t blocks = std::min(ceil_div(n, kReluGradThreads), kReluGradMaxBlocks);
  launch(&relu_grad_kernel<scalar_t>, blocks, kReluGradThreads, 0, current_stream(),
         static_cast<const scalar_t*>(b.grad_out), static_cast<const scalar_t*>(b.out),
         static_cast<scalar_t*>(b.grad_identity), n);
}

}  // namespace sa_cuda::SA_GPU_NS
