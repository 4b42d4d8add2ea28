// The parameter gradients from the backward kernel's per-(batch item, group) partials: one block
// per gradient entry (sa_math.h gives the math, shared with the CPU backend).
//
// Bytes moved: each entry reads its terms' B * G partials (acc_t, plus the saved channel-branch
// means for d_cw) and writes one value in its parameter's dtype; the partials are a few KiB, so
// the launch is latency-bound. Each sum is taken in double: thread t sums the slots t, t + T, ...
// in order, then the block combines the T sums with team_sum's fixed butterfly. T is a function of
// B * G only, so the result is the same on every run (no atomics).
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "../sa_math.h"
#include "../sa_params.h"
#include "team.cuh"

namespace sa_cuda::SA_GPU_NS {

constexpr int kParamGradMaxThreads = 256;

template <typename acc_t>
SA_KERNEL_BOUNDS(kParamGradMaxThreads)
void param_grad_reduce_kernel(BackwardParams p, Variant variant) {
  SA_SHARED_ARRAY(double, scratch, kWarpSize);
  const ParamGradEntry<acc_t> entry = param_grad_entry<acc_t>(p, variant, blockIdx.x);
  const int64_t slots = p.fwd.batch * p.fwd.groups;
  double total = 0;
  for (int k = 0; k < entry.terms; ++k) {
    const SlotTerm<acc_t> term = entry.term(k);
    double sum[1] = {slot_sum(term, threadIdx.x, blockDim.x, slots)};
    team_sum<false>(sum, scratch);  // every thread gets the same bits
    total = entry.accumulate(total, k, term, sum[0]);
  }
  if (threadIdx.x == 0) entry.store(total);
}

// Launched after the backward kernel on the same stream (also for B = 0: it writes the zeros).
template <typename acc_t>
void launch_param_grad_reduce(Variant variant, const BackwardParams& b) {
  const int64_t entries = param_grad_entries(variant, b.fwd.branch_channels);
  // The smallest warp multiple (a power of two) covering the B * G slots, at most 256 threads.
  const int64_t slots = b.fwd.batch * b.fwd.groups;
  int threads = kWarpSize;
  while (threads < kParamGradMaxThreads && threads < slots) threads *= 2;
  launch(&param_grad_reduce_kernel<acc_t>, entries, threads, 0, current_stream(), b, variant);
}

}  // namespace sa_cuda::SA_GPU_NS
