// DLPack interop shared by the binding files of the one module normengine._C: Python tensors
// (torch, numpy: anything with __dlpack__) become non-owning TensorViews for the duration of a call.
#pragma once
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "dlpack/dlpack.h"
#include "normengine/tensor.h"

namespace ne_bind {

namespace py = pybind11;
using ne::TensorView;

// Keeps the DLPack capsules (and so the producers' tensors) alive while a call runs.
struct Borrowed {
  std::vector<py::object> keep;
};

inline ne::DType dtype_of(const DLDataType& t, const char* name) {
  if (t.lanes == 1) {
    if (t.code == kDLFloat && t.bits == 32) return ne::DType::F32;
    if (t.code == kDLFloat && t.bits == 16) return ne::DType::F16;
    if (t.code == kDLFloat && t.bits == 64) return ne::DType::F64;
    if (t.code == kDLBfloat && t.bits == 16) return ne::DType::BF16;
    if (t.code == kDLInt && t.bits == 8) return ne::DType::I8;
    if (t.code == kDLInt && t.bits == 32) return ne::DType::I32;
    if (t.code == kDLInt && t.bits == 64) return ne::DType::I64;
    if (t.code == kDLUInt && t.bits == 8) return ne::DType::U8;
    if (t.code == kDLBool) return ne::DType::Bool;
  }
  throw ne::DTypeError(std::string(name) + ": unsupported element type (DLPack code " + std::to_string(t.code) +
                       ", " + std::to_string(t.bits) + " bits)");
}

inline TensorView view_of(py::handle obj, const char* name, Borrowed& b) {
  if (obj.is_none()) throw ne::ValueError(std::string(name) + ": expected a tensor, got None");
  py::object src = py::reinterpret_borrow<py::object>(obj);
  if (!py::hasattr(src, "__dlpack__"))
    throw ne::DTypeError(std::string(name) + ": expected a torch tensor or numpy array, got " +
                         std::string(py::str(py::type::of(src).attr("__name__"))));
  // torch refuses to export tensors that require grad; the kernels only read them.
  if (py::hasattr(src, "requires_grad") && src.attr("requires_grad").cast<bool>()) src = src.attr("detach")();
  py::object cap = src.attr("__dlpack__")();
  b.keep.push_back(cap);
  PyObject* c = cap.ptr();
  DLTensor* t = nullptr;
  if (PyCapsule_IsValid(c, "dltensor")) {
    t = &static_cast<DLManagedTensor*>(PyCapsule_GetPointer(c, "dltensor"))->dl_tensor;
  } else if (PyCapsule_IsValid(c, "dltensor_versioned")) {
    t = &static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(c, "dltensor_versioned"))->dl_tensor;
  } else {
    throw ne::DTypeError(std::string(name) + ": __dlpack__ did not return a DLPack capsule");
  }
  if (t->ndim > ne::kMaxDims)
    throw ne::ShapeError(std::string(name) + ": at most " + std::to_string(ne::kMaxDims) + " dimensions supported");
  TensorView v;
  v.name = name;
  v.dtype = dtype_of(t->dtype, name);
  v.data = static_cast<char*>(t->data) + t->byte_offset;
  v.ndim = t->ndim;
  int64_t st = 1;
  for (int d = t->ndim - 1; d >= 0; --d) {
    v.shape[d] = t->shape[d];
    v.strides[d] = t->strides ? t->strides[d] : st;
    st *= t->shape[d];
  }
  if (t->device.device_type == kDLCPU) {
    v.device = {ne::DeviceType::CPU, 0};
  } else if (t->device.device_type == kDLCUDA) {
    v.device = {ne::DeviceType::CUDA, t->device.device_id};
  } else {
    throw ne::DeviceError(std::string(name) + ": unsupported device (DLPack device type " +
                          std::to_string(t->device.device_type) + "); normengine runs on CPU and CUDA");
  }
  return v;
}

struct Opt {  // an optional tensor argument
  bool has = false;
  TensorView v;
  const TensorView* ptr() const { return has ? &v : nullptr; }
};
inline Opt opt_view(py::handle obj, const char* name, Borrowed& b) {
  Opt o;
  if (!obj.is_none()) {
    o.v = view_of(obj, name, b);
    o.has = true;
  }
  return o;
}

}  // namespace ne_bind
