"""Fused CPU kernels from the compiled extension fastbn._C (csrc/cpu).

Same functions and semantics as `reference.py`. Each call views every element tensor as
(K, N, C, L) with element strides (spatial dims flattened to one stride), allocates
outputs in x's memory format, converts the small per-channel tensors to the accumulation
dtype, and hands raw addresses to the kernels, which run on torch.get_num_threads()
threads. Anything the kernels do not cover (non-CPU or wrapped tensors, spatial dims that
do not flatten, mismatched element dtypes or K sizes, empty tensors) goes to `reference`.
"""

import math

import torch

from fastbn.backends import reference

try:
    from fastbn import _C
    _IMPORT_ERROR = None
except ImportError as err:  # extension not built: the registry reports why
    _C = None
    _IMPORT_ERROR = f"{type(err).__name__}: {err}"

name = "cpu"

_CODES = {torch.float64: 0, torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def available():
    if _C is None:
        return False, f"fastbn._C is not built ({_IMPORT_ERROR})"
    return True, "fused C++ kernels (fastbn._C)"


def _plain(t):
    return (type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"
            and t.layout == torch.strided and not _is_wrapped(t) and not t.is_neg())


def _strides(t, batched):
    """(sK, sN, sC, sL) of t seen as (K, N, C, L), or None if its spatial dims do not
    flatten to a single stride."""
    lead = 1 if batched else 0
    st = t.stride()
    s_l, expected = None, None
    for size, stride in zip(reversed(t.shape[lead + 2:]), reversed(st[lead + 2:])):
        if size == 1:
            continue
        if s_l is not None and stride != expected:
            return None
        s_l = stride if s_l is None else s_l
        expected = stride * size
    return (st[0] if batched else 0, st[lead], st[lead + 1], 1 if s_l is None else s_l)


class _Plan:
    """Geometry shared by one call: x's (N, C, L) view and the K of batched arguments."""

    def __init__(self, x, elems, chans):
        self.ok = False
        self.ndim_batched = x.dim() + 1
        if _C is None or x.dtype not in _CODES or x.dim() < 2 or x.numel() == 0:
            return
        if not all(_plain(t) for t in (x, *elems, *chans) if t is not None):
            return
        ks = set()
        for t in elems:
            if t is None:
                continue
            if t.dtype != x.dtype:
                return
            if t.shape == x.shape:
                continue
            if t.dim() != x.dim() + 1 or t.shape[1:] != x.shape:
                return
            ks.add(t.shape[0])
        for t in chans:
            if t is None:
                continue
            if t.dim() == 2 and t.shape[1] == x.shape[1]:
                ks.add(t.shape[0])
            elif t.shape != (x.shape[1],):
                return
        if len(ks) > 1 or 0 in ks:
            return
        self.K = ks.pop() if ks else None
        n, c = x.shape[0], x.shape[1]
        length = math.prod(x.shape[2:])
        # Without spatial dims, run along N as the "L" axis (one channel's values).
        self.swap = length == 1
        self.N, self.C, self.L = (1, c, n) if self.swap else (n, c, length)
        tds = self.tds(x, *elems)
        if tds is None:
            return
        _, _, _, s_c, s_l = tds[0]
        self.cl = c > 1 and (self.L == 1 or abs(s_c) < abs(s_l))
        self.ok = True

    @property
    def geom(self):
        return (self.N, self.C, self.L, self.cl)

    def td(self, t):
        """(ptr, sK, sN, sC, sL) for an element tensor, (0, ...) for None, None if it
        does not flatten."""
        if t is None:
            return (0, 0, 0, 0, 0)
        st = _strides(t, t.dim() == self.ndim_batched)
        if st is None:
            return None
        s_k, s_n, s_c, s_l = st
        if self.swap:
            s_n, s_l = 0, s_n
        return (t.data_ptr(), s_k, s_n, s_c, s_l)

    def tds(self, *ts):
        out = [self.td(t) for t in ts]
        return None if any(o is None for o in out) else out

    def chan(self, t, acc):
        """Contiguous per-channel tensor in the accumulation dtype, (K, C) in a K call."""
        if t is None:
            return None
        t = t.to(acc)
        if self.K is not None and t.dim() == 1:
            t = t.expand(self.K, self.C)
        return t.contiguous()


def _plan(x, elems=(), chans=()):
    return _Plan(x, elems, chans)


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _empty(x, plan, dtype=None):
    """An element output in x's memory format, with the leading K in a K call."""
    dtype = x.dtype if dtype is None else dtype
    if plan.K is None:
        return torch.empty_like(x, dtype=dtype)
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))
    return torch.empty_permuted((plan.K, *x.shape), (0, *(d + 1 for d in order)),
                                dtype=dtype, device=x.device)


def _threads():
    return torch.get_num_threads()


def _k(plan):
    return 1 if plan.K is None else plan.K


def forward_train(x, weight, bias, eps, activation=None, running_mean=None, running_var=None,
                  momentum=0.0):
    plan = _plan(x, chans=(weight, bias))
    if not plan.ok or plan.K is not None:
        return reference.forward_train(x, weight, bias, eps, activation, running_mean,
                                       running_var, momentum)
    acc = reference.acc_dtype(x.dtype)
    w, b = plan.chan(weight, acc), plan.chan(bias, acc)
    y = torch.empty_like(x)
    mean, invstd, var = (torch.empty(plan.C, dtype=acc) for _ in range(3))
    tx, ty = plan.tds(x, y)
    _C.forward_train(_CODES[x.dtype], plan.geom, _threads(), tx, ty, w.data_ptr(),
                     b.data_ptr(), float(eps), activation == "relu", mean.data_ptr(),
                     invstd.data_ptr(), var.data_ptr())
    if running_mean is not None:
        reference.update_running_stats(running_mean, running_var, mean, var,
                                       plan.N * plan.L, momentum)
    return y, mean, invstd


def forward_eval(x, running_mean, running_var, weight, bias, eps, activation=None):
    plan = _plan(x, chans=(running_mean, running_var, weight, bias))
    if not plan.ok or plan.K is not None:
        return reference.forward_eval(x, running_mean, running_var, weight, bias, eps,
                                      activation)
    acc = reference.acc_dtype(x.dtype)
    scale = (weight.to(acc) * torch.rsqrt(running_var.to(acc) + eps)).contiguous()
    shift = (bias.to(acc) - running_mean.to(acc) * scale).contiguous()
    y = torch.empty_like(x)
    tx, ty = plan.tds(x, y)
    _C.affine(_CODES[x.dtype], plan.geom, _threads(), tx, ty, scale.data_ptr(),
              shift.data_ptr(), activation == "relu")
    return y


def _stats(plan, x, mean, invstd, weight, bias):
    acc = reference.acc_dtype(x.dtype)
    return acc, [t.to(acc).contiguous() for t in (mean, invstd, weight, bias)]


def backward(grad_y, x, mean, invstd, weight, bias, activation=None):
    plan = _plan(x, (grad_y,), (mean, invstd, weight, bias))
    if not plan.ok:
        return reference.backward(grad_y, x, mean, invstd, weight, bias, activation)
    acc, (m, r, w, b) = _stats(plan, x, mean, invstd, weight, bias)
    k = _k(plan)
    dx = _empty(x, plan)
    gw, gb = (torch.empty(k, plan.C, dtype=acc) for _ in range(2))
    tx, tdy, tdx = plan.tds(x, grad_y, dx)
    _C.backward(_CODES[x.dtype], plan.geom, _threads(), k, activation == "relu", tx, tdy, tdx,
                m.data_ptr(), r.data_ptr(), w.data_ptr(), b.data_ptr(), gw.data_ptr(),
                gb.data_ptr())
    if plan.K is None:
        gw, gb = gw[0], gb[0]
    return dx, gw.to(weight.dtype), gb.to(bias.dtype)


def forward_jvp(x_t, weight_t, bias_t, x, mean, invstd, weight, bias, activation=None):
    plan = _plan(x, (x_t,), (weight_t, bias_t, mean, invstd, weight, bias))
    if not plan.ok or (x_t is None and weight_t is None and bias_t is None):
        return reference.forward_jvp(x_t, weight_t, bias_t, x, mean, invstd, weight, bias,
                                     activation)
    acc, (m, r, w, b) = _stats(plan, x, mean, invstd, weight, bias)
    wt, bt = plan.chan(weight_t, acc), plan.chan(bias_t, acc)
    y_t = _empty(x, plan)
    tx, txt, tyt = plan.tds(x, x_t, y_t)
    _C.forward_jvp(_CODES[x.dtype], plan.geom, _threads(), _k(plan), activation == "relu",
                   tx, txt, tyt, m.data_ptr(), r.data_ptr(), w.data_ptr(), b.data_ptr(),
                   _ptr(wt), _ptr(bt))
    return y_t


def backward_backward(gg_x, gg_weight, gg_bias, grad_y, x, mean, invstd, weight, bias,
                      activation=None):
    plan = _plan(x, (gg_x, grad_y), (gg_weight, gg_bias, mean, invstd, weight, bias))
    if not plan.ok:
        return reference.backward_backward(gg_x, gg_weight, gg_bias, grad_y, x, mean, invstd,
                                           weight, bias, activation)
    acc, (m, r, w, b) = _stats(plan, x, mean, invstd, weight, bias)
    ggw, ggb = plan.chan(gg_weight, acc), plan.chan(gg_bias, acc)
    k = _k(plan)
    g_gy, g_x = _empty(x, plan, grad_y.dtype), _empty(x, plan)
    g_w = torch.empty(k, plan.C, dtype=acc)
    tx, tdy, tggx, tgy, tgx = plan.tds(x, grad_y, gg_x, g_gy, g_x)
    _C.backward_backward(_CODES[x.dtype], plan.geom, _threads(), k, activation == "relu",
                         tx, tdy, tggx, _ptr(ggw), _ptr(ggb), m.data_ptr(), r.data_ptr(),
                         w.data_ptr(), b.data_ptr(), tgy, tgx, g_w.data_ptr())
    if plan.K is None:
        g_w = g_w[0]
    return g_gy, g_x, g_w.to(weight.dtype)


def backward_jvp(grad_y_t, x_t, weight_t, bias_t, grad_y, x, mean, invstd, weight, bias,
                 activation=None):
    # bias_t does not enter backward's value (only the mask), so it never shapes the result.
    plan = _plan(x, (grad_y_t, x_t, grad_y), (weight_t, mean, invstd, weight, bias))
    if not plan.ok:
        return reference.backward_jvp(grad_y_t, x_t, weight_t, bias_t, grad_y, x, mean,
                                      invstd, weight, bias, activation)
    acc, (m, r, w, b) = _stats(plan, x, mean, invstd, weight, bias)
    wt = plan.chan(weight_t, acc)
    k = _k(plan)
    gx_t = _empty(x, plan)
    gw_t, gb_t = (torch.empty(k, plan.C, dtype=acc) for _ in range(2))
    tx, tdy, tdyt, txt, tgx = plan.tds(x, grad_y, grad_y_t, x_t, gx_t)
    _C.backward_jvp(_CODES[x.dtype], plan.geom, _threads(), k, activation == "relu", tx, tdy,
                    tdyt, txt, _ptr(wt), m.data_ptr(), r.data_ptr(), w.data_ptr(),
                    b.data_ptr(), tgx, gw_t.data_ptr(), gb_t.data_ptr())
    if plan.K is None:
        gw_t, gb_t = gw_t[0], gb_t[0]
    return gx_t, gw_t.to(weight.dtype), gb_t.to(bias.dtype)
