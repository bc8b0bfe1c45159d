// Int8 (W8A8) on Hopper: y[m, n] = (float(sum_k q[m, k] wq[n, k]) * s_m) * sw[n] (+ bias[n]) (+ y[m, n]),
// s8 x s8 wgmma with int32 sums, everything after the sum in the epilogue tree (cuda/quant_gemm_sm90.cuh).
#include "quant_gemm_sm90.cuh"

namespace ne {
namespace cuda {

namespace {
template <bool kAccumulate>
void int8_gemm(const Sm90QGemm& a, int sm_count, cudaStream_t stream) {
  using G = sm90::Int8Gemm<kAccumulate>;
  typename G::Main::Arguments main{static_cast<const int8_t*>(a.A), sm90::stride_a<G>(a),
                                   static_cast<const int8_t*>(a.W), sm90::stride_w<G>(a)};
  // ((acc * s_m) * sw[n]) + bias[n]: children's arguments, then the node's own (none)
  typename sm90::Int8Tree::Arguments tree{
      {{{}, {a.sx, 0.f, {}}, {}}, {a.sw, 0.f, {}}, {}},
      {a.bias, 0.f, {}},
      {}};
  if constexpr (kAccumulate) {
    sm90::run<G>(a, sm_count, stream, main, typename G::Epi::FusionCallbacks::Arguments{tree, {}, {}},
                 "int8 y += x W^T");
  } else {
    sm90::run<G>(a, sm_count, stream, main, tree, "int8 y = x W^T");
  }
}
}  // namespace

void sm90_int8_gemm(const Sm90QGemm& a, int sm_count, cudaStream_t stream) {
  if (a.accumulate)
    int8_gemm<true>(a, sm_count, stream);
  else
    int8_gemm<false>(a, sm_count, stream);
}

}  // namespace cuda
}  // namespace ne
