// FP8 (e4m3) on Hopper: y[m, n] = sum_b (s[m, b] * sw(n, b)) * (sum_{k in b} xq[m, k] wq[n, k]) (+ bias[n]) (+ y),
// e4m3 x e4m3 wgmma, fp32 partial sums per 128-wide K block promoted with both scales in the mainloop
// (cuda/quant_gemm_sm90.cuh); bias and residual in the epilogue tree.
#include "quant_gemm_sm90.cuh"

namespace ne {
namespace cuda {

namespace {

// The mainloop reads the scales M / N-major (one 128-row slice of a K block's scales per TMA load):
//   sfa[b * Mp + m] = sx[m * KB + b]     (Mp = M rounded up to 4: TMA wants 16-byte strides)
//   sfb[b * NB + j] = sw[j * KB + b]     (per-tensor weights: sw[0] in every block)
__global__ void transpose_scales(int64_t M, int64_t Mp, int64_t KB, int64_t NB, const float* __restrict__ sx,
                                 const float* __restrict__ sw, bool per_block, float* __restrict__ sfa,
                                 float* __restrict__ sfb) {
  const int64_t na = M * KB, total = na + NB * KB;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    if (i < na) {
      const int64_t m = i / KB, b = i % KB;
      sfa[b * Mp + m] = sx[i];
    } else {
      const int64_t j = (i - na) / KB, b = (i - na) % KB;
      sfb[b * NB + j] = per_block ? sw[i - na] : sw[0];
    }
  }
}

template <bool kAccumulate>
void fp8_gemm(const Sm90QGemm& a, int sm_count, cudaStream_t stream) {
  using G = sm90::Fp8Gemm<kAccumulate>;
  const int64_t KB = (a.K + 127) / 128, NB = (a.N + 127) / 128, Mp = (a.M + 3) / 4 * 4;
  StreamScratch scratch;
  auto* sfa = static_cast<float*>(scratch.alloc(static_cast<size_t>((Mp + NB) * KB) * sizeof(float), stream));
  float* sfb = sfa + Mp * KB;
  const int64_t total = (a.M + NB) * KB;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 4096));
  transpose_scales<<<blocks, 256, 0, stream>>>(a.M, Mp, KB, NB, a.sx, a.sw, a.wgroup != 0, sfa, sfb);
  check_launch("fp8 transpose_scales");

  // ((1, M), (128, KB)) with strides ((0, 1), (0, Mp)); ((128, NB), (128, KB)) with strides ((0, 1), (0, NB))
  using namespace cute;
  const sm90::LayoutSFA layout_sfa = make_layout(
      make_shape(make_shape(_1{}, int32_t(a.M)), make_shape(_128{}, int32_t(KB)), int32_t(1)),
      make_stride(make_stride(_0{}, _1{}), make_stride(_0{}, int32_t(Mp)), int32_t(Mp * KB)));
  const sm90::LayoutSFB layout_sfb = sm90::Fp8Scales::tile_atom_to_shape_SFB(
      make_shape(int32_t(a.M), int32_t(a.N), int32_t(a.K), int32_t(1)));
  typename G::Main::Arguments main{static_cast<const cutlass::float_e4m3_t*>(a.A), sm90::stride_a<G>(a),
                                   static_cast<const cutlass::float_e4m3_t*>(a.W), sm90::stride_w<G>(a),
                                   sfa, layout_sfa, sfb, layout_sfb};
  typename sm90::Fp8Tree::Arguments tree{{}, {a.bias, 0.f, {}}, {}};  // acc + bias[n]
  if constexpr (kAccumulate) {
    sm90::run<G>(a, sm_count, stream, main, typename G::Epi::FusionCallbacks::Arguments{tree, {}, {}},
                 "fp8 y += x W^T");
  } else {
    sm90::run<G>(a, sm_count, stream, main, tree, "fp8 y = x W^T");
  }
}

}  // namespace

void sm90_fp8_gemm(const Sm90QGemm& a, int sm_count, cudaStream_t stream) {
  if (a.accumulate)
    fp8_gemm<true>(a, sm_count, stream);
  else
    fp8_gemm<false>(a, sm_count, stream);
}

}  // namespace cuda
}  // namespace ne
