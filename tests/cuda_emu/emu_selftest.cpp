// Self-test of the emulator (cuda_emu.h) itself, with small kernels whose results are known: warp
// shuffles (every variant, widths 32 and 8), __syncthreads ordering across warps, atomics, and the
// faults it must report (divergent barrier, early return before a barrier, bad shuffle mask, bad
// launch configuration). Built into the same library as norm_emu.cpp; ne_emu_selftest() returns 0
// or -1 with a message in buf.
#include <cstring>
#include <string>

#include "cuda_emu.h"

namespace {

// out[t * 8 + k]: the k-th shuffle result of linear thread t.
__global__ void shuffle_kernel(int* out) {
  const int t = threadIdx.x + threadIdx.y * blockDim.x;
  const int v = 1000 + t;
  int* o = out + t * 8;
  o[0] = __shfl_xor_sync(0xffffffffu, v, 5);
  o[1] = __shfl_xor_sync(0xffffffffu, v, 12, 8);  // partner in a later group of 8: own value
  o[2] = __shfl_down_sync(0xffffffffu, v, 3);
  o[3] = __shfl_down_sync(0xffffffffu, v, 3, 8);
  o[4] = __shfl_up_sync(0xffffffffu, v, 2);
  o[5] = __shfl_up_sync(0xffffffffu, v, 2, 8);
  o[6] = __shfl_sync(0xffffffffu, v, 7);
  o[7] = __shfl_sync(0xffffffffu, v, 9, 8);  // lane 9 % 8 of the thread's group of 8
}

int shuffle_want(int t, int k) {
  const int lane = t % 32, base = t - lane;
  auto at = [&](int l) { return 1000 + base + l; };
  switch (k) {
    case 0: return at(lane ^ 5);
    case 1: return (lane ^ 12) >= (lane / 8 + 1) * 8 ? at(lane) : at(lane ^ 12);
    case 2: return lane + 3 >= 32 ? at(lane) : at(lane + 3);
    case 3: return (lane % 8) + 3 >= 8 ? at(lane) : at(lane + 3);
    case 4: return lane < 2 ? at(lane) : at(lane - 2);
    case 5: return (lane % 8) < 2 ? at(lane) : at(lane - 2);
    case 6: return at(7);
    default: return at(lane / 8 * 8 + 1);
  }
}

// Each thread writes its slot, then (after the barrier) reads its neighbour's, across warps; then a
// second round reuses the buffer, which is only safe because of the second barrier.
__global__ void barrier_kernel(int* out, int* counter) {
  __shared__ int s[256];
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = 10 * t + static_cast<int>(blockIdx.x);
  __syncthreads();
  int a = s[(t + 1) % n];
  __syncthreads();
  s[t] = a + 1;
  __syncthreads();
  out[blockIdx.x * n + t] = s[(t + n - 1) % n];
  atomicAdd(counter, 1);
}

__global__ void divergent_kernel(int* out) {
  if (threadIdx.x < 40) __syncthreads();
  out[threadIdx.x] = 1;
}
__global__ void early_return_kernel(int* out) {
  if (threadIdx.x >= 60) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}
__global__ void bad_mask_kernel(int* out) { out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1, 1); }

template <class F>
std::string fault_of(F&& f) {
  try {
    f();
  } catch (const ne_emu::KernelFault& e) {
    return e.what();
  }
  return "";
}

std::string run() {
  const int saved_order = ne_emu::device().order;
  std::string err;
  for (int order = 0; order < 3 && err.empty(); ++order) {
    ne_emu::device().order = order;
    std::vector<int> out(64 * 3 * 8, -1);
    shuffle_kernel << ne_emu::launch_config(dim3(1), dim3(64, 3))(out.data());
    for (int t = 0; t < 192 && err.empty(); ++t)
      for (int k = 0; k < 8; ++k)
        if (out[t * 8 + k] != shuffle_want(t, k)) {
          err = "shuffle " + std::to_string(k) + " of thread " + std::to_string(t) + ": got " +
                std::to_string(out[t * 8 + k]) + ", want " + std::to_string(shuffle_want(t, k));
          break;
        }
    const int n = 96, blocks = 3;
    std::vector<int> b(n * blocks, -1);
    int counter = 0;
    barrier_kernel << ne_emu::launch_config(blocks, n)(b.data(), &counter);
    for (int blk = 0; blk < blocks && err.empty(); ++blk)
      for (int t = 0; t < n; ++t)
        if (b[blk * n + t] != 10 * t + blk + 1) {
          err = "barrier kernel: thread " + std::to_string(t) + " read " + std::to_string(b[blk * n + t]);
          break;
        }
    if (err.empty() && counter != n * blocks) err = "atomicAdd count " + std::to_string(counter);
  }
  ne_emu::device().order = saved_order;
  if (!err.empty()) return err;

  std::vector<int> o(1024, 0);
  if (fault_of([&] { divergent_kernel << ne_emu::launch_config(1, 64)(o.data()); }).find("deadlock") ==
      std::string::npos)
    return "a divergent __syncthreads was not reported";
  if (fault_of([&] { early_return_kernel << ne_emu::launch_config(1, 64)(o.data()); }).find("deadlock") ==
      std::string::npos)
    return "threads returning before a __syncthreads others wait at were not reported";
  if (fault_of([&] { bad_mask_kernel << ne_emu::launch_config(1, 32)(o.data()); }).find("mask") == std::string::npos)
    return "a partial shuffle mask was not reported";
  cudaGetLastError();
  bad_mask_kernel << ne_emu::launch_config(1, 2048)(o.data());
  if (cudaGetLastError() != cudaErrorInvalidConfiguration) return "a 2048-thread block was not refused";
  bad_mask_kernel << ne_emu::launch_config(dim3(1, 70000), 32)(o.data());
  if (cudaGetLastError() != cudaErrorInvalidConfiguration) return "grid.y = 70000 was not refused";
  return "";
}

}  // namespace

extern "C" int ne_emu_selftest(char* buf, int cap) {
  const std::string err = run();
  if (cap > 0) {
    std::strncpy(buf, err.c_str(), static_cast<size_t>(cap) - 1);
    buf[cap - 1] = 0;
  }
  return err.empty() ? 0 : -1;
}
