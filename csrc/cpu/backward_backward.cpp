// backward_backward: the vector-Jacobian product of backward, one reduction pass for the
// per-(problem, channel) sums and one elementwise pass that is a per-channel linear
// combination of the centred element inputs and xhat (reduce_map in common.h). Formulas:
// reference.py, expanded. (Its sibling backward_jvp.cpp is a file of its own so that the two
// largest template sets compile in parallel.)
#include "cpu/ops.h"

namespace fastbn {
namespace {

template <class T, bool CL, bool RELU>
void bb(const Geom& g, int nth, int64_t K, const TD& x, const TD& dy, const TD& ggx,
        const acc_t<T>* ggw, const acc_t<T>* ggb, const acc_t<T>* mean,
        const acc_t<T>* invstd, const acc_t<T>* w, const acc_t<T>* b, const TD& out_gdy,
        const TD& out_gx, acc_t<T>* out_gw) {
  using A = acc_t<T>;
  const int64_t C = g.channels();
  const double M = g.count();
  // sum g, g xhat, u, a xhat, u g  (g = masked grad_y, a = gg_x, u = a - pivot: a_m the
  // mean of u)
  constexpr int NS = 5;
  auto sums = scratch<double>(K * NS * C);
  auto ya = scratch<A>(K * C), yx = scratch<A>(K * C), y0 = scratch<A>(K * C),
       xa = scratch<A>(K * C), xg = scratch<A>(K * C), xx = scratch<A>(K * C),
       am = scratch<A>(K * C), gm = scratch<A>(K * C), pivot = scratch<A>(K * C);
  const Stats<A> st(g, RELU, mean, invstd, w, b);
  when(unit_runs<CL>({x, dy, ggx, out_gdy, out_gx}), [&](auto unit) {
    when(ggx.ptr != 0, [&](auto has_a) {
      constexpr bool U = decltype(unit)::value, HA = decltype(has_a)::value;
      using P = Prim<T, A, CL, RELU, U>;
      // g_grad_y = mask * (ya * (a - am) + yx * xhat + y0);
      // g_x = xa * (a - am) + xg * (g - gm) + xx * xhat, with am, gm the means of a and g:
      // inputs centred before they are scaled, a large common part of one costs the
      // rounding of its mean alone.
      // Terms of an absent input are left out, not multiplied by 0: a non-finite x or
      // grad_y would make them NaN where the reference has nothing. g and xhat enter only
      // through gg_x and gg_weight (`uses_g`).
      const bool uses_g = HA || ggw;
      if (!uses_g) std::fill(sums.get(), sums.get() + K * NS * C, 0.0);  // no reduction pass
      // gg_x's own sum and its sum with g take it less a pivot: with both a large common
      // part, the product a g of the raw values would round away sum (a - mean) g. Not
      // the sum with xhat, which the pivot would change by pivot * sum xhat: not 0 for a
      // mean that is not exactly x's (a rounded one).
      if (HA)
        for (int64_t k = 0; k < K; ++k) first_values_mean<T>(g, ggx, k, pivot.get() + k * C);
      const PassArray<A> pp(g, HA ? pivot.get() : nullptr, K);
      reduce_map<A, CL, NS>(
          g, nth, K, input_bytes<T>(K, {x, dy, ggx}), uses_g, sums.get(),
          [&](const Seg& s, int64_t k, const Acc<A, CL, NS>& acc) {
#if FASTBN_WIDE_HALF
            if constexpr (WIDE_RUNS<T, CL, U>) {
              const WidePrim<T, CL, RELU> pr(x, s, st);
              const T* d = run_ptr<const T>(dy, s, k);
              const T* a = run_ptr<const T>(ggx, s, k);
              const WideChan<CL> p(HA ? pp.get() + k * g.C : nullptr, s.c);
              return wide_add(acc, s.n, [&](int64_t i, __mmask16 m) {
                const __m512 xh = pr.xhat(i, m), gv = pr.keep(i, m, xh, load16(d + i, m));
                const __m512 zero = _mm512_setzero_ps(), av = HA ? load16(a + i, m) : zero;
                const __m512 uv = HA ? av - p(i, m) : zero;
                return Terms16<NS>{{gv, gv * xh, uv, av * xh, HA ? uv * gv : zero}};
              });
            }
#endif
            const P pr(x, s, st);
            const auto d = src<T, CL, U>(dy, s, k);
            const auto a = src<T, CL, U>(ggx, s, k);
            const Chan<CL, A> p(HA ? pp.get() + k * g.C : nullptr, s.c);
            acc.add(s.n, [&](int64_t i, A(&v)[NS]) {
              const A xh = pr.xhat(i), gv = pr.keep(i, xh, d.template at<A>(i));
              const A av = HA ? a.template at<A>(i) : A(0), uv = HA ? av - p[i] : A(0);
              v[0] = gv;
              v[1] = gv * xh;
              v[2] = uv;
              v[3] = av * xh;
              v[4] = HA ? uv * gv : A(0);
            });
          },
          [&](int64_t lo, int64_t hi, int) {
            for (int64_t k = 0; k < K; ++k)
#pragma omp simd
              for (int64_t c = lo; c < hi; ++c) {
                const double* sk = sums.get() + k * NS * C + c;
                const double g_m = sk[0] / M, gxm = sk[C] / M, a_m = sk[2 * C] / M,
                             axm = sk[3 * C] / M;
                // sum a (g - ...)
                const double adc = HA ? sk[4 * C] - g_m * sk[2 * C] - gxm * sk[3 * C] : 0.0;
                const double r = invstd[c], wc = w[c], wr = wc * r, wr2 = wr * r;
                const double al = ggw ? double(ggw[k * C + c]) : 0.0;
                const double be = ggb ? double(ggb[k * C + c]) : 0.0;
                const double by_a = HA ? 2 * wr2 * gxm * axm - r * r / M * wc * adc : 0.0;
                const double by_w = ggw ? -r * al * gxm : 0.0;
                const int64_t i = k * C + c;
                ya[i] = A(HA ? wr : 0.0);
                yx[i] = A((ggw ? al : 0.0) - (HA ? wr * axm : 0.0));
                y0[i] = A(be);
                xa[i] = A(HA ? -wr2 * gxm : 0.0);
                xg[i] = A((HA ? -wr2 * axm : 0.0) + (ggw ? r * al : 0.0));
                xx[i] = A(by_a + by_w);
                am[i] = A(HA ? double(pivot[i]) + a_m : 0.0);
                gm[i] = A(g_m);
                out_gw[i] = A(HA ? r * adc : 0.0);
              }
            return false;
          },
          [&] {
            return [&, pya = PassArray<A>(g, ya.get(), K), pyx = PassArray<A>(g, yx.get(), K),
                    py0 = PassArray<A>(g, y0.get(), K), pxa = PassArray<A>(g, xa.get(), K),
                    pxg = PassArray<A>(g, xg.get(), K), pxx = PassArray<A>(g, xx.get(), K),
                    pam = PassArray<A>(g, am.get(), K),
                    pgm = PassArray<A>(g, gm.get(), K)](const Seg& s, int64_t k) {
              const int64_t o = k * g.C;
              const Chan<CL, A> cya(pya.get() + o, s.c), cyx(pyx.get() + o, s.c),
                  cy0(py0.get() + o, s.c), cxa(pxa.get() + o, s.c), cxg(pxg.get() + o, s.c),
                  cxx(pxx.get() + o, s.c), cam(pam.get() + o, s.c), cgm(pgm.get() + o, s.c);
#if FASTBN_WIDE_HALF
              if constexpr (WIDE_RUNS<T, CL, U>) {
                const WidePrim<T, CL, RELU> pr(x, s, st);
                const T* d = run_ptr<const T>(dy, s, k);
                const T* a = run_ptr<const T>(ggx, s, k);
                const WideChan<CL> ya(cya), yx(cyx), y0(cy0), xa(cxa), xg(cxg), xx(cxx),
                    vam(cam), vgm(cgm);
                const __mmask16 g_used = uses_g ? 0xFFFF : 0;  // and_mask's
                return wide_map<T>(s, k, [&](int64_t i, __mmask16 m) {
                  const __m512 xh = pr.xhat(i, m), gv = pr.keep(i, m, xh, load16(d + i, m));
                  const __m512 ac = HA ? load16(a + i, m) - vam(i, m) : _mm512_setzero_ps(),
                               xu = _mm512_maskz_mov_ps(g_used, xh);
                  const __m512 gc = _mm512_maskz_mov_ps(g_used, gv - vgm(i, m));
                  return Terms16<2>{
                      {pr.keep(i, m, xh, ya(i, m) * ac + yx(i, m) * xu + y0(i, m)),
                       xa(i, m) * ac + xg(i, m) * gc + xx(i, m) * xu}};
                }, out_gdy, out_gx);
              }
#endif
              const P pr(x, s, st);
              const auto d = src<T, CL, U>(dy, s, k);
              const auto a = src<T, CL, U>(ggx, s, k);
              const auto o1 = dst<T, CL, U>(out_gdy, s, k);
              const auto o2 = dst<T, CL, U>(out_gx, s, k);
              each(s.n, o2, [&](int64_t i) {
                const A xh = pr.xhat(i), gv = pr.keep(i, xh, d.template at<A>(i));
                const A ac = HA ? a.template at<A>(i) - cam[i] : A(0), xu = and_mask(uses_g, xh);
                o1.put(i, pr.keep(i, xh, cya[i] * ac + cyx[i] * xu + cy0[i]));
                o2.put(i, cxa[i] * ac + cxg[i] * and_mask(uses_g, gv - cgm[i]) + cxx[i] * xu);
              });
            };
          });
    });
  });
}

}  // namespace

void backward_backward(int dtype, const Geom& g, int nth, int64_t K, bool relu, const TD& x,
                       const TD& dy, const TD& ggx, uintptr_t ggw, uintptr_t ggb,
                       uintptr_t mean, uintptr_t invstd, uintptr_t w, uintptr_t b,
                       bool params_in_t, const TD& out_gdy, const TD& out_gx,
                       uintptr_t out_gw) {
  dispatch(dtype, g.cl, relu, [&](auto tag, auto cl, auto act) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const int64_t C = g.channels();
    const ChannelIn<T> ggw_in(ggw, params_in_t, K * C), ggb_in(ggb, params_in_t, K * C),
        w_in(w, params_in_t, C), b_in(b, params_in_t, C);
    const ChannelOut<T> gw_out(out_gw, params_in_t, K * C);
    auto p = [](uintptr_t a) { return reinterpret_cast<const A*>(a); };
    bb<T, decltype(cl)::value, decltype(act)::value>(
        g, nth, K, x, dy, ggx, ggw_in.get(), ggb_in.get(), p(mean), p(invstd), w_in.get(),
        b_in.get(), output(dtype, g, K, out_gdy), output(dtype, g, K, out_gx), gw_out.get());
  });
}

}  // namespace fastbn
