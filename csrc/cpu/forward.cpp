// forward_train (statistics pass + normalise pass) and the eval affine pass.
#include <cmath>

#include "cpu/ops.h"

namespace fastbn {
namespace {

template <class T, bool CL, bool RELU>
void affine_pass(const Geom& g, int nth, const TD& x, const TD& y, const acc_t<T>* scale,
                 const acc_t<T>* shift) {
  using A = acc_t<T>;
  map_pass<A, CL>(g, nth, 1, [&](const Seg& s, Scratch<A>& sc) {
    A* v = sc.buf(0);
    load<CL, T>(x, s, 0, v);
    const A* __restrict a = scale + s.c;
    const A* __restrict b = shift + s.c;
    for (int64_t i = 0; i < s.n; ++i) {
      A out = b[ch<CL>(i)] + v[i] * a[ch<CL>(i)];
      v[i] = RELU ? (out > A(0) ? out : A(0)) : out;
    }
    store<CL, T>(y, s, 0, v);
  });
}

template <class T, bool CL, bool RELU>
void train(const Geom& g, int nth, const TD& x, const TD& y, const acc_t<T>* w,
           const acc_t<T>* b, double eps, acc_t<T>* mean, acc_t<T>* invstd, acc_t<T>* var) {
  using A = acc_t<T>;
  const int64_t C = g.C;
  // Sums of (x - pivot) and its square, pivot = the channel's first element: no
  // cancellation when |mean| >> std, in one pass.
  std::vector<A> pivot(C);
  for (int64_t c = 0; c < C; ++c)
    pivot[c] = to_acc<A>(reinterpret_cast<const T*>(x.ptr)[c * x.sC]);
  std::vector<double> sums(2 * C);
  reduce_pass<A, CL>(g, nth, 1, 2, sums.data(), [&](const Seg& s, Scratch<A>& sc, A* f) {
    A* d = sc.buf(0);
    load<CL, T>(x, s, 0, d);
    const A* __restrict p = pivot.data() + s.c;
    for (int64_t i = 0; i < s.n; ++i) d[i] -= p[ch<CL>(i)];
    acc_sum<CL>(f, d, s.n);
    acc_dot<CL>(f + SEG, d, d, s.n);
  });
  std::vector<A> scale(C), shift(C);
  const double M = double(g.M());
  for (int64_t c = 0; c < C; ++c) {
    const double m1 = sums[c] / M;
    const double v = std::max(sums[C + c] / M - m1 * m1, 0.0);
    mean[c] = A(double(pivot[c]) + m1);
    var[c] = A(v);
    invstd[c] = A(1.0 / std::sqrt(v + eps));
    scale[c] = w[c] * invstd[c];
    shift[c] = b[c] - mean[c] * scale[c];
  }
  affine_pass<T, CL, RELU>(g, nth, x, y, scale.data(), shift.data());
}

}  // namespace

void forward_train(int dtype, const Geom& g, int nth, const TD& x, const TD& y, uintptr_t w,
                   uintptr_t b, double eps, bool relu, uintptr_t mean, uintptr_t invstd,
                   uintptr_t var) {
  dispatch(dtype, g.cl, relu, [&](auto tag, auto cl, auto act) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    train<T, decltype(cl)::value, decltype(act)::value>(
        g, nth, x, y, reinterpret_cast<const A*>(w), reinterpret_cast<const A*>(b), eps,
        reinterpret_cast<A*>(mean), reinterpret_cast<A*>(invstd), reinterpret_cast<A*>(var));
  });
}

void affine(int dtype, const Geom& g, int nth, const TD& x, const TD& y, uintptr_t scale,
            uintptr_t shift, bool relu) {
  dispatch(dtype, g.cl, relu, [&](auto tag, auto cl, auto act) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    affine_pass<T, decltype(cl)::value, decltype(act)::value>(
        g, nth, x, y, reinterpret_cast<const A*>(scale), reinterpret_cast<const A*>(shift));
  });
}

}  // namespace fastbn
