// Quantized linear layers (CPU kernels in cpp/ops/quant_gemm.cpp, one instance per ISA; on CUDA
// tensors normengine.ops.quantized_linear composes torch ops for now): y = x W^T with W packed as int8 (per output channel), int4 (groups along K,
// symmetric or with zero points) or fp8 E4M3 (per tensor or 128 x 128 blocks), dequantized in
// registers, never to a W-sized buffer. Python: normengine.ops.quantize_weight / quantized_linear;
// the packing itself (quantization) is done in torch there.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/dispatch.h"
#include "normengine/tensor.h"
#include "ops/gemm.h"

namespace ne {

// Packed weight formats. Every layout is plain row-major over the [N, K] weight (torch.nn.Linear layout).
enum class QFormat : int { Int8 = 0, Int8Weight = 1, Int4 = 2, FP8 = 3 };
struct QWeight {
  QFormat format = QFormat::Int8;
  int64_t N = 0, K = 0;
  // Int8 / Int8Weight: int8 [N, K], q in [-127, 127], w ~= q * scale[n]; Int8Weight with group > 0 (16, 32, 64 or
  //       128; K % group == 0): w ~= q * scale[n, k/group] (llama.cpp's Q8_0 blocks are group 32), or with zero
  //       points (q - zero[n, k/group]) * scale[n, k/group] (GGUF's Q5_1 / Q5_K / Q2_K blocks).
  // Int4: uint8 [N, K/2]; byte j of row n holds k = 2j in its low nibble and k = 2j+1 in its high nibble;
  //       nibble q in 0..15; w ~= (q - zero[n, k/group]) * scale[n, k/group]; zero == nullptr means symmetric:
  //       zero point 7.5, levels (q - 7.5) s = +-0.5 s ... +-7.5 s, symmetric around 0 (mid-rise).
  // FP8: uint8 [N, K] holding E4M3 (fn: no Inf, 0x7f/0xff NaN, max 448) bit patterns; w ~= e4m3(q) * scale.
  const void* data = nullptr;
  // Int8*: [N] (Int8Weight with group > 0: [N, K/group]); Int4: [N, K/group]; FP8: [1] when group == 0 (per tensor),
  // [ceil(N/128), ceil(K/128)] when group == 128 (block scales).
  const float* scale = nullptr;
  const float* zero = nullptr;  // Int4 / grouped Int8Weight asymmetric only: [N, K/group], in quantized units
  // Int4 with zero == nullptr: every group's zero point. 7.5 (symmetric, mid-rise) unless the runner found all of a
  // weight's zero points equal (a GGUF Q4_0's are 8): it then reads this one instead of the [N, K/group] array.
  float zero_point = 7.5f;
  // Int4: 32, 64 or 128 (16 with two-level scales; K % group == 0, K % 32 == 0); FP8: 0 or 128; Int8: 0;
  // Int8Weight: 0, 16 .. 128
  int64_t group = 0;
  // Two-level scales (Int4 and grouped Int8Weight; how GGUF's K-quants hold theirs, kept as they are): with sub set,
  // scale is float32 [N, K / (group * super)], one per super-block of `super` groups, and each group's scale the
  // product s[n, g] = scale[n, g / super] * sub[n, g] (sub int8 [N, K / group]); with sub_zero (int8 [N, K / group])
  // also zero (float32 [N, K / (group * super)]), an offset in weight units o[n, g] = zero[n, g / super] *
  // sub_zero[n, g], and w = q s - o (GGUF's d sc q - dmin m, the same float32 products); without, w = (q - zero_point)
  // s (int4) or q s (int8-weight). A Q4_K weight: 4.75 bits (4.5 in the file) against 6 with a float32 s and z
  // per group; Q6_K as int8 8.6 against 10.
  const int8_t* sub = nullptr;
  const int8_t* sub_zero = nullptr;
  int64_t super = 0;
};


// Scales a packed weight carries (zero points: as many as scales, int4 / grouped int8-weight only): Int8*: N
// (grouped Int8Weight and Int4: N * K / group); FP8: 1 per tensor (group 0) or one per 128 x 128 block.
inline int64_t qweight_scale_count(QFormat f, int64_t N, int64_t K, int64_t group) {
  if (f == QFormat::Int4 || (f == QFormat::Int8Weight && group > 0)) return N * (K / (group > 0 ? group : 1));
  if (f == QFormat::FP8) return group == 0 ? 1 : ((N + 127) / 128) * ((K + 127) / 128);
  return N;
}
// Two-level scales: the super-block scales (and offsets) a weight carries, N * K / (group * super).
inline int64_t qweight_super_count(int64_t N, int64_t K, int64_t group, int64_t super) {
  return N * (K / (group * super));
}

// Throws ValueError / ShapeError when w's format, sizes, group size or zero points do not fit together
// (quant_gemm.cpp; the CPU and CUDA entry points both check with it).
void check_qweight(const QWeight& w);

// Row epilogue as in ops/gemm.h's GemmEpilogue (reuse that struct): y[m,n] = s_m * (dot[m,n] - mu_m * c_n) + bias[n] (+ y).
// y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) (+ y[m, n] if accumulate), CPU, float32 x rows (row stride ldx) and y (ldy).
// Activation handling by format: Int8 (W8A8): x quantized per row (token) on the fly, s_x = max|x_m| / 127,
// q_x = round-to-nearest-even(x / s_x) clamped to [-127, 127], int32 dot products, y = s_x * s_w[n] * dot (+ bias);
// Int8Weight / Int4: x used in fp32, weights dequantized in registers; FP8: x quantized per row and per 128-channel
// block, s = max|x[m, block]| / 448, x_q = E4M3 round-to-nearest-even of x / s, products e4m3 * e4m3 exact in fp32,
// y = sum over K-blocks of s_x[m, b] * s_w[n-block, b] * (fp32 sum of products in the block)  (per-tensor: s_w constant).
// Multithreaded on the engine's pool; scratch for quantized activations is per thread and reused, never a W-sized buffer.
// bf16_products (matmul precision "medium"): the prefill of the weight-dequantizing formats (Int8Weight, Int4, FP8;
// more rows than the GEMV kernels take) may run its dequantized panels through gemm_f32's bf16 path (AMX-BF16 or
// AVX512-BF16): the panel and x rounded to bf16 (relative 2^-9, far below the formats' own quantization error); Int4
// and Int8Weight decode rows may round x to int8 per 32 columns for integer products (int8_activations_decode_x86:
// VNNI, or for Int4 AVX2's VPMADDUBSW; as llama.cpp's 4- and 8-bit dot products); Int8 (W8A8) and FP8 decode rows
// unchanged.
void quant_gemm_f32(int64_t M, const float* x, int64_t ldx, const QWeight& w, const float* bias, float* y, int64_t ldy,
                    bool accumulate = false, const GemmEpilogue* ep = nullptr, bool bf16_products = false);

// Quantize rows of a weight w [N, K] (row stride ldw; float32, bfloat16 or float16) as int8 /
// int8-weight (data int8 [N, K], scale [N]) or int4 (data uint8 [N, K/2], scale [N, K/group], zero
// [N, K/group] when !symmetric): normengine.ops.quantize_weight's arithmetic, in float64, threaded
// (ops/quantize_weight.cpp). Returns false (writing nothing meaningful) if w holds NaN or Inf.
bool quantize_weight_rows(const void* w, DType wdtype, int64_t ldw, int64_t N, int64_t K, QFormat fmt, int group,
                          bool symmetric, void* data, float* scale, float* zero);

#if defined(NE_WITH_CUDA)
namespace cuda {
// The same op on the GPU (cuda/quant_gemm.cu). x: device pointer, dtype xdt (F32, BF16 or F16), M rows, row stride ldx;
// w's pointers device memory; bias device float32 [N] or null; y device float32 [M, ldy]. Enqueued on `stream`.
// Numerics as quant_gemm_f32 (the same activation quantization), tensor cores for Int8 (IMMA) and FP8 (e4m3 MMA).
void quant_linear(int64_t M, const void* x, DType xdt, int64_t ldx, const QWeight& w, const float* bias, float* y,
                  int64_t ldy, bool accumulate, void* stream);
// Hopper: on a compute capability 9.0 device quant_linear runs Int8 / FP8 with more than 8 rows on wgmma kernels
// (cuda/quant_gemm_sm90.h) when this build has them (sm90_gemm_compiled) and they are switched on (set_sm90_gemm,
// on by default), on the mma.sync kernel otherwise: tests and benchmarks compare the two paths with the switch.
bool sm90_gemm_compiled();
void set_sm90_gemm(bool enabled);
bool sm90_gemm_enabled();
int64_t sm90_gemm_calls();  // how many GEMMs the wgmma kernels have run in this process
// The activation quantization quant_linear applies (exposed for tests): fmt Int8: q int8 [M, K] (row stride ldq),
// s [M] (stride lds); FP8: q E4M3 bytes [M, K], s [M, ceil(K/128)] (row stride lds). Bit for bit the CPU's.
void quant_activations(int64_t M, int64_t K, const void* x, DType xdt, int64_t ldx, QFormat fmt, void* q, int64_t ldq,
                       float* s, int64_t lds, void* stream);
// y[M, N] = bf16(x) W^T (+ bias) (+ y if accumulate) for a bfloat16 weight W [N, K] (row stride ldw elements),
// x float32 [M, ldx] rounded to bfloat16 (nearest even), products exact and sums in fp32 on the tensor cores
// (the tile kernel of Int8 / FP8 with mma.sync m16n8k16 bf16): torch's matmul_precision "medium" on the GPU.
// Device pointers, enqueued on `stream`. norm (fused norms): x's rows are normalized as they are rounded,
// bf16(((x - shift) - shift_lo) * scale), so norm(x) is never written. Returns false, doing nothing, where it
// does not apply: K or ldw not a multiple of 8, W not 16-byte aligned, or a GPU older than sm_80.
bool bf16_linear(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const void* w, int64_t ldw,
                 const float* bias, float* y, int64_t ldy, bool accumulate, void* stream,
                 const RowNorm& norm = RowNorm{});
}  // namespace cuda
#endif


// ------------------------------------------------------------------------- kernel table (internal)
// Activations prepared once per call by the entry point: Int8: x quantized per row (xq int8 [M, Kp],
// Kp = K rounded up to 64, zero padded; sx [M]); FP8: x / s rounded to E4M3 values held as floats
// (xf [M, K]) with s per row and 128-channel block (sx [M, ceil(K/128)]); Int4: per-row sums of x
// over each group (gsum [M, K/group], for the zero points) and x de-interleaved per D = 16 or 32
// columns, the table's int4_deinterleave (xf [M, K]: D/2 even columns, then the D/2 odd ones); Int8Weight: x as
// given (with zero points also gsum).
struct QArgs {
  int64_t M;
  const float* x; int64_t ldx;
  const int8_t* xq; int64_t ldxq;
  const float* xf;
  const float* sx; int64_t ldsx;
  const float* gsum;
  const QWeight* w;
  const float* bias;
  float* y; int64_t ldy;
  bool accumulate;
  GemmEpilogue ep;
};

// The epilogue every kernel ends with: v = the output's dot product with its scales applied;
// y[m, n] = r_m (v - mu_m c_n) (the fused norm, ops/gemm.h) + bias[n] (+ y[m, n]).
inline void quant_store(const QArgs& a, int64_t m, int64_t n, float v) {
  if (a.ep.row_scale || a.ep.row_shift) {
    const float mu = a.ep.row_shift ? a.ep.row_shift[m] * a.ep.col_sum[n] : 0.0f;
    v = (a.ep.row_scale ? a.ep.row_scale[m] : 1.0f) * (v - mu);
  }
  if (a.bias) v += a.bias[n];
  float& y = a.y[m * a.ldy + n];
  y = a.accumulate ? y + v : v;
}

// More rows than this: FP8 (Int4 / Int8Weight: QuantTable::max_gemv_rows) dequantize W panel by panel
// (about 4 MB of fp32, per calling thread, reused) into the fp32 GEMM; fewer: the GEMV kernels, which
// dequantize in registers.
constexpr int64_t kQuantPanelMinRows = 4;

// W8A8 kernels with the x86 dot-product extensions (quant_int8_x86.cpp): "amx" (tile multiply),
// "avx512vnni", "avxvnni", or "isa" (the ISA family's AVX2 / scalar kernel). int8_kernels(): what
// this CPU has within the active ISA; int8_kernel(): the one W8A8 GEMMs use now (the best, capped by force_cpu_isa and
// force_int8_kernel("auto" | a name)). int8_gemm_x86 runs a whole call (xq padded to Kp % 64 == 0)
// and returns false when the kernel is "isa".
std::vector<std::string> int8_kernels();
const char* int8_kernel();
void force_int8_kernel(const std::string& name);
bool int8_gemm_x86(const QArgs& a);
// matmul precision "medium" at decode (quant_int8_x86.cpp): int4 weights (any group size) and int8-weight
// ones (per-row or grouped scales, zero points or none; up to kInt8WeightDecodeRows rows of x) against x rounded to
// int8 per 32 columns, integer products (as llama.cpp's 4- and 8-bit dot products): VPDPBUSD with AVX-512 VNNI, else
// for int4 AVX2's VPMADDUBSW; a.gsum prepared by the caller where there are zero terms. Prepares its own
// activations into a and runs the whole call; false (nothing written) where neither applies within the active ISA
// and the int8 kernel choice (int8_decode_formats), for other formats or row counts, K not whole blocks of 32, and
// when x holds NaN or Inf.
constexpr int64_t kInt8WeightDecodeRows = 3;
bool int8_activations_decode_x86(QArgs& a, const float* x, int64_t ldx);
// The weight formats whose decode rows int8_activations_decode_x86 takes under the active ISA and int8 kernel
// choice: "int4" (AVX-512 VNNI or AVX2), "int8-weight" (AVX-512 VNNI); int8_decode_rows(): each with the most
// rows of x it takes (int4: the ISA's GEMV rows; int8-weight: 3)
std::vector<std::string> int8_decode_formats();
std::map<std::string, int64_t> int8_decode_rows();

struct QuantTable {
  void (*block[4])(const QArgs& a, int64_t n0, int64_t n1);  // by QFormat: outputs [0, M) x [n0, n1)
  void (*dequant)(const QWeight& w, int64_t n0, int64_t n1, float* out);  // rows [n0, n1) in fp32, [n1 - n0, K]
  void (*dequant_bf16)(const QWeight& w, int64_t n0, int64_t n1, uint16_t* out);  // the same rounded to bf16
  // W8A8 activations of rows [m0, m1): xq [M, Kp] (zero past K), sx [M]
  void (*quantize_int8)(const float* x, int64_t ldx, int64_t K, int64_t Kp, int8_t* xq, float* sx, int64_t m0, int64_t m1);
  int int4_deinterleave;  // Int4: x de-interleaved per this many columns (16 or 32; group sizes are multiples of 32)
  // Int4 and Int8Weight with at most this many rows run the register kernels (which decode each weight
  // once for up to four rows of x), more rows the dequantized panels. Measured at K = N = 4096, 2 threads,
  // against the panels: int4 AVX-512 12 rows 3.0 ms vs 4.1 ms, 15 rows 3.8 vs 4.4; AVX2 12 rows 4.5 vs 4.7,
  // 15 rows 6.5 vs 5.3; the generic build's scalar kernel loses from 5 rows on (8 rows 59 ms vs 7.8). Int8Weight
  // (which had 4): see benchmarks/RESULTS.md.
  int max_gemv_rows;
  // FP8 activations of rows [m0, m1): xf [M, K] E4M3 values (times the block scale when fold), sx [M, ceil(K/128)] or null
  void (*quantize_fp8)(const float* x, int64_t ldx, int64_t K, float* xf, float* sx, int64_t m0, int64_t m1, bool fold);
};

}  // namespace ne

NE_DECLARE_ISA_TABLES(::ne::QuantTable, quant_table)

