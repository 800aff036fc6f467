// backward: one pass for sum(g) and sum(g * xhat) per (problem, channel), one pass for
// grad_x; x is read once per segment for all K cotangents.
#include "cpu/ops.h"

namespace fastbn {
namespace {

template <class T, bool CL, bool RELU>
void run(const Geom& g, int nth, int64_t K, const TD& x, const TD& dy, const TD& dx,
         const acc_t<T>* mean, const acc_t<T>* invstd, const acc_t<T>* w, const acc_t<T>* b,
         acc_t<T>* gw, acc_t<T>* gb) {
  using A = acc_t<T>;
  const int64_t C = g.C;
  const double M = double(g.M());
  std::vector<double> sums(K * 2 * C);
  reduce_pass<A, CL>(g, nth, K, 2, sums.data(), [&](const Seg& s, Scratch<A>& sc, A* f) {
    A *xh = sc.buf(0), *mask = sc.buf(1), *gv = sc.buf(2);
    load<CL, T>(x, s, 0, xh);
    normalise<CL, RELU>(xh, s, mean, invstd, w, b, mask);
    for (int64_t k = 0; k < K; ++k) {
      load<CL, T>(dy, s, k, gv);
      apply_mask<RELU>(gv, mask, s.n);
      acc_sum<CL>(f + (2 * k) * SEG, gv, s.n);
      acc_dot<CL>(f + (2 * k + 1) * SEG, gv, xh, s.n);
    }
  });
  // grad_x = w * invstd * (g - sum(g) / M - xhat * sum(g xhat) / M)
  std::vector<A> cg(C), cx(K * C), c0(K * C);
  for (int64_t c = 0; c < C; ++c) cg[c] = A(double(w[c]) * invstd[c]);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < C; ++c) {
      const double sg = sums[(2 * k) * C + c], sgx = sums[(2 * k + 1) * C + c];
      gb[k * C + c] = A(sg);
      gw[k * C + c] = A(sgx);
      cx[k * C + c] = A(-double(cg[c]) * sgx / M);
      c0[k * C + c] = A(-double(cg[c]) * sg / M);
    }
  map_pass<A, CL>(g, nth, K, [&](const Seg& s, Scratch<A>& sc) {
    A *xh = sc.buf(0), *mask = sc.buf(1), *gv = sc.buf(2);
    load<CL, T>(x, s, 0, xh);
    normalise<CL, RELU>(xh, s, mean, invstd, w, b, mask);
    const A* __restrict a = cg.data() + s.c;
    for (int64_t k = 0; k < K; ++k) {
      load<CL, T>(dy, s, k, gv);
      apply_mask<RELU>(gv, mask, s.n);
      const A* __restrict bx = cx.data() + k * C + s.c;
      const A* __restrict b0 = c0.data() + k * C + s.c;
      for (int64_t i = 0; i < s.n; ++i)
        gv[i] = a[ch<CL>(i)] * gv[i] + bx[ch<CL>(i)] * xh[i] + b0[ch<CL>(i)];
      store<CL, T>(dx, s, k, gv);
    }
  });
}

}  // namespace

void backward(int dtype, const Geom& g, int nth, int64_t K, bool relu, const TD& x,
              const TD& dy, const TD& dx, uintptr_t mean, uintptr_t invstd, uintptr_t w,
              uintptr_t b, uintptr_t gw, uintptr_t gb) {
  dispatch(dtype, g.cl, relu, [&](auto tag, auto cl, auto act) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    run<T, decltype(cl)::value, decltype(act)::value>(
        g, nth, K, x, dy, dx, reinterpret_cast<const A*>(mean),
        reinterpret_cast<const A*>(invstd), reinterpret_cast<const A*>(w),
        reinterpret_cast<const A*>(b), reinterpret_cast<A*>(gw), reinterpret_cast<A*>(gb));
  });
}

}  // namespace fastbn
