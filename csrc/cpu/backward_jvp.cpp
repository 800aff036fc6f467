// backward_jvp: the Jacobian-vector product of backward, one reduction pass for the
// per-(problem, channel) sums and one elementwise pass that is a per-channel linear
// combination of the centred element inputs and xhat (reduce_map in common.h). Formulas:
// reference.py, expanded.
#include "cpu/ops.h"

namespace fastbn {
namespace {

template <class T, bool CL, bool RELU>
void bjvp(const Geom& g, int nth, int64_t K, const TD& x, const TD& dy, const TD& dyt,
          const TD& xt, const acc_t<T>* wt, const acc_t<T>* mean, const acc_t<T>* invstd,
          const acc_t<T>* w, const acc_t<T>* b, const TD& out_gx, acc_t<T>* out_gw,
          acc_t<T>* out_gb) {
  using A = acc_t<T>;
  const int64_t C = g.channels();
  const double M = g.count();
  // sum g, g xhat, g_t, g_t xhat, u, x_t xhat, g u  (g, g_t: masked grad_y and tangent;
  // u = x_t - pivot, its mean mu)
  constexpr int NS = 7;
  auto sums = scratch<double>(K * NS * C);
  auto et = scratch<A>(C), eu = scratch<A>(K * C), eg = scratch<A>(K * C),
       ex = scratch<A>(K * C), tm = scratch<A>(K * C), xm = scratch<A>(K * C),
       gm = scratch<A>(K * C), pivot = scratch<A>(K * C);
  const Stats<A> st(g, RELU, mean, invstd, w, b);
  when(unit_runs<CL>({x, dy, dyt, xt, out_gx}), [&](auto unit) {
    when(dyt.ptr != 0, [&](auto has_gt) {
      when(xt.ptr != 0, [&](auto has_xt) {
        constexpr bool U = decltype(unit)::value, HG = decltype(has_gt)::value,
                       HX = decltype(has_xt)::value;
        using P = Prim<T, A, CL, RELU, U>;
        // grad_x_t = et * (g_t - tm) + eu * (x_t - xm) + eg * (g - gm) + ex * xhat, with tm,
        // xm, gm the means of g_t, x_t and g: inputs centred before they are scaled, a large
        // common part of one costs the rounding of its mean alone.
        // Terms of an absent tangent are left out, not multiplied by 0: a non-finite
        // grad_y would make them NaN where the reference has nothing.
        const bool uses_g = HX || wt;
        // x_t's own sum and its sum with g take it less a pivot: with both a large common
        // part, the product g x_t of the raw values would round away sum g (x_t - mean).
        // Not the sum with xhat, which the pivot would change by pivot * sum xhat: not 0
        // for a mean that is not exactly x's (a rounded one).
        if (HX)
          for (int64_t k = 0; k < K; ++k) first_values_mean<T>(g, xt, k, pivot.get() + k * C);
        const PassArray<A> pp(g, HX ? pivot.get() : nullptr, K);
        reduce_map<A, CL, NS>(
            g, nth, K, input_bytes<T>(K, {x, dy, dyt, xt}), true, sums.get(),
            [&](const Seg& s, int64_t k, const Acc<A, CL, NS>& acc) {
#if FASTBN_WIDE_HALF
              if constexpr (WIDE_RUNS<T, CL, U>) {
                const WidePrim<T, CL, RELU> pr(x, s, st);
                const T* d = run_ptr<const T>(dy, s, k);
                const T* dt = run_ptr<const T>(dyt, s, k);
                const T* u = run_ptr<const T>(xt, s, k);
                const WideChan<CL> p(HX ? pp.get() + k * g.C : nullptr, s.c);
                return wide_add(acc, s.n, [&](int64_t i, __mmask16 m) {
                  const __m512 zero = _mm512_setzero_ps();
                  const __m512 xh = pr.xhat(i, m), gv = pr.keep(i, m, xh, load16(d + i, m));
                  const __m512 tv = HG ? pr.keep(i, m, xh, load16(dt + i, m)) : zero;
                  const __m512 xv = HX ? load16(u + i, m) : zero, uv = HX ? xv - p(i, m) : zero;
                  return Terms16<NS>{{gv, gv * xh, tv, tv * xh, uv, xv * xh, HX ? uv * gv : zero}};
                });
              }
#endif
              const P pr(x, s, st);
              const auto d = src<T, CL, U>(dy, s, k);
              const auto dt = src<T, CL, U>(dyt, s, k);
              const auto u = src<T, CL, U>(xt, s, k);
              const Chan<CL, A> p(HX ? pp.get() + k * g.C : nullptr, s.c);
              acc.add(s.n, [&](int64_t i, A(&v)[NS]) {
                const A xh = pr.xhat(i), gv = pr.keep(i, xh, d.template at<A>(i));
                const A tv = HG ? pr.keep(i, xh, dt.template at<A>(i)) : A(0);
                const A xv = HX ? u.template at<A>(i) : A(0), uv = HX ? xv - p[i] : A(0);
                v[0] = gv;
                v[1] = gv * xh;
                v[2] = tv;
                v[3] = tv * xh;
                v[4] = uv;
                v[5] = xv * xh;
                v[6] = HX ? uv * gv : A(0);
              });
            },
            [&](int64_t lo, int64_t hi, int) {
#pragma omp simd
              for (int64_t c = lo; c < hi; ++c) et[c] = HG ? A(double(w[c]) * invstd[c]) : A(0);
              for (int64_t k = 0; k < K; ++k)
#pragma omp simd
                for (int64_t c = lo; c < hi; ++c) {
                  const double* sk = sums.get() + k * NS * C + c;
                  const double g0 = sk[0], g1 = sk[C], mu = sk[4 * C] / M, pu = sk[5 * C] / M;
                  const double r = invstd[c], wr = double(w[c]) * r, h = r * g1 / M;
                  const double gb_t = HG ? sk[2 * C] : 0.0;
                  const double gw_t = (HG ? sk[3 * C] : 0.0) +
                                      (HX ? r * (sk[6 * C] - mu * g0 - pu * g1) : 0.0);
                  const double scale_t = (HX ? -wr * r * pu : 0.0) +
                                         (wt ? double(wt[k * C + c]) * r : 0.0);
                  const int64_t i = k * C + c;
                  eu[i] = A(HX ? -wr * h : 0.0);
                  eg[i] = A(scale_t);
                  ex[i] = A(wr * ((HX ? h * pu : 0.0) - gw_t / M) -
                            (uses_g ? scale_t * g1 / M : 0.0));
                  tm[i] = A(gb_t / M);
                  xm[i] = A(HX ? double(pivot[i]) + mu : 0.0);
                  gm[i] = A(g0 / M);
                  out_gw[i] = A(gw_t);
                  out_gb[i] = A(gb_t);
                }
              return false;
            },
            [&] {
              return [&, pet = PassArray<A>(g, et.get()), peu = PassArray<A>(g, eu.get(), K),
                      peg = PassArray<A>(g, eg.get(), K), pex = PassArray<A>(g, ex.get(), K),
                      ptm = PassArray<A>(g, tm.get(), K), pxm = PassArray<A>(g, xm.get(), K),
                      pgm = PassArray<A>(g, gm.get(), K)](const Seg& s, int64_t k) {
                const int64_t o = k * g.C;
                const Chan<CL, A> ct(pet.get(), s.c), cu(peu.get() + o, s.c),
                    cg(peg.get() + o, s.c), cx(pex.get() + o, s.c), ctm(ptm.get() + o, s.c),
                    cxm(pxm.get() + o, s.c), cgm(pgm.get() + o, s.c);
#if FASTBN_WIDE_HALF
                if constexpr (WIDE_RUNS<T, CL, U>) {
                  const WidePrim<T, CL, RELU> pr(x, s, st);
                  const T* d = run_ptr<const T>(dy, s, k);
                  const T* dt = run_ptr<const T>(dyt, s, k);
                  const T* u = run_ptr<const T>(xt, s, k);
                  const WideChan<CL> vt(ct), vu(cu), vg(cg), vx(cx), vtm(ctm), vxm(cxm), vgm(cgm);
                  const __mmask16 g_used = uses_g ? 0xFFFF : 0;  // and_mask's
                  return wide_map<T>(s, k, [&](int64_t i, __mmask16 m) {
                    const __m512 zero = _mm512_setzero_ps();
                    const __m512 xh = pr.xhat(i, m), gv = pr.keep(i, m, xh, load16(d + i, m));
                    const __m512 tc = HG ? pr.keep(i, m, xh, load16(dt + i, m)) - vtm(i, m) : zero;
                    const __m512 uc = HX ? load16(u + i, m) - vxm(i, m) : zero;
                    return vt(i, m) * tc + vu(i, m) * uc +
                           vg(i, m) * _mm512_maskz_mov_ps(g_used, gv - vgm(i, m)) +
                           vx(i, m) * xh;
                  }, out_gx);
                }
#endif
                const P pr(x, s, st);
                const auto d = src<T, CL, U>(dy, s, k);
                const auto dt = src<T, CL, U>(dyt, s, k);
                const auto u = src<T, CL, U>(xt, s, k);
                const auto out = dst<T, CL, U>(out_gx, s, k);
                each(s.n, out, [&](int64_t i) {
                  const A xh = pr.xhat(i), gv = pr.keep(i, xh, d.template at<A>(i));
                  const A tc = HG ? pr.keep(i, xh, dt.template at<A>(i)) - ctm[i] : A(0);
                  const A uc = HX ? u.template at<A>(i) - cxm[i] : A(0);
                  out.put(i, ct[i] * tc + cu[i] * uc + cg[i] * and_mask(uses_g, gv - cgm[i]) +
                                 cx[i] * xh);
                });
              };
            });
      });
    });
  });
}

}  // namespace

void backward_jvp(int dtype, const Geom& g, int nth, int64_t K, bool relu, const TD& x,
                  const TD& dy, const TD& dyt, const TD& xt, uintptr_t wt, uintptr_t mean,
                  uintptr_t invstd, uintptr_t w, uintptr_t b, bool params_in_t,
                  const TD& out_gx, uintptr_t out_gw, uintptr_t out_gb) {
  dispatch(dtype, g.cl, relu, [&](auto tag, auto cl, auto act) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const int64_t C = g.channels();
    const ChannelIn<T> wt_in(wt, params_in_t, K * C), w_in(w, params_in_t, C),
        b_in(b, params_in_t, C);
    const ChannelOut<T> gw_out(out_gw, params_in_t, K * C), gb_out(out_gb, params_in_t, K * C);
    auto p = [](uintptr_t a) { return reinterpret_cast<const A*>(a); };
    bjvp<T, decltype(cl)::value, decltype(act)::value>(
        g, nth, K, x, dy, dyt, xt, wt_in.get(), p(mean), p(invstd), w_in.get(), b_in.get(),
        output(dtype, g, K, out_gx), gw_out.get(), gb_out.get());
  });
}

}  // namespace fastbn
