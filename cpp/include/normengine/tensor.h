// A non-owning view of a strided tensor: what every kernel entry point takes.
//
// Views are built by the bindings from DLPack capsules (torch, numpy) or by C++ callers (the runner,
// the benchmarks) around memory they own. A view never allocates or frees.
#pragma once
#include <cstdint>
#include <string>

#include "normengine/errors.h"

namespace ne {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3, I8 = 4, U8 = 5, I32 = 6, I64 = 7, Bool = 8 };
enum class DeviceType : int { CPU = 0, CUDA = 1 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    case DType::F64: return "float64";
    case DType::I8: return "int8";
    case DType::U8: return "uint8";
    case DType::I32: return "int32";
    case DType::I64: return "int64";
    case DType::Bool: return "bool";
  }
  return "?";
}

inline int dtype_size(DType t) {
  switch (t) {
    case DType::F32: case DType::I32: return 4;
    case DType::F16: case DType::BF16: return 2;
    case DType::F64: case DType::I64: return 8;
    case DType::I8: case DType::U8: case DType::Bool: return 1;
  }
  return 0;
}

inline bool is_float(DType t) {
  return t == DType::F32 || t == DType::F16 || t == DType::BF16 || t == DType::F64;
}

struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
  std::string str() const {
    return type == DeviceType::CPU ? std::string("cpu") : "cuda:" + std::to_string(index);
  }
};

constexpr int kMaxDims = 8;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::F32;
  Device device{};
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements
  const char* name = "tensor";     // for error messages: the argument's name

  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  int64_t size(int d) const { return shape[d < 0 ? d + ndim : d]; }
  int64_t stride(int d) const { return strides[d < 0 ? d + ndim : d]; }
  bool is_contiguous() const {
    int64_t expect = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != expect) return false;
      expect *= shape[i];
    }
    return true;
  }
  template <class T>
  T* ptr() const { return static_cast<T*>(data); }

  // A contiguous view over memory the caller owns.
  static TensorView make(void* data, DType dtype, std::initializer_list<int64_t> shape,
                         Device dev = Device{}, const char* name = "tensor") {
    TensorView t;
    t.data = data;
    t.dtype = dtype;
    t.device = dev;
    t.name = name;
    t.ndim = static_cast<int>(shape.size());
    int i = 0;
    for (int64_t s : shape) t.shape[i++] = s;
    int64_t st = 1;
    for (int d = t.ndim - 1; d >= 0; --d) {
      t.strides[d] = st;
      st *= t.shape[d];
    }
    return t;
  }
};

// ---- A row-major matrix seen by the row-wise kernels: `rows` rows of `cols` contiguous elements,
// consecutive rows `ld` elements apart. Any tensor whose last dim is contiguous and whose leading
// dims collapse into one stride can be seen this way (a contiguous tensor, a column slice, ...).
struct RowMatrix {
  void* data = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0, cols = 0, ld = 0;
  template <class T>
  T* row(int64_t r) const { return static_cast<T*>(data) + r * ld; }
};

std::string shape_str(const TensorView& t);
// Throws ShapeError naming the tensor when its layout cannot be seen as rows of its last dim.
RowMatrix as_rows(const TensorView& t);

// ---- Argument checks shared by every entry point; each names the argument in its message.
void check_float(const TensorView& t);                              // f32/f16/bf16/f64
void check_same_dtype(const TensorView& a, const TensorView& b);
void check_dtype(const TensorView& t, DType want);
void check_same_device(const TensorView& a, const TensorView& b);
void check_same_shape(const TensorView& a, const TensorView& b);
void check_shape_1d(const TensorView& t, int64_t n);                // shape == (n,)
void check_contiguous(const TensorView& t);
// Another tensor of x's shape, dtype and device (residual, grad_output, an output), seen as rows.
RowMatrix rows_like(const TensorView& t, const TensorView& x);
// A CUDA tensor reached a build without CUDA kernels: DeviceError naming it.
[[noreturn]] void throw_no_cuda(const TensorView& x);

}  // namespace ne
