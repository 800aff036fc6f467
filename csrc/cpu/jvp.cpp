// forward_jvp: y_t = mask * (w * xhat_t + w_t * xhat + b_t), with
// xhat_t = invstd * (x_t - mean(x_t) - xhat * mean(x_t * xhat)). The reduction pass runs
// only when x_t is present; x is read once per segment for all K tangents.
#include "cpu/ops.h"

namespace fastbn {
namespace {

template <class T, bool CL, bool RELU>
void run(const Geom& g, int nth, int64_t K, const TD& x, const TD& xt, const TD& yt,
         const acc_t<T>* mean, const acc_t<T>* invstd, const acc_t<T>* w, const acc_t<T>* b,
         const acc_t<T>* wt, const acc_t<T>* bt) {
  using A = acc_t<T>;
  const int64_t C = g.C;
  const double M = double(g.M());
  const bool has_xt = xt.ptr != 0;
  std::vector<double> sums(K * 2 * C, 0.0);
  if (has_xt) {
    reduce_pass<A, CL>(g, nth, K, 2, sums.data(), [&](const Seg& s, Scratch<A>& sc, A* f) {
      A *xh = sc.buf(0), *tv = sc.buf(2);
      load<CL, T>(x, s, 0, xh);
      normalise<CL, false>(xh, s, mean, invstd, w, b, sc.buf(1));
      for (int64_t k = 0; k < K; ++k) {
        load<CL, T>(xt, s, k, tv);
        acc_sum<CL>(f + (2 * k) * SEG, tv, s.n);
        acc_dot<CL>(f + (2 * k + 1) * SEG, tv, xh, s.n);
      }
    });
  }
  // y_t = mask * (alpha * x_t + beta * xhat + gamma)
  std::vector<A> alpha(C), beta(K * C), gamma(K * C);
  for (int64_t c = 0; c < C; ++c) alpha[c] = has_xt ? A(double(w[c]) * invstd[c]) : A(0);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < C; ++c) {
      const double mu = sums[(2 * k) * C + c] / M, proj = sums[(2 * k + 1) * C + c] / M;
      beta[k * C + c] = A(-double(alpha[c]) * proj + (wt ? double(wt[k * C + c]) : 0.0));
      gamma[k * C + c] = A(-double(alpha[c]) * mu + (bt ? double(bt[k * C + c]) : 0.0));
    }
  map_pass<A, CL>(g, nth, K, [&](const Seg& s, Scratch<A>& sc) {
    A *xh = sc.buf(0), *mask = sc.buf(1), *tv = sc.buf(2);
    load<CL, T>(x, s, 0, xh);
    normalise<CL, RELU>(xh, s, mean, invstd, w, b, mask);
    const A* __restrict al = alpha.data() + s.c;
    for (int64_t k = 0; k < K; ++k) {
      const A* __restrict be = beta.data() + k * C + s.c;
      const A* __restrict ga = gamma.data() + k * C + s.c;
      if (has_xt) {
        load<CL, T>(xt, s, k, tv);
        for (int64_t i = 0; i < s.n; ++i)
          tv[i] = al[ch<CL>(i)] * tv[i] + be[ch<CL>(i)] * xh[i] + ga[ch<CL>(i)];
      } else {
        for (int64_t i = 0; i < s.n; ++i) tv[i] = be[ch<CL>(i)] * xh[i] + ga[ch<CL>(i)];
      }
      apply_mask<RELU>(tv, mask, s.n);
      store<CL, T>(yt, s, k, tv);
    }
  });
}

}  // namespace

void forward_jvp(int dtype, const Geom& g, int nth, int64_t K, bool relu, const TD& x,
                 const TD& xt, const TD& yt, uintptr_t mean, uintptr_t invstd, uintptr_t w,
                 uintptr_t b, uintptr_t wt, uintptr_t bt) {
  dispatch(dtype, g.cl, relu, [&](auto tag, auto cl, auto act) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    run<T, decltype(cl)::value, decltype(act)::value>(
        g, nth, K, x, xt, yt, reinterpret_cast<const A*>(mean),
        reinterpret_cast<const A*>(invstd), reinterpret_cast<const A*>(w),
        reinterpret_cast<const A*>(b), reinterpret_cast<const A*>(wt),
        reinterpret_cast<const A*>(bt));
  });
}

}  // namespace fastbn
