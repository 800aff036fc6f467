// backward: one pass for sum(g) and sum(g * xhat) per (problem, channel), one pass for
// grad_x (reduce_map in common.h).
#include "cpu/ops.h"

namespace fastbn {
namespace {

template <class T, bool CL, bool RELU>
void run(const Geom& g, int nth, int64_t K, const TD& x, const TD& dy, const TD& dx,
         const acc_t<T>* mean, const acc_t<T>* invstd, const acc_t<T>* w, const acc_t<T>* b,
         acc_t<T>* gw, acc_t<T>* gb) {
  using A = acc_t<T>;
  const int64_t C = g.channels();
  const double M = g.count();
  auto sums = scratch<double>(K * 2 * C);
  auto cg = scratch<A>(C), cx = scratch<A>(K * C), gm = scratch<A>(K * C);
  const Stats<A> st(g, RELU, mean, invstd, w, b);
  when(unit_runs<CL>({x, dy, dx}), [&](auto unit) {
    constexpr bool U = decltype(unit)::value;
    using P = Prim<T, A, CL, RELU, U>;
    reduce_map<A, CL, 2>(
        g, nth, K, input_bytes<T>(K, {x, dy}), true, sums.get(),
        [&](const Seg& s, int64_t k, const Acc<A, CL, 2>& acc) {
#if FASTBN_WIDE_HALF
          if constexpr (WIDE_RUNS<T, CL, U>) {
            const WidePrim<T, CL, RELU> pr(x, s, st);
            const T* d = run_ptr<const T>(dy, s, k);
            return wide_add(acc, s.n, [&](int64_t i, __mmask16 m) {
              const __m512 xh = pr.xhat(i, m), gv = pr.keep(i, m, xh, load16(d + i, m));
              return Terms16<2>{{gv, gv * xh}};
            });
          }
#endif
          const P pr(x, s, st);
          const auto d = src<T, CL, U>(dy, s, k);
          acc.add(s.n, [&](int64_t i, A(&v)[2]) {
            const A xh = pr.xhat(i), gv = pr.keep(i, xh, d.template at<A>(i));
            v[0] = gv;
            v[1] = gv * xh;
          });
        },
        // grad_x = w * invstd * (g - sum(g) / M - xhat * sum(g xhat) / M): g is centred
        // before it is scaled, so a large common part of it costs the rounding of its mean
        // alone (folded into one per-channel constant, it cancelled after the product's
        // rounding).
        [&](int64_t lo, int64_t hi, int) {
#pragma omp simd
          for (int64_t c = lo; c < hi; ++c) cg[c] = A(double(w[c]) * invstd[c]);
          for (int64_t k = 0; k < K; ++k)
#pragma omp simd
            for (int64_t c = lo; c < hi; ++c) {
              const double sg = sums[(2 * k) * C + c], sgx = sums[(2 * k + 1) * C + c];
              gb[k * C + c] = A(sg);
              gw[k * C + c] = A(sgx);
              cx[k * C + c] = A(-double(cg[c]) * sgx / M);
              gm[k * C + c] = A(sg / M);
            }
          return false;
        },
        [&] {
          return [&, pcg = PassArray<A>(g, cg.get()), pcx = PassArray<A>(g, cx.get(), K),
                  pgm = PassArray<A>(g, gm.get(), K)](const Seg& s, int64_t k) {
            const Chan<CL, A> a(pcg.get(), s.c), bx(pcx.get() + k * g.C, s.c),
                mg(pgm.get() + k * g.C, s.c);
#if FASTBN_WIDE_HALF
            if constexpr (WIDE_RUNS<T, CL, U>) {
              const WidePrim<T, CL, RELU> pr(x, s, st);
              const T* d = run_ptr<const T>(dy, s, k);
              const WideChan<CL> va(a), vx(bx), vmg(mg);
              return wide_map<T>(s, k, [&](int64_t i, __mmask16 m) {
                const __m512 xh = pr.xhat(i, m), gv = pr.keep(i, m, xh, load16(d + i, m));
                return va(i, m) * (gv - vmg(i, m)) + vx(i, m) * xh;
              }, dx);
            }
#endif
            const P pr(x, s, st);
            const auto d = src<T, CL, U>(dy, s, k);
            const auto o = dst<T, CL, U>(dx, s, k);
            each(s.n, o, [&](int64_t i) {
              const A xh = pr.xhat(i), gv = pr.keep(i, xh, d.template at<A>(i));
              o.put(i, a[i] * (gv - mg[i]) + bx[i] * xh);
            });
          };
        });
  });
}

}  // namespace

void backward(int dtype, const Geom& g, int nth, int64_t K, bool relu, const TD& x,
              const TD& dy, const TD& dx, uintptr_t mean, uintptr_t invstd, uintptr_t w,
              uintptr_t b, bool params_in_t, uintptr_t gw, uintptr_t gb) {
  dispatch(dtype, g.cl, relu, [&](auto tag, auto cl, auto act) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const int64_t C = g.channels();
    const ChannelIn<T> w_in(w, params_in_t, C), b_in(b, params_in_t, C);
    const ChannelOut<T> gw_out(gw, params_in_t, K * C), gb_out(gb, params_in_t, K * C);
    run<T, decltype(cl)::value, decltype(act)::value>(
        g, nth, K, x, dy, output(dtype, g, K, dx), reinterpret_cast<const A*>(mean),
        reinterpret_cast<const A*>(invstd), w_in.get(), b_in.get(), gw_out.get(),
        gb_out.get());
  });
}

}  // namespace fastbn
