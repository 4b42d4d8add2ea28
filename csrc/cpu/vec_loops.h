// Loop skeletons for the CPU kernels: a vector body over at::vec::Vectorized<acc_t> lanes, which
// also takes a run's last n % L elements, and a scalar path for runs shorter than a vector that
// calls the same generic lambda with V = acc_t, so each formula is written once.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <memory>
#include <type_traits>
#include <utility>

#include "../sa_math.h"
#include "vec_exp.h"

#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__) && defined(__FMA__)
// The gates' exp on float lanes: exp_lanes (vec_exp.h), inlined, instead of at::vec's call into
// Sleef. Declared here, before any kernel instantiates sa_exp (every CPU kernel includes this
// header); double lanes keep at::vec's exp. Always inlined, as sa_math.h's formulas (SA_HOST_DEVICE
// says why).
template <>
C10_ALWAYS_INLINE at::vec::Vectorized<float> sa_cuda::sa_exp(const at::vec::Vectorized<float>& v) {
  return sa_cuda::cpu::exp_lanes(v);
}
#endif

namespace sa_cuda::cpu {

// The at::parallel_for grain for work units of unit_elements each: tasks of at least
// task_elements elements, so that small units are batched.
inline int64_t grain_for(int64_t unit_elements, int64_t task_elements) {
  return std::max<int64_t>(1, task_elements / std::max<int64_t>(1, unit_elements));
}

// n floats of scratch, aligned as c10's CPU allocator aligns (64 bytes) and not initialized: a
// loop that writes them before it reads them. (A buffer of Vectorized values would be zeroed by
// their constructor.)
struct FreeCpu {
  void operator()(float* p) const { c10::free_cpu(p); }
};
using AlignedFloats = std::unique_ptr<float[], FreeCpu>;
inline AlignedFloats aligned_floats(int64_t n) {
  return AlignedFloats(static_cast<float*>(c10::alloc_cpu(static_cast<size_t>(n) * sizeof(float))));
}

template <typename V>
struct is_vec : std::false_type {};
template <typename T>
struct is_vec<at::vec::Vectorized<T>> : std::true_type {};

template <typename V, typename T>
inline V load(const T* p) {
  if constexpr (is_vec<V>::value) {
    return V::loadu(p);
  } else {
    return *p;
  }
}

template <typename V, typename T>
inline void store(T* p, const V& v) {
  if constexpr (is_vec<V>::value) {
    v.store(p);
  } else {
    *p = v;
  }
}

// A run's last r = n % L elements (n >= L) go as one vector ending at n when r >= kVectorTail. A
// scalar tail calls the scalar exp once per element (a 14x14 plane has 4 of them: 13% of the
// SALayer forward's instructions at stage 3); the overlapping vector costs a stall where a later
// loop reads the overlap back from a buffer just written (a load that spans two stores is not
// forwarded from the store buffer): for one element the stall costs more than the scalar element
// (7x7 planes, bf16: 10% slower forward, 8% backward with the vector, in an A/B run).
constexpr int64_t kVectorTail = 2;

// Whether a run of n elements takes its last r = n % L (r > 0) as one vector ending at n.
template <int64_t L>
inline bool vector_tail(int64_t n, int64_t r) {
  return n >= L && r >= kVectorTail;
}

// vector(i) for the runs [i, i + L) of [0, n): whole runs, then the last n % L elements as one run
// ending at n (kVectorTail), which covers up to L - 1 elements a second time, or scalar(i) for each
// of them. for_each: f(i, V{}) for every element i of [0, n) that way. So f must be a map: lane l
// of f(i, V) writes element i + l of its outputs from element i + l of inputs it does not write
// (every caller's outputs are planes of their own), and writes the same value again.
template <int64_t L, typename Vector, typename Scalar>
inline void for_each_run(int64_t n, const Vector& vector, const Scalar& scalar) {
  const int64_t tail = n % L;
  int64_t i = 0;
  if (tail == 0 || vector_tail<L>(n, tail)) {
    // A loop of its own, with no scalar code after it: gcc kept the scalar tail's values in
    // registers across the vector loop and spilled the loop's (stage 1 forward: 5% more
    // instructions with the scalar tail in the same path).
    for (; i + L <= n; i += L) vector(i);
    if (tail != 0) vector(n - L);
    return;
  }
  for (; i + L <= n; i += L) vector(i);
  for (; i < n; ++i) scalar(i);
}

template <typename acc_t, typename F>
inline void for_each(int64_t n, const F& f) {
  using Vec = at::vec::Vectorized<acc_t>;
  for_each_run<Vec::size()>(n, [&](int64_t i) { f(i, Vec()); }, [&](int64_t i) { f(i, acc_t()); });
}

// The last r of a vector's L lanes (0 <= r <= L) as a blendv mask (all bits set there).
template <typename acc_t>
inline at::vec::Vectorized<acc_t> last_lanes(int64_t r) {
  using Vec = at::vec::Vectorized<acc_t>;
  return Vec::arange(acc_t(0), acc_t(1)) >= Vec(static_cast<acc_t>(Vec::size() - r));
}

// The sum of v's lanes, by halving shuffles (at::vec's reduction): a short dependency chain, where
// storing the lanes and adding them one by one was a chain of L adds per sum on every plane.
template <typename acc_t>
inline acc_t lane_sum(const at::vec::Vectorized<acc_t>& v) {
  using Vec = at::vec::Vectorized<acc_t>;
  return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, v);
}

// K sums over i of terms(i, V{}) (a std::array<V, K>) in one pass: two vector accumulators per
// sum (latency) within blocks of kSumBlock elements whose totals are added up separately, so no
// lane adds more than kSumBlock / (2 L) terms in a row (rounding grows with that run, not with n).
// A block's last n % L elements are one vector ending at the block's end, its lanes before the
// block's tail masked out, where for_each_run takes a vector (kVectorTail; terms may store, as a
// map, like for_each's f), else element by element.
constexpr int64_t kSumBlock = 1024;

// The block totals are added in double (a plane can hold hundreds of blocks).
// sums_over, sum_over, dot and the plane statistics are always inlined: they are the kernels' inner
// loops, and gcc left them as calls once the unit bodies became functions of their own
// (forward_cpu.cpp, "One compiled body"): +16% instructions in the SALayer backward, +11% in the
// forward on 7x7 planes (callgrind).
template <typename acc_t, int K, typename F>
C10_ALWAYS_INLINE std::array<acc_t, K> sums_over(int64_t n, const F& terms) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t L = Vec::size();
  std::array<double, K> total{};
  for (int64_t start = 0; start < n; start += kSumBlock) {
    const int64_t end = std::min(n, start + kSumBlock);
    std::array<Vec, K> acc0, acc1;
    acc0.fill(Vec(0));
    acc1.fill(Vec(0));
    int64_t i = start;
    for (; i + 2 * L <= end; i += 2 * L) {
      const std::array<Vec, K> a = terms(i, Vec()), b = terms(i + L, Vec());
      for (int k = 0; k < K; ++k) {
        acc0[k] = acc0[k] + a[k];
        acc1[k] = acc1[k] + b[k];
      }
    }
    for (; i + L <= end; i += L) {
      const std::array<Vec, K> a = terms(i, Vec());
      for (int k = 0; k < K; ++k) acc0[k] = acc0[k] + a[k];
    }
    std::array<acc_t, K> block{};
    if (vector_tail<L>(n, end - i)) {
      const Vec tail = last_lanes<acc_t>(end - i);
      const std::array<Vec, K> a = terms(end - L, Vec());
      for (int k = 0; k < K; ++k) acc1[k] = acc1[k] + Vec::blendv(Vec(0), a[k], tail);
    } else {
      // Counted down from the rest (at a plane size compiled in, gcc warned of an overflow in
      // the dead loop `for (; i < end; ++i)` where the rest is 0).
      for (int64_t rest = end - i; rest > 0; --rest) {
        const std::array<acc_t, K> a = terms(end - rest, acc_t());
        for (int k = 0; k < K; ++k) block[k] += a[k];
      }
    }
    for (int k = 0; k < K; ++k) {
      block[k] += lane_sum(acc0[k] + acc1[k]);
      total[k] += static_cast<double>(block[k]);
    }
  }
  std::array<acc_t, K> result;
  for (int k = 0; k < K; ++k) result[k] = static_cast<acc_t>(total[k]);
  return result;
}

template <typename acc_t, typename F>
C10_ALWAYS_INLINE acc_t sum_over(int64_t n, const F& term) {
  return sums_over<acc_t, 1>(
      n, [&](int64_t i, auto tag) { return std::array<decltype(tag), 1>{term(i, tag)}; })[0];
}

// A plane (or any run of elements) as acc_t values: the tensor's own memory when the dtype is
// already acc_t, otherwise one converting read into the caller's scratch buffer.
template <typename scalar_t, typename acc_t>
inline const acc_t* as_acc(const scalar_t* src, int64_t n, acc_t* scratch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else if constexpr (c10::is_reduced_floating_point_v<scalar_t>) {
    // bf16/fp16 -> fp32 with vector conversions (at::vec::convert is a scalar loop for these).
    using Vec = at::vec::Vectorized<scalar_t>;
    constexpr int64_t kFloatLanes = at::vec::Vectorized<float>::size();
    for_each_run<Vec::size()>(
        n,
        [&](int64_t i) {
          const auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vec::loadu(src + i));
          lo.store(scratch + i);
          hi.store(scratch + i + kFloatLanes);
        },
        [&](int64_t i) { scratch[i] = static_cast<acc_t>(src[i]); });
    return scratch;
  } else {
    at::vec::convert(src, scratch, n);
    return scratch;
  }
}

// Where to compute a result plane in acc_t: straight into the output when the dtype is acc_t,
// else into scratch, followed by write_output (one converting write).
template <typename scalar_t, typename acc_t>
inline acc_t* result_buffer(scalar_t* dst, acc_t* scratch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return dst;
  } else {
    return scratch;
  }
}

// Asks the cache for the n values from p, to be read or (kForWrite) written, at
// __builtin_prefetch's locality (3: every level). A hint: no value changes.
template <bool kForWrite = false, int kLocality = 3, typename T>
inline void prefetch_span(const T* p, int64_t n) {
  const char* first = reinterpret_cast<const char*>(p);
  for (int64_t byte = 0; byte < n * int64_t{sizeof(T)}; byte += 64) {
    __builtin_prefetch(first + byte, kForWrite, kLocality);
  }
}

using FloatVec = at::vec::Vectorized<float>;

// T in a parameter that takes no part in template argument deduction, so that a nullptr argument
// is accepted (std::type_identity_t is C++20; the wheel's build may be C++17).
template <typename T>
struct NonDeduced {
  using type = T;
};
template <typename T>
using non_deduced_t = typename NonDeduced<T>::type;

// Whether a kernel writes its output with streaming (non-temporal) stores: when the output is
// larger than the cache would keep until the next layer reads it, a streaming store skips reading
// each line from memory before overwriting it (a third of a copy's traffic, a quarter of the
// residual epilogue's). The caller ends each task with stream_fence().
inline bool stream_results(int64_t bytes) { return bytes > (int64_t{8} << 20); }

// stream_results for the NCHW kernels' `planes` output planes of plane_bytes each, written a plane
// (or a branch's planes) at a time, each output 64-byte aligned (allocated by the op): only where
// every plane is whole cache lines. Where two planes share a line, the line takes a streaming store
// from one plane's pass and an ordinary store (an unaligned head or tail) from the other's, and a
// line both cached and streamed is written out more than once: at (32, 2048, 7, 7) (196-byte
// planes; raw op calls on fresh inputs, 2 threads) the residual backward took 4.0 ns an element
// streamed against 0.83 not, the residual forward 0.86-1.0 against 0.57; 14x14 planes (fp32 and
// bf16) were about 2x slower streamed; bf16 28x28 planes (one shared line in 24.5) measured the
// same either way.
inline bool stream_planes(int64_t planes, int64_t plane_bytes) {
  return stream_results(planes * plane_bytes) && plane_bytes % 64 == 0;
}

// Orders a task's streaming stores before the parallel region ends (they are weakly ordered).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

inline bool aligned_32(const void* p) { return reinterpret_cast<uintptr_t>(p) % 32 == 0; }

// 2L values of scalar_t from p as two float vectors (exact).
template <typename scalar_t>
inline std::pair<FloatVec, FloatVec> load_pair(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return {FloatVec::loadu(p), FloatVec::loadu(p + FloatVec::size())};
  } else {
    const auto [lo, hi] =
        at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p));
    return {lo, hi};
  }
}

// A vector of scalar_t to dst (32-byte aligned) by a streaming store: float, bfloat16 and half
// (float64 is not streamed: its kernels take ResultStore<false, false>; a plain store).
template <typename scalar_t>
inline void stream_vector(scalar_t* dst, const at::vec::Vectorized<scalar_t>& v) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm256_stream_ps(dst, v);
    return;
  } else if constexpr (c10::is_reduced_floating_point_v<scalar_t>) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), v);
    return;
  }
#endif
  v.store(dst);
}

// Two float vectors to 2L values of dst in its dtype (rounded as at::vec::convert does), by
// streaming stores when `streaming` and dst is 32-byte aligned.
template <typename scalar_t>
inline void store_pair(scalar_t* dst, const FloatVec& lo, const FloatVec& hi, bool streaming) {
  constexpr int64_t L = FloatVec::size();
  const bool stream = streaming && aligned_32(dst);
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (stream) {
      stream_vector(dst, lo);
      stream_vector(dst + L, hi);
    } else {
      lo.store(dst);
      hi.store(dst + L);
    }
  } else {
    const at::vec::Vectorized<scalar_t> v(at::vec::convert_from_float<scalar_t>(lo, hi));
    if (stream) {
      stream_vector(dst, v);
    } else {
      v.store(dst);
    }
  }
}

// v (float lanes, or one float) as a value of its own, rounded to its type: the
// compiler may not contract it into the add that follows (an FMA), which would skip the rounding
// of the product that eager's separate ops apply, and that the paths which store a result before
// adding identity apply too (the same bits in every path). An empty asm statement that says it
// may change v, in a vector register on AVX2 builds.
template <typename V>
C10_ALWAYS_INLINE V rounded(V v) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<V, at::vec::Vectorized<float>>) {
    __m256 raw = v;
    asm("" : "+x"(raw));
    return V(raw);
  } else {
    asm("" : "+x"(v));
    return v;
  }
#else
  asm("" : "+m"(v));
  return v;
#endif
}

// How a unit body's gate pass stores a result value y (V: a vector of acc_t or one acc_t) at
// result + i. ResultStore<false, false> stores y as it is. Where the output is streamed
// (stream_planes) and the result planes are the NCHW output planes themselves (the dtype is
// acc_t), the gate writes the output with streaming stores (kStreaming: float vectors that start
// 32-byte aligned) and with the residual epilogue fused in (kResidual: relu(y + identity), identity
// at the result's position): a pass of its own after the gate would write each line twice, the
// second time after it has left for memory. Elsewhere the epilogue comes after the gate: the NCHW
// output planes in place (add_identity_relu), NHWC tiles and converted dtypes as they write the
// output (scatter_tile, write_output).
template <bool kResidual, bool kStreaming>
struct ResultStore {
  static constexpr bool kFusesResidual = kResidual;
  static constexpr bool kStreams = kStreaming;

  template <typename acc_t, typename V>
  C10_ALWAYS_INLINE void operator()(acc_t* result, const non_deduced_t<acc_t>* identity, int64_t i,
                                    V y) const {
    if constexpr (kResidual) y = residual_relu(rounded(y), load<V>(identity + i));
    if constexpr (kStreaming && is_vec<V>::value && std::is_same_v<acc_t, float>) {
      if (aligned_32(result + i)) {
        stream_vector(result + i, y);
        return;
      }
    }
    store(result + i, y);
  }
};

// f(ResultStore<false, true>{}) for a streamed output of float (the flag as a template
// argument), else f(ResultStore<false, false>{}).
template <typename scalar_t, typename F>
decltype(auto) with_streaming_store(bool streaming, const F& f) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (streaming) return f(ResultStore<false, true>{});
  }
  return f(ResultStore<false, false>{});
}

// As with_streaming_store, with the residual epilogue fused in where the output is streamed:
// f(ResultStore<true, true>{}).
template <typename scalar_t, typename F>
decltype(auto) with_result_store(bool residual, bool streaming, const F& f) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (residual && streaming) return f(ResultStore<true, true>{});
  }
  return with_streaming_store<scalar_t>(streaming, f);
}

// The residual epilogue (sa_math.h: residual_relu) on n results in acc_t before their one store:
// y = relu(y + identity), identity read in its own dtype at the results' output positions.
template <typename scalar_t, typename acc_t>
inline void add_identity_relu(acc_t* y, const scalar_t* identity, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t L = Vec::size();
  int64_t i = 0;
  if constexpr (c10::is_reduced_floating_point_v<scalar_t>) {
    using ScalarVec = at::vec::Vectorized<scalar_t>;
    for (; i + ScalarVec::size() <= n; i += ScalarVec::size()) {
      const auto [lo, hi] = at::vec::convert_to_float<scalar_t>(ScalarVec::loadu(identity + i));
      residual_relu(Vec::loadu(y + i), lo).store(y + i);
      residual_relu(Vec::loadu(y + i + L), hi).store(y + i + L);
    }
  } else {
    for (; i + L <= n; i += L)
      residual_relu(Vec::loadu(y + i), Vec::loadu(identity + i)).store(y + i);
  }
  for (; i < n; ++i) y[i] = residual_relu(y[i], static_cast<acc_t>(identity[i]));
}

// n results in float (y) to dst in its dtype, rounded as at::vec::convert does, with the residual
// epilogue (relu(y + identity), identity at dst's position) where identity is not null, by
// streaming stores (store_pair) where `streaming`, from dst's first 32-byte boundary on.
template <typename scalar_t>
inline void write_output(const float* y, const non_deduced_t<scalar_t>* identity, scalar_t* dst,
                         int64_t n, bool streaming) {
  constexpr int64_t L = FloatVec::size();
  auto one = [&](int64_t i) {
    const float v =
        identity == nullptr ? y[i] : residual_relu(y[i], static_cast<float>(identity[i]));
    dst[i] = static_cast<scalar_t>(v);
  };
  int64_t i = 0;
  if (streaming) {
    for (; i < n && !aligned_32(dst + i); ++i) one(i);
  }
  for (; i + 2 * L <= n; i += 2 * L) {
    FloatVec lo = FloatVec::loadu(y + i), hi = FloatVec::loadu(y + i + L);
    if (identity != nullptr) {
      const auto [id_lo, id_hi] = load_pair(identity + i);
      lo = residual_relu(lo, id_lo);
      hi = residual_relu(hi, id_hi);
    }
    store_pair(dst + i, lo, hi, streaming);
  }
  for (; i < n; ++i) one(i);
}

// The residual epilogue's backward (sa_math.h: relu_grad) on one vector of scalar_t from i, and
// on one value: grad_out where out > 0, else 0. Exact in every dtype (each value is grad_out's or
// zero).
template <typename scalar_t>
C10_ALWAYS_INLINE at::vec::Vectorized<scalar_t> relu_grad_vector(const scalar_t* grad_out,
                                                                 const scalar_t* out, int64_t i) {
  using Vec = at::vec::Vectorized<scalar_t>;
  if constexpr (c10::is_reduced_floating_point_v<scalar_t>) {
    const auto [g_lo, g_hi] = at::vec::convert_to_float<scalar_t>(Vec::loadu(grad_out + i));
    const auto [o_lo, o_hi] = at::vec::convert_to_float<scalar_t>(Vec::loadu(out + i));
    return Vec(at::vec::convert_from_float<scalar_t>(relu_grad(g_lo, o_lo), relu_grad(g_hi, o_hi)));
  } else {
    return relu_grad(Vec::loadu(grad_out + i), Vec::loadu(out + i));
  }
}
template <typename scalar_t>
C10_ALWAYS_INLINE scalar_t relu_grad_value(const scalar_t* grad_out, const scalar_t* out,
                                           int64_t i) {
  using acc_t = at::opmath_type<scalar_t>;
  return static_cast<scalar_t>(
      relu_grad(static_cast<acc_t>(grad_out[i]), static_cast<acc_t>(out[i])));
}

// grad_identity = the masked grad_out, on n values.
template <typename scalar_t>
inline void relu_grad_run(const scalar_t* grad_out, const scalar_t* out, scalar_t* grad_identity,
                          int64_t n) {
  constexpr int64_t L = at::vec::Vectorized<scalar_t>::size();
  int64_t i = 0;
  for (; i + L <= n; i += L) relu_grad_vector(grad_out, out, i).store(grad_identity + i);
  for (; i < n; ++i) grad_identity[i] = relu_grad_value(grad_out, out, i);
}

// relu_grad_run for a streamed grad_identity: the values go to `copy` (n values of the caller's
// scratch), from which the kernel reads them back in cache, and to grad_identity by streaming
// stores from its first 32-byte boundary on.
template <typename scalar_t>
inline void relu_grad_streamed(const scalar_t* grad_out, const scalar_t* out,
                               scalar_t* grad_identity, scalar_t* copy, int64_t n) {
  constexpr int64_t L = at::vec::Vectorized<scalar_t>::size();
  auto one = [&](int64_t i) { grad_identity[i] = copy[i] = relu_grad_value(grad_out, out, i); };
  int64_t i = 0;
  for (; i < n && !aligned_32(grad_identity + i); ++i) one(i);
  for (; i + L <= n; i += L) {
    const at::vec::Vectorized<scalar_t> g = relu_grad_vector(grad_out, out, i);
    g.store(copy + i);
    stream_vector(grad_identity + i, g);
  }
  for (; i < n; ++i) one(i);
}

// The gradient of SA(x), gu, as a unit body reads it: `read<V>(i)` in its first pass over the plane
// (once per element, up to a tail vector read twice as for_each and sums_over read it), `plane()`
// (N values in cache) in its later passes, and `write<Store>(i, gu)` in its last pass, after that
// pass's own result. GradPlane: a plane already in memory (grad_out itself, or a masked gradient
// made before the body: converted dtypes, NHWC tiles); it writes nothing.
template <typename acc_t>
struct GradPlane {
  const acc_t* gu;

  template <typename V>
  C10_ALWAYS_INLINE V read(int64_t i) const {
    return load<V>(gu + i);
  }
  const acc_t* plane() const { return gu; }
  template <typename Store, typename V>
  C10_ALWAYS_INLINE void write(int64_t, const V&) const {}
};

// The residual epilogue's masked gradient gu = relu_grad(grad_out, out) (sa_math.h), made in the
// body's first pass, where grad_out and out are read from memory beside x, and kept in a scratch
// plane (in cache) for the later passes; the last pass writes it to grad_identity (by Store:
// streamed where grad_identity is). A pass of its own before the body (BackwardTensors::sa_grad)
// took as long as a separate threshold_backward: two streams read and one written, with no
// arithmetic to hide them under. Each gu is the same value either way, so the body's results are
// the same bits; the streaming store comes after the pass's arithmetic, as the gate's does, so
// that its branch (ResultStore) cannot change how the compiler contracts that arithmetic.
template <typename acc_t>
struct MaskedGradPlane {
  const acc_t* grad_out;
  const acc_t* out;
  acc_t* grad_identity;
  acc_t* kept;

  template <typename V>
  C10_ALWAYS_INLINE V read(int64_t i) const {
    const V gu = relu_grad(load<V>(grad_out + i), load<V>(out + i));
    store(kept + i, gu);
    return gu;
  }
  const acc_t* plane() const { return kept; }
  template <typename Store, typename V>
  C10_ALWAYS_INLINE void write(int64_t i, const V& gu) const {
    Store{}(grad_identity, nullptr, i, gu);
  }
};

// Mean and centered variance of the values x * scale (scale a power of two; 1 for the plane
// itself): two passes over data that is in cache, never E[x^2] - mu^2. The mean is summed relative
// to the plane's first value (shift), so a large common offset (|mu| >> std) does not eat the
// sum's precision. Terms are fma(x, scale, -c): x - c rounded once for scale = 1 (today's values
// bit for bit), and no overflow of x - c for the scale of a plane near the top of the range
// (sa_math.h, Standardizer).
template <typename acc_t>
struct PlaneMoments {
  SplitMean<acc_t> mean;
  acc_t var;
};

template <typename acc_t>
C10_ALWAYS_INLINE SplitMean<acc_t> shifted_mean(const acc_t* x, int64_t n, acc_t scale) {
  const acc_t shift = sum_shift(x[0]) * scale;
  return split_mean(shift, sum_over<acc_t>(n, [&](int64_t i, auto tag) {
                             using V = decltype(tag);
                             return sa_fma(load<V>(x + i), V(scale), V(-shift));
                           }) / acc_t(n));
}

template <typename acc_t>
C10_ALWAYS_INLINE acc_t centered_var(const acc_t* x, int64_t n, acc_t scale, acc_t mean) {
  return sum_over<acc_t>(n,
                         [&](int64_t i, auto tag) {
                           using V = decltype(tag);
                           const V d = sa_fma(load<V>(x + i), V(scale), V(-mean));
                           return d * d;
                         }) /
         acc_t(n);
}

// Four values from p as double lanes (exact for float).
inline at::vec::Vectorized<double> load_wide(const float* p) {
  using VecD = at::vec::Vectorized<double>;
#if defined(CPU_CAPABILITY_AVX2)
  static_assert(VecD::size() == 4);
  return VecD(_mm256_cvtps_pd(_mm_loadu_ps(p)));
#else
  alignas(64) double d[VecD::size()];
  for (int64_t l = 0; l < VecD::size(); ++l) d[l] = p[l];
  return VecD::loadu(d);
#endif
}
inline at::vec::Vectorized<double> load_wide(const double* p) {
  return at::vec::Vectorized<double>::loadu(p);
}

// wide_mean (sa_math.h) of the values x * scale: the sum in double lanes. For float x the scale is
// applied to the sum (the same value: every term is exact and the sum cannot overflow double).
template <typename acc_t>
C10_ALWAYS_INLINE acc_t plane_wide_mean(const acc_t* x, int64_t n, acc_t scale) {
  using VecD = at::vec::Vectorized<double>;
  constexpr int64_t L = VecD::size();
  constexpr bool kFloat = std::is_same_v<acc_t, float>;
  auto term = [&](int64_t i) {
    if constexpr (kFloat) {
      return load_wide(x + i);
    } else {
      return load_wide(x + i) * VecD(scale);
    }
  };
  std::array<VecD, 4> acc;
  acc.fill(VecD(0));
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    for (int k = 0; k < 4; ++k) acc[k] = acc[k] + term(i + k * L);
  }
  for (; i + L <= n; i += L) acc[0] = acc[0] + term(i);
  alignas(64) double lanes[L];
  ((acc[0] + acc[1]) + (acc[2] + acc[3])).store(lanes);
  double total = 0;
  for (int64_t l = 0; l < L; ++l) total += lanes[l];
  // By pointer: at a plane size compiled in, the index loop `for (; i < n; ++i)` drew gcc's
  // warning of an overflow in a dead loop, as in sums_over.
  for (const acc_t* rest = x + i; rest < x + n; ++rest) {
    total += wide_term(*rest, kFloat ? acc_t(1) : scale);
  }
  return wide_mean<acc_t>(kFloat ? total * static_cast<double>(scale) : total, n);
}

// max|x| over the plane; NaN if it holds a NaN (at::vec::maximum propagates NaN).
template <typename acc_t>
inline acc_t max_abs(const acc_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec vmax(0);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size())
    vmax = at::vec::maximum(vmax, Vec::loadu(x + i).abs());
  alignas(64) acc_t lanes[Vec::size()];
  vmax.store(lanes);
  acc_t result = 0;
  for (int64_t l = 0; l < Vec::size(); ++l) result = max_nan(result, lanes[l]);
  for (; i < n; ++i) result = max_nan(result, std::abs(x[i]));
  return result;
}

// The moments of the plane's values x * scale: with exact_mean (channel-branch planes: the gate
// uses the mean itself) the mean is plane_wide_mean.
template <typename acc_t>
C10_ALWAYS_INLINE PlaneMoments<acc_t> plane_moments(const acc_t* x, int64_t n, acc_t scale,
                                                    bool exact_mean) {
  const SplitMean<acc_t> mean =
      exact_mean ? SplitMean<acc_t>{plane_wide_mean(x, n, scale), 0} : shifted_mean(x, n, scale);
  return PlaneMoments<acc_t>{mean, centered_var(x, n, scale, mean.mean)};
}

// The Standardizer of a plane whose unscaled moments overflowed: redone scaled by 2^-e. Rare, so
// out of line: a second inlined copy of the moments' loops made gcc outline both as a call per
// plane (7x7 planes: ~40 instructions of the call and its closure, per plane).
template <typename acc_t>
C10_NOINLINE Standardizer<acc_t> rescaled_plane_stats(const acc_t* x, int64_t n, acc_t eps,
                                                      bool exact_mean,
                                                      const PlaneMoments<acc_t>& unscaled) {
  const int e = rescale_exponent(max_abs(x, n));
  const PlaneMoments<acc_t> mo =
      e == 0 ? unscaled : plane_moments(x, n, sa_ldexp(acc_t(1), -e), exact_mean);
  return finish_stats(mo.mean.mean, mo.var, eps, e, mo.mean.lo);
}

// The plane's Standardizer: unscaled moments, redone scaled by 2^-e when they overflowed.
template <typename acc_t>
C10_ALWAYS_INLINE Standardizer<acc_t> plane_stats(const acc_t* x, int64_t n, acc_t eps,
                                                  bool exact_mean) {
  const PlaneMoments<acc_t> mo = plane_moments(x, n, acc_t(1), exact_mean);
  if (stats_overflowed(mo.mean.mean, mo.var)) {
    return rescaled_plane_stats(x, n, eps, exact_mean, mo);
  }
  return finish_stats(mo.mean.mean, mo.var, eps, 0, mo.mean.lo);
}

template <typename acc_t>
C10_ALWAYS_INLINE acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  return sum_over<acc_t>(n, [&](int64_t i, auto tag) {
    using V = decltype(tag);
    return load<V>(a + i) * load<V>(b + i);
  });
}

// The K dot products of a with b, b + stride, ..., b + (K - 1) stride (n values each) in one pass:
// each summed as dot sums it (sums_over), a's vectors loaded once for all K.
template <int K, typename acc_t>
C10_ALWAYS_INLINE std::array<acc_t, K> dots(const acc_t* a, const acc_t* b, int64_t stride,
                                            int64_t n) {
  return sums_over<acc_t, K>(n, [&](int64_t i, auto tag) {
    using V = decltype(tag);
    const V av = load<V>(a + i);
    std::array<V, K> products;
    for (int k = 0; k < K; ++k) products[k] = av * load<V>(b + k * stride + i);
    return products;
  });
}

// kRows entries of a small matrix product at the vector of pixels from i: entry r is
// init_r + sum over k < m of W[(row0 + r) row_stride + k col_stride] v_k(i), v_k the k-th of m
// planes n values apart, summed in the order of k, init_r = bias[row0 + r] (0 without a bias).
// Rows of W v + b for (row_stride, col_stride) = (m, 1), rows of W^T v for (1, m):
// ShuffleAttention's spatial gate z = W2 y + b2 (forward and backward) and dy = W2^T t. The kRows
// chains of m FMAs run side by side, sharing each v_k's load (matrix_rows, kernels_cpu.h).
template <int64_t kRows, typename V, typename T>
C10_ALWAYS_INLINE std::array<V, kRows> matrix_product_rows(const T* W, int64_t row_stride,
                                                           int64_t col_stride,
                                                           const non_deduced_t<T>* bias,
                                                           const non_deduced_t<T>* v, int64_t n,
                                                           int64_t m, int64_t row0, int64_t i) {
  std::array<V, kRows> rows;
  for (int64_t r = 0; r < kRows; ++r) rows[r] = bias == nullptr ? V(0) : V(bias[row0 + r]);
  for (int64_t k = 0; k < m; ++k) {
    const V vk = load<V>(v + k * n + i);
    for (int64_t r = 0; r < kRows; ++r) {
      rows[r] = rows[r] + V(W[(row0 + r) * row_stride + k * col_stride]) * vk;
    }
  }
  return rows;
}

}  // namespace sa_cuda::cpu
