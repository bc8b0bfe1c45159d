// Host build of the L-Mul product as nvcc compiles it for cuda/lmul.cu (cpp/ops/lmul_bits.h under
// __CUDACC__, __host__ __device__): out[i] = checked1(prep1(a[i]), prep1(b[i])) for m mantissa bits.
// tests/test_lmul.py::test_cuda_product_definition_matches_cpu compares it with the CPU kernels bit for bit.
#include <cstdint>

#include "ops/lmul_bits.h"

extern "C" int lmul_bits_host(int64_t n, const uint32_t* a, const uint32_t* b, uint32_t* out, int m) {
  if (m < 1 || m > 23) return 1;
  const int l = m <= 3 ? m : (m == 4 ? 3 : 4);  // as lmul_const (ops/lmul.h)
  const uint32_t trunc = 0xffffffffu << (23 - m), C = (127u << 23) - (1u << (23 - l));
  for (int64_t i = 0; i < n; ++i)
    out[i] = ne::lmul_bits::checked1(ne::lmul_bits::prep1(a[i], trunc), ne::lmul_bits::prep1(b[i], trunc), C);
  return 0;
}
