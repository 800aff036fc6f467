"""Fused CPU kernels from the compiled extension fastbn._C (csrc/cpu).

Same functions and semantics as `reference.py`. Each call views every element tensor as
(K, N, C, L) with element strides (spatial dims flattened to one stride; the view and
the kernels' geometry decided once per distinct shapes and strides, `_layout`), allocates
outputs in x's memory format, converts the small per-channel tensors to the accumulation
dtype, and hands raw addresses to the kernels, which run on torch.get_num_threads()
threads. Anything the kernels do not cover (non-CPU or wrapped tensors, spatial dims that
do not flatten, mismatched element dtypes or K sizes, empty tensors, calls under a
dispatch mode) goes to `reference`.
"""

import functools
import math
from pathlib import Path
from typing import NamedTuple

import torch

from fastbn.backends import reference
from fastbn.backends.layout import flat_strides, k_output_order, output_format

def _why_missing(err):
    """Why fastbn._C cannot be imported: the compiler's failure where the install
    recorded one (setup.py), else the import error."""
    try:
        note = (Path(__file__).parents[1] / "_C.build-error.txt").read_text().strip()
    except OSError:
        return f"{type(err).__name__}: {err}"
    return (f"compiling it failed when fastbn was installed: {note}; reinstall with "
            "`pip install -v` to see the compiler's output")


try:
    from fastbn import _C
    _IMPORT_ERROR = None
except ImportError as err:  # extension not built: the registry reports why
    _C = None
    _IMPORT_ERROR = _why_missing(err)

name = "cpu"

# The kernels' element types, by the extension's own codes.
_CODES = {} if _C is None else {torch.float64: _C.FLOAT64, torch.float32: _C.FLOAT32,
                                torch.bfloat16: _C.BFLOAT16, torch.float16: _C.FLOAT16}
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_ACC = {dtype: reference.acc_dtype(dtype)
        for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16)}
_has_storage = torch._C._has_storage   # False for functorch wrappers and sparse tensors
_num_threads = torch.get_num_threads   # the kernels run on torch's own threads


def available():
    if _C is None:
        return False, f"fastbn._C is not built ({_IMPORT_ERROR})"
    return True, "fused C++ kernels (fastbn._C)"


def build_info():
    """Compiler, vector ISA and thread source of the extension, for `fastbn info`."""
    return _C.build_info() if _C is not None else f"not built ({_IMPORT_ERROR})"


def _plain(t):
    # Sparse and mkldnn tensors have no storage; a ZeroTensor (autograd's stand-in for a
    # zero gradient) has no memory behind it; the kernels read through typed pointers,
    # which must be aligned to their element (a torch.frombuffer view at an odd offset
    # is not).
    return (type(t) in _PLAIN_TYPES and t.is_cpu and _has_storage(t) and not t.is_neg()
            and not t._is_zerotensor() and t.data_ptr() % t.element_size() == 0)


def _kernel_array(t, dtype, channels):
    """Whether the kernels can read per-channel tensor t of `dtype` through its address
    (and update it in place: a running statistic)."""
    return _plain(t) and t.dtype == dtype and t.shape == (channels,) and t.is_contiguous()


def _acc(t, acc):
    """t as a contiguous tensor of dtype acc, without a copy when it already is one."""
    return t if t.dtype == acc and t.is_contiguous() else t.to(acc).contiguous()


# Largest L folded into channels-last pass channels, by element size: below it the NCHW
# passes paid their per-run cost (a vector tail, for 2-byte types a conversion) every
# few values (benchmarks/RESULTS.md, "fold limits by element size"). Eval folds float32
# and 2-byte types only to 32: float32 folded from 36 to 45 values ran 3-9% slower, and
# the 2-byte eval converts whole NCHW runs of up to 255 values in one loop per row
# (AffineMap::runs), 1.1-1.5x faster than folded from 36 values.
FOLD_MAX_L = {2: 56, 4: 45, 8: 45}
EVAL_FOLD_MAX_L = {2: 32, 4: 32, 8: 45}
# Folding copies each per-channel array out to C * L values, which with fewer than 8
# rows weigh as much as the rows: there only to 15 values per (n, c) (from 16, 4x4, the
# NCHW passes won: (4, 8192, 4, 4) backward 0.41 ms against 0.46 folded), and never for
# eval, whose copies doubled its traffic ((2, 8192, 5, 5) 2.8x slower folded,
# (2, 65536, 2, 2) 1.2x).
FEW_ROWS_FOLD_MAX_L = 15


# Channels-last rows of few channels run as rows of up to this many bytes (Geom.tile in
# csrc/cpu/common.h): each row paid a run's fixed cost, and rows under 512 bytes were
# never streamed. Longer tiled rows ran slower on two threads (1 and 2 KiB: up to 1.5x;
# benchmarks/RESULTS.md, "channels-last rows of few channels in tiles").
TILE_ROW_BYTES = 512


def _tile(c, length, s_c, s_l, max_elems):
    """How many rows of a channels-last view (C channels, L rows per sample) run as one:
    the most, up to `max_elems` values, that divide L, where the rows lie end to end;
    else 1."""
    if s_c != 1 or s_l != c:
        return 1
    return next(t for t in range(max(1, max_elems // c), 0, -1) if length % t == 0)


def _view(shape, stride, fold_max_l, few_rows_fold_max_l, tile_max_elems):
    """x's view for the kernels, from its shape and strides alone: (N, C, L, swap,
    strides, channels_last, fold, tile, output format), or None if its spatial dims do
    not flatten. The output format is torch's batch-norm layout for x (`output_format`).
    `fold`: L, where the elements may run as channels-last rows of C * L pass channels
    (see Geom in csrc/cpu/common.h), for L up to `fold_max_l` (`few_rows_fold_max_l`
    with fewer than 8 rows); else 1. `tile`: rows per tiled row of up to
    `tile_max_elems` values (`_tile`; channels-last x only). The other element tensors
    and the outputs must fold or tile too (`_layout`)."""
    strides = flat_strides(shape, stride, False, False)
    if strides is None:
        return None
    n, c, length = shape[0], shape[1], math.prod(shape[2:])
    # Without spatial dims, run along N as the "L" axis (one channel's values).
    swap = length == 1
    if swap:
        n, length, strides = 1, n, flat_strides(shape, stride, False, True)
    s_c, s_l = strides[2], strides[3]
    channels_last = c > 1 and (length == 1 or abs(s_c) < abs(s_l))
    # Few values per (n, c) run, each (c, l) block dense: folded (the outputs fold too:
    # contiguous, torch's layout where x is not channels-last, or in x's order).
    max_l = fold_max_l if n >= 8 else min(fold_max_l, few_rows_fold_max_l)
    fold = (length if not channels_last and not swap and 1 < length <= max_l
            and s_c == length * s_l else 1)
    tile = _tile(c, length, s_c, s_l, tile_max_elems) if channels_last else 1
    fmt = output_format(torch.empty_strided(shape, stride, device="meta"))
    return n, c, length, swap, strides, channels_last, fold, tile, fmt


def _geom(n, c, length, channels_last, fold, tile):
    """The kernels' Geom (csrc/cpu/common.h): folded, each (c, l) block of `fold` values
    is a run of pass channels of a channels-last row; tiled, `tile` rows of C channels
    are one row of pass channels."""
    if fold > 1:
        return (n, c * fold, 1, True, fold, 1)
    return (n, c * tile, length // tile, channels_last, 1, tile)


def _folded(strides):
    """Strides (sK, sN, sC, sL) in the folded view: each (c, l) block is a run of C * L
    pass channels of stride sL."""
    return (*strides[:-2], strides[-1], 0)


def _tiled(strides, tile):
    """Strides in the tiled view: `tile` rows of stride sL as one."""
    return (*strides[:-1], strides[-1] * tile)


def _tiles(strides, c):
    """Whether an element tensor's rows lie end to end (as x's must to be tiled)."""
    return strides[-1] == c * strides[-2]


class _Layout(NamedTuple):
    """How the kernels run one call, decided from its tensors' shapes and strides alone
    (`_layout`). K: the leading dimension of K-batched arguments, or None; N, C, L: x's
    view; fold, tile: see `_view`; geom: the kernels' Geom; fmt: the element outputs'
    memory format (torch's batch-norm layout for x); inputs: the strides (sK, sN, sC, sL)
    of x and of each element argument, zeros for an absent one; out: an element
    output's strides (`_empty`); out_order: its dims' order for torch.empty_permuted in
    a K call, None for a contiguous one and in calls without K (where it is in `fmt`).
    Strides are in the view the kernels run: folded or tiled where the call is."""
    K: int | None
    N: int
    C: int
    L: int
    fold: int
    tile: int
    geom: tuple
    fmt: torch.memory_format
    inputs: tuple
    out: tuple
    out_order: tuple | None


@functools.lru_cache(maxsize=4096)
def _layout(shape, stride, elems, chans, stats, fold_max_l, few_rows_fold_max_l,
            tile_max_elems):
    """The _Layout of a call on an x of `shape` and `stride`, with element arguments of
    (shape, stride) `elems` (x's shape, or K-batched), per-channel tangents of shapes
    `chans` ((C,) or (K, C)) and primal per-channel tensors of shapes `stats` ((C,) only:
    the kernels read one value a channel for all K problems), None for an absent one,
    and `_view`'s limits. None where the kernels do not run it: x empty or of one
    dimension, spatial dims that do not flatten, other shapes, K sizes that differ.
    Cached: computed per call, it was most of a small call's Python."""
    if len(shape) < 2 or math.prod(shape) == 0:
        return None
    view = _view(shape, stride, fold_max_l, few_rows_fold_max_l, tile_max_elems)
    if view is None:
        return None
    n, c, length, swap, x_strides, channels_last, fold, tile, fmt = view
    ks = set()
    for s in chans:
        if s is not None and s != (c,):
            if len(s) != 2 or s[1] != c:
                return None
            ks.add(s[0])
    inputs = [x_strides]
    for e in elems:
        if e is None:
            inputs.append((0, 0, 0, 0))
            continue
        e_shape, e_stride = e
        batched = e_shape != shape
        if batched:
            if len(e_shape) != len(shape) + 1 or e_shape[1:] != shape:
                return None
            ks.add(e_shape[0])
        strides = flat_strides(e_shape, e_stride, batched, swap)
        if strides is None:
            return None
        inputs.append(strides)
    if len(ks) > 1 or 0 in ks or any(s is not None and s != (c,) for s in stats):
        return None
    k = ks.pop() if ks else None

    def folds(strides):   # each (c, l) block dense
        return strides[2] == length * strides[3]

    # An element input whose (c, l) blocks are not dense: no folding.
    if fold > 1 and not all(folds(s) for s in inputs[1:]):
        fold = 1
    if k is None:
        out_order = None
        out_stride = torch.empty(shape, device="meta", memory_format=fmt).stride()
        out = flat_strides(shape, out_stride, False, swap)
    else:
        # Leading K outermost, the rest in x's memory format; where x overlaps itself
        # (as_strided, expand) its order can put N between the spatial dims, or C inside
        # a folded run: contiguous, which always flattens and folds.
        out_order = k_output_order(stride)
        out_shape = (k, *shape)
        out_stride = torch.empty_permuted(out_shape, out_order, device="meta").stride()
        out = flat_strides(out_shape, out_stride, True, swap)
        if out is None or fold > 1 and not folds(out):
            out_order = None
            out_stride = torch.empty(out_shape, device="meta").stride()
            out = flat_strides(out_shape, out_stride, True, swap)
    # x folds only where it is not channels-last, and torch's layout for it then folds
    # too; should a layout ever not, the call runs unfolded rather than misread.
    if fold > 1 and not folds(out):
        fold = 1
    # Tiled where every element tensor's rows lie end to end, the output's too (torch
    # lays a 3-D x's outputs out contiguous even where x has C innermost).
    if tile > 1 and not all(_tiles(s, c) for s in (*inputs[1:], out)):
        tile = 1
    if fold > 1:
        inputs, out = [_folded(s) for s in inputs], _folded(out)
    elif tile > 1:
        inputs, out = [_tiled(s, tile) for s in inputs], _tiled(out, tile)
    return _Layout(k, n, c, length, fold, tile, _geom(n, c, length, channels_last, fold, tile),
                   fmt, tuple(inputs), out, out_order)


def _plan(x, elems=(), chans=(), stats=()):
    """The _Layout of a call on x with element arguments `elems`, per-channel tangents
    `chans` and primal per-channel tensors `stats` (see `_layout`), or None where the
    kernels do not run it: also where x's dtype has no kernel, a tensor cannot be read
    through its address (`_plain`), an element argument has another dtype than x's, or
    a dispatch mode is on (make_fx, linearize, a flop counter: the mode must see every
    op, and kernels writing through raw addresses would show it only `empty`)."""
    dtype = x.dtype
    if dtype not in _CODES or not _plain(x) or torch._C._len_torch_dispatch_stack():
        return None
    elem_layouts = []
    for t in elems:
        if t is None:
            elem_layouts.append(None)
        elif t.dtype != dtype or not _plain(t):
            return None
        else:
            elem_layouts.append((t.shape, t.stride()))
    shapes = []
    for t in (*chans, *stats):
        if t is None:
            shapes.append(None)
        elif not _plain(t):
            return None
        else:
            shapes.append(t.shape)
    size = dtype.itemsize
    return _layout(x.shape, x.stride(), tuple(elem_layouts), tuple(shapes[:len(chans)]),
                   tuple(shapes[len(chans):]), FOLD_MAX_L[size], FEW_ROWS_FOLD_MAX_L,
                   TILE_ROW_BYTES // size)


def _td(t, strides):
    """A kernel's tensor descriptor (ptr, sK, sN, sC, sL); ptr 0 for an absent tensor."""
    return (_ptr(t), *strides)


def _tds(plan, x, *elems):
    """The descriptors of x and of each element argument, as the plan has them."""
    return [_td(t, s) for t, s in zip((x, *elems), plan.inputs, strict=True)]


def _chan(plan, t, dtype):
    """Contiguous per-channel tensor of `dtype` (the accumulation dtype, or a half x's:
    see _stats), (K, C) in a K call."""
    if t is None:
        return None
    if plan.K is not None and t.dim() == 1:
        t = t.expand(plan.K, plan.C)
    return _acc(t, dtype)


def _as(t, like):
    """t in like's dtype (per-channel results are computed in the accumulation dtype)."""
    return t if t.dtype == like.dtype else t.to(like.dtype)


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _empty(x, plan, dtype=None):
    """An element output: in torch's batch-norm output layout, or in a K call with the
    leading K outermost and the rest in x's memory format (`_layout`)."""
    if plan.K is None:
        return torch.empty_like(x, dtype=dtype, memory_format=plan.fmt)
    dtype = x.dtype if dtype is None else dtype
    shape = (plan.K, *x.shape)
    if plan.out_order is None:
        return torch.empty(shape, dtype=dtype, device=x.device)
    return torch.empty_permuted(shape, plan.out_order, dtype=dtype, device=x.device)


def _per_channel_output(plan, acc):
    """A per-channel output: (C,), or (K, C) in a K call (the kernels write K·C values)."""
    return torch.empty(plan.C if plan.K is None else (plan.K, plan.C), dtype=acc)


def _k(plan):
    return 1 if plan.K is None else plan.K


def forward_train(x, weight, bias, eps, activation=None, running_mean=None, running_var=None,
                  momentum=0.0):
    plan = _plan(x, stats=(weight, bias))
    if plan is None:
        return reference.forward_train(x, weight, bias, eps, activation, running_mean,
                                       running_var, momentum)
    acc = _ACC[x.dtype]
    # A half layer's parameters and buffers, all of x's dtype, go to the kernel as they
    # are: converted here, they cost more than a small call's kernel.
    tracked = () if running_mean is None else (running_mean, running_var)
    own = x.dtype != acc and all(_kernel_array(t, x.dtype, plan.C)
                                 for t in (weight, bias, *tracked))
    w, b = (weight, bias) if own else (_acc(weight, acc), _acc(bias, acc))
    y = torch.empty_like(x, memory_format=plan.fmt)
    mean, invstd = torch.empty(plan.C, dtype=acc), torch.empty(plan.C, dtype=acc)
    # The kernel updates running statistics of the accumulation dtype (or all of x's, as
    # above) in place; others (say bfloat16 buffers of a float32 x) from the variance it
    # returns.
    fused = own or running_mean is None or (_kernel_array(running_mean, acc, plan.C)
                                            and _kernel_array(running_var, acc, plan.C))
    var = None if fused else torch.empty(plan.C, dtype=acc)
    _C.forward_train(_CODES[x.dtype], plan.geom, _num_threads(), _td(x, plan.inputs[0]),
                     _td(y, plan.out), w.data_ptr(), b.data_ptr(), own, float(eps),
                     activation == "relu", mean.data_ptr(), invstd.data_ptr(), _ptr(var),
                     _ptr(running_mean if fused else None),
                     _ptr(running_var if fused else None), float(momentum))
    if not fused:
        reference.update_running_stats(running_mean, running_var, mean, var,
                                       plan.N * plan.L, momentum)
    elif running_mean is not None:   # written through raw pointers: tell autograd
        torch.autograd.graph.increment_version((running_mean, running_var))
    return y, mean, invstd


def forward_eval(x, running_mean, running_var, weight, bias, eps, activation=None):
    # Planned in this one frame, not by _plan: on a cold cache (a convolution between two
    # batch norms) the Python of a small layer's eval call costs as much as its kernel,
    # and each frame and call counts (benchmarks/RESULTS.md).
    plan, dtype = None, x.dtype
    if dtype in _CODES and _plain(x) and not torch._C._len_torch_dispatch_stack():
        size = dtype.itemsize
        # With fewer than 8 rows never folded (see FEW_ROWS_FOLD_MAX_L).
        plan = _layout(x.shape, x.stride(), (), (), (), EVAL_FOLD_MAX_L[size], 1,
                       TILE_ROW_BYTES // size)
    if plan is None:
        return reference.forward_eval(x, running_mean, running_var, weight, bias, eps,
                                      activation)
    channels = (plan.C,)
    acc = _ACC[dtype]
    # Read as they are where all four are contiguous and of x's dtype (`own`, for a half
    # x: see forward_train) or all of the accumulation dtype; else converted to it.
    stats_dtype = running_mean.dtype
    ready = stats_dtype == dtype or stats_dtype == acc
    stats = (running_mean, running_var, weight, bias)
    for t in stats:
        if t.shape != channels or not _plain(t):
            return reference.forward_eval(x, running_mean, running_var, weight, bias, eps,
                                          activation)
        ready = ready and t.dtype == stats_dtype and t.is_contiguous()
    if not ready:
        stats_dtype = acc
        stats = [_acc(t, acc) for t in stats]
    y = torch.empty_like(x, memory_format=plan.fmt)
    m, v, w, b = stats
    _C.forward_eval(_CODES[dtype], plan.geom, _num_threads(), (x.data_ptr(), *plan.inputs[0]),
                    (y.data_ptr(), *plan.out), m.data_ptr(), v.data_ptr(), w.data_ptr(),
                    b.data_ptr(), stats_dtype != acc, float(eps), activation == "relu")
    return y


def _stats(x, plan, mean, invstd, weight, bias, *tangents):
    """(own, dtype, [mean, invstd, weight, bias] for a derivative kernel). A half layer's
    parameters, their per-channel tangents and gradients go to the kernel in x's dtype
    as they are (`own`, the kernels' params_in_t; dtype is x's): tensor conversions here
    would cost ~10 us each on the cold cache a pass leaves, four to six a call. Else all
    go in the accumulation dtype (dtype)."""
    acc = _ACC[x.dtype]
    own = (x.dtype != acc and _kernel_array(weight, x.dtype, plan.C)
           and _kernel_array(bias, x.dtype, plan.C)
           and all(t is None or t.dtype == x.dtype for t in tangents))
    dtype = x.dtype if own else acc
    return own, dtype, [_acc(mean, acc), _acc(invstd, acc), _acc(weight, dtype),
                        _acc(bias, dtype)]


def backward(grad_y, x, mean, invstd, weight, bias, activation=None):
    plan = _plan(x, (grad_y,), stats=(mean, invstd, weight, bias))
    if plan is None:
        return reference.backward(grad_y, x, mean, invstd, weight, bias, activation)
    own, dtype, (m, r, w, b) = _stats(x, plan, mean, invstd, weight, bias)
    dx = _empty(x, plan)
    gw, gb = _per_channel_output(plan, dtype), _per_channel_output(plan, dtype)
    _C.backward(_CODES[x.dtype], plan.geom, _num_threads(), _k(plan), activation == "relu",
                *_tds(plan, x, grad_y), _td(dx, plan.out), m.data_ptr(), r.data_ptr(),
                w.data_ptr(), b.data_ptr(), own, gw.data_ptr(), gb.data_ptr())
    return dx, _as(gw, weight), _as(gb, bias)


def forward_jvp(x_t, weight_t, bias_t, x, mean, invstd, weight, bias, activation=None):
    plan = _plan(x, (x_t,), (weight_t, bias_t), (mean, invstd, weight, bias))
    if plan is None or (x_t is None and weight_t is None and bias_t is None):
        return reference.forward_jvp(x_t, weight_t, bias_t, x, mean, invstd, weight, bias,
                                     activation)
    own, dtype, (m, r, w, b) = _stats(x, plan, mean, invstd, weight, bias, weight_t, bias_t)
    wt, bt = _chan(plan, weight_t, dtype), _chan(plan, bias_t, dtype)
    y_t = _empty(x, plan)
    _C.forward_jvp(_CODES[x.dtype], plan.geom, _num_threads(), _k(plan), activation == "relu",
                   *_tds(plan, x, x_t), _td(y_t, plan.out), m.data_ptr(), r.data_ptr(),
                   w.data_ptr(), b.data_ptr(), _ptr(wt), _ptr(bt), own)
    return y_t


def backward_backward(gg_x, gg_weight, gg_bias, grad_y, x, mean, invstd, weight, bias,
                      activation=None):
    plan = _plan(x, (grad_y, gg_x), (gg_weight, gg_bias), (mean, invstd, weight, bias))
    if plan is None:
        return reference.backward_backward(gg_x, gg_weight, gg_bias, grad_y, x, mean, invstd,
                                           weight, bias, activation)
    own, dtype, (m, r, w, b) = _stats(x, plan, mean, invstd, weight, bias, gg_weight,
                                      gg_bias)
    ggw, ggb = _chan(plan, gg_weight, dtype), _chan(plan, gg_bias, dtype)
    g_gy, g_x = _empty(x, plan, grad_y.dtype), _empty(x, plan)
    g_w = _per_channel_output(plan, dtype)
    _C.backward_backward(_CODES[x.dtype], plan.geom, _num_threads(), _k(plan),
                         activation == "relu", *_tds(plan, x, grad_y, gg_x), _ptr(ggw),
                         _ptr(ggb), m.data_ptr(), r.data_ptr(), w.data_ptr(), b.data_ptr(),
                         own, _td(g_gy, plan.out), _td(g_x, plan.out), g_w.data_ptr())
    return g_gy, g_x, _as(g_w, weight)


def backward_jvp(grad_y_t, x_t, weight_t, bias_t, grad_y, x, mean, invstd, weight, bias,
                 activation=None):
    # bias_t does not enter backward's value (only the mask), so it never shapes the result.
    plan = _plan(x, (grad_y, grad_y_t, x_t), (weight_t,), (mean, invstd, weight, bias))
    if plan is None:
        return reference.backward_jvp(grad_y_t, x_t, weight_t, bias_t, grad_y, x, mean,
                                      invstd, weight, bias, activation)
    own, dtype, (m, r, w, b) = _stats(x, plan, mean, invstd, weight, bias, weight_t)
    wt = _chan(plan, weight_t, dtype)
    gx_t = _empty(x, plan)
    gw_t, gb_t = _per_channel_output(plan, dtype), _per_channel_output(plan, dtype)
    _C.backward_jvp(_CODES[x.dtype], plan.geom, _num_threads(), _k(plan), activation == "relu",
                    *_tds(plan, x, grad_y, grad_y_t, x_t), _ptr(wt), m.data_ptr(),
                    r.data_ptr(), w.data_ptr(), b.data_ptr(), own, _td(gx_t, plan.out),
                    gw_t.data_ptr(), gb_t.data_ptr())
    return gx_t, _as(gw_t, weight), _as(gb_t, bias)
