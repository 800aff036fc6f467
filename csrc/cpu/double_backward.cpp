// Second-order kernels: backward_backward (VJP of backward) and backward_jvp (JVP of
// backward). Each is one reduction pass for the per-(problem, channel) sums and one
// elementwise pass that is a per-channel linear combination of the element inputs and
// xhat; x is read once per segment for all K problems. Formulas: reference.py, expanded.
#include "cpu/ops.h"

namespace fastbn {
namespace {

template <class T, bool CL, bool RELU>
void bb(const Geom& g, int nth, int64_t K, const TD& x, const TD& dy, const TD& ggx,
        const acc_t<T>* ggw, const acc_t<T>* ggb, const acc_t<T>* mean,
        const acc_t<T>* invstd, const acc_t<T>* w, const acc_t<T>* b, const TD& out_gdy,
        const TD& out_gx, acc_t<T>* out_gw) {
  using A = acc_t<T>;
  const int64_t C = g.C;
  const double M = double(g.M());
  const bool has_a = ggx.ptr != 0;
  constexpr int64_t NS = 5;  // sum g, g xhat, a, a xhat, a g  (g = masked grad_y, a = gg_x)
  std::vector<double> sums(K * NS * C, 0.0);
  if (has_a || ggw) {
    reduce_pass<A, CL>(g, nth, K, NS, sums.data(), [&](const Seg& s, Scratch<A>& sc, A* f) {
      A *xh = sc.buf(0), *mask = sc.buf(1), *gv = sc.buf(2), *av = sc.buf(3);
      load<CL, T>(x, s, 0, xh);
      normalise<CL, RELU>(xh, s, mean, invstd, w, b, mask);
      for (int64_t k = 0; k < K; ++k) {
        A* fk = f + k * NS * SEG;
        load<CL, T>(dy, s, k, gv);
        apply_mask<RELU>(gv, mask, s.n);
        acc_sum<CL>(fk, gv, s.n);
        acc_dot<CL>(fk + SEG, gv, xh, s.n);
        if (has_a) {
          load<CL, T>(ggx, s, k, av);
          acc_sum<CL>(fk + 2 * SEG, av, s.n);
          acc_dot<CL>(fk + 3 * SEG, av, xh, s.n);
          acc_dot<CL>(fk + 4 * SEG, av, gv, s.n);
        }
      }
    });
  }
  // g_grad_y = mask * (ya * a + yx * xhat + y0);  g_x = xa * a + xg * g + xx * xhat + x0
  std::vector<A> ya(K * C), yx(K * C), y0(K * C), xa(K * C), xg(K * C), xx(K * C), x0(K * C);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < C; ++c) {
      const double* sk = sums.data() + k * NS * C + c;
      const double gm = sk[0] / M, gxm = sk[C] / M, am = sk[2 * C] / M, axm = sk[3 * C] / M;
      const double adc = sk[4 * C] - gm * sk[2 * C] - gxm * sk[3 * C];  // sum a (g - ...)
      const double r = invstd[c], wc = w[c], wr = wc * r, wr2 = wr * r;
      const double al = ggw ? double(ggw[k * C + c]) : 0.0;
      const double be = ggb ? double(ggb[k * C + c]) : 0.0;
      const int64_t i = k * C + c;
      ya[i] = A(has_a ? wr : 0.0);
      yx[i] = A(al - wr * axm);
      y0[i] = A(be - wr * am);
      xa[i] = A(-wr2 * gxm);
      xg[i] = A(-wr2 * axm + r * al);
      xx[i] = A(2 * wr2 * gxm * axm - r * r / M * wc * adc - r * al * gxm);
      x0[i] = A(wr2 * (gxm * am + axm * gm) - r * al * gm);
      out_gw[i] = A(r * adc);
    }
  map_pass<A, CL>(g, nth, K, [&](const Seg& s, Scratch<A>& sc) {
    A *xh = sc.buf(0), *mask = sc.buf(1), *gv = sc.buf(2), *av = sc.buf(3);
    A *o1 = sc.buf(4), *o2 = sc.buf(5);
    load<CL, T>(x, s, 0, xh);
    normalise<CL, RELU>(xh, s, mean, invstd, w, b, mask);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t o = k * C + s.c;
      const A *__restrict cya = ya.data() + o, *__restrict cyx = yx.data() + o,
                          *__restrict cy0 = y0.data() + o, *__restrict cxa = xa.data() + o,
                          *__restrict cxg = xg.data() + o, *__restrict cxx = xx.data() + o,
                          *__restrict cx0 = x0.data() + o;
      load<CL, T>(dy, s, k, gv);
      apply_mask<RELU>(gv, mask, s.n);
      if (has_a) {
        load<CL, T>(ggx, s, k, av);
      } else {
        std::fill(av, av + s.n, A(0));
      }
      for (int64_t i = 0; i < s.n; ++i) {
        const int64_t j = ch<CL>(i);
        o1[i] = cya[j] * av[i] + cyx[j] * xh[i] + cy0[j];
        o2[i] = cxa[j] * av[i] + cxg[j] * gv[i] + cxx[j] * xh[i] + cx0[j];
      }
      apply_mask<RELU>(o1, mask, s.n);
      store<CL, T>(out_gdy, s, k, o1);
      store<CL, T>(out_gx, s, k, o2);
    }
  });
}

template <class T, bool CL, bool RELU>
void bjvp(const Geom& g, int nth, int64_t K, const TD& x, const TD& dy, const TD& dyt,
          const TD& xt, const acc_t<T>* wt, const acc_t<T>* mean, const acc_t<T>* invstd,
          const acc_t<T>* w, const acc_t<T>* b, const TD& out_gx, acc_t<T>* out_gw,
          acc_t<T>* out_gb) {
  using A = acc_t<T>;
  const int64_t C = g.C;
  const double M = double(g.M());
  const bool has_gt = dyt.ptr != 0, has_xt = xt.ptr != 0;
  // sum g, g xhat, g_t, g_t xhat, x_t, x_t xhat, g x_t  (g, g_t: masked grad_y and tangent)
  constexpr int64_t NS = 7;
  std::vector<double> sums(K * NS * C, 0.0);
  reduce_pass<A, CL>(g, nth, K, NS, sums.data(), [&](const Seg& s, Scratch<A>& sc, A* f) {
    A *xh = sc.buf(0), *mask = sc.buf(1), *gv = sc.buf(2), *tv = sc.buf(3), *uv = sc.buf(4);
    load<CL, T>(x, s, 0, xh);
    normalise<CL, RELU>(xh, s, mean, invstd, w, b, mask);
    for (int64_t k = 0; k < K; ++k) {
      A* fk = f + k * NS * SEG;
      load<CL, T>(dy, s, k, gv);
      apply_mask<RELU>(gv, mask, s.n);
      acc_sum<CL>(fk, gv, s.n);
      acc_dot<CL>(fk + SEG, gv, xh, s.n);
      if (has_gt) {
        load<CL, T>(dyt, s, k, tv);
        apply_mask<RELU>(tv, mask, s.n);
        acc_sum<CL>(fk + 2 * SEG, tv, s.n);
        acc_dot<CL>(fk + 3 * SEG, tv, xh, s.n);
      }
      if (has_xt) {
        load<CL, T>(xt, s, k, uv);
        acc_sum<CL>(fk + 4 * SEG, uv, s.n);
        acc_dot<CL>(fk + 5 * SEG, uv, xh, s.n);
        acc_dot<CL>(fk + 6 * SEG, uv, gv, s.n);
      }
    }
  });
  // grad_x_t = et * g_t + eu * x_t + eg * g + ex * xhat + e0
  std::vector<A> et(C), eu(K * C), eg(K * C), ex(K * C), e0(K * C);
  for (int64_t c = 0; c < C; ++c) et[c] = has_gt ? A(double(w[c]) * invstd[c]) : A(0);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < C; ++c) {
      const double* sk = sums.data() + k * NS * C + c;
      const double g0 = sk[0], g1 = sk[C], mu = sk[4 * C] / M, pu = sk[5 * C] / M;
      const double r = invstd[c], wr = double(w[c]) * r, h = r * g1 / M;
      const double gb_t = sk[2 * C];
      const double gw_t = sk[3 * C] + r * (sk[6 * C] - mu * g0 - pu * g1);
      const double scale_t = -wr * r * pu + (wt ? double(wt[k * C + c]) * r : 0.0);
      const int64_t i = k * C + c;
      eu[i] = A(-wr * h);
      eg[i] = A(scale_t);
      ex[i] = A(wr * (h * pu - gw_t / M) - scale_t * g1 / M);
      e0[i] = A(wr * (h * mu - gb_t / M) - scale_t * g0 / M);
      out_gw[i] = A(gw_t);
      out_gb[i] = A(gb_t);
    }
  map_pass<A, CL>(g, nth, K, [&](const Seg& s, Scratch<A>& sc) {
    A *xh = sc.buf(0), *mask = sc.buf(1), *gv = sc.buf(2), *tv = sc.buf(3), *uv = sc.buf(4);
    load<CL, T>(x, s, 0, xh);
    normalise<CL, RELU>(xh, s, mean, invstd, w, b, mask);
    const A* __restrict ct = et.data() + s.c;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t o = k * C + s.c;
      const A *__restrict cu = eu.data() + o, *__restrict cg = eg.data() + o,
                          *__restrict cx = ex.data() + o, *__restrict c0 = e0.data() + o;
      load<CL, T>(dy, s, k, gv);
      apply_mask<RELU>(gv, mask, s.n);
      if (has_gt) {
        load<CL, T>(dyt, s, k, tv);
        apply_mask<RELU>(tv, mask, s.n);
      } else {
        std::fill(tv, tv + s.n, A(0));
      }
      if (has_xt) {
        load<CL, T>(xt, s, k, uv);
      } else {
        std::fill(uv, uv + s.n, A(0));
      }
      for (int64_t i = 0; i < s.n; ++i) {
        const int64_t j = ch<CL>(i);
        gv[i] = ct[j] * tv[i] + cu[j] * uv[i] + cg[j] * gv[i] + cx[j] * xh[i] + c0[j];
      }
      store<CL, T>(out_gx, s, k, gv);
    }
  });
}

}  // namespace

void backward_backward(int dtype, const Geom& g, int nth, int64_t K, bool relu, const TD& x,
                       const TD& dy, const TD& ggx, uintptr_t ggw, uintptr_t ggb,
                       uintptr_t mean, uintptr_t invstd, uintptr_t w, uintptr_t b,
                       const TD& out_gdy, const TD& out_gx, uintptr_t out_gw) {
  dispatch(dtype, g.cl, relu, [&](auto tag, auto cl, auto act) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    auto p = [](uintptr_t a) { return reinterpret_cast<const A*>(a); };
    bb<T, decltype(cl)::value, decltype(act)::value>(
        g, nth, K, x, dy, ggx, p(ggw), p(ggb), p(mean), p(invstd), p(w), p(b), out_gdy,
        out_gx, reinterpret_cast<A*>(out_gw));
  });
}

void backward_jvp(int dtype, const Geom& g, int nth, int64_t K, bool relu, const TD& x,
                  const TD& dy, const TD& dyt, const TD& xt, uintptr_t wt, uintptr_t mean,
                  uintptr_t invstd, uintptr_t w, uintptr_t b, const TD& out_gx,
                  uintptr_t out_gw, uintptr_t out_gb) {
  dispatch(dtype, g.cl, relu, [&](auto tag, auto cl, auto act) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    auto p = [](uintptr_t a) { return reinterpret_cast<const A*>(a); };
    bjvp<T, decltype(cl)::value, decltype(act)::value>(
        g, nth, K, x, dy, dyt, xt, p(wt), p(mean), p(invstd), p(w), p(b), out_gx,
        reinterpret_cast<A*>(out_gw), reinterpret_cast<A*>(out_gb));
  });
}

}  // namespace fastbn
