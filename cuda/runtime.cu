// CUDA runtime queries of ops.h.
#include "common.cuh"

namespace ne {
namespace cuda {

// Visible devices; 0 where no driver or GPU is present (the static runtime loads the driver lazily).
int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver / no device" error
    return 0;
  }
  return n;
}

}  // namespace cuda
}  // namespace ne
