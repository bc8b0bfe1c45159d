#include <sstream>

#include "normengine/tensor.h"

namespace ne {

std::string shape_str(const TensorView& t) {
  std::ostringstream s;
  s << "(";
  for (int i = 0; i < t.ndim; ++i) s << (i ? ", " : "") << t.shape[i];
  if (t.ndim == 1) s << ",";
  s << ")";
  return s.str();
}

RowMatrix as_rows(const TensorView& t) {
  RowMatrix m;
  m.data = t.data;
  m.dtype = t.dtype;
  if (t.ndim == 0) {
    m.rows = 1; m.cols = 1; m.ld = 1;
    return m;
  }
  m.cols = t.shape[t.ndim - 1];
  m.rows = 1;
  for (int i = 0; i < t.ndim - 1; ++i) m.rows *= t.shape[i];
  if (m.cols > 1 && t.strides[t.ndim - 1] != 1)
    throw ShapeError(std::string(t.name) + ": the last dimension must be contiguous (stride 1), got stride " +
                     std::to_string(t.strides[t.ndim - 1]));
  // Leading dims must collapse to one row stride: stride[i] == stride[i+1] * shape[i+1] for dims of size > 1.
  int64_t ld = -1;
  int64_t expect = -1;
  for (int i = t.ndim - 2; i >= 0; --i) {
    if (t.shape[i] == 1) continue;
    if (ld < 0) {
      ld = t.strides[i];
      expect = ld * t.shape[i];
    } else {
      if (t.strides[i] != expect)
        throw ShapeError(std::string(t.name) + ": leading dimensions of shape " + shape_str(t) +
                         " do not collapse into rows of one stride; make it contiguous");
      expect *= t.shape[i];
    }
  }
  m.ld = ld < 0 ? m.cols : ld;
  if (m.rows > 1 && m.ld < m.cols)
    throw ShapeError(std::string(t.name) + ": rows overlap (row stride " + std::to_string(m.ld) + " < " +
                     std::to_string(m.cols) + " columns)");
  return m;
}

void check_float(const TensorView& t) {
  if (!is_float(t.dtype))
    throw DTypeError(std::string(t.name) + ": expected a floating-point tensor (float32, float16, bfloat16 or "
                     "float64), got " + dtype_name(t.dtype));
}

void check_dtype(const TensorView& t, DType want) {
  if (t.dtype != want)
    throw DTypeError(std::string(t.name) + ": expected dtype " + dtype_name(want) + ", got " + dtype_name(t.dtype));
}

void check_same_dtype(const TensorView& a, const TensorView& b) {
  if (a.dtype != b.dtype)
    throw DTypeError(std::string(b.name) + ": dtype " + dtype_name(b.dtype) + " does not match " + a.name + "'s " +
                     dtype_name(a.dtype));
}

void check_same_device(const TensorView& a, const TensorView& b) {
  if (a.device != b.device)
    throw DeviceError(std::string(b.name) + " is on " + b.device.str() + " but " + a.name + " is on " +
                      a.device.str() + "; move them to one device");
}

void check_same_shape(const TensorView& a, const TensorView& b) {
  bool same = a.ndim == b.ndim;
  for (int i = 0; same && i < a.ndim; ++i) same = a.shape[i] == b.shape[i];
  if (!same)
    throw ShapeError(std::string(b.name) + ": shape " + shape_str(b) + " does not match " + a.name + "'s " +
                     shape_str(a));
}

void check_shape_1d(const TensorView& t, int64_t n) {
  if (t.ndim != 1 || t.shape[0] != n)
    throw ShapeError(std::string(t.name) + ": expected shape (" + std::to_string(n) + ",), got " + shape_str(t));
}

void check_contiguous(const TensorView& t) {
  if (!t.is_contiguous()) throw ShapeError(std::string(t.name) + ": expected a contiguous tensor");
}

RowMatrix rows_like(const TensorView& t, const TensorView& x) {
  check_same_device(x, t);
  check_same_dtype(x, t);
  check_same_shape(x, t);
  return as_rows(t);
}

void throw_no_cuda(const TensorView& x) {
  throw DeviceError(std::string(x.name) + " is on " + x.device.str() +
                    ", but this build of normengine has no CUDA kernels (it was built without nvcc)");
}

}  // namespace ne
