// The Hopper GEMMs of cuda/quant_gemm_sm90.h, as CUTLASS 3.x kernels: which collectives, tile shapes and
// epilogue trees, and how quant_linear's operands map onto their arguments. Included by one .cu per format,
// compiled for sm_90a only (wgmma and setmaxnreg exist on no other target).
//
// Both kernels: 128 x 128 x 128-byte CTA tiles, a persistent grid of thread-block clusters, one producer warp
// issuing TMA loads of the A (activation) and W tiles into a multi-stage shared-memory ring (as many stages as
// fit beside the epilogue's buffers), consumer warpgroups issuing wgmma on them, and a TMA-store epilogue
// that evaluates the output formula as a tree over the accumulators (CUTLASS's epilogue visitor trees).
//   Int8: ping-pong schedule: two consumer warpgroups each own a whole 128 x 128 tile (int32 accumulators), one
//         computes while the other runs its epilogue; clusters of 2 along M share each W tile by TMA multicast.
//   FP8:  cooperative schedule: both consumer warpgroups split one tile (64 rows each) and, after every
//         128-wide K block, promote its fp32 partial sums into the accumulators times s[m, b] * sw(n, b)
//         (the blockwise-scaling mainloop; scales loaded beside the tiles); clusters of 2 along N share A.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/detail/blockwise_scale_layout.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include <string>
#include <type_traits>

#include "common.cuh"
#include "quant_gemm_sm90.h"

namespace ne {
namespace cuda {
namespace sm90 {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

using Tile = Shape<_128, _128, _128>;

// ---------------------------------------------------------------------------- epilogue trees
// A vector along the output's columns (one value per n: weight scales, bias; a null bias reads as 0) and
// one along its rows (one per m: the int8 activation scales).
using PerColumn = fusion::Sm90RowBroadcast<0, Tile, float, float, Stride<_0, _1, int64_t>>;
using PerRow = fusion::Sm90ColBroadcast<0, Tile, float, float, Stride<_1, _0, int64_t>>;
template <template <class> class Op>
using Fn = fusion::Sm90Compute<Op, float, float, cutlass::FloatRoundStyle::round_to_nearest>;

// Int8:  ((float(acc) * s_m) * sw[n]) + bias[n]       (the order of the CPU kernel and the mma.sync kernel)
using Int8Tree = fusion::Sm90EVT<Fn<cutlass::plus>,
                                 fusion::Sm90EVT<Fn<cutlass::multiplies>,
                                                 fusion::Sm90EVT<Fn<cutlass::multiplies>, fusion::Sm90AccFetch, PerRow>,
                                                 PerColumn>,
                                 PerColumn>;
// FP8:   acc + bias[n]                                 (the scales are already in acc)
using Fp8Tree = fusion::Sm90EVT<Fn<cutlass::plus>, fusion::Sm90AccFetch, PerColumn>;
// accumulate: tree + y[m, n], y read through TMA as the source C. A separate instantiation: the source read
// is decided at compile time (Sm90SrcFetch), and reading an unwritten y to multiply it by 0 could give NaN.
template <class Tree, bool kAccumulate>
using WithResidual = std::conditional_t<kAccumulate, fusion::Sm90EVT<Fn<cutlass::plus>, Tree, fusion::Sm90SrcFetch<float>>, Tree>;

template <class Tree, bool kAccumulate, class Cluster, class Schedule, class ElementAcc>
using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster, cutlass::epilogue::collective::EpilogueTileAuto,
    ElementAcc, float, std::conditional_t<kAccumulate, float, void>, cutlass::layout::RowMajor, 4, float,
    cutlass::layout::RowMajor, 4, Schedule, WithResidual<Tree, kAccumulate>>::CollectiveOp;

template <class Epi>
using Carveout = cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epi::SharedStorage))>;

// ---------------------------------------------------------------------------- kernels
template <bool kAccumulate>
struct Int8Gemm {
  using Cluster = Shape<_2, _1, _1>;
  using Epi = Epilogue<Int8Tree, kAccumulate, Cluster, cutlass::epilogue::TmaWarpSpecialized, int32_t>;
  using Main = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, int8_t, cutlass::layout::RowMajor, 16, int8_t,
      cutlass::layout::ColumnMajor, 16, int32_t, Tile, Cluster, Carveout<Epi>,
      cutlass::gemm::KernelTmaWarpSpecializedPingpong>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Main, Epi>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// FP8 scales: per activation row and 128-channel block (granularity 1 x 128) and per 128 x 128 weight block.
// CUTLASS's sm_90 mainloop reads both M/N-major: sfa[b][m], sfb[b][nb] (see transpose_scales below).
using Fp8Scales = cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128>;
using LayoutSFA = decltype(Fp8Scales::deduce_layoutSFA());
using LayoutSFB = decltype(Fp8Scales::deduce_layoutSFB());

template <bool kAccumulate>
struct Fp8Gemm {
  using Cluster = Shape<_1, _2, _1>;
  using Epi = Epilogue<Fp8Tree, kAccumulate, Cluster, cutlass::epilogue::TmaWarpSpecializedCooperative, float>;
  using Main = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::float_e4m3_t,
      cute::tuple<cutlass::layout::RowMajor, LayoutSFA>, 16, cutlass::float_e4m3_t,
      cute::tuple<cutlass::layout::ColumnMajor, LayoutSFB>, 16, float, Tile, Cluster, Carveout<Epi>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8Blockwise>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Main, Epi>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// ---------------------------------------------------------------------------- arguments
// A and W as row-major [rows, K] with their row strides; y as row-major [M, ldy] (also the source C when
// accumulating); the device's SM count sizes the persistent grid. Pointers are not read here, so the host
// test (tests/sm90_host.cu) checks these very arguments with can_implement on a machine without a GPU.
template <class Gemm, class TreeArgs>
typename Gemm::Device::Arguments arguments(const Sm90QGemm& a, int device, int sm_count,
                                           typename Gemm::Main::Arguments main, TreeArgs tree) {
  using Kernel = typename Gemm::Kernel;
  typename Gemm::Device::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = {static_cast<int>(a.M), static_cast<int>(a.N), static_cast<int>(a.K), 1};
  args.mainloop = main;
  args.epilogue.thread = tree;
  if constexpr (std::is_void_v<typename Kernel::ElementC>) {
    args.epilogue.ptr_C = nullptr;
  } else {
    args.epilogue.ptr_C = a.y;
  }
  args.epilogue.dC = typename Kernel::StrideC{a.ldy, _1{}, int64_t(0)};
  args.epilogue.ptr_D = a.y;
  args.epilogue.dD = typename Kernel::StrideD{a.ldy, _1{}, int64_t(0)};
  args.hw_info.device_id = device;
  args.hw_info.sm_count = sm_count;
  return args;
}

template <class Gemm>
typename Gemm::Kernel::StrideA stride_a(const Sm90QGemm& a) {
  return typename Gemm::Kernel::StrideA{a.lda, _1{}, int64_t(0)};
}
template <class Gemm>
typename Gemm::Kernel::StrideB stride_w(const Sm90QGemm& a) {
  return typename Gemm::Kernel::StrideB{a.ldw, _1{}, int64_t(0)};
}

// Int8: ((acc * s_m) * sw[n]) + bias[n] (+ y): children's arguments first, then the node's own (none).
template <bool kAccumulate>
typename Int8Gemm<kAccumulate>::Device::Arguments int8_arguments(const Sm90QGemm& a, int device, int sm_count) {
  using G = Int8Gemm<kAccumulate>;
  typename G::Main::Arguments main{static_cast<const int8_t*>(a.A), stride_a<G>(a), static_cast<const int8_t*>(a.W),
                                   stride_w<G>(a)};
  typename Int8Tree::Arguments tree{{{{}, {a.sx, 0.f, {}}, {}}, {a.sw, 0.f, {}}, {}}, {a.bias, 0.f, {}}, {}};
  if constexpr (kAccumulate)
    return arguments<G>(a, device, sm_count, main, typename G::Epi::FusionCallbacks::Arguments{tree, {}, {}});
  else
    return arguments<G>(a, device, sm_count, main, tree);
}

// FP8 scales as the mainloop reads them (M / N-major, see transpose_scales in quant_gemm_sm90_fp8.cu):
//   sfa: ((1, Mp), (128, KB)) with strides ((0, 1), (0, Mp)): sfa[b * Mp + m], Mp = M rounded up to 4 (the
//        mainloop loads it by TMA: 16-byte strides, and a row count CUTLASS checks for 4-float alignment)
//   sfb: ((128, NB), (128, KB)) with strides ((0, 1), (0, NB)): sfb[b * NB + j]
inline int64_t fp8_scale_rows(int64_t M) { return (M + 3) / 4 * 4; }

template <bool kAccumulate>
typename Fp8Gemm<kAccumulate>::Device::Arguments fp8_arguments(const Sm90QGemm& a, int device, int sm_count,
                                                               const float* sfa, const float* sfb) {
  using G = Fp8Gemm<kAccumulate>;
  const int32_t Mp = static_cast<int32_t>(fp8_scale_rows(a.M)), KB = static_cast<int32_t>((a.K + 127) / 128);
  const LayoutSFA layout_sfa = make_layout(make_shape(make_shape(_1{}, Mp), make_shape(_128{}, KB), int32_t(1)),
                                           make_stride(make_stride(_0{}, _1{}), make_stride(_0{}, Mp), Mp * KB));
  const LayoutSFB layout_sfb =
      Fp8Scales::tile_atom_to_shape_SFB(make_shape(int32_t(a.M), int32_t(a.N), int32_t(a.K), int32_t(1)));
  typename G::Main::Arguments main{static_cast<const cutlass::float_e4m3_t*>(a.A), stride_a<G>(a),
                                   static_cast<const cutlass::float_e4m3_t*>(a.W), stride_w<G>(a),
                                   sfa, layout_sfa, sfb, layout_sfb};
  typename Fp8Tree::Arguments tree{{}, {a.bias, 0.f, {}}, {}};  // acc + bias[n]
  if constexpr (kAccumulate)
    return arguments<G>(a, device, sm_count, main, typename G::Epi::FusionCallbacks::Arguments{tree, {}, {}});
  else
    return arguments<G>(a, device, sm_count, main, tree);
}

// ---------------------------------------------------------------------------- running one
inline void check_cutlass(cutlass::Status s, const char* what) {
  if (s != cutlass::Status::kSuccess)
    throw Error(std::string("CUTLASS sm_90 GEMM (") + what + "): " + cutlass::cutlassGetStatusString(s));
}

template <class Gemm>
void run(typename Gemm::Device::Arguments const& args, cudaStream_t stream, const char* what) {
  using Device = typename Gemm::Device;
  Device gemm;
  check_cutlass(gemm.can_implement(args), what);  // quant_gemm_sm90 checked the same conditions before coming here
  StreamScratch workspace;
  const size_t ws = Device::get_workspace_size(args);
  void* w = ws ? workspace.alloc(ws, stream) : nullptr;
  check_cutlass(gemm.initialize(args, w, stream), what);
  check_cutlass(gemm.run(stream), what);
  check_launch(what);
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ne
