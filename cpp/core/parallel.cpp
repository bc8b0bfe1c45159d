#include "core/parallel.h"

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define NE_PAUSE() _mm_pause()
#else
#define NE_PAUSE() std::this_thread::yield()
#endif

#include "normengine/ops.h"

namespace ne {
namespace {

int available_cores() {
  if (const char* env = std::getenv("NORMENGINE_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  unsigned h = std::thread::hardware_concurrency();
  return h ? static_cast<int>(h) : 1;
}

thread_local bool t_in_parallel = false;

class Pool {
 public:
  explicit Pool(int threads) : threads_(threads < 1 ? 1 : threads) {
    for (int i = 1; i < threads_; ++i) workers_.emplace_back([this, i] { worker(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_ = true;
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int threads() const { return threads_; }

  void run(int64_t n, int used, RangeFn fn, void* ctx) {
    std::unique_lock<std::mutex> busy(run_m_, std::try_to_lock);
    if (!busy.owns_lock() || used <= 1) {  // another thread is using the pool: run inline
      fn(ctx, 0, n, 0);
      return;
    }
    if (used > threads_) used = threads_;
    fn_ = fn;
    ctx_ = ctx;
    n_ = n;
    used_ = used;
    // every worker acknowledges every job, so none can read the next job's fields under this one's generation
    pending_.store(threads_ - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(m_);
      gen_.fetch_add(1, std::memory_order_release);
    }
    if (sleeping_.load(std::memory_order_acquire) > 0) cv_.notify_all();
    t_in_parallel = true;
    fn(ctx, 0, n / used, 0);
    t_in_parallel = false;
    while (pending_.load(std::memory_order_acquire) != 0) NE_PAUSE();
  }

 private:
  void worker(int id) {
    uint64_t seen = 0;  // the generation at construction: a job posted before this thread runs is still seen
    t_in_parallel = true;
    for (;;) {
      // Spin for a short while (back-to-back kernels), then sleep.
      auto t0 = std::chrono::steady_clock::now();
      uint64_t g;
      for (int spins = 0;; ++spins) {
        g = gen_.load(std::memory_order_acquire);
        if (g != seen) break;
        if ((spins & 255) == 255 &&
            std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(200)) {
          std::unique_lock<std::mutex> lk(m_);
          sleeping_.fetch_add(1, std::memory_order_acq_rel);
          cv_.wait(lk, [&] { return gen_.load(std::memory_order_acquire) != seen; });
          sleeping_.fetch_sub(1, std::memory_order_acq_rel);
          g = gen_.load(std::memory_order_acquire);
          break;
        }
        NE_PAUSE();
      }
      seen = g;
      if (stop_) return;
      if (id < used_) {
        int64_t b = n_ * id / used_, e = n_ * (id + 1) / used_;
        fn_(ctx_, b, e, id);
      }
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  int threads_;
  std::vector<std::thread> workers_;
  std::mutex m_, run_m_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> pending_{0};
  std::atomic<int> sleeping_{0};
  bool stop_ = false;
  RangeFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0;
  int used_ = 0;
};

// The pool is shared: a parallel_for holds its own reference for the whole job, so that
// set_num_threads() from another thread only drops the global one (the old pool, its workers joined,
// goes when its last job ends) instead of deleting it under a running job, which deadlocked or read
// freed memory. The global reference is never destroyed (no worker joins during static destruction).
std::mutex g_pool_m;
std::shared_ptr<Pool>& g_pool = *new std::shared_ptr<Pool>();
int g_threads = 0;

// fork(): the child has only the forking thread, none of the pool's workers, so a job posted to the
// inherited pool would wait for them forever (an op in a fork-started DataLoader worker hung). The
// child forgets that pool (leaked: its destructor would join threads the child does not have) and
// makes its own on its first parallel job; its lock is made anew in case another thread held it.
const bool g_fork_handler = [] {
  pthread_atfork(nullptr, nullptr, [] {
    new (&g_pool_m) std::mutex;
    new std::shared_ptr<Pool>(std::move(g_pool));
  });
  return true;
}();

std::shared_ptr<Pool> pool() {
  std::lock_guard<std::mutex> lk(g_pool_m);
  if (!g_pool) {
    if (g_threads <= 0) g_threads = available_cores();
    g_pool = std::make_shared<Pool>(g_threads);
  }
  return g_pool;
}

}  // namespace

int num_threads() {
  std::lock_guard<std::mutex> lk(g_pool_m);
  return g_threads > 0 ? g_threads : available_cores();
}

void set_num_threads(int n) {
  std::shared_ptr<Pool> old;  // released after the lock: a pool whose last job just ended joins its workers here
  {
    std::lock_guard<std::mutex> lk(g_pool_m);
    const int want = n > 0 ? n : available_cores();
    if (g_pool && g_pool->threads() == want) return;
    old.swap(g_pool);
    g_threads = want;
  }
}

int plan_threads(int64_t n, int64_t grain, int max_threads) {
  if (t_in_parallel || n <= 0) return 1;
  if (grain < 1) grain = 1;
  int64_t by_work = n / grain;
  int t = num_threads();
  if (max_threads > 0 && t > max_threads) t = max_threads;
  if (by_work < t) t = static_cast<int>(by_work < 1 ? 1 : by_work);
  return t;
}

void parallel_for_raw(int64_t n, int64_t grain, RangeFn fn, void* ctx, int max_threads) {
  if (n <= 0) return;
  int used = plan_threads(n, grain, max_threads);
  if (used <= 1) {
    fn(ctx, 0, n, 0);
    return;
  }
  pool()->run(n, used, fn, ctx);  // (the temporary reference lives until run returns)
}

}  // namespace ne
