#include "cpu/parallel.h"

#include <unistd.h>

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace fastbn {
namespace {

class Pool {
 public:
  void run(int n, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> busy(use_, std::try_to_lock);
    if (!busy.owns_lock()) {
      for (int t = 0; t < n; ++t) fn(t);
      return;
    }
    {
      std::unique_lock<std::mutex> lk(m_);
      while (int(workers_.size()) < n - 1) {
        int id = int(workers_.size()) + 1;
        workers_.emplace_back([this, id] { loop(id); });
        workers_.back().detach();
      }
      job_ = &fn;
      width_ = n;
      pending_ = n - 1;
      ++generation_;
    }
    wake_.notify_all();
    fn(0);
    std::unique_lock<std::mutex> lk(m_);
    done_.wait(lk, [this] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* job;
      {
        std::unique_lock<std::mutex> lk(m_);
        wake_.wait(lk, [&] { return generation_ != seen && id < width_; });
        seen = generation_;
        job = job_;
      }
      (*job)(id);
      std::lock_guard<std::mutex> lk(m_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex use_, m_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* job_ = nullptr;
  int width_ = 0, pending_ = 0;
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
