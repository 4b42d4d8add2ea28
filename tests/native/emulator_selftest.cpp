// Planted bugs for the checks of the SIMT emulator (csrc/cuda/emulator.h), each next to the same
// kernel without the bug. Built and driven by tests/emulator/test_emulator.py, which asserts on the
// output.
//
//   emulator_selftest poison        a shared-memory read before any thread wrote (static and
//   dynamic
//                                   shared memory): prints each block's result
//   emulator_selftest order         a block reading what the previous block wrote: prints the order
//                                   the blocks ran in and both kernels' results
//   emulator_selftest barrier NAME  one barrier kernel (see kBarrierKernels): prints "ok" or the
//   error emulator_selftest launch        launches the hardware rejects: prints each error
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "cuda/portable.cuh"

using namespace sa_cuda;

namespace {

// c10::Error appends a backtrace to its message.
std::string first_line(const char* what) {
  return std::string(what).substr(0, std::string(what).find('\n'));
}

constexpr int kThreads = 128;
constexpr int kSlots = 32;  // a reduction scratch sized for the largest block (1024 / 32 warps)

// ---- shared memory poisoning -------------------------------------------------------------------
// Each warp publishes its partial sum, then thread 0 adds the partials. The planted bug adds all 32
// slots instead of the block's 4 warps: slots nobody wrote (zero-filled shared memory hid it).
template <bool kDynamic, bool kPlantedBug>
SA_KERNEL_BOUNDS(kThreads)
void warp_partials_sum_kernel(const float* in, float* out) {
  SA_SHARED_ARRAY(float, static_partials, kSlots);
  SA_DYNAMIC_SHARED(float, dynamic_partials);
  float* partials = kDynamic ? dynamic_partials : static_partials;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float v = in[blockIdx.x * blockDim.x + threadIdx.x];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (lane == 0) partials[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    const int used = kPlantedBug ? kSlots : static_cast<int>(blockDim.x / 32);
    float total = 0;
    for (int w = 0; w < used; ++w) total += partials[w];
    out[blockIdx.x] = total;
  }
}

template <bool kDynamic, bool kPlantedBug>
void print_partials_sums(const char* name) {
  constexpr int blocks = 3;
  std::vector<float> in(blocks * kThreads), out(blocks);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i % 7);
  emulated::launch(&warp_partials_sum_kernel<kDynamic, kPlantedBug>, blocks, kThreads,
                   kDynamic ? kSlots * sizeof(float) : 0, nullptr, in.data(), out.data());
  std::printf("%s", name);
  for (float v : out) std::printf(" %.9g", v);
  std::printf("\n");
}

// ---- block order ------------------------------------------------------------------------------
// Block b's value is block b-1's plus one: right only if the blocks run in order (the planted
// bug); the fixed kernel computes it from b alone. Thread 0 also logs the order the blocks ran in.
template <bool kPlantedBug>
SA_KERNEL_BOUNDS(32)
void running_count_kernel(float* out, int* order, int* ran) {
  if (threadIdx.x != 0) return;
  order[(*ran)++] = static_cast<int>(blockIdx.x);
  if (kPlantedBug) {
    out[blockIdx.x] = (blockIdx.x == 0 ? 0.0f : out[blockIdx.x - 1]) + 1.0f;
  } else {
    out[blockIdx.x] = static_cast<float>(blockIdx.x) + 1.0f;
  }
}

void print_ints(const char* name, const std::vector<int>& v) {
  std::printf("%s", name);
  for (int x : v) std::printf(" %d", x);
  std::printf("\n");
}

template <bool kPlantedBug>
void print_running_count(const char* name, int blocks) {
  std::vector<float> out(blocks, 0.0f);
  std::vector<int> order(blocks, -1);
  int ran = 0;
  emulated::launch(&running_count_kernel<kPlantedBug>, blocks, 32, 0, nullptr, out.data(),
                   order.data(), &ran);
  print_ints("order", order);
  std::printf("%s", name);
  for (float v : out) std::printf(" %.9g", v);
  std::printf("\n");
}

// ---- barriers ---------------------------------------------------------------------------------
// 64 threads; each kernel writes out[threadIdx.x]. The "planted" lines are found by the test.
// (A shuffle is a barrier of the warp: every lane of a full-mask shuffle must reach it.)
SA_KERNEL_BOUNDS(64) void sync_in_first_warp_kernel(float* out) {
  out[threadIdx.x] = 1;
  if (threadIdx.x < 32) __syncthreads();  // planted: barrier of warp 0 only
}

SA_KERNEL_BOUNDS(64) void sync_in_one_branch_kernel(float* out) {
  SA_SHARED_ARRAY(float, buf, 64);
  buf[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 48) {
    __syncthreads();  // planted: barrier in one branch
    out[threadIdx.x] = buf[63 - threadIdx.x];
  } else {
    out[threadIdx.x] = 0;
  }
  __syncthreads();  // planted: the other branch's next barrier
}

SA_KERNEL_BOUNDS(64) void sync_count_per_thread_kernel(float* out) {
  for (unsigned i = 0; i <= threadIdx.x % 2; ++i)
    __syncthreads();  // planted: odd threads sync twice
  out[threadIdx.x] = 1;
}

SA_KERNEL_BOUNDS(64) void sync_after_early_return_kernel(float* out) {
  if (threadIdx.x >= 32) return;  // planted: returns, yet the others sync below
  out[threadIdx.x] = 1;
  __syncthreads();  // reached by threads 0-31 only
}

SA_KERNEL_BOUNDS(64) void shuffle_in_half_warp_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 32 < 16)
    v = __shfl_xor_sync(0xffffffffu, v, 1);  // planted: half of each warp shuffles
  out[threadIdx.x] = v;
}

// The fixes: the barrier out of the divergent code.
SA_KERNEL_BOUNDS(64) void sync_uniform_kernel(float* out) {
  SA_SHARED_ARRAY(float, buf, 64);
  buf[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = threadIdx.x < 48 ? buf[63 - threadIdx.x] : 0;
  __syncthreads();
}

// Legal: a warp past the work leaves as a whole and nobody synchronizes the block afterwards (the
// warp-team kernels do this); the others still shuffle within their warp.
SA_KERNEL_BOUNDS(64) void warp_early_return_kernel(float* out) {
  out[threadIdx.x] = 0;
  __syncthreads();
  if (threadIdx.x >= 32) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<float>(threadIdx.x), 1);
}

struct BarrierKernel {
  const char* name;
  void (*kernel)(float*);
};
constexpr BarrierKernel kBarrierKernels[] = {
    {"sync_in_first_warp", &sync_in_first_warp_kernel},
    {"sync_in_one_branch", &sync_in_one_branch_kernel},
    {"sync_count_per_thread", &sync_count_per_thread_kernel},
    {"sync_after_early_return", &sync_after_early_return_kernel},
    {"shuffle_in_half_warp", &shuffle_in_half_warp_kernel},
    {"sync_uniform", &sync_uniform_kernel},
    {"warp_early_return", &warp_early_return_kernel},
};

int run_barrier(const std::string& name) {
  for (const BarrierKernel& k : kBarrierKernels) {
    if (name != k.name) continue;
    std::vector<float> out(64, -1.0f);
    try {
      emulated::launch(k.kernel, 2, 64, 0, nullptr, out.data());
    } catch (const std::exception& e) {
      std::printf("error: %s\n", first_line(e.what()).c_str());
      return 0;
    }
    std::printf("ok");
    for (float v : out) std::printf(" %.9g", v);
    std::printf("\n");
    return 0;
  }
  std::fprintf(stderr, "no barrier kernel %s\n", name.c_str());
  return 2;
}

// ---- launches the hardware rejects ------------------------------------------------------------
int kernel_runs = 0;

SA_KERNEL_BOUNDS(1024) void count_runs_kernel() {
  if (threadIdx.x == 0) ++kernel_runs;
}

SA_KERNEL_BOUNDS(32) void static_shared_over_48k_kernel() {
  SA_SHARED_ARRAY(double, big, 6145);  // 49160 bytes
  big[threadIdx.x] = 0;
}

int run_launch() {
  struct Bad {
    const char* what;
    int64_t blocks;
    int threads;
    size_t smem;
  } bad[] = {
      {"2^31 blocks", int64_t(1) << 31, 32, 0},
      {"2^32 + 1 blocks", (int64_t(1) << 32) + 1, 32, 0},
      {"0 blocks", 0, 32, 0},
      {"-1 blocks", -1, 32, 0},
      {"1025 threads", 1, 1025, 0},
      {"0 threads", 1, 0, 0},
      {"dynamic shared memory over budget", 1, 32, sa_emu::kMaxSharedBytes + 1},
  };
  for (const Bad& b : bad) {
    try {
      emulated::launch(&count_runs_kernel, b.blocks, b.threads, b.smem, nullptr);
      std::printf("NOT rejected %s\n", b.what);
    } catch (const std::exception& e) {
      std::printf("rejected %s: %s\n", b.what, first_line(e.what()).c_str());
    }
  }
  try {
    emulated::launch(&static_shared_over_48k_kernel, 1, 32, 0, nullptr);
    std::printf("NOT rejected static shared memory over 48 KiB\n");
  } catch (const std::exception& e) {
    std::printf("rejected static shared memory over 48 KiB: %s\n", first_line(e.what()).c_str());
  }
  std::printf("kernel runs %d\n", kernel_runs);
  // The limits themselves are fine.
  emulated::launch(&count_runs_kernel, 3, 1024, sa_emu::kMaxSharedBytes, nullptr);
  std::printf("kernel runs %d\n", kernel_runs);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "poison") {
    print_partials_sums<false, false>("static fixed");
    print_partials_sums<false, true>("static planted");
    print_partials_sums<true, false>("dynamic fixed");
    print_partials_sums<true, true>("dynamic planted");
    return 0;
  }
  if (mode == "order" && argc > 2) {
    const int blocks = std::atoi(argv[2]);
    print_running_count<false>("fixed", blocks);
    print_running_count<true>("planted", blocks);
    return 0;
  }
  if (mode == "barrier" && argc > 2) return run_barrier(argv[2]);
  if (mode == "launch") return run_launch();
  std::fprintf(stderr, "usage: emulator_selftest [poison|order BLOCKS|barrier NAME|launch]\n");
  return 2;
}
