"""Batch-norm kernels written with PyTorch ops: the executable spec.

Every backend implements the same plain-tensor functions (no autograd inside):

    forward_train(x, weight, bias, eps, activation, running_mean, running_var, momentum)
        -> y, mean, invstd
    forward_eval(x, running_mean, running_var, weight, bias, eps, activation) -> y
    backward(grad_y, x, mean, invstd, weight, bias, activation)
        -> grad_x, grad_weight, grad_bias
    forward_jvp(x_t, weight_t, bias_t, x, mean, invstd, weight, bias, activation) -> y_t
    backward_backward(gg_x, gg_weight, gg_bias, grad_y, x, mean, invstd, weight, bias,
                      activation) -> g_grad_y, g_x, g_weight
    backward_jvp(grad_y_t, x_t, weight_t, bias_t, grad_y, x, mean, invstd, weight, bias,
                 activation) -> grad_x_t, grad_weight_t, grad_bias_t

Conventions:
- x has shape (N, C, *); statistics are per channel over every other dimension and are
  float32 (float64 for float64 input); `mean` and `invstd` are those of x.
- weight and bias are always tensors (the op layer materialises ones/zeros).
- `activation` is None or "relu"; the ReLU mask is recomputed from (x, mean, invstd,
  weight, bias), never stored.
- Tangents and cotangents may be None (zero). `grad_y`, tangents and cotangents may carry
  one extra leading dimension K: K independent problems that share the primal
  (x, weight, bias). Element tensors are then (K, N, C, *), per-channel ones (K, C), and
  every output gains the leading K.
- backward_backward is the vector-Jacobian product, and backward_jvp the Jacobian-vector
  product, of `backward` as a function of (grad_y, x, weight) where mean and invstd are
  the statistics of x (their dependence on x is part of the derivative). bias enters
  `backward` only through the ReLU mask, whose derivative is zero almost everywhere.
"""

import math

import torch
from torch._prims_common import (make_channels_last_strides_for,
                                 make_contiguous_strides_for)

from fastbn.backends.layout import as_output

name = "reference"
runs_pytorch_ops = True   # so it also runs on the batched wrappers of transforms


def available():
    return True, "pure PyTorch ops"


def acc_dtype(dtype):
    """Statistics and accumulation dtype for an input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_dims(ndim):
    """Every dimension but the channel one, counted from the right so that the same list
    serves (N, C, *) tensors and their K-batched (K, N, C, *) forms."""
    return [-ndim] + list(range(-ndim + 2, 0))


def per_channel(v, ndim):
    """View a (C,) or (K, C) tensor so it broadcasts against (N, C, *) or (K, N, C, *)."""
    batched = v.dim() == 2
    v = v.reshape(v.shape + (1,) * (ndim - 2))
    return v.unsqueeze(1) if batched else v


class LocalReduction:
    """Per-channel reductions over the batch this process holds."""

    def count(self, x):
        """Elements per channel of x, (N, C, *) (C may be 0: a vmap over no batches)."""
        return x.shape[0] * math.prod(x.shape[2:])

    def total(self, *sums):
        """Per-channel sums over the whole batch, from the sums over the local one."""
        return list(sums)

    def moments(self, x):
        """Per-channel mean and biased variance of x in the accumulation dtype."""
        if x.shape[1] == 0:   # no channels (a vmap over no batches): torch warns of 0/0
            empty = x.new_empty(0, dtype=acc_dtype(x.dtype))
            return empty, empty.clone()
        # Two passes: the mean of x less a per-channel pivot (its first value where that
        # is finite), then squares about the mean. torch.var_mean's Welford updates gave
        # a channel holding an inf first a NaN mean (inf - inf) where a sum gives inf; a
        # plain sum of values far from zero (1e4 + N(0, 1)) lost ten ulps of their mean,
        # and a float64 one cost 17 copies of x.
        ndim, dims = x.dim(), reduce_dims(x.dim())
        xa = x.to(acc_dtype(x.dtype))
        pivot = xa.new_zeros(x.shape[1])
        if x.numel():
            first = xa[(0, slice(None)) + (0,) * (ndim - 2)].detach()
            pivot = torch.where(first.isfinite(), first, pivot)
        mean = pivot + (xa - per_channel(pivot, ndim)).mean(dims)
        return mean, (xa - per_channel(mean, ndim)).square().mean(dims)


LOCAL = LocalReduction()


def sums(ndim, *tensors):
    """Per-channel sums of element tensors of an ndim-dimensional input."""
    return [t.sum(reduce_dims(ndim)) for t in tensors]


def xhat_of(x, mean, invstd):
    d = x.dim()
    return (x.to(mean.dtype) - per_channel(mean, d)) * per_channel(invstd, d)


def pre_activation(xhat, weight, bias):
    d = xhat.dim()
    return xhat * per_channel(weight.to(xhat.dtype), d) + per_channel(bias.to(xhat.dtype), d)


def relu_mask(xhat, weight, bias):
    return pre_activation(xhat, weight, bias) > 0


def masked(t, mask):
    return t if mask is None else torch.where(mask, t, torch.zeros((), dtype=t.dtype))


def statistics(x, eps, reduction=LOCAL):
    """Per-channel mean, biased variance and 1/sqrt(var + eps), in the accumulation dtype."""
    mean, var = reduction.moments(x)
    return mean, var, torch.rsqrt(var + eps)


def update_running_stats(running_mean, running_var, mean, var, count, momentum):
    """running = (1 - momentum) * running + momentum * batch, with the unbiased variance
    of `count` values from their biased `var`."""
    if not isinstance(count, torch.Tensor):
        correction = count / (count - 1) if count > 1 else 1.0
        blend_running_stats(running_mean, running_var, mean, var * correction, momentum)
        return
    # SyncBatchNorm's global count: stay on device. No value on any process leaves the
    # running statistics as they were (torch's, for an empty batch), not NaN.
    before = running_mean.clone(), running_var.clone()
    blend_running_stats(running_mean, running_var, mean,
                        var * (count / (count - 1).clamp(min=1)), momentum)

    def keep_where_empty():
        for running, old in zip((running_mean, running_var), before):
            running.copy_(torch.where(count > 0, running, old))
    _update_in_place(running_mean, running_var, keep_where_empty)


def _update_in_place(running_mean, running_var, update):
    """Run `update`, which writes running statistics in place, outside autograd; inside
    inference mode where either was made there (torch's kernels write those from
    anywhere, and so do fastbn's; a normal tensor may be written there too). Dynamo cannot
    trace is_inference(): compiled code asks nothing."""
    if not torch.compiler.is_compiling() and (running_mean.is_inference()
                                              or running_var.is_inference()):
        with torch.inference_mode():
            update()
    else:
        with torch.no_grad():
            update()


def blend_running_stats(running_mean, running_var, mean, unbiased_var, momentum):
    """running = (1 - momentum) * running + momentum * batch."""
    # The product is taken before add_, not as its alpha: inductor bakes a traced float
    # alpha in at the first recompile (a momentum that changes between steps, as with
    # momentum=None, then blended with a stale value from the third step on).
    def blend():
        for running, batch in ((running_mean, mean), (running_var, unbiased_var)):
            if running.dtype == batch.dtype:
                running.mul_(1 - momentum).add_(batch * momentum)
            else:
                # A lower-precision buffer (float16, bfloat16): blended in the statistics'
                # dtype and rounded once, as torch does; in its own dtype it was rounded
                # three times a step, and drifted.
                running.copy_(running.to(batch.dtype) * (1 - momentum) + batch * momentum)
    _update_in_place(running_mean, running_var, blend)


def _affine(x, scale, shift, activation):
    """y = x * scale + shift per channel (ReLU'd), laid out as torch's batch norm's."""
    d = x.dim()
    y = torch.addcmul(per_channel(shift, d), x.to(scale.dtype), per_channel(scale, d))
    if activation == "relu":
        y = torch.relu(y)
    return as_output(y.to(x.dtype), x)


# ---- torch's own kernels for plain calls ----------------------------------------------
#
# The composed math of this module is the definition and serves every call that is
# differentiated, batched or reduced across processes. A plain local call (the autograd
# layer's kernel calls when this backend is selected) computes the same values with
# torch's native batch-norm kernels: PyTorch ops too, and faster than the composed math
# (its statistics alone cost 4-9 copies of x on CPU). A training forward takes them only
# where their statistics are exact (`_native_statistics_exact`).
# tests/backends check both paths against each other.

def _native_ok(x, reduction, *others):
    """Whether torch's native kernels may serve this call: local statistics, a non-empty
    x, and tensors that nothing differentiates or batches (no autograd graph, no forward
    AD level, no functorch wrapper or legacy batched tensor: those have no storage)."""
    if (reduction is not LOCAL or x.numel() == 0
            or torch.autograd.forward_ad._current_level >= 0):
        return False
    grad = torch.is_grad_enabled()
    for t in (x, *others):
        if t is None:
            continue
        if not torch._C._has_storage(t) or (grad and t.requires_grad):
            return False
    return True


def _native_statistics_exact(x):
    """Whether torch's native batch statistics of x are as exact as the definition's:
    torch 2.13's CPU kernel takes two passes (the mean, then squares about it) only for
    float32 and float64 x contiguous in NC(D)HW order with planes of more than one value.
    Its channels-last, (N, C), strided and half-precision paths lose digits: for x = 1e4 +
    N(0, 1), 2^20 values a channel, a variance of 18442 against 1 (channels-last and
    (N, C)); at any offset, half-precision variances off by up to 4e-4 of their value."""
    return (x.dtype in (torch.float32, torch.float64) and x.dim() > 2 and x.is_contiguous()
            and x.numel() > x.shape[0] * x.shape[1])


def _native_forward(x, weight, bias, eps, activation, running_mean, running_var,
                    momentum=0.0, training=True):
    acc = acc_dtype(x.dtype)
    y, mean, invstd = torch.native_batch_norm(x, weight.to(acc), bias.to(acc), running_mean,
                                              running_var, training, momentum, eps)
    if training and running_mean is not None:   # its schema does not mark them written
        torch.autograd.graph.increment_version((running_mean, running_var))
    if activation == "relu":
        y.relu_()
    return y, mean, invstd


def _canonical_strides(t):
    """t's strides are those of a fresh contiguous or channels-last tensor of its shape:
    torch 2.13's native backward returns wrong gradients for others next to a grad_y of
    another layout (a channels-last x with a size-1 spatial dim in other strides, say)."""
    shape, stride = t.shape, t.stride()
    return (stride == make_contiguous_strides_for(shape)
            or (t.dim() in (4, 5) and stride == make_channels_last_strides_for(shape)))


def _native_backward(grad_y, x, mean, invstd, weight, bias, activation):
    acc = acc_dtype(x.dtype)
    if activation == "relu":
        grad_y = masked(grad_y, relu_mask(xhat_of(x, mean, invstd), weight, bias))
    grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
        grad_y, x, weight.to(acc).contiguous(), None, None, mean, invstd, True, 0.0,
        [True, True, True])
    return grad_x, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype)


def forward_train(x, weight, bias, eps, activation=None, running_mean=None, running_var=None,
                  momentum=0.0, *, reduction=LOCAL):
    acc = acc_dtype(x.dtype)
    # (Planes of more than one value also keep one value per channel away from torch's
    # kernel, whose running variance is then NaN: n / (n - 1).)
    if (_native_statistics_exact(x)
            and _native_ok(x, reduction, weight, bias, running_mean, running_var)
            and (running_mean is None or running_mean.dtype == running_var.dtype == acc)):
        return _native_forward(x, weight, bias, eps, activation, running_mean, running_var,
                               momentum)
    mean, var, invstd = statistics(x, eps, reduction)
    scale = weight.to(invstd.dtype) * invstd
    shift = bias.to(invstd.dtype) - mean * scale
    y = _affine(x, scale, shift, activation)
    if running_mean is not None:
        update_running_stats(running_mean, running_var, mean.detach(), var.detach(),
                             reduction.count(x), momentum)
    return y, mean, invstd


def forward_eval(x, running_mean, running_var, weight, bias, eps, activation=None):
    acc = acc_dtype(x.dtype)
    if (running_mean.dtype == running_var.dtype == acc
            and _native_ok(x, LOCAL, running_mean, running_var, weight, bias)):
        return _native_forward(x, weight, bias, eps, activation, running_mean, running_var,
                               training=False)[0]
    scale = weight.to(acc) * torch.rsqrt(running_var.to(acc) + eps)
    shift = bias.to(acc) - running_mean.to(acc) * scale
    return _affine(x, scale, shift, activation)


def _backward_inputs(grad_y, x, mean, invstd, weight, bias, activation, reduction):
    """(ndim, count, xhat, ReLU mask or None, masked grad_y) in the accumulation dtype."""
    xhat = xhat_of(x, mean, invstd)
    mask = relu_mask(xhat, weight, bias) if activation == "relu" else None
    return x.dim(), reduction.count(x), xhat, mask, masked(grad_y.to(xhat.dtype), mask)


def backward(grad_y, x, mean, invstd, weight, bias, activation=None, *, reduction=LOCAL):
    if (grad_y.shape == x.shape and grad_y.dtype == x.dtype
            and mean.dtype == invstd.dtype == acc_dtype(x.dtype)
            and _native_ok(x, reduction, grad_y, mean, invstd, weight, bias)
            and _canonical_strides(x) and _canonical_strides(grad_y)):
        return _native_backward(grad_y, x, mean, invstd, weight, bias, activation)
    d, m, xhat, _, g = _backward_inputs(grad_y, x, mean, invstd, weight, bias, activation,
                                        reduction)
    grad_bias, grad_weight = sums(d, g, g * xhat)
    total_bias, total_weight = reduction.total(grad_bias, grad_weight)
    w = weight.to(xhat.dtype)
    grad_x = (g - per_channel(total_bias / m, d) - xhat * per_channel(total_weight / m, d)) \
        * per_channel(w * invstd, d)
    grad_x = grad_x.to(grad_y.dtype)
    if grad_x.dim() == x.dim():   # not K-batched: laid out like x, as torch's
        grad_x = as_output(grad_x, x)
    return grad_x, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype)


def _xhat_tangent(x_t, xhat, invstd, d, reduction, m):
    """Tangent of xhat for a tangent of x, and the tangent of invstd."""
    xa = x_t.to(xhat.dtype)
    x_t_sum, proj_sum = reduction.total(*sums(d, xa, xa * xhat))
    proj = proj_sum / m
    xhat_t = (xa - per_channel(x_t_sum / m, d) - xhat * per_channel(proj, d)) \
        * per_channel(invstd, d)
    invstd_t = -invstd * invstd * proj
    return xhat_t, invstd_t


def _plus(total, term):
    return term if total is None else total + term


def forward_jvp(x_t, weight_t, bias_t, x, mean, invstd, weight, bias, activation=None, *,
                reduction=LOCAL):
    d = x.dim()
    xhat = xhat_of(x, mean, invstd)
    y_t = None
    if x_t is not None:
        xhat_t, _ = _xhat_tangent(x_t, xhat, invstd, d, reduction, reduction.count(x))
        y_t = xhat_t * per_channel(weight.to(xhat.dtype), d)
    if weight_t is not None:
        y_t = _plus(y_t, xhat * per_channel(weight_t.to(xhat.dtype), d))
    if bias_t is not None:
        y_t = _plus(y_t, per_channel(bias_t.to(xhat.dtype), d))
    if y_t is None:
        return torch.zeros_like(x)
    # expand, not broadcast_to: the latter has no vmap batching rule
    y_t = y_t.expand(torch.broadcast_shapes(y_t.shape, xhat.shape))
    if activation == "relu":
        y_t = masked(y_t, relu_mask(xhat, weight, bias))
    return y_t.to(x.dtype)


def backward_backward(gg_x, gg_weight, gg_bias, grad_y, x, mean, invstd, weight, bias,
                      activation=None, *, reduction=LOCAL):
    d, m, xhat, mask, g = _backward_inputs(grad_y, x, mean, invstd, weight, bias,
                                           activation, reduction)
    w = per_channel(weight.to(xhat.dtype), d)
    r = per_channel(invstd, d)
    a = None if gg_x is None else gg_x.to(xhat.dtype)
    alpha = None if gg_weight is None else gg_weight.to(xhat.dtype)
    local = sums(d, g, g * xhat, *(() if a is None else (a, a * xhat)))
    # Each process's gg_weight weighs its own share of grad_weight: the sums that centre g
    # in its derivative are weighted by the gg_weight of the process they come from.
    weighted = () if alpha is None else (alpha * local[0], alpha * local[1])
    totals = reduction.total(*local, *weighted)
    if weighted:
        alpha_g_mean, alpha_gx_mean = (per_channel(t / m, d) for t in totals[-2:])
        totals = totals[:-2]
    g_mean, gx_mean = (per_channel(t / m, d) for t in totals[:2])
    centered_g = g - g_mean - xhat * gx_mean   # grad_x = weight * invstd * centered_g

    g_g = g_x = g_w = None   # g_g: gradient w.r.t. the masked grad_y
    if a is not None:
        a_mean, ax_mean = (per_channel(t / m, d) for t in totals[2:])
        g_g = w * r * (a - a_mean - xhat * ax_mean)
        (a_dot_centered,) = sums(d, a * centered_g)
        g_w = invstd * a_dot_centered
        (a_dot_centered,) = reduction.total(a_dot_centered)
        # Derivative w.r.t. xhat at fixed invstd, chained through xhat(x) and invstd(x).
        big_g = -w * r * (gx_mean * a + ax_mean * g)
        big_g_mean = -w * r * (gx_mean * a_mean + ax_mean * g_mean)
        big_gx_mean = -2 * w * r * gx_mean * ax_mean
        d_invstd = weight.to(xhat.dtype) * a_dot_centered
        g_x = r * (big_g - big_g_mean - xhat * big_gx_mean) \
            - (r * r / m) * xhat * per_channel(d_invstd, d)
    if alpha is not None:
        alpha = per_channel(alpha, d)
        g_g = _plus(g_g, alpha * xhat)
        g_x = _plus(g_x, r * (alpha * g - alpha_g_mean - xhat * alpha_gx_mean))
    if gg_bias is not None:
        g_g = _plus(g_g, per_channel(gg_bias.to(xhat.dtype), d))

    parts = [t.shape for t in (g_g, g_x) if t is not None]
    shape = torch.broadcast_shapes(g.shape, *parts)
    zero = torch.zeros((), dtype=xhat.dtype)
    g_g = masked((zero if g_g is None else g_g).expand(shape), mask)
    g_x = (zero if g_x is None else g_x).expand(shape)
    g_w = (zero if g_w is None else g_w).expand(shape[:-d] + weight.shape)
    return g_g.to(grad_y.dtype), g_x.to(x.dtype), g_w.to(weight.dtype)


def backward_jvp(grad_y_t, x_t, weight_t, bias_t, grad_y, x, mean, invstd, weight, bias,
                 activation=None, *, reduction=LOCAL):
    d, m, xhat, mask, g = _backward_inputs(grad_y, x, mean, invstd, weight, bias,
                                           activation, reduction)
    w = weight.to(xhat.dtype)
    g_t = None if grad_y_t is None else masked(grad_y_t.to(xhat.dtype), mask)
    local = sums(d, g, g * xhat, *(() if g_t is None else (g_t, g_t * xhat)))
    total_bias, total_weight, *g_t_totals = reduction.total(*local)

    # gb_t, gw_t: tangents of the (local) weight and bias gradients; their totals feed gx_t
    gb_t = gw_t = gx_t = total_gb_t = total_gw_t = None
    scale_t = None   # tangent of weight * invstd
    if g_t is not None:
        gb_t, gw_t = local[2:]
        total_gb_t, total_gw_t = g_t_totals
        gx_t = g_t
    if x_t is not None:
        xhat_t, invstd_t = _xhat_tangent(x_t, xhat, invstd, d, reduction, m)
        (g_dot_xhat_t,) = sums(d, g * xhat_t)
        gw_t = _plus(gw_t, g_dot_xhat_t)
        total_gw_t = _plus(total_gw_t, reduction.total(g_dot_xhat_t)[0])
        gx_t = _plus(gx_t, -xhat_t * per_channel(total_weight / m, d))
        scale_t = w * invstd_t
    if weight_t is not None:
        scale_t = _plus(scale_t, weight_t.to(xhat.dtype) * invstd)
    zero = torch.zeros((), dtype=xhat.dtype)
    gb_t, gw_t, gx_t, total_gb_t, total_gw_t = (
        zero if t is None else t for t in (gb_t, gw_t, gx_t, total_gb_t, total_gw_t))
    gx_t = (gx_t - per_channel(total_gb_t / m, d) - xhat * per_channel(total_gw_t / m, d)) \
        * per_channel(w * invstd, d)
    if scale_t is not None:
        inner = g - per_channel(total_bias / m, d) - xhat * per_channel(total_weight / m, d)
        gx_t = gx_t + per_channel(scale_t, d) * inner

    shape = torch.broadcast_shapes(g.shape, gx_t.shape)
    gx_t = gx_t.expand(shape)
    gw_t = gw_t.expand(shape[:-d] + weight.shape)
    gb_t = gb_t.expand(shape[:-d] + weight.shape)
    return gx_t.to(x.dtype), gw_t.to(weight.dtype), gb_t.to(bias.dtype)
