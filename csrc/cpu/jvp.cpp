// forward_jvp: y_t = mask * (w * xhat_t + w_t * xhat + b_t), with
// xhat_t = invstd * (x_t - mean(x_t) - xhat * mean(x_t * xhat)). The reduction pass runs
// only when x_t is present (reduce_map in common.h). x_t is centred before it is scaled,
// so a large common part of it costs the rounding of its mean alone.
#include "cpu/ops.h"

namespace fastbn {
namespace {

template <class T, bool CL, bool RELU>
void run(const Geom& g, int nth, int64_t K, const TD& x, const TD& xt, const TD& yt,
         const acc_t<T>* mean, const acc_t<T>* invstd, const acc_t<T>* w, const acc_t<T>* b,
         const acc_t<T>* wt, const acc_t<T>* bt) {
  using A = acc_t<T>;
  const int64_t C = g.channels();
  const double M = g.count();
  auto sums = scratch<double>(K * 2 * C);
  auto alpha = scratch<A>(C), beta = scratch<A>(K * C), gamma = scratch<A>(K * C),
       mu = scratch<A>(K * C);
  const Stats<A> st(g, RELU, mean, invstd, w, b);
  when(unit_runs<CL>({x, xt, yt}), [&](auto unit) {
    when(xt.ptr != 0, [&](auto has_xt) {
      constexpr bool U = decltype(unit)::value, HX = decltype(has_xt)::value;
      using P = Prim<T, A, CL, RELU, U>;
      // y_t = mask * (alpha * (x_t - mu) + beta * xhat + gamma). xhat enters only through x_t
      // and w_t: not multiplied by 0 for a bias tangent alone, where a non-finite x would
      // make NaN of a term the reference does not have.
      const bool uses_xhat = HX || wt;
      if (!HX) std::fill(sums.get(), sums.get() + K * 2 * C, 0.0);  // no reduction pass
      reduce_map<A, CL, 2>(
          g, nth, K, input_bytes<T>(K, {x, xt}), HX, sums.get(),
          [&](const Seg& s, int64_t k, const Acc<A, CL, 2>& acc) {
#if FASTBN_WIDE_HALF
            if constexpr (WIDE_RUNS<T, CL, U>) {
              const WidePrim<T, CL, RELU> pr(x, s, st);
              const T* tr = run_ptr<const T>(xt, s, k);
              return wide_add(acc, s.n, [&](int64_t i, __mmask16 m) {
                const __m512 tv = load16(tr + i, m);
                return Terms16<2>{{tv, tv * pr.xhat(i, m)}};
              });
            }
#endif
            const P pr(x, s, st);
            const auto t = src<T, CL, U>(xt, s, k);
            acc.add(s.n, [&](int64_t i, A(&v)[2]) {
              const A tv = t.template at<A>(i);
              v[0] = tv;
              v[1] = tv * pr.xhat(i);
            });
          },
          [&](int64_t lo, int64_t hi, int) {
#pragma omp simd
            for (int64_t c = lo; c < hi; ++c) alpha[c] = HX ? A(double(w[c]) * invstd[c]) : A(0);
            for (int64_t k = 0; k < K; ++k)
#pragma omp simd
              for (int64_t c = lo; c < hi; ++c) {
                const double proj = sums[(2 * k + 1) * C + c] / M;
                beta[k * C + c] =
                    A(-double(alpha[c]) * proj + (wt ? double(wt[k * C + c]) : 0.0));
                gamma[k * C + c] = bt ? bt[k * C + c] : A(0);
                mu[k * C + c] = A(sums[(2 * k) * C + c] / M);
              }
            return false;
          },
          [&] {
            return [&, pal = PassArray<A>(g, alpha.get()), pbe = PassArray<A>(g, beta.get(), K),
                    pga = PassArray<A>(g, gamma.get(), K),
                    pmu = PassArray<A>(g, mu.get(), K)](const Seg& s, int64_t k) {
              const Chan<CL, A> al(pal.get(), s.c), be(pbe.get() + k * g.C, s.c),
                  ga(pga.get() + k * g.C, s.c), mx(pmu.get() + k * g.C, s.c);
#if FASTBN_WIDE_HALF
              if constexpr (WIDE_RUNS<T, CL, U>) {
                const WidePrim<T, CL, RELU> pr(x, s, st);
                const T* tr = run_ptr<const T>(xt, s, k);
                const WideChan<CL> va(al), vb(be), vg(ga), vmx(mx);
                const __mmask16 xhat_used = uses_xhat ? 0xFFFF : 0;  // and_mask's
                return wide_map<T>(s, k, [&](int64_t i, __mmask16 m) {
                  const __m512 xh = pr.xhat(i, m);
                  __m512 v = vb(i, m) * _mm512_maskz_mov_ps(xhat_used, xh) + vg(i, m);
                  if constexpr (HX) v = va(i, m) * (load16(tr + i, m) - vmx(i, m)) + v;
                  return pr.keep(i, m, xh, v);
                }, yt);
              }
#endif
              const P pr(x, s, st);
              const auto t = src<T, CL, U>(xt, s, k);
              const auto o = dst<T, CL, U>(yt, s, k);
              each(s.n, o, [&](int64_t i) {
                const A xh = pr.xhat(i);
                A v = be[i] * and_mask(uses_xhat, xh) + ga[i];
                if constexpr (HX) v = al[i] * (t.template at<A>(i) - mx[i]) + v;
                o.put(i, pr.keep(i, xh, v));
              });
            };
          });
    });
  });
}

}  // namespace

void forward_jvp(int dtype, const Geom& g, int nth, int64_t K, bool relu, const TD& x,
                 const TD& xt, const TD& yt, uintptr_t mean, uintptr_t invstd, uintptr_t w,
                 uintptr_t b, uintptr_t wt, uintptr_t bt, bool params_in_t) {
  dispatch(dtype, g.cl, relu, [&](auto tag, auto cl, auto act) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const int64_t C = g.channels();
    const ChannelIn<T> w_in(w, params_in_t, C), b_in(b, params_in_t, C),
        wt_in(wt, params_in_t, K * C), bt_in(bt, params_in_t, K * C);
    run<T, decltype(cl)::value, decltype(act)::value>(
        g, nth, K, x, xt, output(dtype, g, K, yt), reinterpret_cast<const A*>(mean),
        reinterpret_cast<const A*>(invstd), w_in.get(), b_in.get(), wt_in.get(), bt_in.get());
  });
}

}  // namespace fastbn
