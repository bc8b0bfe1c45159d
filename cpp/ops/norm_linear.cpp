// norm_linear: y = norm(x) W^T + b with the normalization applied inside the GEMM.
//
//   RMSNorm / CRMSNorm:  norm(x)_k = x_k * rstd            =>  y_n = rstd * (x . W_n) + b_n
//   LayerNorm:           norm(x)_k = (x_k - mu) * rstd     =>  y_n = rstd * (x . W_n - mu * c_n) + b_n
//                        with c_n = sum_k W[n, k], the column-sum correction
//
// The row statistics (rstd, mu) come from one read of x (norm_stats); the GEMM then reads the raw x
// and applies them per row in its epilogue, so the normalized activation is never written to
// memory. Norm gains and biases are expected folded into W and b already (normengine.convert).
// The LayerNorm form subtracts mu * c_n after the dot product: for a row whose mean is large next to
// its spread that cancels digits (rows of 1e4 + N(0, 1): 4e-3 relative error). Such rows (|mu| * rstd
// above kCenterRatio) are centred first into a scratch copy, x - mu, and read with shift 0
// (center_far_rows); every other row is read raw. The zero-mean RMSNorm forms never need it.
#include "ops/norm_linear.h"

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "normengine/ops.h"
#include "ops/gemm.h"

namespace ne {

const float* center_far_rows(const float* x, int64_t rows, int64_t cols, int64_t ldx, float* shift,
                             const float* rstd, std::vector<float>& scratch) {
  auto far = [&](int64_t r) { return std::fabs(shift[r]) * rstd[r] > kCenterRatio; };
  bool any = false;
  for (int64_t r = 0; r < rows && !any; ++r) any = far(r);
  if (!any) return x;
  if (scratch.size() < static_cast<size_t>(rows * cols)) scratch.resize(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    float* o = scratch.data() + r * cols;
    if (far(r)) {
      // the mean again in double: the float32 mean itself is off by up to half an ulp of |mu|, an
      // error as large as the spread the row keeps after centring
      double mu = 0.0;
      for (int64_t k = 0; k < cols; ++k) mu += xr[k];
      mu /= static_cast<double>(cols);
      for (int64_t k = 0; k < cols; ++k) o[k] = static_cast<float>(static_cast<double>(xr[k]) - mu);
      shift[r] = 0.0f;
    } else {
      std::memcpy(o, xr, sizeof(float) * static_cast<size_t>(cols));
    }
  }
  return scratch.data();
}

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
  if (x.device.type == DeviceType::CUDA) {
#if defined(NE_WITH_CUDA)
    // the GEMM with the norm epilogue (cuda/gemm.cu): the mean subtracted as x is read, rstd on the sums;
    // fp32 products (no bf16 epilogue kernel on the GPU) and no column sums needed
    (void)bf16_products;
    return cuda::norm_linear_gemm(cuda::dense_args(check_linear(x, w, bias, y), w, bias), kind, eps,
                                  static_cast<float*>(rstd.data), ctx.cuda_stream);
#else
    throw DeviceError(std::string(x.name) + ": normengine was built without CUDA");
#endif
  }
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
  ep.col_sum = c;
  if (kind != NormKind::LayerNorm) {
    linear(x, w, bias, y, ctx, &ep, bf16_products);
    return;
  }
  // rows far from zero mean are read centred (the returned mean stays the true one)
  std::vector<float> shift(static_cast<const float*>(mean->data),
                           static_cast<const float*>(mean->data) + xr.rows);
  std::vector<float> centred;
  const float* xs = center_far_rows(static_cast<const float*>(xr.data), xr.rows, K, xr.ld, shift.data(),
                                    static_cast<const float*>(rstd.data), centred);
  ep.row_shift = shift.data();
  if (xs == xr.data) {
    linear(x, w, bias, y, ctx, &ep, bf16_products);
  } else {
    const TensorView xc = TensorView::make(const_cast<float*>(xs), DType::F32, {xr.rows, K}, x.device, x.name);
    const RowMatrix yr = as_rows(y);  // y as [rows, N] (its row stride kept)
    TensorView y2 = TensorView::make(yr.data, DType::F32, {yr.rows, yr.cols}, y.device, y.name);
    y2.strides[0] = yr.ld;
    linear(xc, w, bias, y2, ctx, &ep, bf16_products);
  }
}

}  // namespace ne
