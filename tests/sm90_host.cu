// Host-only check of the Hopper GEMMs' arguments (cuda/quant_gemm_sm90.cuh), no GPU needed: for a problem
// (format, accumulate, M, N, K, row strides, fp8 weight grouping) returns bit 0 = quant_gemm_sm90 would take it
// (sm90_tma_fits), bit 1 = CUTLASS's can_implement accepts the arguments the kernel would be launched with.
// tests/test_quant.py builds it with nvcc and requires bit 0 => bit 1 over a sweep of shapes: a problem the
// dispatcher accepts must never reach can_implement's "misaligned" error on a GPU.
#include "quant_gemm_sm90.cuh"

using namespace ne;
using namespace ne::cuda;

template <class Gemm>
static bool implementable(typename Gemm::Device::Arguments const& args) {
  return Gemm::Device::can_implement(args) == cutlass::Status::kSuccess;
}

extern "C" int sm90_check(int fp8, int accumulate, int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldw,
                          int64_t ldy, int64_t wgroup) {
  // any 16-byte aligned addresses: nothing is dereferenced on the host
  void* p = reinterpret_cast<void*>(uintptr_t(1) << 20);
  Sm90QGemm a{fp8 ? QFormat::FP8 : QFormat::Int8, M, N, K, p, lda, static_cast<const float*>(p), p, ldw,
              static_cast<const float*>(p), wgroup, nullptr, static_cast<float*>(p), ldy, accumulate != 0};
  const int fits = sm90_tma_fits(a) ? 1 : 0;
  bool ok;
  const float* s = static_cast<const float*>(p);
  if (fp8)
    ok = accumulate ? implementable<sm90::Fp8Gemm<true>>(sm90::fp8_arguments<true>(a, 0, 132, s, s))
                    : implementable<sm90::Fp8Gemm<false>>(sm90::fp8_arguments<false>(a, 0, 132, s, s));
  else
    ok = accumulate ? implementable<sm90::Int8Gemm<true>>(sm90::int8_arguments<true>(a, 0, 132))
                    : implementable<sm90::Int8Gemm<false>>(sm90::int8_arguments<false>(a, 0, 132));
  return fits | (ok ? 2 : 0);
}
