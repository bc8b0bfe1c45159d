// norm_linear: y = norm(x) W^T + b with the normalization applied inside the GEMM.
//
//   RMSNorm / CRMSNorm:  norm(x)_k = x_k * rstd            =>  y_n = rstd * (x . W_n) + b_n
//   LayerNorm:           norm(x)_k = (x_k - mu) * rstd     =>  y_n = rstd * (x . W_n - mu * c_n) + b_n
//                        with c_n = sum_k W[n, k], the column-sum correction
//
// The row statistics (rstd, mu) come from one read of x (norm_stats); the GEMM then reads the raw x
// and applies them per row in its epilogue, so the normalized activation is never written to
// memory. Norm gains and biases are expected folded into W and b already (normengine.convert).
// (The LayerNorm form subtracts mu * c_n after the dot product: for rows whose mean is large next
// to their spread that cancels digits, which is why the zero-mean RMSNorm forms are preferred.)
#include <string>
#include <vector>

#include "normengine/ops.h"
#include "ops/gemm.h"

namespace ne {

void norm_linear(NormKind kind, const TensorView& x, const TensorView& w, const TensorView* bias, double eps,
                 const TensorView* col_sum, const TensorView& y, const TensorView* mean, const TensorView& rstd,
                 const Ctx& ctx, bool bf16_products) {
  check_dtype(x, DType::F32);
  if (w.ndim != 2)
    throw ShapeError(std::string(w.name) + ": expected a 2-D tensor [out_features, in_features], got shape " +
                     shape_str(w));
  const RowMatrix xr = as_rows(x);
  const int64_t N = w.shape[0], K = w.shape[1];
  if (xr.cols != K)
    throw ShapeError(std::string(x.name) + ": last dimension " + std::to_string(xr.cols) + " does not match " +
                     w.name + "'s in_features " + std::to_string(K));
  if (kind == NormKind::LayerNorm && !mean)
    throw ValueError("mean: layer norm_linear needs a buffer for the row means");
  if (col_sum) {
    check_dtype(*col_sum, DType::F32);
    check_shape_1d(*col_sum, N);
    check_same_device(x, *col_sum);
  }
  // statistics first (checks x, mean, rstd)
  norm_stats(kind, x, eps, kind == NormKind::LayerNorm ? mean : nullptr, rstd, ctx);
  if (x.device.type == DeviceType::CUDA)
    throw UnsupportedError("norm_linear: the fused GEMM runs on the CPU in this version (" + std::string(x.name) +
                           " is on " + x.device.str() + "); normengine.ops.norm_linear composes it on CUDA");
  // the GEMM with the per-row epilogue (checks w, bias, y like linear())
  std::vector<float> csum;
  const float* c = nullptr;
  if (kind == NormKind::LayerNorm) {
    if (col_sum) {
      c = static_cast<const float*>(col_sum->data);
    } else {
      // c_n = W_n . 1, computed with the same kernel
      std::vector<float> one(static_cast<size_t>(K), 1.0f);
      csum.resize(static_cast<size_t>(N));
      gemm_f32(1, N, K, one.data(), K, w.data, w.dtype, w.ndim == 2 && N > 1 ? w.strides[0] : K, nullptr,
               csum.data(), N, false);
      c = csum.data();
    }
  }
  GemmEpilogue ep;
  ep.row_scale = static_cast<const float*>(rstd.data);
  ep.row_shift = kind == NormKind::LayerNorm ? static_cast<const float*>(mean->data) : nullptr;
  ep.col_sum = c;
  linear(x, w, bias, y, ctx, &ep, bf16_products);
}

}  // namespace ne
