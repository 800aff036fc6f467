// Shared machinery of the fused batch-norm kernels: element types, the canonical
// (K, N, C, L) strided view, in-place element runs converted in registers, and the two
// passes every kernel is built from (one reduction pass, one elementwise pass).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/parallel.h"

#ifdef __linux__
#include <sys/mman.h>
#endif
#if defined(__SSE2__)
// gcc 12 reports the AVX-512 intrinsics' undefined pass-through vectors as used
// uninitialised wherever they are inlined (fixed in gcc 13 by the same pragma in them).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

namespace fastbn {

// ---- element types ---------------------------------------------------------------------

struct bf16 {
  uint16_t v;
};

inline float float_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

#if defined(__aarch64__)
// ACLE's binary16 storage type (fcvt conversions): g++ before 13 takes _Float16 on
// AArch64 in C only.
using half = __fp16;
inline float half_to_float(half h) { return float(h); }
inline half float_to_half(float f) { return half(f); }
#else
// Conversions in a few integer and float operations without branches, which the element
// loops vectorise (the method of torch's c10::Half and the FP16 library: the float unit
// does the rounding). x86's _Float16 (F16C, AVX512-FP16) converts one element at a time
// under g++ 12 (no vector loop around it): float16 kernels ran 6-22x slower than
// float32. Same bits as the hardware's conversions, NaN payloads aside (a quiet NaN, as
// torch's).
struct half {
  uint16_t v;
};
inline float half_to_float(half h) {
  const uint32_t w = uint32_t(h.v) << 16, sign = w & 0x80000000u, two_w = w + w;
  // Normal (and inf/NaN): the exponent rebased by 224, then scaled by 2^-112.
  const float normal = float_from_bits((two_w >> 4) + (0xE0u << 23)) * float_from_bits(0x07800000u);
  // Subnormal: the mantissa placed in a float of exponent -1, less 0.5.
  const float subnormal = float_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  return float_from_bits(sign | bits_of(two_w < (1u << 27) ? subnormal : normal));
}
inline half float_to_half(float f) {
  // |f| scaled up and back down so that out-of-range values become inf; adding a power
  // of two aligned to f's exponent rounds the mantissa to 10 bits (to nearest even).
  float base = (std::fabs(f) * float_from_bits(0x77800000u)) * float_from_bits(0x08800000u);
  const uint32_t w = bits_of(f), shl1_w = w + w, sign = w & 0x80000000u;
  const uint32_t bias = std::max(shl1_w & 0xFF000000u, 0x71000000u);
  base = float_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = bits_of(base), nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  return half{uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}
#endif

// Accumulation type: double for double, float otherwise.
template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <class A, class T>
inline A to_acc(T v) {
  if constexpr (std::is_same_v<T, bf16>) {
    return float_from_bits(uint32_t(v.v) << 16);
  } else if constexpr (std::is_same_v<T, half>) {
    return half_to_float(v);
  } else {
    return A(v);
  }
}

template <class T, class A>
inline T from_acc(A v) {
  if constexpr (std::is_same_v<T, bf16>) {
    const uint32_t u = bits_of(v);
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
// tensor over the K problems. ptr == 0 means "absent" (a zero tangent). `stream`: an
// output written with non-temporal stores (see `output`).
struct TD {
  uintptr_t ptr;
  int64_t sK, sN, sC, sL;
  bool stream = false;
};

struct Geom {
  int64_t N, C, L;
  bool cl;  // channels are the fast dimension: iterate rows of channels
  // > 1: an NCHW tensor with few values per (n, c) run as channels-last rows of C "pass
  // channels", `fold` consecutive ones per channel (L is 1): the NCHW passes would pay
  // their per-run cost every few values.
  int64_t fold = 1;
  // > 1: a channels-last tensor whose rows of a sample lie end to end, run as rows of
  // `tile` of them: C pass channels, channel c % (C / tile) in turn (L is the sample's
  // rows over tile). Rows of few channels paid a run's fixed cost each, and rows under
  // 512 bytes were never streamed (see Dst).
  int64_t tile = 1;
  int64_t M() const { return N * L; }           // rows of the passes (channels-last)
  int64_t spread() const { return fold * tile; }  // pass channels per channel
  int64_t channels() const { return C / spread(); }  // the tensor's channels
  double count() const { return double(M() * spread()); }  // values per channel
};

constexpr int64_t SEG = 512;   // channels per channels-last run: slot sums stay in L1
constexpr int64_t RB = 32;     // rows per channels-last task: bounds float accumulation length
constexpr int64_t RUN = 1024;  // max NCHW run: a float lane adds at most RUN / W
                               // elements before going to double (see nchw_sums; at 4096,
                               // per-channel outputs had up to 2.5x the reference's error)
constexpr int64_t MAP_RUN = 1024;  // max NCHW run of the elementwise pass: a staged output
                                   // run (4-8 KiB, see Dst) stays in L1
constexpr int64_t UNIT_ELEMS = 16384;  // elements per NCHW work unit: its x fits in L2
constexpr int64_t CHUNK = 8192;        // min contiguous elements per step of an NCHW unit
constexpr int64_t CB_MAX = 64;         // max channels per NCHW unit: bounds its float lanes
// From this many channels the per-channel steps between the passes (adding the threads'
// sums, finishing the statistics) are split over the threads.
constexpr int64_t FINISH_SPLIT_MIN = 4096;

class StageArena;

// A run is n elements along L at one (n, c) (NCHW) or along C at one (n, l)
// (channels-last); c is the channel of its first element. `stage`: the running thread's
// staging buffers (thread_stage()), looked up once per task or thread by the passes: a
// thread_local looked up for every run cost 12% of a float16 forward on 7x7 planes
// (__tls_get_addr).
struct Seg {
  int64_t nn, c, l, n;
  StageArena* stage;
};

template <class A>
constexpr int64_t lanes() {
  return 64 / sizeof(A);
}

// Per-channel scratch that every use writes before it reads: uninitialised (zeroing a
// few arrays of C values cost as much as the pass for few rows of many channels).
template <class V>
std::unique_ptr<V[]> scratch(int64_t n) {
  return std::unique_ptr<V[]>(new V[size_t(n)]);
}

// A per-channel input of C values in the accumulation type: the array itself, or a copy
// converted from the element type T where it holds T (a half layer's parameters and
// buffers: converted here, not by a tensor conversion per call in Python).
template <class T>
class ChannelIn {
 public:
  using A = acc_t<T>;
  ChannelIn(uintptr_t p, bool in_t, int64_t C) : p_(reinterpret_cast<const A*>(p)) {
    if constexpr (!std::is_same_v<T, A>) {
      if (!in_t || !p) return;
      const T* t = reinterpret_cast<const T*>(p);
      copy_ = scratch<A>(C);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) copy_[c] = to_acc<A>(t[c]);
      p_ = copy_.get();
    }
  }
  const A* get() const { return p_; }

 private:
  std::unique_ptr<A[]> copy_;
  const A* p_;
};

// A per-channel output of n values in the accumulation type: the array itself, or scratch
// rounded once into the array of T on destruction where that holds T (a half layer's
// parameter gradients, as ChannelIn reads its parameters).
template <class T>
class ChannelOut {
 public:
  using A = acc_t<T>;
  ChannelOut(uintptr_t p, bool in_t, int64_t n) : p_(reinterpret_cast<A*>(p)) {
    if constexpr (!std::is_same_v<T, A>) {
      if (!in_t || !p) return;
      out_ = reinterpret_cast<T*>(p);
      n_ = n;
      copy_ = scratch<A>(n);
      p_ = copy_.get();
    }
  }
  ChannelOut(const ChannelOut&) = delete;
  ChannelOut& operator=(const ChannelOut&) = delete;
  ~ChannelOut() {
#pragma omp simd
    for (int64_t i = 0; i < n_; ++i) out_[i] = from_acc<T>(p_[i]);
  }
  A* get() const { return p_; }

 private:
  std::unique_ptr<A[]> copy_;
  A* p_;
  T* out_ = nullptr;
  int64_t n_ = 0;
};

// A per-channel array, (rows, channels), as the passes index it, (rows, g.C): each
// channel's values repeated for its g.spread() pass channels (a copy, written before it
// is read: not zeroed); the array itself when there is one pass channel per channel.
template <class A>
class PassArray {
 public:
  PassArray(const Geom& g, const A* values, int64_t rows = 1) : values_(values), p_(values) {
    if (g.spread() == 1 || values == nullptr) return;
    copy_ = scratch<A>(rows * g.C);
    p_ = copy_.get();
    for (int64_t r = 0; r < rows; ++r) refresh(g, 0, g.channels(), r);
  }
  // After values of channels [lo, hi) of row r changed: the copy takes them (only these
  // entries are written, so threads may refresh disjoint ranges at once).
  void refresh(const Geom& g, int64_t lo, int64_t hi, int64_t r = 0) {
    if (!copy_) return;
    const int64_t C = g.channels();
    A* row = copy_.get() + r * g.C;
    for (int64_t t = 0; t < g.tile; ++t)
      for (int64_t c = lo; c < hi; ++c)
        std::fill_n(row + (t * C + c) * g.fold, g.fold, values_[r * C + c]);
  }
  // Moves keep the buffer p_ points into; a copy would point into the original's.
  PassArray(PassArray&&) = default;
  PassArray& operator=(PassArray&&) = default;
  PassArray(const PassArray&) = delete;
  PassArray& operator=(const PassArray&) = delete;
  const A* get() const { return p_; }

 private:
  std::unique_ptr<A[]> copy_;
  const A* values_;
  const A* p_;
};

// o[channel - lo] += v(c) for the pass channels c in [c0, c1) (channel: c / g.fold, or
// c % g.channels() tiled), each channel's terms in pass-channel order (the same bits as
// one chain per channel). Folded, the channels whole in the range add position by
// position across channels: independent additions, where a chain of fold dependent ones
// per channel made a folded reduction with few rows latency bound.
template <class F>
inline void fold_add(const Geom& g, int64_t c0, int64_t c1, double* o, int64_t lo, F&& v) {
  const int64_t fold = g.fold;
  if (g.tile > 1) {  // one unit-stride loop per tiled row: channel c - base
    const int64_t C = g.channels();
    for (int64_t c = c0; c < c1;) {
      const int64_t base = c / C * C, end = std::min(c1, base + C);
#pragma omp simd
      for (int64_t p = c; p < end; ++p) o[p - base - lo] += v(p);
      c = end;
    }
    return;
  }
  if (fold == 1) {  // unit stride, which the general loop does not show the compiler
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) o[c - lo] += v(c);
    return;
  }
  auto chain = [&](int64_t a, int64_t b) {  // part of one channel's pass channels
    double sum = o[a / fold - lo];
    for (int64_t c = a; c < b; ++c) sum += v(c);
    o[a / fold - lo] = sum;
  };
  const int64_t first = (c0 + fold - 1) / fold, last = c1 / fold;  // whole: [first, last)
  if (first > last) return chain(c0, c1);
  if (c0 < first * fold) chain(c0, first * fold);
  for (int64_t l = 0; l < fold; ++l)
#pragma omp simd
    for (int64_t ch = first; ch < last; ++ch) o[ch - lo] += v(ch * fold + l);
  if (last * fold < c1) chain(last * fold, c1);
}

// out[c]: the mean of the first values of channel c in problem k of t, 0 where one is not
// finite: sample 0's first min(L, 64, M / 16) positions, each pass channel's (a small
// share of the pass). A reduction pass sums t - out[c]: a large common part of t's values
// then cancels before a product or a float lane's sum rounds it.
template <class T>
void first_values_mean(const Geom& g, const TD& t, int64_t k, acc_t<T>* out) {
  using A = acc_t<T>;
  const int64_t C = g.channels();
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>({g.L, 64, g.M() / 16}));
  const T* t0 = reinterpret_cast<const T*>(t.ptr) + k * t.sK;
  std::vector<double> sample(C, 0.0);
  for (int64_t l = 0; l < rows; ++l)
    fold_add(g, 0, g.C, sample.data(), 0,
             [&](int64_t c) { return double(to_acc<A>(t0[c * t.sC + l * t.sL])); });
  const double taken = double(rows * g.spread());
#pragma omp simd
  for (int64_t c = 0; c < C; ++c)
    out[c] = std::isfinite(sample[c]) ? A(sample[c] / taken) : A(0);
}

inline int64_t offset(const TD& t, const Seg& s, int64_t k) {
  return k * t.sK + s.nn * t.sN + s.c * t.sC + s.l * t.sL;
}

// Runs are read and written in place, converting to the accumulation type in registers.
// UNIT (stride 1, known at compile time) lets the compiler emit plain vector loads.
template <class T, bool UNIT>
struct Src {
  const T* p;
  int64_t st;
  Src(const T* run, int64_t stride, int64_t /*len*/, StageArena*) : p(run), st(stride) {}
  template <class A>
  A at(int64_t i) const {
    return to_acc<A>(p[UNIT ? i : i * st]);
  }
};

// Copies bytes to dest with non-temporal stores for the 64-byte lines it covers whole,
// plain stores for the partial lines at either end (a line is never written both ways).
inline void stream_store(void* dest, const void* src, size_t bytes) {
  char* d = static_cast<char*>(dest);
  const char* s = static_cast<const char*>(src);
  const size_t head = std::min(bytes, size_t(-reinterpret_cast<uintptr_t>(d) & 63));
  std::memcpy(d, s, head);
  d += head, s += head, bytes -= head;
  for (; bytes >= 64; d += 64, s += 64, bytes -= 64) {
#if defined(__AVX512F__)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d), _mm512_loadu_si512(s));
#elif defined(__AVX__)
    for (int h = 0; h < 64; h += 32)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + h),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + h)));
#elif defined(__SSE2__)
    for (int h = 0; h < 64; h += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + h),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + h)));
#else
    std::memcpy(d, s, 64);
#endif
  }
  std::memcpy(d, s, bytes);
}

// Orders this thread's non-temporal stores before what follows (the pass's join).
inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

#if defined(__SSE2__)
constexpr bool NON_TEMPORAL_STORES = true;
#else
constexpr bool NON_TEMPORAL_STORES = false;  // stream_store is a memcpy: never stage
#endif

// Per-thread staging buffers of streamed output runs, taken in turn: a run's outputs
// (at most STAGE_SLOTS: backward_backward writes two) each hold one until the run ends.
constexpr int STAGE_SLOTS = 2;

inline void* stage_buffer() {
  alignas(64) static thread_local unsigned char buffers[STAGE_SLOTS][MAP_RUN * sizeof(double)];
  static thread_local int next = 0;
  void* buffer = buffers[next];
  next = (next + 1) % STAGE_SLOTS;
  return buffer;
}

// Whether a unit-stride output run of n elements of `size` bytes is staged and streamed
// (see Dst): shorter runs are written in place, as their partial lines and the staging
// cost outweigh the saving (channels-last rows of 64 floats ran 10% slower staged).
inline bool staged_run(bool stream, int64_t n, int64_t size) {
  return stream && n <= MAP_RUN && n * size >= 512;
}

// An output run. A streamed unit-stride run is computed into a staging buffer (in L1)
// and goes to memory with non-temporal stores when the Dst goes out of scope, at the
// end of the run.
template <class T, bool UNIT>
struct Dst {
  T* p;  // where put() writes: the run itself, or its staging buffer
  int64_t st;
  T* out = nullptr;  // streamed: the run in the output, and its length
  int64_t n = 0;

  Dst(T* run, int64_t stride, int64_t len, bool stream, StageArena*) : p(run), st(stride) {
    if (UNIT && staged_run(stream, len, sizeof(T)))
      out = run, n = len, p = static_cast<T*>(stage_buffer());
  }
  Dst(const Dst&) = delete;
  Dst& operator=(const Dst&) = delete;
  ~Dst() {
    if (out) stream_store(out, p, size_t(n) * sizeof(T));
  }
  template <class A>
  void put(int64_t i, A v) const {
    p[UNIT ? i : i * st] = from_acc<T>(v);
  }
  // Elements before where put() writes reaches a 64-byte line (see each). Not for 2-byte
  // types: their head (up to 31 elements) ran as a scalar loop, each element rounded
  // alone, and bfloat16 passes over runs of 100 and 196 took up to 1.5x the time.
  int64_t head() const {
    if constexpr (!UNIT || sizeof(T) < 4) return 0;
    return int64_t((64 - (reinterpret_cast<uintptr_t>(p) & 63)) & 63) / int64_t(sizeof(T));
  }
};

// 2-byte values converted 16 at a time in registers (load16, store16, the wide runs).
#if defined(__F16C__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define FASTBN_WIDE_HALF 1
#else
#define FASTBN_WIDE_HALF 0
#endif

#if defined(__F16C__)
#if FASTBN_WIDE_HALF
// 16 values of a 2-byte type to float, and back, in registers: to_acc's and from_acc's
// conversions bit for bit (lanes outside k load as 0 and are not stored).
inline __m512 load16(const half* p, __mmask16 k) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}
inline __m512 load16(const bf16* p, __mmask16 k) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline void store16(half* p, __mmask16 k, __m512 v) {
  constexpr int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtps_ph(v, nearest));
}
inline void store16(bf16* p, __mmask16 k, __m512 v) {
  // Rounded to nearest even; a NaN keeps its top bits, made quiet. AVX512-BF16's
  // conversion does just that in one instruction, but flushes subnormals to zero (torch
  // keeps them): a vector with a subnormal lane takes the integer operations (the bfloat16
  // kernels 1.1-1.2x faster than with the integer operations for every vector).
#if defined(__AVX512BF16__)
  constexpr int subnormal = 0x20;
  if (!_mm512_mask_fpclass_ps_mask(k, v, subnormal)) {
    _mm256_mask_storeu_epi16(p, k, (__m256i)_mm512_cvtneps_pbh(v));
    return;
  }
#endif
  const __m512i u = _mm512_castps_si512(v), one = _mm512_set1_epi32(1);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
  const __m512i nan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  const __mmask16 is_nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i out = _mm512_mask_mov_epi32(rounded, is_nan, nan);
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(out));
}
#endif

// Without AVX-512, unit-stride float16 runs go through per-thread float buffers (in L1),
// converted whole by F16C's vector instructions: converted element by element in the
// loops (the branch-free method above, a dozen vector operations per 16 values each way),
// the first-order kernels were compute-bound at 1.5-2x float32's time. (With AVX-512
// every unit-stride run skips the buffers: WIDE_RUNS.)

// n float16 values to float, and back (rounded to nearest, ties to even): 8 at a time,
// the tail one by one.
inline void halves_to_floats(const half* h, int64_t n, float* f) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  for (; i < n; ++i) f[i] = _cvtsh_ss(h[i].v);
}
inline void floats_to_halves(const float* f, int64_t n, half* h) {
  constexpr int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(h + i), _mm256_cvtps_ph(_mm256_loadu_ps(f + i), nearest));
  for (; i < n; ++i) h[i].v = _cvtss_sh(f[i], nearest);
}

// The floats of staged runs: one block per thread, taken and given back in LIFO order
// (a run's Src and Dst objects live in nested scopes). On the stack, as members of the
// Src and Dst objects, they made frames of up to 70 KiB; here a run takes only its own
// length (rounded up to whole vectors) and an absent input nothing.
class StageArena {
 public:
  // Live at once: a kernel's reduction reads at most 4 element inputs of RUN values.
  static constexpr int64_t FLOATS = 8 * RUN;

  static StageArena* mine() {
    static thread_local StageArena arena;
    return &arena;
  }
  // n floats (64-byte aligned); give_back(the returned mark) releases them and all taken
  // after them.
  float* take(int64_t n, int64_t& mark) {
    const int64_t end = used_ + (n + 15) / 16 * 16;
    if (end > FLOATS) throw_overflow();
    mark = used_;
    used_ = end;
    return base_ + mark;
  }
  void give_back(int64_t mark) { used_ = mark; }

 private:
  StageArena() : raw_(new float[FLOATS + 16]) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(raw_.get());
    base_ = reinterpret_cast<float*>((p + 63) & ~uintptr_t(63));
  }
  [[noreturn]] static void throw_overflow() {
    throw std::logic_error("fastbn._C: more staged float16 runs live than StageArena holds");
  }
  std::unique_ptr<float[]> raw_;
  float* base_;
  int64_t used_ = 0;
};

// A staged run is never copied: src() and dst() return it as a prvalue, constructed in
// place.
template <>
struct Src<half, true> {
  const float* f = nullptr;
  int64_t mark = -1;
  StageArena* stage;
  Src(const half* run, int64_t /*stride*/, int64_t len, StageArena* arena) : stage(arena) {
    if (!run) return;  // absent: never read
    float* buffer = stage->take(len, mark);
    halves_to_floats(run, len, buffer);
    f = buffer;
  }
  ~Src() {
    if (mark >= 0) stage->give_back(mark);
  }
  Src(const Src&) = delete;
  Src& operator=(const Src&) = delete;
  template <class A>
  A at(int64_t i) const {
    return f[i];
  }
};

// Outputs go to the run when the Dst goes out of scope, streamed as Dst's are.
template <>
struct Dst<half, true> {
  StageArena* stage;
  int64_t mark;
  float* f;
  half* out;
  int64_t n;
  bool stream;
  Dst(half* run, int64_t /*stride*/, int64_t len, bool streamed, StageArena* arena)
      : stage(arena), mark(0), f(stage->take(len, mark)), out(run), n(len),
        stream(staged_run(streamed, len, sizeof(half))) {}
  Dst(const Dst&) = delete;
  Dst& operator=(const Dst&) = delete;
  ~Dst() {
    if (stream) {
      alignas(64) half staged[MAP_RUN];
      floats_to_halves(f, n, staged);
      stream_store(out, staged, size_t(n) * sizeof(half));
    } else {
      floats_to_halves(f, n, out);
    }
    stage->give_back(mark);
  }
  template <class A>
  void put(int64_t i, A v) const {
    f[i] = v;
  }
  int64_t head() const { return 0; }  // f starts a line
};

// Out of line: inlined, the compiler recomputed the thread_local's address (a call to
// __tls_get_addr) for every run rather than keep the pointer.
[[gnu::noinline]] inline StageArena* thread_stage() { return StageArena::mine(); }
#else
inline StageArena* thread_stage() { return nullptr; }  // no staged runs
#endif

template <bool CL>
inline int64_t run_stride(const TD& t) {
  return CL ? t.sC : t.sL;
}

template <class T, bool CL, bool UNIT>
inline Src<T, UNIT> src(const TD& t, const Seg& s, int64_t k) {
  // Absent: callers never read it.
  const T* run = t.ptr ? reinterpret_cast<const T*>(t.ptr) + offset(t, s, k) : nullptr;
  return Src<T, UNIT>(run, run_stride<CL>(t), s.n, s.stage);
}

template <class T, bool CL, bool UNIT>
inline Dst<T, UNIT> dst(const TD& t, const Seg& s, int64_t k) {
  return {reinterpret_cast<T*>(t.ptr) + offset(t, s, k), run_stride<CL>(t), s.n, t.stream,
          s.stage};
}

// True when every present tensor runs with stride 1.
template <bool CL>
inline bool unit_runs(std::initializer_list<TD> ts) {
  for (const TD& t : ts)
    if (t.ptr && run_stride<CL>(t) != 1) return false;
  return true;
}

// Per-channel value at element i of a run: a register copy for NCHW (one channel per
// run, and no aliasing with the outputs), consecutive channels for channels-last. A
// null base (an array the pass does not read) gives a Chan that must not be read.
template <bool CL, class A>
struct Chan {
  const A* p;
  A v;
  Chan(const A* base, int64_t c)
      : p(base ? base + c : nullptr), v(CL || !base ? A(0) : base[c]) {}
  A operator[](int64_t i) const {
    if constexpr (CL) return p[i];
    else return v;
  }
};

// v if on, else +0 (inf and NaN included), as a bitwise AND: the element loops stay
// free of branches. A select (`on ? v : 0`) lets the compiler sink v's load into a
// branch, and loops with several masked terms then did not vectorise at all.
template <class A>
inline A and_mask(bool on, A v) {
  using U = std::conditional_t<sizeof(A) == 8, uint64_t, uint32_t>;
  U u;
  std::memcpy(&u, &v, sizeof(A));
  u &= U(0) - U(on);
  std::memcpy(&v, &u, sizeof(A));
  return v;
}

// The per-channel arrays of the primal (mean, invstd, weight, bias) as the passes index
// them. Weight and bias enter only through the ReLU mask: without it they are neither
// copied out for folding nor read (null).
template <class A>
struct Stats {
  PassArray<A> mean, invstd, w, b;
  Stats(const Geom& g, bool relu, const A* m, const A* r, const A* wt, const A* bt)
      : mean(g, m), invstd(g, r), w(g, relu ? wt : nullptr), b(g, relu ? bt : nullptr) {}
};

// x's run with the statistics: xhat and the ReLU mask (xhat * weight + bias > 0), both
// as the reference computes them.
template <class T, class A, bool CL, bool RELU, bool UNIT>
struct Prim {
  Src<T, UNIT> x;
  Chan<CL, A> m, r, w, b;
  Prim(const TD& xt, const Seg& s, const Stats<A>& st)
      : x(src<T, CL, UNIT>(xt, s, 0)), m(st.mean.get(), s.c), r(st.invstd.get(), s.c),
        w(st.w.get(), s.c), b(st.b.get(), s.c) {}
  A xhat(int64_t i) const { return (x.template at<A>(i) - m[i]) * r[i]; }
  // v where the mask is set, else 0; the identity without ReLU.
  A keep(int64_t i, A xh, A v) const {
    if constexpr (RELU) return and_mask(xh * w[i] + b[i] > A(0), v);
    else return v;
  }
};

// Whether the passes take unit-stride runs of a 2-byte type in registers, 16 values
// converted at a time (WidePrim, wide_add, wide_map), rather than staged through float
// buffers (Src, Dst): staged, float16 backward of 56x56 planes ran at 0.79x stock's, in
// registers at 1.02x (the kernels 1.4-1.8x faster on NCHW planes, bfloat16's 1.1-1.3x;
// on channels-last rows float16's 1.05-1.6x, bfloat16's 1.0-1.2x).
template <class T, bool CL, bool UNIT>
constexpr bool WIDE_RUNS = FASTBN_WIDE_HALF && UNIT && sizeof(T) == 2;

#if FASTBN_WIDE_HALF
// The first n lanes of 16 (all of them from 16).
inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}

// Run s of problem k in t (T const for an input); null for an absent t.
template <class T>
inline T* run_ptr(const TD& t, const Seg& s, int64_t k) {
  return t.ptr ? reinterpret_cast<T*>(t.ptr) + offset(t, s, k) : nullptr;
}

// Chan for a wide run: the per-channel values of the 16 elements from i (lanes outside
// k are 0), the NCHW run's one value in a register, a channels-last row's channels
// loaded. By value: referenced, they were read again after every store (which may alias
// them), not kept in registers.
template <bool CL>
struct WideChan {
  const float* p;
  __m512 v;
  explicit WideChan(const Chan<CL, float>& c)
      : p(c.p), v(CL ? _mm512_setzero_ps() : _mm512_set1_ps(c.v)) {}
  WideChan(const float* base, int64_t c) : WideChan(Chan<CL, float>(base, c)) {}
  __m512 operator()(int64_t i, __mmask16 k) const {
    if constexpr (CL) return _mm512_maskz_loadu_ps(k, p + i);
    else return v;
  }
};

// Prim for a wide run: xhat and the ReLU mask of the 16 values from i, with the
// operations of Prim's in the same order (the same bits; the vector operators are IEEE
// lane by lane, and the build contracts nothing).
template <class T, bool CL, bool RELU>
struct WidePrim {
  const T* x;
  WideChan<CL> m, r, w, b;
  WidePrim(const TD& xt, const Seg& s, const Stats<float>& st)
      : x(run_ptr<const T>(xt, s, 0)), m(st.mean.get(), s.c), r(st.invstd.get(), s.c),
        w(st.w.get(), s.c), b(st.b.get(), s.c) {}
  __m512 xhat(int64_t i, __mmask16 k) const { return (load16(x + i, k) - m(i, k)) * r(i, k); }
  __m512 keep(int64_t i, __mmask16 k, __m512 xh, __m512 v) const {
    if constexpr (RELU)
      return _mm512_maskz_mov_ps(
          _mm512_cmp_ps_mask(xh * w(i, k) + b(i, k), _mm512_setzero_ps(), _CMP_GT_OQ), v);
    else return v;
  }
};
#endif

// Calls f(std::bool_constant<b>): lifts a per-call flag out of the element loops.
template <class F>
inline void when(bool b, F&& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

// ---- passes ----------------------------------------------------------------------------

// Sums of one problem over a run. NCHW folds a run into W lanes per sum (independent
// vector accumulators, no reassociation); channels-last keeps one slot per channel.
// fn(i, v) writes the NS terms of element i into v.
template <class A, bool CL, int NS>
struct Acc {
  static constexpr int64_t W = 2 * lanes<A>();
  A* f;  // NCHW: [NS][W] lanes; channels-last: [NS][SEG] slots

  template <class F>
  void add(int64_t n, F&& fn) const {
    if constexpr (CL) {
      A* __restrict s = f;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        A v[NS];
        fn(i, v);
        for (int j = 0; j < NS; ++j) s[j * SEG + i] += v[j];
      }
    } else if (n < W) {
      // A short run: element i straight into lane i in memory, a vector loop (the caller
      // counts it as W elements: see nchw_sums). Runs placed from where the last one
      // ended, all lanes filled in turn, took a scalar loop with an index modulo W: 43%
      // of a (2, 8192, 5, 5) backward.
      A* __restrict s = f;
#pragma omp simd
      for (int64_t w = 0; w < n; ++w) {
        A v[NS];
        fn(w, v);
        for (int j = 0; j < NS; ++j) s[j * W + w] += v[j];
      }
    } else {
      A l[NS][W];  // local, so the lanes live in registers across the loop
      for (int j = 0; j < NS; ++j)
        for (int64_t w = 0; w < W; ++w) l[j][w] = f[j * W + w];
      int64_t i = 0;
      for (; i + W <= n; i += W) {
#pragma omp simd
        for (int64_t w = 0; w < W; ++w) {
          A v[NS];
          fn(i + w, v);
          for (int j = 0; j < NS; ++j) l[j][w] += v[j];
        }
      }
      if (i < n) {
        // The tail as the run's last W elements with those already added masked out:
        // full vectors only. A partial-vector tail made the compiler keep the lanes on
        // the stack, and each run then stalled on store forwarding (7×7 planes: 3×).
        const int64_t base = n - W, done = i - base;
#pragma omp simd
        for (int64_t w = 0; w < W; ++w) {
          A v[NS];
          fn(base + w, v);
          for (int j = 0; j < NS; ++j) l[j][w] += and_mask(w >= done, v[j]);
        }
      }
      for (int j = 0; j < NS; ++j)
        for (int64_t w = 0; w < W; ++w) f[j * W + w] = l[j][w];
    }
  }
};

#if FASTBN_WIDE_HALF
// The NS terms of 16 values (a struct: gcc warns of ignored attributes in std::array's).
template <int NS>
struct Terms16 {
  __m512 v[NS];
};

// step(i, mask) over a run of n, 16 values a step: whole vectors (a constant mask, which
// the compiler drops from the loads and stores), then a masked tail.
template <class F>
inline void wide_steps(int64_t n, F&& step) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) step(i, __mmask16(0xFFFF));
  if (i < n) step(i, first_lanes(n - i));
}

// The 16 values from i of each output over a run of n, from fn(i, mask): a vector for
// one output, a Terms16 (in the outputs' order) for more. Whole vectors, then a masked
// tail.
template <class F, class... T>
inline void wide_each(int64_t n, F&& fn, T*... out) {
  wide_steps(n, [&](int64_t i, __mmask16 k) {
    const auto v = fn(i, k);
    if constexpr (sizeof...(T) == 1) {
      (store16(out + i, k, v), ...);
    } else {
      int j = 0;
      (store16(out + i, k, v.v[j++]), ...);
    }
  });
}

// An output run of a wide pass, as Dst: `p`, where the pass writes, is the run itself, or
// for a streamed run (staged_run) a staging buffer (in L1) that goes to the run with
// non-temporal stores when the WideOut goes out of scope.
template <class T>
struct WideOut {
  T* run;
  T* p;
  int64_t n;
  WideOut(const TD& t, const Seg& s, int64_t k) : run(run_ptr<T>(t, s, k)), p(run), n(s.n) {
    if (staged_run(t.stream, n, sizeof(T))) p = static_cast<T*>(stage_buffer());
  }
  WideOut(const WideOut&) = delete;
  WideOut& operator=(const WideOut&) = delete;
  ~WideOut() {
    if (p != run) stream_store(run, p, size_t(n) * sizeof(T));
  }
};

// wide_each over run s of problem k into the outputs `out` of element type T. (The
// WideOut temporaries live until wide_each returns, then stream what they staged.)
template <class T, class F, class... Out>
inline void wide_map(const Seg& s, int64_t k, F&& fn, const Out&... out) {
  wide_each(s.n, fn, WideOut<T>(out, s, k).p...);
}

// Acc<float, false, NS>::add over a run of n, where fn(i, mask) gives the Terms16<NS> of
// the 16 values from i: each term into the lane that add() puts it in, by the same
// additions (a tail's elements already added as +0), so the same bits.
template <int NS, class F>
inline void wide_add(const Acc<float, false, NS>& acc, int64_t n, F&& fn) {
  constexpr int64_t W = Acc<float, false, NS>::W;
  static_assert(W == 32, "two vectors of lanes per sum");
  float* f = acc.f;
  if (n < W) {
    for (int64_t h = 0; h < n; h += 16) {
      const __mmask16 k = first_lanes(n - h);
      const Terms16<NS> t = fn(h, k);
      for (int j = 0; j < NS; ++j) {
        const __m512 lane = _mm512_loadu_ps(f + j * W + h);
        _mm512_storeu_ps(f + j * W + h, _mm512_mask_add_ps(lane, k, lane, t.v[j]));
      }
    }
    return;
  }
  __m512 lo[NS], hi[NS];
  for (int j = 0; j < NS; ++j)
    lo[j] = _mm512_loadu_ps(f + j * W), hi[j] = _mm512_loadu_ps(f + j * W + 16);
  auto add = [&](int64_t i, __mmask16 klo, __mmask16 khi) {
    const Terms16<NS> a = fn(i, __mmask16(0xFFFF)), b = fn(i + 16, __mmask16(0xFFFF));
    for (int j = 0; j < NS; ++j)
      lo[j] += _mm512_maskz_mov_ps(klo, a.v[j]), hi[j] += _mm512_maskz_mov_ps(khi, b.v[j]);
  };
  int64_t i = 0;
  for (; i + W <= n; i += W) add(i, 0xFFFF, 0xFFFF);
  if (i < n) {
    const int64_t done = i - (n - W);  // the last W elements, the first `done` added
    add(n - W, __mmask16(~first_lanes(done)),
        __mmask16(~first_lanes(std::max<int64_t>(0, done - 16))));
  }
  for (int j = 0; j < NS; ++j)
    _mm512_storeu_ps(f + j * W, lo[j]), _mm512_storeu_ps(f + j * W + 16, hi[j]);
}

// Acc<float, true, NS>::add over a channels-last row of n: each term into its channel's
// slot, one addition each, as add() does.
template <int NS, class F>
inline void wide_add(const Acc<float, true, NS>& acc, int64_t n, F&& fn) {
  wide_steps(n, [&](int64_t i, __mmask16 k) {
    const Terms16<NS> t = fn(i, k);
    for (int j = 0; j < NS; ++j) {
      float* slot = acc.f + j * SEG + i;
      _mm512_mask_storeu_ps(slot, k, _mm512_maskz_loadu_ps(k, slot) + t.v[j]);
    }
  });
}
#endif

// Runs from this long peel their head (see each): on shorter ones (7x7 planes) the extra
// loop cost more than the split stores.
constexpr int64_t PEEL_MIN_RUN = 64;

// Elementwise loop over a run that writes `out` (a Dst): the elements before out's next
// 64-byte line first, so that no vector store after them spans two lines (NCHW runs of
// 100 or 196 floats start mid-line: an affine pass over them ran 8-10% slower than over
// aligned runs, and peeled ran at memcpy's speed).
template <class D, class F>
inline void each(int64_t n, const D& out, F&& fn) {
  const int64_t head = n >= PEEL_MIN_RUN ? std::min(n, out.head()) : 0;
#pragma omp simd
  for (int64_t i = 0; i < head; ++i) fn(i);
#pragma omp simd
  for (int64_t i = head; i < n; ++i) fn(i);
}

// NCHW work units: a block of CB channels times R rows (n), walked n by n so each step
// reads CB adjacent rows (contiguous in NCHW): at least CHUNK elements where CB_MAX
// allows, so the prefetchers stream instead of restarting at each jump of C * L
// elements. Units are numbered row-block-major, so a thread's range of units moves forward
// through memory (one sweep when units hold one row). The grid depends on the shape only,
// and the reduction combines per-unit sums in a fixed order, so its bits do not depend on
// the thread count.
struct Grid {
  int64_t cb, R, nb;  // channels and rows per unit, row blocks
  int64_t ncb;        // channel blocks
  int64_t c0(int64_t unit) const { return unit % ncb * cb; }
  int64_t n0(int64_t unit) const { return unit / ncb * R; }
};

inline Grid nchw_grid(const Geom& g) {
  const int64_t L = std::max<int64_t>(g.L, 1);
  const int64_t cb = std::min({g.C, CB_MAX, (CHUNK + L - 1) / L});
  const int64_t R = std::min(g.N, std::max<int64_t>(1, UNIT_ELEMS / (cb * L)));
  return {cb, R, (g.N + R - 1) / R, (g.C + cb - 1) / cb};
}

inline int64_t num_tasks(const Geom& g) {
  if (g.cl) return (g.M() + RB - 1) / RB * ((g.C + SEG - 1) / SEG);
  const Grid G = nchw_grid(g);
  return G.ncb * G.nb;
}

// Calls f(seg) for the runs of channels-last task `task`: RB rows of one block of SEG
// channels. (NCHW tasks are the reduction's units, nchw_sums, and the elementwise pass's
// stretches of rows, map_pass.)
template <class F>
inline void cl_task_runs(const Geom& g, int64_t task, F&& f) {
  StageArena* const stage = thread_stage();
  const int64_t ncb = (g.C + SEG - 1) / SEG;
  const int64_t r0 = task / ncb * RB, c = task % ncb * SEG;
  const int64_t r1 = std::min(r0 + RB, g.M());
  for (int64_t r = r0, nn = r0 / g.L, l = r0 % g.L; r < r1; ++r) {
    f(Seg{nn, c, l, std::min(SEG, g.C - c), stage});
    if (++l == g.L) l = 0, ++nn;
  }
}

// Few elements do not pay for waking threads; the choice depends on the shape only.
inline int threads_for(const Geom& g, int64_t K, int nth, int64_t tasks) {
  const int64_t work = g.M() * g.C * std::max<int64_t>(K, 1);
  const int64_t by_work = std::max<int64_t>(1, work / 32768);
  return int(std::max<int64_t>(1, std::min<int64_t>({int64_t(nth), by_work, tasks})));
}

// The first `used` (a multiple of 8) of the W float lanes of one sum, added in double:
// eight independent partials (one vector register), not a W-long chain of dependent
// additions; a fixed order, so fixed bits.
template <int64_t W, class A>
inline double lane_sum(const A* f, int64_t used) {
  static_assert(W % 8 == 0, "lanes come in vectors of 8 doubles");
#if defined(__AVX__)
  if constexpr (std::is_same_v<A, float>) {
    // The same additions in registers: inlined into a flush over many channels, the
    // generic form went through the stack and a chain of scalar adds (half of nchw_sums'
    // time in a few-row backward).
    __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();  // q[0..3], q[4..7]
    for (int64_t w = 0; w < used; w += 8) {
      lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm_loadu_ps(f + w)));
      hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm_loadu_ps(f + w + 4)));
    }
    const __m256d a = _mm256_add_pd(lo, hi);  // q[e] + q[e + 4]
    const __m256d h = _mm256_hadd_pd(a, a);   // a0 + a1, ., a2 + a3, .
    return _mm_cvtsd_f64(_mm_add_sd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1)));
  }
#endif
  double q[8] = {};
  for (int64_t w = 0; w < used; w += 8)
#pragma omp simd
    for (int e = 0; e < 8; ++e) q[e] += double(f[w + e]);
  return ((q[0] + q[4]) + (q[1] + q[5])) + ((q[2] + q[6]) + (q[3] + q[7]));
}

// The tensor's channels [lo, hi) that channels-last tasks [t0, t1) reach: a range of
// channel blocks within one block of rows, else (and tiled: a row holds every channel)
// all of them.
inline std::pair<int64_t, int64_t> channel_span(const Geom& g, int64_t t0, int64_t t1) {
  const int64_t ncb = (g.C + SEG - 1) / SEG;
  if (t1 <= t0) return {0, 0};
  if (t0 / ncb != (t1 - 1) / ncb || g.tile > 1) return {0, g.channels()};
  const int64_t lo = t0 % ncb * SEG, hi = std::min(g.C, ((t1 - 1) % ncb + 1) * SEG);
  return {lo / g.fold, (hi - 1) / g.fold + 1};
}

// NCHW: adds the NS sums of problem k over rows [n0, n1) of channels [c0, c1) to
// part[(k * NS + j) * stride + (c - c0)], through float lanes ([c][NS][W]) that go to
// double before any lane adds more than RUN / W elements: a run adds at most
// ceil(n / W) to a lane (a tail adds a second element to the last lanes, a short run one
// to its first n), so it counts as that many times W. A channel's sums do not
// depend on the other channels of the call (its own lanes; every channel takes the same
// runs, so each flushes where it alone would), so any split of a unit's channels gives
// the same bits.
template <class A, int NS, class F>
void nchw_sums(const Geom& g, int64_t c0, int64_t c1, int64_t n0, int64_t n1, int64_t k,
               A* lanes, int64_t* pending, double* part, int64_t stride, StageArena* stage,
               F& fn) {
  using Ac = Acc<A, false, NS>;
  // Runs shorter than W leave the lanes past their length zero: with few rows the flush
  // was as much work as the runs.
  const int64_t used = std::min(Ac::W, (std::min(g.L, RUN) + 7) / 8 * 8);
  auto flush = [&] {
    for (int64_t c = c0; c < c1; ++c) {
      if (pending[c - c0] == 0) continue;
      for (int j = 0; j < NS; ++j) {
        A* f = lanes + ((c - c0) * NS + j) * Ac::W;
        part[(k * NS + j) * stride + (c - c0)] += lane_sum<Ac::W>(f, used);
        std::fill(f, f + Ac::W, A(0));  // a fixed size: stores, not a call to memset
      }
      pending[c - c0] = 0;
    }
  };
  for (int64_t nn = n0; nn < n1; ++nn)
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t l = 0; l < g.L; l += RUN) {
        const Seg s{nn, c, l, std::min(RUN, g.L - l), stage};
        const int64_t weight = (s.n + Ac::W - 1) / Ac::W * Ac::W;
        if (pending[c - c0] + weight > RUN) flush();
        pending[c - c0] += weight;
        fn(s, k, Ac{lanes + (c - c0) * NS * Ac::W});
      }
  flush();
}

// Both passes do a task one problem k at a time: x and the inputs shared by the K
// problems (64 KiB a task) come back from L2 for each k, and only the few streams of one
// problem are live at once, which the hardware prefetchers follow; interleaving the K
// problems' rows instead ran 3K+ streams and was latency bound.
//
// Reduction pass: fn(seg, k, Acc) adds NS sums of problem k over a run; results land in
// out[(k * NS + j) * channels + c] (double; pass channels folded to the tensor's). Float
// partials go to double before a lane takes more than RUN / W elements (NCHW) or a
// slot more than RB rows (channels-last). reduce_pass (below) picks the layout's.

// NCHW reduction: each unit (CB channels, R rows) adds its sums in double per unit
// (KS, CB), through [CB][NS][W] float lanes (nchw_sums); the units of a channel block
// are added in row order, so any split over the threads gives the same bits.
template <class A, int NS, class F>
void reduce_pass_nchw(const Geom& g, int nth, int64_t K, double* out, F& fn) {
  using Ac = Acc<A, false, NS>;
  const int64_t C = g.channels(), nt = num_tasks(g), KS = K * NS;
  const int T = threads_for(g, K, nth, nt);
  const Grid G = nchw_grid(g);
  std::vector<double> part(size_t(nt) * KS * G.cb, 0.0);
  parallel_run(T, [&](int t) {
    std::vector<A> lanes(G.cb * NS * Ac::W, A(0));
    std::vector<int64_t> pending(G.cb, 0);  // each channel's lanes' fill (nchw_sums)
    StageArena* const stage = thread_stage();
    for (int64_t task = nt * t / T; task < nt * (t + 1) / T; ++task) {
      const int64_t c0 = G.c0(task), n0 = G.n0(task);
      for (int64_t k = 0; k < K; ++k)
        nchw_sums<A, NS>(g, c0, std::min(C, c0 + G.cb), n0, std::min(g.N, n0 + G.R), k,
                         lanes.data(), pending.data(),
                         part.data() + size_t(task) * KS * G.cb, G.cb, stage, fn);
    }
  });
  std::fill(out, out + KS * C, 0.0);  // a channel block's units in row order
  for (int64_t u = 0; u < nt; ++u) {
    const int64_t c0 = G.c0(u), c1 = std::min(C, c0 + G.cb);
    for (int64_t kj = 0; kj < KS; ++kj)
      for (int64_t c = c0; c < c1; ++c)
        out[kj * C + c] += part[(size_t(u) * KS + kj) * G.cb + (c - c0)];
  }
}

// Channels-last reduction: float [NS][SEG] channel slots per thread, flushed after each
// task's problem to double partials per thread over the channel span its tasks reach
// (KS, span): with few rows and many channels each thread's tasks reach a share of them,
// and zeroing T * KS * C doubles outweighed the pass.
template <class A, int NS, class F>
void reduce_pass_cl(const Geom& g, int nth, int64_t K, double* out, F& fn) {
  using Ac = Acc<A, true, NS>;
  const int64_t C = g.channels(), nt = num_tasks(g), KS = K * NS;
  const int T = threads_for(g, K, nth, nt);
  std::vector<std::vector<double>> thread_part(T);
  std::vector<std::pair<int64_t, int64_t>> span(T);
  parallel_run(T, [&](int t) {
    std::vector<A> facc(NS * SEG, A(0));
    span[t] = channel_span(g, nt * t / T, nt * (t + 1) / T);
    thread_part[t].assign(size_t(KS) * (span[t].second - span[t].first), 0.0);
    for (int64_t task = nt * t / T; task < nt * (t + 1) / T; ++task)
      for (int64_t k = 0; k < K; ++k) {
        int64_t c0 = -1, c1 = 0;
        // Float partials of problem k to double, and reset.
        auto flush = [&] {
          const auto [lo, hi] = span[t];
          for (int j = 0; j < NS; ++j) {
            A* f = facc.data() + j * SEG;
            double* o = thread_part[t].data() + (k * NS + j) * (hi - lo);
            fold_add(g, c0, c1, o, lo, [&](int64_t c) { return double(f[c - c0]); });
            std::fill(f, f + (c1 - c0), A(0));  // the slots this task used only
          }
        };
        cl_task_runs(g, task, [&](const Seg& s) {
          if (c0 < 0) c0 = s.c;
          c1 = std::max(c1, s.c + s.n);
          fn(s, k, Ac{facc.data()});
        });
        flush();
      }
  });
  // Each channel adds the threads' sums in thread order, so the channels may be split
  // over the threads (where there are many) with the same bits.
  const int FT = C >= FINISH_SPLIT_MIN ? T : 1;
  parallel_run(FT, [&](int ft) {
    const int64_t c_lo = C * ft / FT, c_hi = C * (ft + 1) / FT;
    for (int64_t kj = 0; kj < KS; ++kj) std::fill(out + kj * C + c_lo, out + kj * C + c_hi, 0.0);
    for (int t = 0; t < T; ++t) {
      const int64_t lo = std::max(span[t].first, c_lo), hi = std::min(span[t].second, c_hi);
      const int64_t width = span[t].second - span[t].first;
      for (int64_t kj = 0; kj < KS; ++kj) {
        double* o = out + kj * C;
        const double* p = thread_part[t].data() + kj * width;
        const int64_t first = span[t].first;
#pragma omp simd
        for (int64_t c = lo; c < hi; ++c) o[c] += p[c - first];
      }
    }
  });
}

// The reduction pass (see the comment above reduce_pass_nchw) for either layout.
template <class A, bool CL, int NS, class F>
void reduce_pass(const Geom& g, int nth, int64_t K, double* out, F&& fn) {
  if constexpr (CL)
    reduce_pass_cl<A, NS>(g, nth, K, out, fn);
  else
    reduce_pass_nchw<A, NS>(g, nth, K, out, fn);
}

// Runs of equal length (a multiple of 16) up to MAP_RUN over n elements of an NCHW row,
// for the elementwise pass: a short last run would be written in place between streamed
// ones (see Dst), which cost a 3136-element row 10-20% more than streaming it all.
inline int64_t map_run_length(int64_t n) {
  const int64_t parts = (n + MAP_RUN - 1) / MAP_RUN;
  return ((n + parts - 1) / parts + 15) / 16 * 16;
}

// Whether an elementwise fn offers fn.runs(nn, c0, c1, k): the whole NCHW runs of
// channels [c0, c1) in row nn, in one plain loop per channel.
template <class F, class = void>
struct offers_runs : std::false_type {};
template <class F>
struct offers_runs<F, std::void_t<decltype(std::declval<const F&>().runs(
                          int64_t(0), int64_t(0), int64_t(0), int64_t(0)))>>
    : std::true_type {};

// NCHW runs up to fn's short_run (this, unless fn vectorises its runs itself) go to
// fn.runs where it is offered: a Seg's setup and the vector loop's prologue per run cost
// more than a run's few values (a 1x3 plane's eval ran at a quarter of a plain loop's
// speed).
constexpr int64_t SHORT_RUN = 32;

// The elementwise fn over the NCHW runs of channels [c0, c1) in row nn: in one fn.runs
// call where fn offers it and rows are short, else run by run, up to `run` values each.
template <class F>
inline void row_runs(F& fn, const Geom& g, int64_t nn, int64_t c0, int64_t c1, int64_t run,
                     int64_t k, StageArena* stage) {
  if constexpr (offers_runs<F>::value) {
    if (g.L <= F::short_run) return fn.runs(nn, c0, c1, k);
  }
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t l = 0; l < g.L; l += run) fn(Seg{nn, c, l, std::min(run, g.L - l), stage}, k);
}

// Elementwise pass: fn(seg, k) for every run and problem. Any split of the runs gives the
// same bits, so NCHW tasks are stretches of whole rows of about UNIT_ELEMS elements in
// (n, c) order, or UNIT_ELEMS-long pieces of longer rows: one forward sweep of memory.
// (The reduction's units interleave R rows, which costs short rows, 7×7 planes, up to
// twice the time where x is in the last-level cache.)
template <bool CL, class F>
void map_pass(const Geom& g, int nth, int64_t K, F&& fn) {
  static_assert(SEG <= MAP_RUN, "channels-last runs fit a staged output run");
  static_assert(MAP_RUN % 16 == 0, "even runs stay within MAP_RUN");
  const int64_t runs = g.N * g.C, L = std::max<int64_t>(g.L, 1);
  const int64_t per = std::max<int64_t>(1, UNIT_ELEMS / L);  // rows per task
  const int64_t pieces = (L + UNIT_ELEMS - 1) / UNIT_ELEMS;   // tasks per row
  const int64_t nt = CL ? num_tasks(g) : pieces > 1 ? runs * pieces : (runs + per - 1) / per;
  const int T = threads_for(g, K, nth, nt);
  const int64_t row_run = map_run_length(L);  // whole rows: once, not per row
  parallel_run(T, [&](int t) {
    StageArena* const stage = thread_stage();
    for (int64_t task = nt * t / T; task < nt * (t + 1) / T; ++task)
      for (int64_t k = 0; k < K; ++k) {
        if constexpr (CL) {
          cl_task_runs(g, task, [&](const Seg& s) { fn(s, k); });
        } else if (pieces > 1) {
          const int64_t r = task / pieces, l0 = task % pieces * UNIT_ELEMS;
          const int64_t l1 = std::min(g.L, l0 + UNIT_ELEMS), len = map_run_length(l1 - l0);
          for (int64_t l = l0; l < l1; l += len)
            fn(Seg{r / g.C, r % g.C, l, std::min(len, l1 - l), stage}, k);
        } else {
          const int64_t r0 = task * per, r1 = std::min(runs, r0 + per);
          for (int64_t r = r0; r < r1;) {
            const int64_t nn = r / g.C, c = r % g.C, c1 = std::min(g.C, c + r1 - r);
            row_runs(fn, g, nn, c, c1, row_run, k, stage);
            r += c1 - c;
          }
        }
      }
    store_fence();
  });
}

// ---- reduction, per-channel coefficients, elementwise pass -----------------------------

// The bytes of element inputs an NCHW channel block may hold for its elementwise pass to
// read them back from L2 (reduce_map); 0: never. Process-wide (caches.cpp); set_ returns
// the old setting.
int64_t fuse_max_bytes();
int64_t set_fuse_max_bytes(int64_t bytes);

// Bytes per (n, c, l) value of element inputs that both passes read: x and the others,
// K-batched ones K times.
template <class T>
inline int64_t input_bytes(int64_t K, std::initializer_list<TD> inputs) {
  int64_t bytes = 0;
  for (const TD& t : inputs)
    if (t.ptr) bytes += int64_t(sizeof(T)) * (t.sK ? K : 1);
  return bytes;
}

// Min contiguous elements a fused block reads per row (a 4 KiB page of floats): shorter
// stretches between jumps of C * L elements left the prefetchers behind (7x7 planes in
// blocks of 13-20 channels: up to 12% slower than the whole passes).
constexpr int64_t FUSE_MIN_RUN = 1024;

// Channels per fused NCHW block, or 0 where the passes run whole: channels-last rows, K
// problems (the whole passes keep a unit's x in L2 across them; fused blocks of a K = 8
// jvp ran up to 17% slower), a channel's inputs beyond ONE_CHANNEL_FUSE times
// fuse_max_bytes(), fewer channels than threads, blocks too narrow for the prefetchers.
// A block holds as many channels as fit in the budget, or one channel of up to
// ONE_CHANNEL_FUSE times it: one channel's second pass still found most of its inputs in L2
// (32x64x56x56 float32 backward_backward, 1.2 MB a channel: 0.82x the whole passes;
// backward_jvp, 1.6 MB: 0.86x), where blocks of the whole L2 did not (2 MB: 1.17x).
constexpr double ONE_CHANNEL_FUSE = 1.6;
inline int64_t fused_block(const Geom& g, int T, int64_t K, int64_t bytes_per_value) {
  const int64_t budget = fuse_max_bytes();
  const int64_t per_channel = g.N * g.L * bytes_per_value;
  if (g.cl || g.fold != 1 || K != 1 || budget <= 0 || g.C < T ||
      per_channel > int64_t(ONE_CHANNEL_FUSE * double(budget)))
    return 0;
  const int64_t cs = std::max<int64_t>(1, std::min(budget / per_channel, (g.C + T - 1) / T));
  return cs * g.L >= FUSE_MIN_RUN || cs == g.C ? cs : 0;
}

// A kernel's two passes with the per-channel step between them: reduce(seg, k, Acc) adds
// the sums (reduce_pass) into out; finish(c0, c1, attempt) turns those of channels [c0, c1)
// into the elementwise pass's coefficients, returning true to have that reduction run
// once more (attempt 0 only); make_map() gives the elementwise fn(seg, k) (map_pass).
//
// NCHW blocks (K = 1) whose inputs fit in L2 run both passes back to back on one thread, the
// second reading its inputs from L2 instead of memory (a separate second pass re-read
// 32x64x56x56 from memory: backward 2.6x a copy, 2.1x fused). A block's sums are those
// of reduce_pass bit for bit: the grid's rows per unit, the units added in row order
// (nchw_sums). Without `reduce_needed` (no sums) the coefficients come from zero sums.
template <class A, bool CL, int NS, class R, class Fin, class MakeMap>
void reduce_map(const Geom& g, int nth, int64_t K, int64_t bytes_per_value, bool reduce_needed,
                double* out, R&& reduce, Fin&& finish, MakeMap&& make_map) {
  const int64_t C = g.channels(), KS = K * NS;
  const int T = threads_for(g, K, nth, C);
  const int64_t cs = reduce_needed ? fused_block(g, T, K, bytes_per_value) : 0;
  if constexpr (!CL) {
    if (cs > 0) {
      using Ac = Acc<A, false, NS>;
      const Grid G = nchw_grid(g);
      const int64_t live = std::min(cs, G.cb);
      const int64_t row_run = map_run_length(g.L);
      auto map = make_map();
      parallel_run(T, [&](int t) {
        StageArena* const stage = thread_stage();
        std::vector<A> lanes(live * NS * Ac::W, A(0));
        std::vector<int64_t> pending(live, 0);
        std::vector<double> unit(KS * live);
        // Each share an equal range of channels, in blocks of at most cs: whole blocks of
        // cs dealt out left a short last block, and one thread up to 1.7x the other's
        // channels (bfloat16 64x256x100: 4 blocks of 81, 81, 81 and 13 channels).
        const int64_t lo = C * t / T, width = C * (t + 1) / T - lo;
        const int64_t blocks = (width + cs - 1) / cs;
        for (int64_t blk = 0; blk < blocks; ++blk) {
          const int64_t b0 = lo + width * blk / blocks, b1 = lo + width * (blk + 1) / blocks;
          for (int attempt = 0;; ++attempt) {
            for (int64_t kj = 0; kj < KS; ++kj)
              std::fill(out + kj * C + b0, out + kj * C + b1, 0.0);
            for (int64_t c0 = b0; c0 < b1; c0 += live) {
              const int64_t c1 = std::min(b1, c0 + live);
              for (int64_t n0 = 0; n0 < g.N; n0 += G.R) {
                std::fill(unit.begin(), unit.end(), 0.0);
                for (int64_t k = 0; k < K; ++k)
                  nchw_sums<A, NS>(g, c0, c1, n0, std::min(g.N, n0 + G.R), k, lanes.data(),
                                   pending.data(), unit.data(), live, stage, reduce);
                for (int64_t kj = 0; kj < KS; ++kj)
                  for (int64_t c = c0; c < c1; ++c) out[kj * C + c] += unit[kj * live + (c - c0)];
              }
            }
            if (!finish(b0, b1, attempt) || attempt > 0) break;
          }
          for (int64_t k = 0; k < K; ++k)
            for (int64_t nn = 0; nn < g.N; ++nn) row_runs(map, g, nn, b0, b1, row_run, k, stage);
        }
        store_fence();
      });
      return;
    }
  }
  if (reduce_needed) reduce_pass<A, CL, NS>(g, nth, K, out, reduce);
  // Per-channel work (a square root, divisions, the running statistics) in ranges, on the
  // threads where there are many channels: with few rows it outweighed the passes. A
  // range asking for another attempt is finished again after a second reduction.
  const int FT = C >= FINISH_SPLIT_MIN ? T : 1;
  std::vector<char> again(FT, 0);
  auto finish_ranges = [&](int attempt) {
    parallel_run(FT, [&](int t) {
      if (attempt == 0 || again[t]) again[t] = finish(C * t / FT, C * (t + 1) / FT, attempt);
    });
  };
  finish_ranges(0);
  if (reduce_needed && std::find(again.begin(), again.end(), 1) != again.end()) {
    reduce_pass<A, CL, NS>(g, nth, K, out, reduce);
    finish_ranges(1);
  }
  map_pass<CL>(g, nth, K, make_map());
}

// ---- dispatch --------------------------------------------------------------------------

enum DType : int { kFloat64 = 0, kFloat32 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Outputs from this many bytes (2-byte outputs: from HALF_STREAM_FACTOR times it) are
// written with non-temporal stores; -1 (the default) means FASTBN_STREAM_MIN_BYTES, or
// half the last-level cache (counted as 32 MiB at most) where it is unset.
// Process-wide; set_ returns the old setting.
int64_t stream_min_bytes();
int64_t set_stream_min_bytes(int64_t bytes);

// An output of 32 MiB or more (glibc's largest mmap threshold, so every such allocation
// is a fresh mapping; K-batched outputs often are) is first touched by the kernel, and
// 4 KiB page faults then cost several times the write itself; asking for transparent
// huge pages first (THP "madvise" mode) avoids that. Smaller outputs come from the
// reused heap, where the advice only costs (huge pages zeroed and compacted on fault).
constexpr uintptr_t ADVISE_MIN_BYTES = uintptr_t(32) << 20;

// t, an output the kernel is about to write, marked for streaming when it is too large
// to stay cached next to the pass's input (from half the last-level cache): a plain
// store first reads the line it overwrites (read for ownership), a third of an
// elementwise pass's traffic, which non-temporal stores skip (the kernels' 25 MB
// elementwise passes: 2-23% faster). Smaller outputs stay in cache for their consumer
// (streaming an 8 MB one made it up to 1.3x slower). Hints only: the results do not
// depend on them.
//
// bfloat16 and float16 passes convert every value, and a streamed run's staging cost
// them more than the reads for ownership it saves: their eval and forward train of
// 16 MiB outputs ran 1.2-1.6x slower streamed, 32 MiB ones 1.15-1.2x; from 64 MiB either
// way won by layout.
constexpr int64_t HALF_STREAM_FACTOR = 4;

inline TD output(int dtype, const Geom& g, int64_t K, TD t) {
  if (!t.ptr || t.sK < 0 || t.sN < 0 || t.sC < 0 || t.sL < 0) return t;
  const int64_t last = (K - 1) * t.sK + (g.N - 1) * t.sN + (g.C - 1) * t.sC + (g.L - 1) * t.sL;
  const uintptr_t esize = dtype == kFloat64 ? 8 : dtype == kFloat32 ? 4 : 2;
  const uintptr_t bytes = uintptr_t(last + 1) * esize;
  const int64_t scaled = int64_t(bytes) / (esize == 2 ? HALF_STREAM_FACTOR : 1);
  t.stream = NON_TEMPORAL_STORES && scaled >= stream_min_bytes();
#ifdef MADV_HUGEPAGE
  if (bytes >= ADVISE_MIN_BYTES) {
    const uintptr_t huge = uintptr_t(1) << 21;
    const uintptr_t a = (t.ptr + huge - 1) & ~(huge - 1);
    const uintptr_t e = (t.ptr + bytes) & ~(huge - 1);
    if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
  }
#endif
  return t;
}

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
