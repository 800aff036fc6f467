// forward_train (statistics pass + normalise pass, running statistics updated in place)
// and forward_eval (one affine pass).
#include <cmath>
#include <vector>

#include "cpu/ops.h"

namespace fastbn {
namespace {

// The running statistics, updated in place from the batch statistics of a channel:
// running = (1 - momentum) * running + momentum * batch, with the unbiased variance.
// Buffers of A are blended in double and rounded once; buffers of the element type T (a
// half layer's) as torch blends them, in A and rounded once to T.
template <class T>
struct Running {
  using A = acc_t<T>;
  uintptr_t mean, var;  // 0: not tracked
  bool in_t;
  double momentum;
  // Channels [lo, hi) from the batch mean (as stored) and biased variance.
  void update(int64_t lo, int64_t hi, const A* batch_mean, const double* biased_var,
              double count) const {
    if (!mean) return;
    const double unbias = count > 1 ? count / (count - 1) : 1.0;
    if constexpr (!std::is_same_v<T, A>) {
      if (in_t) {
        T *m = reinterpret_cast<T*>(mean), *v = reinterpret_cast<T*>(var);
        const A keep = A(1 - momentum), take = A(momentum), correction = A(unbias);
#pragma omp simd
        for (int64_t c = lo; c < hi; ++c) {
          m[c] = from_acc<T>(to_acc<A>(m[c]) * keep + batch_mean[c] * take);
          v[c] = from_acc<T>(to_acc<A>(v[c]) * keep + A(biased_var[c]) * correction * take);
        }
        return;
      }
    }
    A *m = reinterpret_cast<A*>(mean), *v = reinterpret_cast<A*>(var);
#pragma omp simd
    for (int64_t c = lo; c < hi; ++c) {
      const double unbiased = biased_var[c] * unbias;
      m[c] = A((1 - momentum) * double(m[c]) + momentum * double(batch_mean[c]));
      v[c] = A((1 - momentum) * double(v[c]) + momentum * unbiased);
    }
  }
};

// The elementwise fn of y = (x - center) * scale + bias (+ ReLU) (map_pass). x - center
// first: for x far from 0 (1e4 + N(0, 1)) x * scale would round to x's ulp before the
// shift cancels it.
template <class T, bool CL, bool RELU, bool U>
struct AffineMap {
  using A = acc_t<T>;
  const TD& x;
  const TD& y;
  PassArray<A> center, scale, bias;
  int64_t L;

  static A value(A v, A m, A a, A b) {
    const A out = (v - m) * a + b;
    return RELU ? (out < A(0) ? A(0) : out) : out;  // torch's relu: NaN and -0 stay
  }
  static constexpr bool WIDE = WIDE_RUNS<T, CL, U>;
  // NCHW runs up to this long go to runs() (row_runs). Wide runs up to the length from
  // which a streamed run would be staged (staged_run): the per-run setup cost float16
  // 7x7 planes a third of their eval (316 us against 216 on 128x512x7x7) and bfloat16
  // up to 14x14 planes 10-15%.
  static constexpr int64_t short_run = WIDE ? 511 / int64_t(sizeof(T)) : SHORT_RUN;

  void operator()(const Seg& s, int64_t) const {
    const Chan<CL, A> m(center.get(), s.c), a(scale.get(), s.c), b(bias.get(), s.c);
#if FASTBN_WIDE_HALF
    // (The WideOut lives until wide_values returns: see wide_map.)
    if constexpr (WIDE)
      return wide_values(run_ptr<const T>(x, s, 0), WideOut<T>(y, s, 0).p, s.n, m, a, b);
#endif
    const auto in = src<T, CL, U>(x, s, 0);
    const auto out = dst<T, CL, U>(y, s, 0);
    each(s.n, out, [&](int64_t i) { out.put(i, value(in.template at<A>(i), m[i], a[i], b[i])); });
  }
#if FASTBN_WIDE_HALF
  // y = value(x) over n values, 16 at a time, the operations of value() in between (the
  // same bits): float16 staged through float buffers (Src, Dst) took 1.3x stock's
  // float16 eval, and bfloat16's compiled loop 1.12x stock's over NCHW runs (one thread)
  // and 1.1x this one's over channels-last rows.
  static void wide_values(const T* xr, T* yr, int64_t n, const Chan<CL, A> center,
                          const Chan<CL, A> scale, const Chan<CL, A> bias) {
    const WideChan<CL> m(center), a(scale), b(bias);
    const __m512 zero = _mm512_setzero_ps();
    wide_each(n, [&](int64_t i, __mmask16 k) {
      __m512 out = (load16(xr + i, k) - m(i, k)) * a(i, k) + b(i, k);
      if constexpr (RELU)  // out < 0 -> +0; NaN and -0 stay
        out = _mm512_mask_mov_ps(out, _mm512_cmp_ps_mask(out, zero, _CMP_LT_OQ), zero);
      return out;
    }, yr);
  }
#endif
  // The whole NCHW runs of channels [c0, c1) in row nn (up to short_run long). Not
  // inlined: inside the pass's thread closure its loop kept its pointers on the stack.
  [[gnu::noinline]] void runs(int64_t nn, int64_t c0, int64_t c1, int64_t) const {
    const T* xr = reinterpret_cast<const T*>(x.ptr) + nn * x.sN;
    T* yr = reinterpret_cast<T*>(y.ptr) + nn * y.sN;
    const int64_t xs = U ? 1 : x.sL, ys = U ? 1 : y.sL;
    for (int64_t c = c0; c < c1; ++c) {
      const T* xc = xr + c * x.sC;
      T* yc = yr + c * y.sC;
      if constexpr (WIDE) {
#if FASTBN_WIDE_HALF
        wide_values(xc, yc, L, {center.get(), c}, {scale.get(), c}, {bias.get(), c});
#endif
      } else {
        const A m = center.get()[c], a = scale.get()[c], b = bias.get()[c];
        for (int64_t l = 0; l < L; ++l)
          yc[l * ys] = from_acc<T>(value(to_acc<A>(xc[l * xs]), m, a, b));
      }
    }
  }
};

template <class T, bool CL, bool RELU, bool U>
AffineMap<T, CL, RELU, U> affine_map(const Geom& g, const TD& x, const TD& y,
                                     const acc_t<T>* center, const acc_t<T>* scale,
                                     const acc_t<T>* bias) {
  using A = acc_t<T>;
  return {x, y, PassArray<A>(g, center), PassArray<A>(g, scale), PassArray<A>(g, bias), g.L};
}

template <class T, bool CL, bool RELU>
void train(const Geom& g, int nth, const TD& x, const TD& y, const acc_t<T>* w,
           const acc_t<T>* b, double eps, acc_t<T>* mean, acc_t<T>* invstd, acc_t<T>* var,
           const Running<T>& running) {
  using A = acc_t<T>;
  const int64_t C = g.channels();
  // Sums of (x - pivot) and its square, in one pass. The pivot (first_values_mean) keeps
  // E[d^2] - E[d]^2 from cancelling when |mean| >> std: float lanes lose about
  // ((pivot - mean) / std)^2 ulps of the variance. A pivot that lands far from the mean
  // (an outlier among the first elements) is replaced by the mean found and the pass
  // repeated, once. A non-finite sample gives pivot 0, so an inf in x gives torch's inf
  // mean, not inf - inf. Channels are innermost: C independent sums, not one chain of
  // dependent additions per channel.
  constexpr double MAX_PIVOT_OFFSET = 4;  // in standard deviations: loses 16 ulps at most
  auto pivot = scratch<A>(C);
  first_values_mean<T>(g, x, 0, pivot.get());
  auto sums = scratch<double>(2 * C), m1 = scratch<double>(C), biased = scratch<double>(C);
  auto scale = scratch<A>(C);
  const double M = g.count();
  // Folded, a copy that a moved pivot refreshes, range by range.
  PassArray<A> pp(g, pivot.get());
  when(unit_runs<CL>({x, y}), [&](auto unit) {
    constexpr bool U = decltype(unit)::value;
    reduce_map<A, CL, 2>(
        g, nth, 1, input_bytes<T>(1, {x}), true, sums.get(),
        [&](const Seg& s, int64_t, const Acc<A, CL, 2>& acc) {
#if FASTBN_WIDE_HALF
          if constexpr (WIDE_RUNS<T, CL, U>) {
            const T* xr = run_ptr<const T>(x, s, 0);
            const WideChan<CL> p(pp.get(), s.c);
            return wide_add(acc, s.n, [&](int64_t i, __mmask16 m) {
              const __m512 d = load16(xr + i, m) - p(i, m);
              return Terms16<2>{{d, d * d}};
            });
          }
#endif
          const auto in = src<T, CL, U>(x, s, 0);
          const Chan<CL, A> p(pp.get(), s.c);
          acc.add(s.n, [&](int64_t i, A(&v)[2]) {
            const A d = in.template at<A>(i) - p[i];
            v[0] = d;
            v[1] = d * d;
          });
        },
        [&](int64_t lo, int64_t hi, int attempt) {
          // Loops without branches, which the compiler vectorises, and one division a
          // channel (with few rows of many channels this step outweighed the passes).
          const double inv_m = 1.0 / M;
#pragma omp simd
          for (int64_t c = lo; c < hi; ++c) {
            m1[c] = sums[c] * inv_m;
            biased[c] = std::max(sums[C + c] * inv_m - m1[c] * m1[c], 0.0);
          }
          if (attempt == 0) {
            auto far = [&](int64_t c) {
              return m1[c] * m1[c] > MAX_PIVOT_OFFSET * MAX_PIVOT_OFFSET * biased[c] &&
                     std::isfinite(m1[c]);
            };
            int any = 0;
#pragma omp simd reduction(| : any)
            for (int64_t c = lo; c < hi; ++c) any |= int(far(c));
            if (any) {
              for (int64_t c = lo; c < hi; ++c)
                if (far(c)) pivot[c] = A(double(pivot[c]) + m1[c]);
              pp.refresh(g, lo, hi);
              return true;
            }
          }
          // 1 / sqrt in the accumulation type: float's square root and division take a
          // fraction of double's time, and the result is stored as A anyway.
#pragma omp simd
          for (int64_t c = lo; c < hi; ++c) {
            mean[c] = A(double(pivot[c]) + m1[c]);
            invstd[c] = A(1) / std::sqrt(A(biased[c] + eps));
            scale[c] = w[c] * invstd[c];
          }
          if (var) std::copy(biased.get() + lo, biased.get() + hi, var + lo);
          running.update(lo, hi, mean, biased.get(), M);
          return false;
        },
        [&] { return affine_map<T, CL, RELU, U>(g, x, y, mean, scale.get(), b); });
  });
}

}  // namespace

void forward_train(int dtype, const Geom& g, int nth, const TD& x, const TD& y, uintptr_t w,
                   uintptr_t b, bool stats_in_t, double eps, bool relu, uintptr_t mean,
                   uintptr_t invstd, uintptr_t var, uintptr_t running_mean,
                   uintptr_t running_var, double momentum) {
  dispatch(dtype, g.cl, relu, [&](auto tag, auto cl, auto act) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const ChannelIn<T> wt(w, stats_in_t, g.channels()), bt(b, stats_in_t, g.channels());
    const Running<T> running{running_mean, running_var, stats_in_t, momentum};
    train<T, decltype(cl)::value, decltype(act)::value>(
        g, nth, x, output(dtype, g, 1, y), wt.get(), bt.get(), eps,
        reinterpret_cast<A*>(mean), reinterpret_cast<A*>(invstd), reinterpret_cast<A*>(var),
        running);
  });
}

void forward_eval(int dtype, const Geom& g, int nth, const TD& x, const TD& y,
                  uintptr_t running_mean, uintptr_t running_var, uintptr_t w, uintptr_t b,
                  bool stats_in_t, double eps, bool relu) {
  dispatch(dtype, g.cl, relu, [&](auto tag, auto cl, auto act) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const int64_t C = g.channels();
    const ChannelIn<T> mean_in(running_mean, stats_in_t, C), var_in(running_var, stats_in_t, C),
        w_in(w, stats_in_t, C), b_in(b, stats_in_t, C);
    const A *rm = mean_in.get(), *rv = var_in.get(), *wt = w_in.get(), *bt = b_in.get();
    auto scale = scratch<A>(C);
    // var + eps, its square root and 1 / it in the accumulation type, as torch's eval (same
    // bits for float): a double square root and division per channel took a fifth of a 1x3
    // plane's pass.
#pragma omp simd
    for (int64_t c = 0; c < C; ++c)
      scale[c] = wt[c] * (A(1) / std::sqrt(rv[c] + A(eps)));
    constexpr bool CL = decltype(cl)::value;
    const TD out = output(dtype, g, 1, y);
    when(unit_runs<CL>({x, out}), [&](auto unit) {
      map_pass<CL>(g, nth, 1,
                   affine_map<T, CL, decltype(act)::value, decltype(unit)::value>(
                       g, x, out, rm, scale.get(), bt));
    });
  });
}

}  // namespace fastbn
