// The engine's thread pool: one set of workers for every CPU kernel, sized by set_num_threads().
//
// parallel_for(n, grain, fn) splits [0, n) into one contiguous range per thread (never ranges
// shorter than `grain`, so small problems stay on the calling thread) and calls fn(begin, end, tid)
// with tid in [0, threads used). The calling thread takes range 0. Workers spin briefly between jobs
// and then sleep, so back-to-back kernels (a decode step) do not pay a wake-up each.
#pragma once
#include <cstdint>
#include <type_traits>

namespace ne {

using RangeFn = void (*)(void* ctx, int64_t begin, int64_t end, int tid);

// Number of threads parallel_for would use for n items of the given grain (at most max_threads
// when that is > 0).
int plan_threads(int64_t n, int64_t grain, int max_threads = 0);
void parallel_for_raw(int64_t n, int64_t grain, RangeFn fn, void* ctx, int max_threads = 0);

template <class F>
inline void parallel_for(int64_t n, int64_t grain, F&& f) {
  using Fn = std::remove_reference_t<F>;
  auto tramp = [](void* c, int64_t b, int64_t e, int tid) { (*static_cast<Fn*>(c))(b, e, tid); };
  parallel_for_raw(n, grain, tramp, const_cast<void*>(static_cast<const void*>(&f)));
}

// parallel_for on at most max_threads threads (tid < max_threads), for a caller that sized per-thread
// buffers by a thread count it read before: set_num_threads() on another thread may change
// num_threads() in between, and a larger pool must not index past those buffers.
template <class F>
inline void parallel_for_upto(int64_t n, int64_t grain, int max_threads, F&& f) {
  using Fn = std::remove_reference_t<F>;
  auto tramp = [](void* c, int64_t b, int64_t e, int tid) { (*static_cast<Fn*>(c))(b, e, tid); };
  parallel_for_raw(n, grain, tramp, const_cast<void*>(static_cast<const void*>(&f)), max_threads < 1 ? 1 : max_threads);
}

}  // namespace ne
