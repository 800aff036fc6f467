#include "cpu/parallel.h"

#include <dlfcn.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace fastbn {
namespace {

// Shares are claimed, not assigned: the caller and the woken workers take share indices
// from one counter, so a worker that the OS has not scheduled yet (say, because torch's
// OpenMP threads still spin on the other core) delays nothing: the caller takes its
// shares. Which thread runs a share never changes what the share computes.
class Pool {
 public:
  void run(int n, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> busy(use_, std::try_to_lock);
    if (!busy.owns_lock()) {
      for (int t = 0; t < n; ++t) fn(t);
      return;
    }
    uint32_t generation;
    {
      std::unique_lock<std::mutex> lk(m_);
      while (int(workers_.size()) < n - 1) {
        workers_.emplace_back([this] { loop(); });
        workers_.back().detach();
      }
      // 32 bits, as next_ holds them; 0 is what a new worker has seen.
      if (++generation_ == 0) ++generation_;
      generation = generation_;
      job_ = &fn;
      width_ = n;
      finished_ = 0;
      next_.store(uint64_t(generation) << 32);
    }
    wake_.notify_all();
    work(generation, n, fn);
    std::unique_lock<std::mutex> lk(m_);
    done_.wait(lk, [&] { return finished_ == n; });
  }

 private:
  // Runs shares of `generation` while any is left; a stale generation claims nothing.
  void work(uint32_t generation, int n, const std::function<void(int)>& fn) {
    for (;;) {
      uint64_t claim = next_.load();
      if (uint32_t(claim >> 32) != generation || int(claim & 0xffffffffu) >= n) return;
      if (!next_.compare_exchange_weak(claim, claim + 1)) continue;
      fn(int(claim & 0xffffffffu));
      std::lock_guard<std::mutex> lk(m_);
      if (++finished_ == n) done_.notify_one();
    }
  }

  void loop() {
    uint32_t seen = 0;
    for (;;) {
      const std::function<void(int)>* job;
      uint32_t generation;
      int n;
      {
        std::unique_lock<std::mutex> lk(m_);
        wake_.wait(lk, [&] { return generation_ != seen; });
        seen = generation = generation_;
        job = job_;
        n = width_;
      }
      work(generation, n, *job);
    }
  }

  std::mutex use_, m_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> next_{0};   // generation << 32 | next unclaimed share
  const std::function<void(int)>* job_ = nullptr;
  int width_ = 0, finished_ = 0;
  uint32_t generation_ = 0;  // wraps after 2^32 runs, as next_'s high half does
};

// Leaked on purpose: workers must never be joined during interpreter teardown. A forked
// child gets a fresh pool (the parent's threads do not exist there).
Pool* pool() {
  static Pool* p = nullptr;
  static pid_t owner = 0;
  static std::mutex m;
  std::lock_guard<std::mutex> lk(m);
  if (p == nullptr || owner != getpid()) {
    p = new Pool();
    owner = getpid();
  }
  return p;
}

// torch's own OpenMP team, found at run time (no link-time dependency): the GNU entry
// point that `#pragma omp parallel` compiles to, exported by libgomp and by LLVM's and
// Intel's OpenMP runtimes alike. torch's workers are the threads torch.get_num_threads()
// counts, and they spin for a while after each of torch's ops, so between two torch ops
// a team of them starts in microseconds, where a separate pool would have to wait for a
// core they are spinning on.
using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);

// FASTBN_CPU_POOL=own selects our pool even where the OpenMP team is found (tests).
// Only in the process that found it: GNU OpenMP's team does not survive fork() (a forked
// child's first parallel region waits forever for the parent's threads), so a child
// uses our pool, which starts afresh there.
const pid_t loaded_in = getpid();   // the process that loaded the extension

GompParallel torch_openmp() {
  static const GompParallel fn = [] {
    const char* choice = std::getenv("FASTBN_CPU_POOL");
    if (choice && std::string(choice) == "own") return GompParallel(nullptr);
    return reinterpret_cast<GompParallel>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
  }();
  return getpid() == loaded_in ? fn : nullptr;
}

struct Job {
  const std::function<void(int)>* fn;
  int n;
  std::atomic<int> next{0};
};

// Each team member claims shares until none is left (the same claim rule as the pool).
void run_shares(void* data) {
  Job& job = *static_cast<Job*>(data);
  for (int t; (t = job.next.fetch_add(1)) < job.n;) (*job.fn)(t);
}

}  // namespace

const char* threading() { return torch_openmp() ? "torch's OpenMP team" : "own pool"; }

void parallel_run(int n, const std::function<void(int)>& fn) {
  if (n <= 1) {
    fn(0);
    return;
  }
  if (GompParallel team = torch_openmp()) {
    Job job{&fn, n};
    team(run_shares, &job, unsigned(n), 0);
    return;
  }
  pool()->run(n, fn);
}

}  // namespace fastbn
