// The size from which kernel outputs are written with non-temporal stores (common.h).
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <string>

#include "cpu/common.h"

namespace fastbn {
namespace {

std::atomic<int64_t> min_bytes{-1};

// The largest cache of cpu0 in Linux's sysfs, else glibc's sysconf. Inside a VM either
// can report the host's whole L3 (see default_min_bytes).
int64_t last_level_cache_bytes() {
  int64_t best_level = 0, bytes = -1;
  for (int i = 0; i < 8; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i);
    std::ifstream level_file(dir + "/level"), size_file(dir + "/size");
    int64_t level = 0, size = 0;
    std::string unit;
    if (!(level_file >> level) || !(size_file >> size)) break;
    size_file >> unit;  // "K" or "M", when given
    size <<= unit == "M" ? 20 : unit == "K" ? 10 : 0;
    if (level >= best_level) best_level = level, bytes = size;
  }
#ifdef _SC_LEVEL3_CACHE_SIZE
  if (bytes <= 0) bytes = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
  return bytes;
}

// FASTBN_STREAM_MIN_BYTES where set, else half the last-level cache, counted as 32 MiB
// at most.
int64_t default_min_bytes() {
  if (const char* env = std::getenv("FASTBN_STREAM_MIN_BYTES")) {
    char* end = nullptr;
    const long long bytes = std::strtoll(env, &end, 10);
    if (end != env && *end == '\0' && bytes >= 0) return bytes;
  }
  // A VM's sysfs can report the host's whole L3 as shared by its few CPUs (480 MiB on a
  // 2-CPU guest): no core group caches more than tens of MiB, so 32 MiB at most counts.
  const int64_t llc = std::min(last_level_cache_bytes(), int64_t(32) << 20);
  return llc > 0 ? llc / 2 : int64_t(16) << 20;  // unknown: 16 MiB
}

}  // namespace

int64_t stream_min_bytes() {
  static const int64_t automatic = default_min_bytes();
  const int64_t set = min_bytes.load(std::memory_order_relaxed);
  return set < 0 ? automatic : set;
}

int64_t set_stream_min_bytes(int64_t bytes) {
  return min_bytes.exchange(bytes < 0 ? -1 : bytes, std::memory_order_relaxed);
}

}  // namespace fastbn
