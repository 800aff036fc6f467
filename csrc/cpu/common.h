// Shared machinery of the fused batch-norm kernels: element types, the canonical
// (K, N, C, L) strided view, per-segment loads/stores into float buffers, and the two
// passes every kernel is built from (one reduction pass, one elementwise pass).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "cpu/parallel.h"

namespace fastbn {

// ---- element types ---------------------------------------------------------------------

struct bf16 {
  uint16_t v;
};

#if defined(__FLT16_MANT_DIG__) && !defined(FASTBN_SOFT_HALF)
using half = _Float16;  // hardware conversions (F16C / AArch64 fcvt) where available
inline float half_to_float(half h) { return float(h); }
inline half float_to_half(float f) { return half(f); }
#else
struct half {
  uint16_t v;
};
inline float half_to_float(half h) {
  uint32_t sign = uint32_t(h.v & 0x8000) << 16, exp = (h.v >> 10) & 0x1f, man = h.v & 0x3ff;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000 | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else {  // zero or subnormal: exact in float
    float f = float(man) * (1.0f / 16777216.0f);
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline half float_to_half(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint16_t sign = (u >> 16) & 0x8000;
  uint32_t a = u & 0x7fffffff;
  if (a > 0x7f800000) return half{uint16_t(sign | 0x7e00)};
  if (a >= 0x477ff000) return half{uint16_t(sign | 0x7c00)};  // rounds to >= 65520: inf
  if (a < 0x38800000) {  // result is subnormal: let the float adder round to 2^-24
    float g;
    std::memcpy(&g, &a, 4);
    g += 0.5f;
    uint32_t gb;
    std::memcpy(&gb, &g, 4);
    return half{uint16_t(sign | (gb - 0x3f000000))};
  }
  uint32_t r = a + 0xfff + ((a >> 13) & 1) - (112u << 23);  // round to nearest even
  return half{uint16_t(sign | (r >> 13))};
}
#endif

// Accumulation type: double for double, float otherwise.
template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <class A, class T>
inline A to_acc(T v) {
  if constexpr (std::is_same_v<T, bf16>) {
    uint32_t u = uint32_t(v.v) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  } else if constexpr (std::is_same_v<T, half>) {
    return half_to_float(v);
  } else {
    return A(v);
  }
}

template <class T, class A>
inline T from_acc(A v) {
  if constexpr (std::is_same_v<T, bf16>) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    uint32_t rounded = (u + 0x7fff + ((u >> 16) & 1)) >> 16;  // round to nearest even
    bool nan = (u & 0x7fffffff) > 0x7f800000;
    return bf16{uint16_t(nan ? ((u >> 16) | 0x40) : rounded)};
  } else if constexpr (std::is_same_v<T, half>) {
    return float_to_half(v);
  } else {
    return T(v);
  }
}

// ---- canonical view --------------------------------------------------------------------

// One element tensor seen as (K, N, C, L) with element strides; sK = 0 broadcasts one
// tensor over the K problems. ptr == 0 means "absent" (a zero tangent).
struct TD {
  uintptr_t ptr;
  int64_t sK, sN, sC, sL;
};

struct Geom {
  int64_t N, C, L;
  bool cl;  // channels are the fast dimension: iterate rows of channels
  int64_t M() const { return N * L; }
};

constexpr int64_t SEG = 512;  // elements per segment: buffers stay in L1
constexpr int64_t RB = 32;    // rows per channels-last task: bounds float accumulation length

// A segment is a run of elements along L at one (n, c) (NCHW) or along C at one (n, l)
// (channels-last); c is the channel of its first element.
struct Seg {
  int64_t nn, c, l, n;
};

template <class A>
constexpr int64_t lanes() {
  return 64 / sizeof(A);
}

template <class A>
inline int64_t padded(int64_t n) {
  return (n + lanes<A>() - 1) / lanes<A>() * lanes<A>();
}

inline int64_t offset(const TD& t, const Seg& s, int64_t k) {
  return k * t.sK + s.nn * t.sN + s.c * t.sC + s.l * t.sL;
}

// Converts one segment of t (problem k) into buf, zero-padded to a whole number of lanes.
template <bool CL, class T, class A>
inline void load(const TD& t, const Seg& s, int64_t k, A* __restrict buf) {
  const T* __restrict p = reinterpret_cast<const T*>(t.ptr) + offset(t, s, k);
  const int64_t st = CL ? t.sC : t.sL;
  if (st == 1) {
    for (int64_t i = 0; i < s.n; ++i) buf[i] = to_acc<A>(p[i]);
  } else {
    for (int64_t i = 0; i < s.n; ++i) buf[i] = to_acc<A>(p[i * st]);
  }
  for (int64_t i = s.n; i < padded<A>(s.n); ++i) buf[i] = A(0);
}

template <bool CL, class T, class A>
inline void store(const TD& t, const Seg& s, int64_t k, const A* __restrict buf) {
  T* __restrict p = reinterpret_cast<T*>(t.ptr) + offset(t, s, k);
  const int64_t st = CL ? t.sC : t.sL;
  if (st == 1) {
    for (int64_t i = 0; i < s.n; ++i) p[i] = from_acc<T>(buf[i]);
  } else {
    for (int64_t i = 0; i < s.n; ++i) p[i * st] = from_acc<T>(buf[i]);
  }
}

// Per-channel value for element i of a segment: one channel (NCHW) or consecutive ones.
template <bool CL>
inline int64_t ch(int64_t i) {
  return CL ? i : 0;
}

// Segment-local accumulation of sums: NCHW folds a segment into lanes<A>() partial sums
// (the loop the compiler vectorises without reassociating), channels-last keeps one slot
// per channel. Inputs are zero-padded, so NCHW may run over whole lanes.
template <bool CL, class A>
inline void acc_sum(A* __restrict f, const A* __restrict u, int64_t n) {
  if constexpr (CL) {
    for (int64_t i = 0; i < n; ++i) f[i] += u[i];
  } else {
    constexpr int64_t W = lanes<A>();
    A l[W];
    for (int64_t w = 0; w < W; ++w) l[w] = f[w];
    for (int64_t b = 0; b < padded<A>(n); b += W)
      for (int64_t w = 0; w < W; ++w) l[w] += u[b + w];
    for (int64_t w = 0; w < W; ++w) f[w] = l[w];
  }
}

template <bool CL, class A>
inline void acc_dot(A* __restrict f, const A* __restrict u, const A* __restrict v, int64_t n) {
  if constexpr (CL) {
    for (int64_t i = 0; i < n; ++i) f[i] += u[i] * v[i];
  } else {
    constexpr int64_t W = lanes<A>();
    A l[W];
    for (int64_t w = 0; w < W; ++w) l[w] = f[w];
    for (int64_t b = 0; b < padded<A>(n); b += W)
      for (int64_t w = 0; w < W; ++w) l[w] += u[b + w] * v[b + w];
    for (int64_t w = 0; w < W; ++w) f[w] = l[w];
  }
}

// Turns a loaded segment of x into xhat = (x - mean) * invstd in place, and writes the
// ReLU mask (xhat * weight + bias > 0) as 1/0, both as the reference computes them.
template <bool CL, bool RELU, class A>
inline void normalise(A* __restrict xh, const Seg& s, const A* mean, const A* invstd,
                      const A* w, const A* b, A* __restrict mask) {
  const A* __restrict m = mean + s.c;
  const A* __restrict r = invstd + s.c;
  for (int64_t i = 0; i < s.n; ++i) xh[i] = (xh[i] - m[ch<CL>(i)]) * r[ch<CL>(i)];
  for (int64_t i = s.n; i < padded<A>(s.n); ++i) xh[i] = A(0);
  if constexpr (RELU) {
    const A* __restrict ww = w + s.c;
    const A* __restrict bb = b + s.c;
    for (int64_t i = 0; i < s.n; ++i)
      mask[i] = (xh[i] * ww[ch<CL>(i)] + bb[ch<CL>(i)] > A(0)) ? A(1) : A(0);
    for (int64_t i = s.n; i < padded<A>(s.n); ++i) mask[i] = A(0);
  }
}

// g = mask ? v : 0 in place (the masked cotangent), a no-op without ReLU.
template <bool RELU, class A>
inline void apply_mask(A* __restrict v, const A* __restrict mask, int64_t n) {
  if constexpr (RELU) {
    for (int64_t i = 0; i < padded<A>(n); ++i) v[i] = mask[i] > A(0) ? v[i] : A(0);
  }
}

// ---- passes ----------------------------------------------------------------------------

// Fixed task grid: NCHW tasks are (n, c, L-chunk) single segments in memory order;
// channels-last tasks are (row block, channel block). Threads take contiguous task ranges,
// so the partition (and every sum) depends only on the shape and thread count.
inline int64_t num_tasks(const Geom& g) {
  if (g.cl) return (g.M() + RB - 1) / RB * ((g.C + SEG - 1) / SEG);
  return g.C * g.N * ((g.L + SEG - 1) / SEG);
}

template <bool CL, class F>
inline void task_segments(const Geom& g, int64_t task, F&& f) {
  if constexpr (CL) {
    const int64_t ncb = (g.C + SEG - 1) / SEG;
    const int64_t r0 = task / ncb * RB, c = task % ncb * SEG;
    const int64_t r1 = std::min(r0 + RB, g.M());
    for (int64_t r = r0; r < r1; ++r) f(Seg{r / g.L, c, r % g.L, std::min(SEG, g.C - c)});
  } else {
    const int64_t nlb = (g.L + SEG - 1) / SEG;
    const int64_t nn = task / (g.C * nlb), rem = task % (g.C * nlb);
    const int64_t l = rem % nlb * SEG;
    f(Seg{nn, rem / nlb, l, std::min(SEG, g.L - l)});
  }
}

// Few elements do not pay for waking threads; the choice depends on the shape only.
inline int threads_for(const Geom& g, int64_t K, int nth) {
  const int64_t work = g.M() * g.C * std::max<int64_t>(K, 1);
  const int64_t by_work = std::max<int64_t>(1, work / 32768);
  return int(std::max<int64_t>(1, std::min<int64_t>({int64_t(nth), by_work, num_tasks(g)})));
}

// Per-thread scratch: NB segment buffers.
template <class A>
struct Scratch {
  static constexpr int NB = 6;
  std::vector<A> mem;
  Scratch() : mem(NB * SEG + lanes<A>()) {}
  A* buf(int i) {
    auto base = reinterpret_cast<uintptr_t>(mem.data());
    A* aligned = reinterpret_cast<A*>((base + 63) & ~uintptr_t(63));
    return aligned + i * SEG;
  }
};

// Reduction pass: seg_fn(seg, scratch, facc) adds NS sums for each of K problems into
// facc[(k * NS + j) * SEG + slot]; results land in out[(k * NS + j) * C + c] (double).
template <class A, bool CL, class F>
void reduce_pass(const Geom& g, int nth, int64_t K, int64_t NS, double* out, F&& seg_fn) {
  const int64_t C = g.C, nt = num_tasks(g), width = K * NS * C;
  const int T = threads_for(g, K, nth);
  std::vector<double> part(size_t(T) * width, 0.0);
  parallel_run(T, [&](int t) {
    Scratch<A> s;
    std::vector<A> facc(K * NS * SEG);
    double* mine = part.data() + size_t(t) * width;
    for (int64_t task = nt * t / T; task < nt * (t + 1) / T; ++task) {
      std::fill(facc.begin(), facc.end(), A(0));
      Seg last{};
      task_segments<CL>(g, task, [&](const Seg& seg) {
        seg_fn(seg, s, facc.data());
        last = seg;
      });
      for (int64_t kj = 0; kj < K * NS; ++kj) {
        const A* f = facc.data() + kj * SEG;
        double* o = mine + kj * C + last.c;
        if constexpr (CL) {
          for (int64_t i = 0; i < last.n; ++i) o[i] += double(f[i]);
        } else {
          double sum = 0;
          for (int64_t w = 0; w < lanes<A>(); ++w) sum += double(f[w]);
          o[0] += sum;
        }
      }
    }
  });
  std::fill(out, out + width, 0.0);
  for (int t = 0; t < T; ++t)
    for (int64_t i = 0; i < width; ++i) out[i] += part[size_t(t) * width + i];
}

// Elementwise pass: seg_fn(seg, scratch) for every segment.
template <class A, bool CL, class F>
void map_pass(const Geom& g, int nth, int64_t K, F&& seg_fn) {
  const int64_t nt = num_tasks(g);
  const int T = threads_for(g, K, nth);
  parallel_run(T, [&](int t) {
    Scratch<A> s;
    for (int64_t task = nt * t / T; task < nt * (t + 1) / T; ++task)
      task_segments<CL>(g, task, [&](const Seg& seg) { seg_fn(seg, s); });
  });
}

// ---- dispatch --------------------------------------------------------------------------

enum DType : int { kFloat64 = 0, kFloat32 = 1, kBFloat16 = 2, kFloat16 = 3 };

template <class T>
struct type_tag {
  using type = T;
};

// Calls f(type_tag<T>, bool_constant<CL>, bool_constant<RELU>) for the runtime variant.
template <class F>
void dispatch(int dtype, bool cl, bool relu, F&& f) {
  auto variants = [&](auto tag) {
    if (cl) {
      if (relu) f(tag, std::true_type{}, std::true_type{});
      else f(tag, std::true_type{}, std::false_type{});
    } else {
      if (relu) f(tag, std::false_type{}, std::true_type{});
      else f(tag, std::false_type{}, std::false_type{});
    }
  };
  switch (dtype) {
    case kFloat64: variants(type_tag<double>{}); break;
    case kFloat32: variants(type_tag<float>{}); break;
    case kBFloat16: variants(type_tag<bf16>{}); break;
    case kFloat16: variants(type_tag<half>{}); break;
    default: throw std::invalid_argument("fastbn._C: unsupported dtype code");
  }
}

}  // namespace fastbn
