// Internal: the fused LayerNorm-in-GEMM's guard against cancellation (cpp/ops/norm_linear.cpp).
#pragma once
#include <cstdint>
#include <vector>

namespace ne {

// Rows whose |mean| * rstd exceeds this are centred before the GEMM: above it, subtracting mean * c_n
// after the dot product would cost more than about 1e-6 relative (fp32 sums of K ~ 10^3 terms).
constexpr float kCenterRatio = 4.0f;

// x: rows x cols (row stride ldx); shift: each row's mean, rstd: its 1 / std. When some row has
// |shift| * rstd > kCenterRatio, writes every row into `scratch` (rows x cols, contiguous): those rows
// minus their mean, with their shift set to 0, the others as they are; returns scratch. Otherwise
// returns x and touches nothing.
const float* center_far_rows(const float* x, int64_t rows, int64_t cols, int64_t ldx, float* shift,
                             const float* rstd, std::vector<float>& scratch);

}  // namespace ne
