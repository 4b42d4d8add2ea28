// Checks sa_cuda::cpu::exp_lanes (csrc/cpu/vec_exp.h), the CPU kernels' vector exp, against float64
// exp on every STEP-th 32-bit pattern (an odd step visits every residue of the low mantissa bits;
// STEP = 1: all 2^32 floats). Built and run by tests/kernels/test_vec_exp.py.
//
//   vec_exp_check STEP   prints "checked N worst_ulp W at X wrong K", K the count of results that
//                        are not what exp must give: NaN for NaN, +inf where exp(x) > FLT_MAX,
//                        a subnormal within one subnormal spacing where exp(x) < FLT_MIN.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "cpu/vec_exp.h"

namespace {

// The spacing of floats at |v| (the subnormal spacing below FLT_MIN).
double float_spacing(double v) {
  if (std::fabs(v) < 1.17549435e-38) return std::ldexp(1.0, -149);
  int e;
  std::frexp(std::fabs(v), &e);
  return std::ldexp(1.0, e - 24);
}

}  // namespace

int main(int argc, char** argv) {
  const uint64_t step = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 61;
  double worst = 0;
  float worst_at = 0;
  long checked = 0, wrong = 0;
  alignas(32) float in[8], out[8];
  for (uint64_t base = 0; base <= 0xffffffffull; base += 8 * step) {
    for (int l = 0; l < 8; ++l) {
      const uint32_t bits = static_cast<uint32_t>(base + l * step);
      std::memcpy(&in[l], &bits, sizeof bits);
    }
    _mm256_store_ps(out, sa_cuda::cpu::exp_lanes(_mm256_load_ps(in)));
    for (int l = 0; l < 8; ++l) {
      const float x = in[l], y = out[l];
      const double want = std::exp(static_cast<double>(x));
      bool ok;
      if (std::isnan(x)) {
        ok = std::isnan(y);
      } else if (want > 3.4028234663852886e38) {
        ok = std::isinf(y) && y > 0;
      } else if (!std::isfinite(y)) {
        ok = false;
      } else if (want < 1.17549435e-38) {
        ok = std::fabs(y - want) <= std::ldexp(1.0, -149);
      } else {
        const double ulp = std::fabs(y - want) / float_spacing(want);
        if (ulp > worst) worst = ulp, worst_at = x;
        ok = true;
      }
      if (!ok && wrong++ < 10) std::printf("wrong: exp(%.9g) = %.9g, want %.9g\n", x, y, want);
      ++checked;
    }
  }
  std::printf("checked %ld worst_ulp %.4f at %.9g wrong %ld\n", checked, worst, worst_at, wrong);
  return 0;
}
