// The portable CUDA subset the kernels are written in (DESIGN.md section 6).
//
// Under nvcc these are CUDA itself. Under a host compiler they map to the CPU SIMT emulator in
// emulator.h (one host thread per CUDA thread, barriers for __syncthreads and warp exchanges), so
// the very same kernel source runs in CI without a GPU, under ThreadSanitizer and ASan too.
//
// The subset: threadIdx/blockIdx/blockDim/gridDim (.x), __syncthreads, full-mask warp shuffles
// (__shfl_xor_sync, __shfl_down_sync, __shfl_sync), static shared memory (__shared__ arrays in
// kernels), dynamic shared memory (SA_DYNAMIC_SHARED), aligned vector loads/stores (Pack),
// expf/exp/sqrtf/sqrt through sa_math.h, and launches through sa_cuda::gpu::launch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>

// The kernels' namespace: sa_cuda::gpu in the CUDA build, sa_cuda::emulated in the emulation
// build, so both can be loaded into one process without their symbols interposing.

#if defined(__CUDACC__)

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#define SA_GPU_NS gpu
#define SA_KERNEL __global__
#define SA_DEVICE __device__ __forceinline__
#define SA_DYNAMIC_SHARED(T, name)                                   \
  extern __shared__ __align__(16) unsigned char sa_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(sa_dynamic_smem_)

namespace sa_cuda::SA_GPU_NS {

constexpr unsigned kFullMask = 0xffffffffu;
using Stream = cudaStream_t;

inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }

inline int max_dynamic_shared_bytes() {
  int device = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return bytes;
}

template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes, Stream stream,
            Args&&... args) {
  if (smem_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_bytes)));
  }
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace sa_cuda::SA_GPU_NS

#else  // host compiler: the SIMT emulator

#include "emulator.h"

#define SA_GPU_NS emulated
#define SA_KERNEL
#define SA_DEVICE inline
#define __shared__ static
#define SA_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::sa_emu::dynamic_shared_memory())

namespace sa_cuda::SA_GPU_NS {

constexpr unsigned kFullMask = 0xffffffffu;
using Stream = void*;

inline Stream current_stream() { return nullptr; }
inline int max_dynamic_shared_bytes() { return static_cast<int>(::sa_emu::kMaxSharedBytes); }

template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes, Stream,
            Args&&... args) {
  ::sa_emu::launch(grid, block, smem_bytes, [&] { kernel(args...); });
}

}  // namespace sa_cuda::SA_GPU_NS

#endif

namespace sa_cuda::SA_GPU_NS {

// N values of T moved as one aligned access (a 128-bit load/store when sizeof(T) * N == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T val[N];
};

template <typename T, int N>
SA_DEVICE Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
SA_DEVICE void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

}  // namespace sa_cuda::SA_GPU_NS
