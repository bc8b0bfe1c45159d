// normengine error types. The bindings translate each to the Python class of the same name in
// normengine.errors (ShapeError and DeviceError are ValueErrors, DTypeError is a TypeError).
#pragma once
#include <stdexcept>
#include <string>

namespace ne {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct ShapeError : Error {  // shapes or strides that do not fit together
  using Error::Error;
};
struct DTypeError : Error {  // unsupported or mismatched element types
  using Error::Error;
};
struct DeviceError : Error {  // mixed devices, or a device this build cannot run on
  using Error::Error;
};
struct UnsupportedError : Error {  // valid request this engine does not implement
  using Error::Error;
};
struct ValueError : Error {  // bad scalar argument (eps < 0, ...)
  using Error::Error;
};

}  // namespace ne
