// When quant_linear's tensor-core GEMM runs on Hopper's wgmma kernels (cuda/quant_gemm_sm90.h): compiled in,
// switched on, an sm_90 device, and operands TMA can address. Built for every CUDA target; the kernels
// themselves only for sm_90a (NE_WITH_SM90_GEMM).
#include <atomic>
#include <mutex>
#include <vector>

#include "common.cuh"
#include "quant_gemm_sm90.h"

namespace ne {
namespace cuda {

namespace {

std::atomic<bool> g_enabled{true};
std::atomic<int64_t> g_calls{0};  // GEMMs run here: lets tests see that the wgmma path took a call

#if defined(NE_WITH_SM90_GEMM)
struct DeviceInfo {
  bool known = false, hopper = false;
  int sm_count = 0;
};

// Compute capability 9.0 (an sm_90a cubin runs there and nowhere else) and the SM count the persistent grid
// is sized by; read once per device.
DeviceInfo device_info(int dev) {
  static std::mutex mu;
  static std::vector<DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (dev >= static_cast<int>(cache.size())) cache.resize(dev + 1);
  DeviceInfo& d = cache[dev];
  if (!d.known) {
    int major = 0, minor = 0;
    check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
    check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), "cudaDeviceGetAttribute");
    check(cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
    d.hopper = major == 9 && minor == 0;
    d.known = true;
  }
  return d;
}
#endif

}  // namespace

bool sm90_gemm_compiled() {
#if defined(NE_WITH_SM90_GEMM)
  return true;
#else
  return false;
#endif
}

void set_sm90_gemm(bool enabled) { g_enabled.store(enabled); }
bool sm90_gemm_enabled() { return g_enabled.load(); }
int64_t sm90_gemm_calls() { return g_calls.load(); }

bool quant_gemm_sm90(const Sm90QGemm& a, cudaStream_t stream) {
#if defined(NE_WITH_SM90_GEMM)
  if (!g_enabled.load(std::memory_order_relaxed) || !sm90_tma_fits(a)) return false;
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  const DeviceInfo info = device_info(dev);
  if (!info.hopper) return false;
  if (a.format == QFormat::Int8)
    sm90_int8_gemm(a, dev, info.sm_count, stream);
  else
    sm90_fp8_gemm(a, dev, info.sm_count, stream);
  g_calls.fetch_add(1, std::memory_order_relaxed);
  return true;
#else
  (void)a;
  (void)stream;
  return false;
#endif
}

}  // namespace cuda
}  // namespace ne
