// The portable CUDA subset the kernels are written in (docs/kernels.md).
//
// Under nvcc these are CUDA itself. Under a host compiler they map to the CPU SIMT emulator in
// emulator.h (a fiber per CUDA thread, barriers for __syncthreads and warp exchanges), so
// the very same kernel source runs in CI without a GPU, under ThreadSanitizer and ASan too.
//
// The subset: threadIdx/blockIdx/blockDim/gridDim (.x), __syncthreads, full-mask warp shuffles
// (__shfl_xor_sync, __shfl_down_sync, __shfl_sync), static shared arrays (SA_SHARED_ARRAY),
// dynamic shared memory (SA_DYNAMIC_SHARED), aligned vector loads/stores (Pack), global scratch
// memory between the launches of one call (Workspace),
// expf/exp/sqrtf/sqrt through sa_math.h, kernels declared with SA_KERNEL_BOUNDS(max threads per
// block[, min blocks per SM]), and 1-D launches through sa_cuda::SA_GPU_NS::launch (the block count
// checked against the grid limit before it is narrowed to the hardware's 32 bits).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>

#include <c10/util/Exception.h>

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#else
#include "emulator.h"
#endif

namespace sa_cuda {

// A 1-D grid of `blocks` blocks. dim3 holds 32-bit counts and the hardware allows 2^31 - 1 blocks
// in x: a larger int64 count would wrap silently (and launch a fraction of the work).
inline dim3 grid_1d(int64_t blocks) {
  TORCH_CHECK(blocks >= 1 && blocks <= 2147483647, "sa_cuda: a launch needs ", blocks,
              " blocks; the grid limit is 2^31 - 1");
  return dim3(static_cast<unsigned>(blocks));
}

}  // namespace sa_cuda

// The kernels' namespace: sa_cuda::gpu in the CUDA build, sa_cuda::emulated in the emulation
// build, so both can be loaded into one process without their symbols interposing.

#if defined(__CUDACC__)

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#define SA_GPU_NS gpu
// A kernel's largest block, optionally with the blocks per SM it must fit (__launch_bounds__):
// lets ptxas budget registers for it (without it, a kernel that grows past 65536 / threads
// registers fails to launch, on the hardware only).
#define SA_KERNEL_BOUNDS(...) __global__ __launch_bounds__(__VA_ARGS__)
#define SA_SHARED_ARRAY(T, name, count) __shared__ T name[count]
#define SA_DEVICE __device__ __forceinline__
#define SA_DYNAMIC_SHARED(T, name)                                  \
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

// Global memory for the intermediate results of one launcher call (partial sums passed from one
// kernel to the next), from PyTorch's caching allocator: freed when the launcher returns, and the
// allocator's stream order keeps it valid for the kernels it queued on the current stream.
class Workspace {
 public:
  explicit Workspace(size_t bytes)
      : data_(c10::cuda::CUDACachingAllocator::get()->allocate(bytes)) {}
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_.get());
  }

 private:
  c10::DataPtr data_;
};

template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), int64_t blocks, int threads, size_t smem_bytes,
            Stream stream, Args&&... args) {
  const dim3 grid = grid_1d(blocks);
  if (smem_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_bytes)));
  }
  kernel<<<grid, dim3(threads), smem_bytes, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace sa_cuda::SA_GPU_NS

#else  // host compiler: the SIMT emulator

#define SA_GPU_NS emulated
#define SA_KERNEL_BOUNDS(...)
#define SA_DEVICE inline
// Per-launch storage keyed by the declaration site (the address of a tag local to the kernel, one
// per template instantiation), shared by the block's threads and poisoned at each block start.
#define SA_SHARED_ARRAY(T, name, count) \
  static char sa_shared_site_##name;    \
  T(&name)[count] = ::sa_emu::shared_array<T, (count)>(&sa_shared_site_##name)
#define SA_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::sa_emu::dynamic_shared_memory())

namespace sa_cuda::SA_GPU_NS {

constexpr unsigned kFullMask = 0xffffffffu;
using Stream = void*;

inline Stream current_stream() { return nullptr; }
inline int max_dynamic_shared_bytes() { return static_cast<int>(::sa_emu::kMaxSharedBytes); }

// Host memory of exactly the bytes asked for (so that ASan sees an access past them), freed when
// the launcher returns: launches run to completion before launch() returns.
class Workspace {
 public:
  explicit Workspace(size_t bytes) : data_(new unsigned char[bytes > 0 ? bytes : 1]) {}
  template <typename T>
  T* as() const {
    return reinterpret_cast<T*>(data_.get());
  }

 private:
  std::unique_ptr<unsigned char[]> data_;
};

template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), int64_t blocks, int threads, size_t smem_bytes, Stream,
            Args&&... args) {
  ::sa_emu::launch(grid_1d(blocks), dim3(threads), smem_bytes, [&] { kernel(args...); });
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
#if !defined(__CUDACC__)
  ::sa_emu::check_aligned(p, sizeof(Pack<T, N>));
#endif
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
SA_DEVICE void store_pack(T* p, const Pack<T, N>& v) {
#if !defined(__CUDACC__)
  ::sa_emu::check_aligned(p, sizeof(Pack<T, N>));
#endif
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

}  // namespace sa_cuda::SA_GPU_NS
