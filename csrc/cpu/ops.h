// Kernel entry points. Pointers are raw addresses; per-channel arrays are contiguous in
// the accumulation type (double for float64 input, float otherwise; a half layer's
// parameters, their tangents and gradients may hold x's type, see stats_in_t and
// params_in_t), K-batched ones (K, C). An absent optional input is address 0.
#pragma once

#include <cstdint>

#include "cpu/common.h"

namespace fastbn {

// Statistics + normalise (+ ReLU): writes y, mean, invstd and (if var != 0) the biased
// variance, and updates running_mean/running_var in place when they are given.
// `stats_in_t`: w, b and the running statistics hold x's element type (not the
// accumulation type; mean, invstd and var always do).
void forward_train(int dtype, const Geom& g, int nth, const TD& x, const TD& y, uintptr_t w,
                   uintptr_t b, bool stats_in_t, double eps, bool relu, uintptr_t mean,
                   uintptr_t invstd, uintptr_t var, uintptr_t running_mean,
                   uintptr_t running_var, double momentum);

// Normalise with the running statistics (+ ReLU); `stats_in_t` as for forward_train.
void forward_eval(int dtype, const Geom& g, int nth, const TD& x, const TD& y,
                  uintptr_t running_mean, uintptr_t running_var, uintptr_t w, uintptr_t b,
                  bool stats_in_t, double eps, bool relu);

// grad_x (K, N, C, L), grad_weight and grad_bias (K, C).
// `params_in_t` (all derivative kernels): w, b and every other per-channel input and output
// but mean and invstd hold x's element type.
void backward(int dtype, const Geom& g, int nth, int64_t K, bool relu, const TD& x,
              const TD& dy, const TD& dx, uintptr_t mean, uintptr_t invstd, uintptr_t w,
              uintptr_t b, bool params_in_t, uintptr_t gw, uintptr_t gb);

// Tangent of y for tangents of x (element), weight and bias ((K, C)).
void forward_jvp(int dtype, const Geom& g, int nth, int64_t K, bool relu, const TD& x,
                 const TD& xt, const TD& yt, uintptr_t mean, uintptr_t invstd, uintptr_t w,
                 uintptr_t b, uintptr_t wt, uintptr_t bt, bool params_in_t);

// Vector-Jacobian product of backward: (gg_x, gg_weight, gg_bias) -> (g_grad_y, g_x, g_w).
void backward_backward(int dtype, const Geom& g, int nth, int64_t K, bool relu, const TD& x,
                       const TD& dy, const TD& ggx, uintptr_t ggw, uintptr_t ggb,
                       uintptr_t mean, uintptr_t invstd, uintptr_t w, uintptr_t b,
                       bool params_in_t, const TD& out_gdy, const TD& out_gx,
                       uintptr_t out_gw);

// Jacobian-vector product of backward: tangents (grad_y, x, weight) ->
// (grad_x_t, grad_weight_t, grad_bias_t).
void backward_jvp(int dtype, const Geom& g, int nth, int64_t K, bool relu, const TD& x,
                  const TD& dy, const TD& dyt, const TD& xt, uintptr_t wt, uintptr_t mean,
                  uintptr_t invstd, uintptr_t w, uintptr_t b, bool params_in_t,
                  const TD& out_gx, uintptr_t out_gw, uintptr_t out_gb);

}  // namespace fastbn
