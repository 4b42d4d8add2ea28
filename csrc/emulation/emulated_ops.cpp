// Test-only build of the CUDA kernels for the CPU SIMT emulator (csrc/cuda/emulator.h): the same
// kernel source and launch code as csrc/cuda/*.cu, compiled by the host compiler, registered as
// torch.ops.sa_cuda_emu.* (the sa_cuda schemas) for CPU tensors. Built by tests/emulation.py.
#include <torch/library.h>

#include "../cuda/backward_launch.cuh"
#include "../cuda/forward_launch.cuh"
#include "../ops.h"

namespace sa_cuda {

TORCH_LIBRARY(sa_cuda_emu, m) {
  define_ops(m);
  // Emulated kernel launches so far in this process (tests take the difference around a call).
  m.def("emulated_launches() -> int", [] { return ::sa_emu::launches(); });
  // The block counts of the emulated launches since the last call.
  m.def("emulated_launch_blocks() -> int[]", [] {
    std::lock_guard<std::mutex> lock(::sa_emu::launch_mutex());
    std::vector<int64_t> blocks;
    blocks.swap(::sa_emu::launch_blocks());
    return blocks;
  });
}

TORCH_LIBRARY_IMPL(sa_cuda_emu, CPU, m) {
  register_backend<&emulated::forward, &emulated::backward>(m);
}

}  // namespace sa_cuda
