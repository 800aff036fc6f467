#include "cpu/parallel.h"

#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
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
    uint64_t generation;
    {
      std::unique_lock<std::mutex> lk(m_);
      while (int(workers_.size()) < n - 1) {
        workers_.emplace_back([this] { loop(); });
        workers_.back().detach();
      }
      generation = ++generation_;
      job_ = &fn;
      width_ = n;
      finished_ = 0;
      next_.store(generation << 32);
    }
    wake_.notify_all();
    work(generation, n, fn);
    std::unique_lock<std::mutex> lk(m_);
    done_.wait(lk, [&] { return finished_ == n; });
  }

 private:
  // Runs shares of `generation` while any is left; a stale generation claims nothing.
  void work(uint64_t generation, int n, const std::function<void(int)>& fn) {
    for (;;) {
      uint64_t claim = next_.load();
      if ((claim >> 32) != generation || int(claim & 0xffffffffu) >= n) return;
      if (!next_.compare_exchange_weak(claim, claim + 1)) continue;
      fn(int(claim & 0xffffffffu));
      std::lock_guard<std::mutex> lk(m_);
      if (++finished_ == n) done_.notify_one();
    }
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* job;
      uint64_t generation;
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
  uint64_t generation_ = 0;
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

}  // namespace

void parallel_run(int n, const std::function<void(int)>& fn) {
  if (n <= 1) {
    fn(0);
    return;
  }
  pool()->run(n, fn);
}

}  // namespace fastbn
