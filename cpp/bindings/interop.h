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

// torch tensors are read through their own attributes (about 1 us) rather than __dlpack__ (about 2 us
// each: a call with several tensors spent more time exporting them than a small kernel runs). What
// this path does not know (a dtype outside the table, a device other than CPU / CUDA, a non-strided
// layout, a lazily negated view, no torch at all) goes through DLPack, which also raises the errors.
struct TorchTypes {
  py::object tensor, strided;
  std::vector<std::pair<py::object, ne::DType>> dtypes;
  // attribute names, interned once (a name made from a C string per lookup cost ~0.1 us each)
  py::object layout, is_neg, dtype, is_cpu, is_cuda, get_device, shape, stride, data_ptr;
};

// torch's types, once this process has imported torch; nullptr before (then nothing passed in can be a
// torch tensor). The binding never imports torch itself: normengine.load of a checkpoint Model.save
// wrote runs on numpy arrays in a process without torch (python/normengine/_lite.py).
inline const TorchTypes* torch_types() {
  static TorchTypes* t = nullptr;  // set once, under the GIL; never freed (outlives module teardown)
  if (t) return t;
  static PyObject* const torch_name = PyUnicode_InternFromString("torch");  // (made once: this runs per tensor)
  PyObject* mod = PyImport_GetModule(torch_name);  // a new reference, or NULL when not imported
  if (!mod) {
    PyErr_Clear();
    return nullptr;
  }
  py::module_ torch = py::reinterpret_steal<py::module_>(mod);
  auto* r = new TorchTypes();
  try {
    r->tensor = torch.attr("Tensor");
    r->strided = torch.attr("strided");
    const std::pair<const char*, ne::DType> table[] = {
        {"float32", ne::DType::F32}, {"float16", ne::DType::F16}, {"bfloat16", ne::DType::BF16},
        {"float64", ne::DType::F64}, {"int8", ne::DType::I8},     {"int32", ne::DType::I32},
        {"int64", ne::DType::I64},   {"uint8", ne::DType::U8},    {"bool", ne::DType::Bool}};
    for (const auto& e : table) r->dtypes.emplace_back(torch.attr(e.first), e.second);
  } catch (const py::error_already_set&) {  // torch still importing (a call from its own import): later
    delete r;
    return nullptr;
  }
  auto name = [](const char* n) { return py::reinterpret_steal<py::object>(PyUnicode_InternFromString(n)); };
  r->layout = name("layout");
  r->is_neg = name("is_neg");
  r->dtype = name("dtype");
  r->is_cpu = name("is_cpu");
  r->is_cuda = name("is_cuda");
  r->get_device = name("get_device");
  r->shape = name("shape");
  r->stride = name("stride");
  r->data_ptr = name("data_ptr");
  t = r;
  return t;
}

// obj.<name> and obj.<name>() with an interned name (no bound method object for the call)
inline py::object get_attr(py::handle obj, const py::object& name) {
  PyObject* r = PyObject_GetAttr(obj.ptr(), name.ptr());
  if (!r) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}
inline py::object call_method(py::handle obj, const py::object& name) {
  PyObject* r = PyObject_CallMethodNoArgs(obj.ptr(), name.ptr());
  if (!r) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}

inline bool torch_view(py::handle obj, const char* name, TensorView& v) {
  const TorchTypes* types = torch_types();
  if (!types || !PyObject_TypeCheck(obj.ptr(), reinterpret_cast<PyTypeObject*>(types->tensor.ptr()))) return false;
  const TorchTypes& tt = *types;
  {
    const py::object layout = get_attr(obj, tt.layout);
    if (!layout.is(tt.strided))  // sparse / mkldnn tensors have no strided memory to read
      throw ne::DTypeError(std::string(name) + ": expected a dense (strided) tensor, got layout " +
                           std::string(py::str(layout)) + "; call .to_dense()");
  }
  // a lazily negated view (torch._neg_view, x.conj().imag) holds -x in memory; torch's __dlpack__ exports that
  // memory as is, which gave silently negated operands: refused (the Python wrappers resolve their inputs)
  if (call_method(obj, tt.is_neg).is(py::handle(Py_True)))
    throw ne::DTypeError(std::string(name) + ": a negated view (is_neg() is True: torch._neg_view, x.conj().imag); "
                         "pass x.resolve_neg()");
  const py::object dt = get_attr(obj, tt.dtype);
  bool found = false;
  for (const auto& e : tt.dtypes)
    if (dt.is(e.first)) {
      v.dtype = e.second;
      found = true;
      break;
    }
  if (!found) return false;
  if (get_attr(obj, tt.is_cpu).is(py::handle(Py_True))) {
    v.device = {ne::DeviceType::CPU, 0};
  } else if (get_attr(obj, tt.is_cuda).is(py::handle(Py_True))) {
    v.device = {ne::DeviceType::CUDA, call_method(obj, tt.get_device).cast<int>()};
  } else {
    return false;
  }
  const py::tuple shape = get_attr(obj, tt.shape), stride = call_method(obj, tt.stride);
  const int nd = static_cast<int>(shape.size());
  if (nd > ne::kMaxDims)
    throw ne::ShapeError(std::string(name) + ": at most " + std::to_string(ne::kMaxDims) + " dimensions supported");
  v.name = name;
  v.ndim = nd;
  for (int d = 0; d < nd; ++d) {
    v.shape[d] = shape[d].cast<int64_t>();
    v.strides[d] = stride[d].cast<int64_t>();
  }
  v.data = reinterpret_cast<void*>(call_method(obj, tt.data_ptr).cast<uintptr_t>());
  return true;
}

// Elements but no memory (a null data pointer: torch._efficientzerotensor, which segfaulted a kernel).
inline const TensorView& with_memory(const TensorView& v, const char* name) {
  int64_t numel = 1;
  for (int d = 0; d < v.ndim; ++d) numel *= v.shape[d];
  if (!v.data && numel > 0)
    throw ne::DTypeError(std::string(name) + ": a tensor without memory (data pointer 0, e.g. a ZeroTensor); "
                         "pass a materialized tensor");
  return v;
}

// u16_as_bf16: a 16-bit unsigned array holds bfloat16 bit patterns (numpy has no bfloat16; normengine's
// torch-free load keeps bfloat16 weights as uint16 arrays).
inline TensorView view_of(py::handle obj, const char* name, Borrowed& b, bool u16_as_bf16 = false) {
  if (obj.is_none()) throw ne::ValueError(std::string(name) + ": expected a tensor, got None");
  {
    TensorView v;
    if (torch_view(obj, name, v)) return with_memory(v, name);  // the caller's argument keeps the tensor alive
  }
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
  const bool bf16_bits = u16_as_bf16 && t->dtype.code == kDLUInt && t->dtype.bits == 16 && t->dtype.lanes == 1;
  v.dtype = bf16_bits ? ne::DType::BF16 : dtype_of(t->dtype, name);
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
  return with_memory(v, name);
}

// A CPU tensor of dtype `dt`, `rows` x `cols` elements with unit stride along the columns (cols < 0:
// any); returns its row stride.
inline int64_t matrix(const ne::TensorView& t, ne::DType dt, int64_t rows, int64_t cols) {
  if (t.device.type != ne::DeviceType::CPU)
    throw ne::DeviceError(std::string(t.name) + ": expected a CPU tensor, got " + t.device.str());
  if (t.dtype != dt)
    throw ne::DTypeError(std::string(t.name) + ": expected " + ne::dtype_name(dt) + ", got " + ne::dtype_name(t.dtype));
  const bool ok = t.ndim == 2 && t.shape[0] == rows && (cols < 0 || t.shape[1] == cols) &&
                  (t.shape[1] <= 1 || t.strides[1] == 1) && (rows <= 1 || t.strides[0] >= t.shape[1]);
  if (!ok)
    throw ne::ShapeError(std::string(t.name) + ": expected a [" + std::to_string(rows) + ", " +
                         (cols < 0 ? std::string("*") : std::to_string(cols)) + "] matrix with contiguous rows, got " +
                         ne::shape_str(t));
  return rows > 1 ? t.strides[0] : t.shape[1];
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
