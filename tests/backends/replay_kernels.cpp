// Replays kernel calls recorded on this machine through fastbn's C++ kernels built for
// another (test_other_architectures.py: AArch64 under qemu). Each call is read as its
// kernel's name, the memory it reads and writes (regions) and its arguments, addresses
// given as (region, offset); the regions are written back after the calls, in order.
//
// File format (little-endian): u32 calls; per call: u32 name length, name; u32 regions,
// each u64 size and its bytes; u32 arguments, each a tag byte and its value: 'i' i64,
// 'd' f64, 'b' u8, 'p' address, 't' TD (address, 4 x i64), 'g' Geom (6 x i64); an
// address is i32 region (-1: absent) and u64 offset ('i' 0 stands for an absent one).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/ops.h"

namespace {

using fastbn::Geom;
using fastbn::TD;

struct Region {
  uint64_t size;
  std::unique_ptr<unsigned char, decltype(&std::free)> data{nullptr, &std::free};
};

class Reader {
 public:
  explicit Reader(std::FILE* f) : f_(f) {}

  template <class V>
  V raw() {
    V v;
    if (std::fread(&v, sizeof(V), 1, f_) != 1) throw std::runtime_error("truncated input");
    return v;
  }

  void bytes(void* out, uint64_t n) {
    if (n && std::fread(out, 1, n, f_) != n) throw std::runtime_error("truncated input");
  }

  void expect(char tag) {
    const char got = raw<char>();
    if (got != tag) {
      throw std::runtime_error(std::string("argument tag '") + got + "', expected '" + tag +
                               "'");
    }
  }

  uintptr_t address(const std::vector<Region>& regions) {
    const auto region = raw<int32_t>();
    const auto offset = raw<uint64_t>();
    if (region < 0) return 0;
    if (size_t(region) >= regions.size() || offset > regions[region].size) {
      throw std::runtime_error("address outside the call's regions");
    }
    return reinterpret_cast<uintptr_t>(regions[region].data.get()) + offset;
  }

  // One argument of the kernel's parameter type V.
  template <class V>
  V arg(const std::vector<Region>& regions) {
    if constexpr (std::is_same_v<V, bool>) {
      expect('b');
      return raw<uint8_t>() != 0;
    } else if constexpr (std::is_same_v<V, double>) {
      expect('d');
      return raw<double>();
    } else if constexpr (std::is_same_v<V, uintptr_t>) {
      const char tag = raw<char>();
      if (tag == 'i') {   // absent: the recorder cannot tell a 0 address from a 0 integer
        if (raw<int64_t>() != 0) throw std::runtime_error("an integer for an address");
        return 0;
      }
      if (tag != 'p') throw std::runtime_error("argument tag for an address");
      return address(regions);
    } else if constexpr (std::is_same_v<V, TD>) {
      expect('t');
      TD td{};
      td.ptr = address(regions);
      td.sK = raw<int64_t>();
      td.sN = raw<int64_t>();
      td.sC = raw<int64_t>();
      td.sL = raw<int64_t>();
      return td;
    } else if constexpr (std::is_same_v<V, Geom>) {
      expect('g');
      Geom g{};
      g.N = raw<int64_t>();
      g.C = raw<int64_t>();
      g.L = raw<int64_t>();
      g.cl = raw<int64_t>() != 0;
      g.fold = raw<int64_t>();
      g.tile = raw<int64_t>();
      return g;
    } else {
      static_assert(std::is_integral_v<V>);
      expect('i');
      return V(raw<int64_t>());
    }
  }

 private:
  std::FILE* f_;
};

// Reads the arguments in order (a braced list evaluates left to right) and calls fn.
template <class... P>
void replay(void (*fn)(P...), Reader& in, const std::vector<Region>& regions,
            uint32_t arguments) {
  if (arguments != sizeof...(P)) throw std::runtime_error("wrong argument count");
  std::tuple<std::decay_t<P>...> args{in.arg<std::decay_t<P>>(regions)...};
  std::apply(fn, args);
}

void call(const std::string& name, Reader& in, const std::vector<Region>& regions,
          uint32_t arguments) {
  using fastbn::backward, fastbn::backward_backward, fastbn::backward_jvp;
  using fastbn::forward_eval, fastbn::forward_jvp, fastbn::forward_train;
  if (name == "forward_train") return replay(&forward_train, in, regions, arguments);
  if (name == "forward_eval") return replay(&forward_eval, in, regions, arguments);
  if (name == "backward") return replay(&backward, in, regions, arguments);
  if (name == "forward_jvp") return replay(&forward_jvp, in, regions, arguments);
  if (name == "backward_backward") return replay(&backward_backward, in, regions, arguments);
  if (name == "backward_jvp") return replay(&backward_jvp, in, regions, arguments);
  throw std::runtime_error("unknown kernel " + name);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s CALLS_IN REGIONS_OUT\n", argv[0]);
    return 2;
  }
  std::FILE* f = std::fopen(argv[1], "rb");
  std::FILE* out = std::fopen(argv[2], "wb");
  if (!f || !out) {
    std::perror("open");
    return 2;
  }
  try {
    Reader in(f);
    const auto calls = in.raw<uint32_t>();
    for (uint32_t i = 0; i < calls; ++i) {
      std::string name(in.raw<uint32_t>(), '\0');
      in.bytes(name.data(), name.size());
      std::vector<Region> regions(in.raw<uint32_t>());
      for (auto& r : regions) {
        r.size = in.raw<uint64_t>();
        // 64-byte aligned, as torch's allocations: the offsets keep their alignment.
        const size_t bytes = (r.size / 64 + 1) * 64;
        r.data.reset(static_cast<unsigned char*>(std::aligned_alloc(64, bytes)));
        in.bytes(r.data.get(), r.size);
      }
      const auto arguments = in.raw<uint32_t>();
      call(name, in, regions, arguments);
      (void)arguments;
      for (const auto& r : regions) std::fwrite(r.data.get(), 1, r.size, out);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "replay_kernels: %s\n", e.what());
    return 1;
  }
  return std::fclose(out) == 0 ? 0 : 1;
}
