// What every emulator harness (tests/cuda_emu/*_emu.cpp) shares: one call at a time (__shared__
// variables are process-wide statics), the last error as text, and kernel names for the launch log.
// A harness includes this after the kernel sources and defines ne_harness::init_names(), which names
// its kernels with ne_harness::name(kernel, "text"); its extern "C" entry points run their work through
// ne_harness::guarded(...) and expose error() and launches() under their own prefix.
#pragma once
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <string>

#include "cuda_emu.h"
#include "normengine/tensor.h"

// Internal linkage throughout: several harness libraries are loaded into one test process, and shared
// symbols would interpose (one library's names and init_names serving another's).
namespace ne_harness {
namespace {

std::mutex mu;
std::string err;
std::map<const void*, std::string> names;

template <class F>
void name(F* f, const std::string& s) {
  names[reinterpret_cast<const void*>(f)] = s;
}

void init_names();  // the harness's kernels (called once, under mu); defined in the harness's file

// Runs f under the lock with a fresh launch log and error state: 0, or -1 with err set.
template <class F>
int guarded(F&& f) {
  std::lock_guard<std::mutex> lock(mu);
  if (names.empty()) init_names();
  ne_emu::device().log.clear();
  ne_emu::device().last_error = cudaSuccess;
  err.clear();
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    err = e.what();
    return -1;
  }
}

const char* error() { return err.c_str(); }

// The harnesses' dtype codes (their ctypes callers): 0 f32, 1 bf16, 2 f16, 3 f64.
inline ne::DType dtype_of(int code) {
  switch (code) {
    case 0: return ne::DType::F32;
    case 1: return ne::DType::BF16;
    case 2: return ne::DType::F16;
    default: return ne::DType::F64;
  }
}

// A rows x cols matrix of dtype code `dtype` at p, rows ld elements apart; absent (data null, as the CPU entry
// points pass it) where p is null.
inline ne::RowMatrix mat(const void* p, int dtype, int64_t rows, int64_t cols, int64_t ld) {
  ne::RowMatrix m;
  if (!p) return m;
  m.data = const_cast<void*>(p);
  m.dtype = dtype_of(dtype);
  m.rows = rows;
  m.cols = cols;
  m.ld = ld;
  return m;
}

// The launches of the last call, one line each: "name grid.x grid.y grid.z block.x block.y" (into buf, at
// most cap - 1 characters; unnamed kernels as `unnamed`); returns the full length.
int launches(char* buf, int cap, const char* unnamed = "?") {
  std::lock_guard<std::mutex> lock(mu);
  std::string s;
  for (const auto& l : ne_emu::device().log) {
    auto it = names.find(l.kernel);
    s += (it == names.end() ? std::string(unnamed) : it->second) + " " + std::to_string(l.grid.x) + " " +
         std::to_string(l.grid.y) + " " + std::to_string(l.grid.z) + " " + std::to_string(l.block.x) + " " +
         std::to_string(l.block.y) + "\n";
  }
  if (cap > 0) {
    std::strncpy(buf, s.c_str(), static_cast<size_t>(cap) - 1);
    buf[cap - 1] = 0;
  }
  return static_cast<int>(s.size());
}

}  // namespace
}  // namespace ne_harness

// A harness names its kernels in a function of its own and hands it over with this, at file scope.
#define NE_HARNESS_NAMES(fn) \
  namespace ne_harness {     \
  namespace {                \
  void init_names() { fn(); } \
  }                          \
  }
