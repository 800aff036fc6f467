// Settings the kernels derive from the caches (common.h): the output size from which they
// write with non-temporal stores, and the inputs an NCHW block may hold for its two passes
// to run back to back.
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <string>

#include "cpu/common.h"

namespace fastbn {
namespace {

std::atomic<int64_t> min_bytes{-1}, fuse_bytes{-1};

// The data cache of cpu0 at `level` in Linux's sysfs (the largest one there, for
// level 0), else glibc's sysconf. Inside a VM the last level can be the host's whole L3
// (see default_min_bytes).
int64_t cache_bytes(int64_t level) {
  int64_t best_level = 0, bytes = -1;
  for (int i = 0; i < 8; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i);
    std::ifstream level_file(dir + "/level"), size_file(dir + "/size"), type_file(dir + "/type");
    int64_t at = 0, size = 0;
    std::string unit, type;
    if (!(level_file >> at) || !(size_file >> size)) break;
    size_file >> unit;  // "K" or "M", when given
    type_file >> type;
    size <<= unit == "M" ? 20 : unit == "K" ? 10 : 0;
    if (type == "Instruction") continue;
    if (level ? at == level : at >= best_level) best_level = at, bytes = size;
  }
#if defined(_SC_LEVEL3_CACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
  if (bytes <= 0) bytes = sysconf(level == 2 ? _SC_LEVEL2_CACHE_SIZE : _SC_LEVEL3_CACHE_SIZE);
#endif
  return bytes;
}

// The variable `name` as a non-negative byte count, else `fallback`.
int64_t from_env(const char* name, int64_t fallback) {
  if (const char* env = std::getenv(name)) {
    char* end = nullptr;
    const long long bytes = std::strtoll(env, &end, 10);
    if (end != env && *end == '\0' && bytes >= 0) return bytes;
  }
  return fallback;
}

// FASTBN_STREAM_MIN_BYTES where set, else half the last-level cache, counted as 32 MiB
// at most.
int64_t default_min_bytes() {
  // A VM's sysfs can report the host's whole L3 as shared by its few CPUs (480 MiB on a
  // 2-CPU guest): no core group caches more than tens of MiB, so 32 MiB at most counts.
  const int64_t llc = std::min(cache_bytes(0), int64_t(32) << 20);
  return from_env("FASTBN_STREAM_MIN_BYTES", llc > 0 ? llc / 2 : int64_t(16) << 20);
}

// FASTBN_FUSE_MAX_BYTES where set, else half the L2 cache (256 KiB where unknown): the
// block's inputs share it with the output runs and the other passes' data.
int64_t default_fuse_bytes() {
  const int64_t l2 = cache_bytes(2);
  return from_env("FASTBN_FUSE_MAX_BYTES", l2 > 0 ? l2 / 2 : int64_t(256) << 10);
}

int64_t current(const std::atomic<int64_t>& set, int64_t automatic) {
  const int64_t value = set.load(std::memory_order_relaxed);
  return value < 0 ? automatic : value;
}

}  // namespace

int64_t stream_min_bytes() {
  static const int64_t automatic = default_min_bytes();
  return current(min_bytes, automatic);
}

int64_t set_stream_min_bytes(int64_t bytes) {
  return min_bytes.exchange(bytes < 0 ? -1 : bytes, std::memory_order_relaxed);
}

int64_t fuse_max_bytes() {
  static const int64_t automatic = default_fuse_bytes();
  return current(fuse_bytes, automatic);
}

int64_t set_fuse_max_bytes(int64_t bytes) {
  return fuse_bytes.exchange(bytes < 0 ? -1 : bytes, std::memory_order_relaxed);
}

}  // namespace fastbn
