// The gradient of SA(x) as the backward kernels read it (sa_params.h: BackwardParams). Without the
// residual epilogue it is grad_out. With it, it is relu's mask of grad_out (sa_math.h: relu_grad),
// which is also the gradient of identity. The read of each element that comes first in a backward
// (one thread's, once) reads out beside grad_out, masks, and stores the result to grad_identity.
// Reads after that (a second pass, a later kernel) take it back from grad_identity (L2 where it
// fits), where they would otherwise read grad_out again. The masked value is grad_out's own or
// zero, so it round-trips through the input dtype exactly: both reads give the same acc_t bits.
//
// Bytes moved by the epilogue: out read once and grad_identity written once, beside the backward's
// own reads of grad_out. (A separate element-wise kernel before the backward, as this replaced,
// moved grad_out, out and grad_identity, and the backward then read grad_identity once more: one
// more read of the tensor and one more launch.)
#pragma once

#include <cstdint>

#include "../sa_math.h"
#include "../sa_params.h"
#include "team.cuh"

namespace sa_cuda::SA_GPU_NS {

// A thread reads the gradient in two steps: load (grad_out's values, and out's with the epilogue)
// for every value it is about to use, then mask (relu's mask, and the store to grad_identity). A
// store between two loads would hold the second load back (the compiler cannot tell the tensors
// apart), so a kernel with several loads in flight issues all of them before the first mask.
template <typename scalar_t>
struct SaGradRead {
  const scalar_t* grad;     // grad_out, or grad_identity on a reread with the epilogue
  const scalar_t* out;      // the forward's output on a first read with the epilogue, else null
  scalar_t* grad_identity;  // where a first read with the epilogue stores the masked gradient

  // Pack `pack` of the run from element `offset`, as load_acc (the pack width was chosen for
  // grad_out, out and grad_identity too): the gradient into g, out (with the epilogue) into o.
  template <typename acc_t, int kVec>
  SA_DEVICE void load(int64_t offset, int64_t pack, acc_t (&g)[kVec], acc_t (&o)[kVec]) const {
    load_acc<scalar_t, acc_t, kVec>(grad + offset, pack, g);
    if (out != nullptr) load_acc<scalar_t, acc_t, kVec>(out + offset, pack, o);
  }
  // A reread's pack (sa_grad_reread: nothing to mask).
  template <typename acc_t, int kVec>
  SA_DEVICE void load(int64_t offset, int64_t pack, acc_t (&g)[kVec]) const {
    load_acc<scalar_t, acc_t, kVec>(grad + offset, pack, g);
  }
  // The loaded pack's gradient, masked and stored with the epilogue. store: whether this thread
  // owns the store (false on a thread that reads a duplicate to stay in its team's collectives).
  template <typename acc_t, int kVec>
  SA_DEVICE void mask(int64_t offset, int64_t pack, acc_t (&g)[kVec], const acc_t (&o)[kVec],
                      bool store) const {
    if (out == nullptr) return;
#pragma unroll
    for (int i = 0; i < kVec; ++i) g[i] = relu_grad(g[i], o[i]);
    if (store) store_acc<scalar_t, acc_t, kVec>(grad_identity + offset, pack, g);
  }

  // Element e of the [B, C, N] or [B, N, C] tensor, in the same two steps.
  template <typename acc_t>
  SA_DEVICE void load_at(int64_t e, acc_t& g, acc_t& o) const {
    g = static_cast<acc_t>(grad[e]);
    if (out != nullptr) o = static_cast<acc_t>(out[e]);
  }
  template <typename acc_t>
  SA_DEVICE void mask_at(int64_t e, acc_t& g, acc_t o) const {
    if (out == nullptr) return;
    g = relu_grad(g, o);
    grad_identity[e] = static_cast<scalar_t>(g);
  }
};

// The first read of each element: grad_out, masked (and stored) with the epilogue.
template <typename scalar_t>
SA_DEVICE SaGradRead<scalar_t> sa_grad_first_read(const BackwardParams& p) {
  return {static_cast<const scalar_t*>(p.grad_out), static_cast<const scalar_t*>(p.out),
          static_cast<scalar_t*>(p.grad_identity)};
}

// A later read of elements the first read has been through (in this thread, or before a barrier or
// in an earlier kernel): grad_identity with the epilogue, else grad_out.
template <typename scalar_t>
SA_DEVICE SaGradRead<scalar_t> sa_grad_reread(const BackwardParams& p) {
  const void* grad = p.out != nullptr ? p.grad_identity : p.grad_out;
  return {static_cast<const scalar_t*>(grad), nullptr, nullptr};
}

}  // namespace sa_cuda::SA_GPU_NS
