// A small thread pool for the kernels' parallel loops, made for a shared 2-core machine.
//
// at::parallel_for (OpenMP) splits a loop into one fixed chunk per thread and ends in a barrier: when another
// process holds the second core for a scheduler slice, every kernel call waits for it, and decode falls from
// ~150 to a few tokens per second. Here the work is cut into several chunks that threads claim from an atomic
// counter, and the calling thread works too and waits only for chunks that a helper has actually claimed: a
// helper that is not running leaves its share to the caller, so the worst case is one thread's speed.
// Helpers spin for a few tens of microseconds after a job (the next kernel call of a decode step follows
// within microseconds), then sleep on a futex.
//
// Protocol: the caller publishes (generation, next chunk = 0) in `state`, then the job; a helper increments
// `active`, reads the job, and claims chunks by compare-and-swap on `state` for that job's generation. At
// the end the caller withdraws the job and waits until `active` is 0; by the sequentially consistent order
// of these operations, any helper that saw the job is counted, and one that comes later sees no job.
#include <ATen/Parallel.h>

#include <pthread.h>

#include <atomic>
#include <thread>
#include <vector>

#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define MC_PAUSE() _mm_pause()
#else
#define MC_PAUSE() std::this_thread::yield()
#endif

namespace mini_claude {

namespace {

struct Job {
  uint32_t gen;
  int64_t n, chunk;
  const std::function<void(int64_t, int64_t)>* fn;
};

std::atomic<uint64_t> g_state{0};  // generation << 32 | index of the next unclaimed chunk
std::atomic<const Job*> g_job{nullptr};
std::atomic<int> g_active{0};
std::atomic<uint32_t> g_gen{0};
std::atomic<int> g_sleepers{0};
std::atomic<int> g_wanted{0};  // helpers that take part (at::get_num_threads() - 1)
std::mutex g_mu;
int g_started = 0;
constexpr int kSpins = 20000;  // ~ tens of microseconds of pause instructions
// Every this many pauses a spinning thread yields its core: when the process has one core's worth of CPU (the
// other taken by another process), a caller spinning for a helper's chunk, or a helper spinning for the next
// job, would otherwise hold the core the other one needs until the next scheduler tick (milliseconds).
constexpr int kYieldEvery = 1000;

inline void spin_pause(int spins) {
  if (spins % kYieldEvery == kYieldEvery - 1)
    std::this_thread::yield();
  else
    MC_PAUSE();
}

void run(const Job* job) {
  uint64_t s = g_state.load();
  for (;;) {
    if ((s >> 32) != job->gen) return;
    const int64_t i = static_cast<int64_t>(s & 0xffffffffu);
    if (i * job->chunk >= job->n) return;
    if (g_state.compare_exchange_weak(s, s + 1)) {
      (*job->fn)(i * job->chunk, std::min(job->n, (i + 1) * job->chunk));
      s = g_state.load();
    }
  }
}

void helper(int index) {
  uint32_t seen = g_gen.load();
  for (;;) {
    int spins = 0;
    uint32_t g;
    while ((g = g_gen.load()) == seen) {
      if (++spins < kSpins) {
        spin_pause(spins);
      } else {
        g_sleepers.fetch_add(1);
        g_gen.wait(seen);
        g_sleepers.fetch_sub(1);
        spins = 0;
      }
    }
    seen = g;
    if (index >= g_wanted.load()) continue;
    g_active.fetch_add(1);
    if (const Job* job = g_job.load()) run(job);
    g_active.fetch_sub(1);
  }
}

void after_fork_in_child() {  // the helpers do not exist in a forked child: start afresh
  g_started = 0;
  g_active.store(0);
  g_sleepers.store(0);
  g_job.store(nullptr);
}

void ensure_helpers(int wanted) {
  std::lock_guard<std::mutex> lock(g_mu);
  static bool registered = false;
  if (!registered) {
    pthread_atfork(nullptr, nullptr, after_fork_in_child);
    registered = true;
  }
  for (; g_started < wanted; ++g_started) std::thread(helper, g_started).detach();
}

}  // namespace

void parallel_for(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  const int threads = at::get_num_threads();
  chunk = std::max<int64_t>(1, chunk);
  if (threads <= 1 || n <= chunk || at::in_parallel_region()) {
    fn(0, n);
    return;
  }
  ensure_helpers(threads - 1);
  g_wanted.store(threads - 1);
  const uint32_t gen = g_gen.load() + 1;
  const Job job{gen, n, chunk, &fn};
  g_state.store(static_cast<uint64_t>(gen) << 32);
  g_job.store(&job);
  g_gen.store(gen);
  if (g_sleepers.load() > 0) g_gen.notify_all();
  run(&job);
  g_job.store(nullptr);
  for (int spins = 0; g_active.load() != 0; ++spins) spin_pause(spins);
}

}  // namespace mini_claude
