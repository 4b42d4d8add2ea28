// Standalone driver of the emulated CUDA kernels, built by tests/emulator/test_sanitizers.py as a
// plain, a ThreadSanitizer and an AddressSanitizer binary (no Python, no libtorch_cpu: only
// libc10).
//
//   kernel_selftest kernels   every launch path of both variants, plain and with the residual
//                             epilogue (relu(SA(x) + identity)): forward checked against a naive
//                             float64 loop, backward run and checked finite (and relu's mask
//                             checked exactly); prints "ok"
//   kernel_selftest race      a planted missing __syncthreads (TSan must report a data race)
//   kernel_selftest oob       a planted out-of-bounds read (ASan must report it)
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/backward_launch.cuh"
#include "cuda/forward_launch.cuh"

using namespace sa_cuda;

namespace {

// ---- planted bugs (test-only kernels) ---------------------------------------------------------
SA_KERNEL_BOUNDS(64) void planted_race_kernel(float* out) {
  SA_SHARED_ARRAY(float, buf, 64);
  buf[threadIdx.x] = static_cast<float>(threadIdx.x);
  // BUG (planted): a __syncthreads() is missing here.
  out[threadIdx.x] = buf[(threadIdx.x + 1) % blockDim.x];
}

SA_KERNEL_BOUNDS(64) void planted_oob_kernel(const float* in, float* out) {
  out[threadIdx.x] = in[threadIdx.x + 1];  // BUG (planted): the last thread reads in[blockDim.x]
}

// ---- the real kernels -------------------------------------------------------------------------
struct Rng {
  unsigned long long s = 88172645463325252ull;
  double next() {  // uniform in [-1, 1)
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return static_cast<double>(s >> 11) / static_cast<double>(1ull << 52) - 1.0;
  }
};

struct Case {
  Variant variant;
  int64_t B, C, G, H, W, offset;  // offset: elements the tensors start past a 16-byte boundary
  bool nhwc = false;              // the tensors are channels_last ([B, H * W, C])
};

// Offset of element (b, c, i) of a [B, C, N] tensor in the case's layout.
int64_t element(const Case& k, int64_t b, int64_t c, int64_t i) {
  const int64_t N = k.H * k.W;
  return k.nhwc ? (b * N + i) * k.C + c : (b * k.C + c) * N + i;
}

// Naive float64 forward (docs/design.md), for the check.
std::vector<double> naive_forward(const Case& k, const std::vector<double>& x,
                                  const std::vector<double> (&p)[6]) {
  const int64_t m = k.C / (2 * k.G), N = k.H * k.W;
  std::vector<double> out(x.size()), mu(k.B * k.C), r(k.B * k.C);
  for (int64_t pl = 0; pl < k.B * k.C; ++pl) {
    double s = 0, q = 0;
    for (int64_t i = 0; i < N; ++i) s += x[pl * N + i];
    mu[pl] = s / N;
    for (int64_t i = 0; i < N; ++i) q += (x[pl * N + i] - mu[pl]) * (x[pl * N + i] - mu[pl]);
    r[pl] = 1.0 / std::sqrt(q / N + 1e-5);
  }
  for (int64_t b = 0; b < k.B; ++b) {
    for (int64_t c = 0; c < k.C; ++c) {
      const ChannelRole role = channel_role(c, m);
      const int64_t c0 = c - role.k, j = role.k;  // first channel of the branch, row j
      for (int64_t i = 0; i < N; ++i) {
        double z = 0;
        if (!role.spatial) {
          if (k.variant == Variant::kSALayer) {
            z = p[0][j] * mu[b * k.C + c] + p[1][j];
          } else {
            z = p[1][j];
            for (int64_t l = 0; l < m; ++l) z += p[0][j * m + l] * mu[b * k.C + c0 + l];
          }
        } else {
          auto y = [&](int64_t l) {
            const int64_t pl = b * k.C + c0 + l;
            return p[4][l] * (x[pl * N + i] - mu[pl]) * r[pl] + p[5][l];
          };
          if (k.variant == Variant::kSALayer) {
            z = p[2][j] * y(j) + p[3][j];
          } else {
            z = p[3][j];
            for (int64_t l = 0; l < m; ++l) z += p[2][j * m + l] * y(l);
          }
        }
        out[(b * k.C + shuffle_dst(c, k.C)) * N + i] =
            x[(b * k.C + c) * N + i] / (1 + std::exp(-z));
      }
    }
  }
  return out;
}

template <typename T>
bool run_case(const Case& k, c10::ScalarType dtype, bool residual) {
  const int64_t m = k.C / (2 * k.G), N = k.H * k.W, n = k.B * k.C * N;
  Rng rng;
  std::vector<double> x64(n), g64(n), id64(n), p64[6];
  for (auto& v : x64) v = 2 * rng.next() + 0.5;
  for (auto& v : g64) v = rng.next();
  for (auto& v : id64) v = 2 * rng.next();  // out = relu(SA(x) + identity): about half pass
  for (int i = 0; i < 6; ++i) {
    const bool matrix = k.variant == Variant::kShuffleAttention && (i == 0 || i == 2);
    p64[i].resize(matrix ? m * m : m);
    for (auto& v : p64[i]) v = rng.next();
  }
  // Exactly sized heap buffers (so ASan sees any overrun), offset by k.offset elements.
  // The residual epilogue's identity and grad_identity are allocated only when it runs.
  const int64_t residual_n = residual ? n + k.offset : 0;
  std::vector<T> xs(n + k.offset), gs(n + k.offset), outs(n + k.offset), dxs(n + k.offset),
      ids(residual_n), gids(residual_n);
  T *x = xs.data() + k.offset, *g = gs.data() + k.offset, *out = outs.data() + k.offset,
    *dx = dxs.data() + k.offset, *identity = residual ? ids.data() + k.offset : nullptr,
    *grad_identity = residual ? gids.data() + k.offset : nullptr;
  // x64, g64 and id64 are NCHW; x, g and identity in the case's layout.
  for (int64_t b = 0; b < k.B; ++b) {
    for (int64_t c = 0; c < k.C; ++c) {
      for (int64_t i = 0; i < N; ++i) {
        const int64_t nchw = (b * k.C + c) * N + i, at = element(k, b, c, i);
        x[at] = static_cast<T>(x64[nchw]);
        x64[nchw] = static_cast<double>(x[at]);
        g[at] = static_cast<T>(g64[nchw]);
        if (residual) {
          identity[at] = static_cast<T>(id64[nchw]);
          id64[nchw] = static_cast<double>(identity[at]);
        }
      }
    }
  }
  std::vector<T> p[6];
  for (int i = 0; i < 6; ++i) p[i].assign(p64[i].begin(), p64[i].end());
  std::vector<T> mean(k.B * k.C), rstd(k.B * k.C), gate_grad(k.B * k.G * m), t_sum(k.B * k.G * m),
      t_xh(k.B * k.G * m * (k.variant == Variant::kShuffleAttention ? m : 1));

  ForwardParams f{};
  f.batch = k.B;
  f.channels = k.C;
  f.groups = k.G;
  f.branch_channels = m;
  f.plane_size = N;
  f.eps = 1e-5;
  f.x = x;
  f.out = out;
  f.identity = identity;
  f.mean = mean.data();
  f.rstd = rstd.data();
  for (int i = 0; i < 6; ++i) {
    f.params[i] = p[i].data();
    f.param_dtypes[i] = sizeof(T) == 8 ? ParamDtype::kFloat64 : ParamDtype::kFloat32;
  }
  f.channels_last = k.nhwc;
  emulated::forward(k.variant, dtype, f);
  const std::vector<double> want = naive_forward(k, x64, p64);
  double err = 0, scale = 0;
  for (int64_t b = 0; b < k.B; ++b) {
    for (int64_t c = 0; c < k.C; ++c) {
      for (int64_t i = 0; i < N; ++i) {
        const int64_t nchw = (b * k.C + c) * N + i;
        const double w = residual ? std::max(0.0, want[nchw] + id64[nchw]) : want[nchw];
        err = std::max(err, std::abs(static_cast<double>(out[element(k, b, c, i)]) - w));
        scale = std::max(scale, std::abs(w));
      }
    }
  }
  BackwardParams bp{};
  bp.fwd = f;
  bp.grad_out = g;
  bp.grad_x = dx;
  bp.out = residual ? out : nullptr;
  bp.grad_identity = grad_identity;
  bp.gate_grad = gate_grad.data();
  bp.t_sum = t_sum.data();
  bp.t_xh = t_xh.data();
  std::vector<T> param_grads[6];  // exactly sized: the reduction writes each entry once
  for (int i = 0; i < 6; ++i) {
    param_grads[i].resize(p[i].size());
    bp.param_grads[i] = param_grads[i].data();
  }
  emulated::backward(k.variant, dtype, bp);
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) finite = finite && std::isfinite(static_cast<double>(dx[i]));
  for (const auto& grad : param_grads) {
    for (const T v : grad) finite = finite && std::isfinite(static_cast<double>(v));
  }
  bool masked = true;  // grad_identity is relu's mask of g by out, exactly
  for (int64_t i = 0; residual && i < n; ++i) {
    masked = masked && grad_identity[i] == (out[i] <= T(0) ? T(0) : g[i]);
  }
  const double tol = (sizeof(T) == 8 ? 1e-12 : 1e-5) * std::max(1.0, scale);
  const bool ok = err <= tol && finite && masked;
  std::printf("%s %s B=%lld C=%lld G=%lld %lldx%lld offset=%lld%s%s: max err %.3g (tol %.3g)%s%s\n",
              k.variant == Variant::kSALayer ? "sa_layer" : "shuffle_attention",
              sizeof(T) == 8 ? "float64" : "float32", (long long)k.B, (long long)k.C,
              (long long)k.G, (long long)k.H, (long long)k.W, (long long)k.offset,
              k.nhwc ? " channels_last" : "", residual ? " residual" : "", err, tol,
              finite ? "" : " NON-FINITE gradient", masked ? "" : " WRONG relu mask");
  return ok;
}

int run_kernels() {
  const Case cases[] = {
      // SALayer: warp per plane (staged chunk, vector; staged with a partial last block and a
      // misaligned chunk), block per plane (16-byte, 8-byte (float), misaligned), streamed
      {Variant::kSALayer, 2, 16, 2, 7, 9, 0},
      {Variant::kSALayer, 1, 16, 4, 8, 8, 0},
      {Variant::kSALayer, 3, 4, 1, 7, 7, 1},
      {Variant::kSALayer, 1, 8, 2, 30, 30, 0},
      {Variant::kSALayer, 1, 4, 1, 30, 31, 0},
      {Variant::kSALayer, 1, 8, 2, 30, 30, 1},
      {Variant::kSALayer, 1, 4, 1, 65, 67, 0},
      // SALayer channels_last: two tiles (32 + 8 channels), a whole and a partial chunk
      {Variant::kSALayer, 2, 40, 5, 17, 19, 1, true},
      // ShuffleAttention: several tiles, partial tiles, m = 1
      {Variant::kShuffleAttention, 2, 16, 2, 7, 9, 0},
      {Variant::kShuffleAttention, 1, 8, 1, 40, 41, 1},
      {Variant::kShuffleAttention, 1, 8, 4, 5, 5, 0},
      // ShuffleAttention channels_last: windows of 16 + 4 channels per half, two chunks; a branch
      // of 17 channels walked in tiles of 32 pixels (and 3)
      {Variant::kShuffleAttention, 2, 40, 5, 17, 19, 1, true},
      {Variant::kShuffleAttention, 1, 68, 2, 5, 7, 0, true},
  };
  bool ok = true;
  for (const Case& k : cases) {
    for (const bool residual : {false, true}) {
      ok = run_case<float>(k, c10::ScalarType::Float, residual) && ok;
      ok = run_case<double>(k, c10::ScalarType::Double, residual) && ok;
    }
  }
  std::printf(ok ? "ok\n" : "FAILED\n");
  return ok ? 0 : 1;
}

int run_race() {
  std::vector<float> out(64);
  emulated::launch(&planted_race_kernel, 1, 64, 0, nullptr, out.data());
  std::printf("race kernel ran\n");
  return 0;
}

int run_oob() {
  std::vector<float> in(64), out(64);
  emulated::launch(&planted_oob_kernel, 1, 64, 0, nullptr, in.data(), out.data());
  std::printf("oob kernel ran\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "kernels";
  if (mode == "kernels") return run_kernels();
  if (mode == "race") return run_race();
  if (mode == "oob") return run_oob();
  std::fprintf(stderr, "usage: kernel_selftest [kernels|race|oob]\n");
  return 2;
}
