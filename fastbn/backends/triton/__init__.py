"""Triton backend: fused batch-norm kernels for CUDA (and for CPU through the interpreter).

Same functions and semantics as `reference.py`. Every call views element tensors as
(K, N, C, L) through strides (spatial dims flattened to one stride), allocates outputs in
x's memory format, and launches the generic kernel of `kernels.py` on either
- the persistent path (one read: the per-channel slice fits one tile), or
- the split path: partial statistics per (channel block, chunk) in one launch, then a
  launch that combines them and runs the elementwise pass (small C with large N*H*W gets
  many chunks, so it never runs one program per channel).
The choice depends on shapes only; launchers never synchronise with the device (the
autotuner does, timing the first call of each shape on a GPU).

Native: float64, float32, bfloat16 and float16 element tensors (statistics in float32,
float64 for float64), any mix of K-batched and shared arguments (a shared argument gets K
stride 0). Falls back to `reference` per call for: CPU tensors outside the interpreter,
functorch-wrapped or non-strided tensors, spatial dims that do not flatten to one stride,
mismatched devices or K sizes, x with fewer than 2 dims, empty tensors, and K times the
channels beyond CUDA's grid (2^31 - 1).

Tuning knobs live in `config` (a `Config`; fields may also be set from the environment,
FASTBN_TRITON_<FIELD>): `persist_max` (largest tile of the persistent path, in elements;
0 forces the split path), `chunk` (elements per chunk of the split path), `block_m`,
`block_c`, `max_chunks`, `programs` (target number of programs of the split path).
Under torch.compile the kernels run inside fastbn's custom ops (fastbn/ops/library.py),
which are opaque to Dynamo; the launchers only read shapes and strides.
"""

import contextlib
import functools
import os
import struct
from dataclasses import dataclass, fields
from typing import Optional

import torch

from fastbn.backends import reference
from fastbn.backends.layout import empty_output, flat_strides, k_output_order

try:
    import triton
    from fastbn.backends.triton import kernels as _k
    _IMPORT_ERROR = None
except Exception as err:   # noqa: BLE001 - not installed, or a broken install (a CUDA
    # runtime error, say): the registry reports why and the other backends serve
    triton = None
    _k = None
    _IMPORT_ERROR = f"{type(err).__name__}: {err}"

name = "triton"

_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _interpreting():
    """Whether the kernels run in Triton's interpreter: TRITON_INTERPRET as it was when
    they were defined (at import), whatever it says now."""
    return _k is not None and _k.INTERPRETED


def runs_on_cpu():
    """True when kernels run on CPU tensors (Triton's interpreter, TRITON_INTERPRET=1)."""
    return triton is not None and _interpreting()


def available():
    if triton is None:
        return False, f"triton not installed ({_IMPORT_ERROR})"
    if torch.cuda.is_available():
        return True, f"Triton {triton.__version__} kernels on CUDA"
    if _interpreting():
        return True, f"Triton {triton.__version__} interpreter on CPU (TRITON_INTERPRET=1)"
    return False, ("no CUDA device; set TRITON_INTERPRET=1 before fastbn's Triton backend "
                   "is imported to run on CPU")


# Triton's largest block, in elements (triton.language.TRITON_MAX_TENSOR_NUMEL).
MAX_TILE = 2 ** 20


@dataclass
class Config:
    # elements of the persistent tile (BLOCK_M * BLOCK_C); None: 8192 on a GPU, 65536
    # under the interpreter (where fewer, larger numpy tiles are what is fast)
    persist_max: Optional[int] = None
    chunk: Optional[int] = None  # elements per chunk on the split path (None: derived)
    block_m: Optional[int] = None
    block_c: Optional[int] = None
    max_chunks: int = 256
    programs: Optional[int] = None   # target programs on the split path (None: 4 per SM)

    @classmethod
    def from_env(cls):
        cfg = cls()
        for f in fields(cls):
            variable = f"FASTBN_TRITON_{f.name.upper()}"
            raw = os.environ.get(variable)
            if raw:
                try:
                    setattr(cfg, f.name, int(raw))
                except ValueError:
                    raise ValueError(f"{variable} must be an integer, got {raw!r}") from None
        cfg.check()
        return cfg

    def check(self):
        """ValueError unless every set field is in range (checked at each launch too:
        fields may be set in code). 0, like None, leaves chunk, block_m, block_c and programs
        to be derived; persist_max 0 forces the split path, max_chunks 0 one chunk."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"fastbn Triton config: {f.name} must be a non-negative "
                                 f"int, got {value!r}")
            if f.name in ("block_m", "block_c") and value & (value - 1):
                raise ValueError(f"fastbn Triton config: {f.name} must be a power of two "
                                 f"(a Triton block), got {value}")
            if f.name in ("block_m", "block_c", "persist_max") and value > MAX_TILE:
                raise ValueError(f"fastbn Triton config: {f.name} must be at most "
                                 f"{MAX_TILE} (Triton's largest block), got {value}")


config = Config.from_env()


# ----------------------------------------------------------------------------- launch

# Options of every launch: no fused multiply-adds, so each product is rounded before it
# is added, as in the reference (and the cpu build's -ffp-contract=off): the ReLU mask
# xhat * w + b > 0 decides alike at its boundary. Explicit, since Triton's default changes
# (and it warns when the default is left to it).
LAUNCH_OPTIONS = dict(enable_fp_fusion=False)


def num_warps(block_m, block_c):
    """Warps for a tile, from its size alone: they shape tl.sum's reduction tree, so one
    chosen by timing could give other bits in another process."""
    return 8 if block_m * block_c >= 8192 else 4


def _warps_of_the_tile(configs, named_args, **meta):
    warps = num_warps(meta["BLOCK_M"], meta["BLOCK_C"])
    return [c for c in configs if c.num_warps == warps]


def _autotuned(interpret):
    """The kernel behind triton.autotune. Only num_stages is tuned (it pipelines loads and
    leaves the arithmetic alone); num_warps follows the tile (`num_warps`). BLOCK_C,
    BLOCK_M and the chunking fix the layout of the partial statistics, which the two split
    launches must agree on, so the launcher chooses them from the shape."""
    if interpret:
        configs = [triton.Config({}, num_warps=4)]
    else:
        configs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in
                   ((4, 1), (8, 1), (4, 2), (8, 2))]
    def bench(kernel_call, quantiles):   # short: memory-bound kernels time steadily
        return triton.testing.do_bench(kernel_call, warmup=5, rep=15, quantiles=quantiles)

    return triton.autotune(configs=configs, do_bench=None if interpret else bench,
                           prune_configs_by=dict(early_config_prune=_warps_of_the_tile),
                           key=["M", "C", "L", "NCHUNKS", "OP", "MODE", "ACT", "HAS_E1",
                                "HAS_E2", "HAS_E3", "HAS_P1", "HAS_P2", "IDX64", "BLOCK_M",
                                "BLOCK_C", "sxC", "sxL"])(_k.bn_kernel)


# CUDA's limits on grid axis 0 (channel blocks × K) and axis 1 (the chunks).
MAX_GRID_X, MAX_GRID_Y = 2 ** 31 - 1, 65535


def _extent(t):
    """One past the largest element offset of t from its data pointer."""
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


@functools.cache
def _kernel():
    return _autotuned(_interpreting())


_SMS = {}


def _target_programs(device):
    if config.programs:
        return config.programs
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return 4 * _SMS[idx]


def _pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def _view(t, batched):
    """(sK, sN, sC, sL) of t seen as (K, N, C, L), or None when the spatial dims do not
    flatten to one stride."""
    return flat_strides(t.shape, t.stride(), batched)


def _plain(t, device):
    # A ZeroTensor (autograd's stand-in for a zero gradient) has no memory behind it: a
    # kernel would read address 0.
    return (type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided
            and not _is_wrapped(t) and t.device == device and not t.is_neg()
            and not t.is_conj() and not t._is_zerotensor())


def _empty_like(x, k, dtype):
    """A tensor of x's shape: without k, in torch's batch-norm output layout; with k,
    a leading K outermost and the rest in x's memory format (dims ordered by x's strides,
    dense). Not a view (autograd forbids in-place ops on views made inside a custom
    Function)."""
    if k is None:
        return empty_output(x, dtype)
    out = torch.empty_permuted((k, *x.shape), k_output_order(x.stride()), dtype=dtype,
                               device=x.device)
    if _view(out, True) is None:
        # x's strides put N between spatial dims (a permuted or overlapping x): the
        # kernels need spatial dims that flatten, as they do in the contiguous order.
        out = torch.empty((k, *x.shape), dtype=dtype, device=x.device)
    return out


class _Call:
    """Checks and geometry of one call; `ok` is False when it must go to reference."""

    def __init__(self, x, elems, chans):
        self.ok = False
        # Under a dispatch mode (make_fx, linearize) the mode must see every op: kernels
        # writing through raw addresses would record only `empty`.
        if (triton is None or x.dim() < 2 or x.numel() == 0 or x.dtype not in _DTYPES
                or torch._C._len_torch_dispatch_stack()):
            return
        if x.device.type == "cpu":
            if not _interpreting():
                return
        elif x.device.type != "cuda":
            return
        device = x.device
        if not all(_plain(t, device) for t in (x, *elems, *chans) if t is not None):
            return
        geo = _view(x, False)
        if geo is None:
            return
        ks = set()
        self.views = []
        for t in elems:
            if t is None:
                self.views.append((0, 0, 0, 0))
                continue
            if t.dtype not in _DTYPES:
                return
            if t.shape == x.shape:
                v = _view(t, False)
            elif t.dim() == x.dim() + 1 and t.shape[1:] == x.shape:
                ks.add(t.shape[0])
                v = _view(t, True)
            else:
                return
            if v is None:
                return
            self.views.append(v)
        C = x.shape[1]
        for t in chans:
            if t is None:
                continue
            if t.shape == (C,):
                continue
            if t.dim() == 2 and t.shape[1] == C:
                ks.add(t.shape[0])
            else:
                return
        if len(ks) > 1 or 0 in ks:
            return
        self.k = ks.pop() if ks else None
        self.K = self.k or 1
        if self.K * C > MAX_GRID_X:   # grid axis 0 holds K times the channel blocks
            return
        self.x = x
        self.acc = reference.acc_dtype(x.dtype)
        self.tl_acc = _k.tl.float64 if self.acc == torch.float64 else _k.tl.float32
        _, self.sN, self.sC, self.sL = geo
        self.N, self.C = x.shape[0], C
        self.L = x.numel() // (self.N * C)
        self.M = self.N * self.L
        # 64-bit offsets where an element offset (of x, an argument reaching into a larger
        # buffer, or a K-batched output) or a loop counter (up to 2M) could pass int32's.
        big = 2 ** 31 - 1
        self.idx64 = (2 * self.M >= big or x.numel() * self.K >= big
                      or any(t is not None and _extent(t) >= big for t in (x, *elems)))
        self.ok = True

    def chan(self, t):
        """A per-channel tensor in the accumulation dtype, contiguous; and its K stride."""
        if t is None:
            return self.x, 0
        t = _prim(t, self.acc)
        return t, (self.C if t.dim() == 2 else 0)

    def plan(self, split_only=False):
        """(mode, BLOCK_M, BLOCK_C, CHUNK, NCHUNKS) from the shape alone; mode is "fused"
        (one program per channel block holds all of M) or "split" (M in chunks)."""
        config.check()
        interpret = _interpreting()
        C, M = self.C, self.M
        chan_contig = self.sC == 1 and C > 1
        if config.block_c:
            bc = config.block_c
        elif interpret:
            bc = min(_pow2(C), 16)
        else:
            bc = min(_pow2(C), 64) if chan_contig else 1
        bm_full = _pow2(M)
        persist_max = config.persist_max
        if persist_max is None:
            persist_max = 65536 if interpret else 8192
        if not split_only and bm_full * bc <= persist_max:
            return "fused", bm_full, bc, M, 1
        if config.block_m:
            bm = config.block_m
        elif interpret:
            bm = max(64, 16384 // bc)
        else:
            bm = max(16, 4096 // bc) if chan_contig else 1024
        cblocks = triton.cdiv(C, bc)
        if config.chunk:
            chunk = max(config.chunk, triton.cdiv(M, MAX_GRID_Y))
            bm = min(bm, _pow2(chunk))
        else:
            chunks = max(1, min(config.max_chunks, MAX_GRID_Y,
                                triton.cdiv(_target_programs(self.x.device),
                                                               cblocks), triton.cdiv(M, bm)))
            chunk = triton.cdiv(triton.cdiv(M, chunks), bm) * bm
        if bm * bc > MAX_TILE:
            raise ValueError(f"fastbn Triton config: a tile of block_m {bm} × block_c {bc} "
                             f"is larger than Triton's largest block ({MAX_TILE})")
        return "split", bm, bc, chunk, triton.cdiv(M, chunk)

    def launch(self, op, act, elems, outs, mean, invstd, weight, bias, p1, p2, qs, eps=0.0):
        x = self.x
        views = self.views + [(0, 0, 0, 0)] * (3 - len(self.views))
        e = list(elems) + [None] * (3 - len(elems))
        outs = list(outs) + [None] * (2 - len(outs))
        ov = [(0, 0, 0, 0) if o is None else _view(o, o.dim() == x.dim() + 1) for o in outs]
        has_p1, has_p2 = p1 is not None, p2 is not None   # chan() may hand back x itself
        p1, sp1 = self.chan(p1)
        p2, sp2 = self.chan(p2)
        qs = list(qs) + [None] * (3 - len(qs))
        sq = qs[0].shape[-1] if qs[0] is not None and qs[0].dim() == 2 else 0
        kind, bm, bc, chunk, nchunks = self.plan(split_only=(op == _k.OP_EVAL))
        ns = _k.NSUMS[op]
        grid = (triton.cdiv(self.C, bc) * self.K, nchunks)
        dummy = x
        args = [x] + [t if t is not None else dummy for t in e] \
            + [o if o is not None else dummy for o in outs] \
            + [mean if mean is not None else dummy, invstd if invstd is not None else dummy,
               weight, bias, p1, p2] + [q if q is not None else dummy for q in qs]
        part = dummy
        if kind == "split" and ns:
            part = torch.empty((self.K, nchunks, ns, self.C), dtype=torch.float64,
                               device=x.device)
        # eps's float64 bits as two int32s (see the kernel)
        eps_hi, eps_lo = struct.unpack("<ii", struct.pack("<d", eps))[::-1]
        tail = [self.M, self.C, self.L, chunk, nchunks, eps_hi, eps_lo,
                self.sN, self.sC, self.sL, *views[0], *views[1], *views[2], *ov[0], *ov[1],
                sp1, sp2, sq]
        meta = dict(OP=op, ACT=act == "relu", HAS_E1=e[0] is not None,
                    HAS_E2=e[1] is not None, HAS_E3=e[2] is not None,
                    HAS_P1=has_p1, HAS_P2=has_p2, NS=ns, ACC=self.tl_acc,
                    IDX64=self.idx64 or part.numel() >= 2 ** 31,   # tiny chunks: many partials
                    BLOCK_M=bm, BLOCK_C=bc)
        kernel = _kernel()
        modes = ([_k.MODE_FUSED] if kind == "fused"
                 else [_k.MODE_REDUCE, _k.MODE_APPLY] if ns else [_k.MODE_APPLY])
        # Triton launches on the current device, not on the tensors'.
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            for mode in modes:
                kernel[grid](*args, part, *tail, MODE=mode, **meta, **LAUNCH_OPTIONS)


def _k_out(call, like_dtype):
    return _empty_like(call.x, call.k, like_dtype)


def _chan_out(call, batched):
    shape = (call.K, call.C) if batched else (call.C,)
    return torch.empty(shape, dtype=call.acc, device=call.x.device)


def _prim(t, acc):
    """A per-channel tensor in the accumulation dtype, contiguous."""
    return t.to(acc).contiguous()


# ----------------------------------------------------------------------------- kernels

def forward_train(x, weight, bias, eps, activation=None, running_mean=None, running_var=None,
                  momentum=0.0):
    call = _Call(x, [], [weight, bias])
    if not call.ok or call.k is not None:
        return reference.forward_train(x, weight, bias, eps, activation, running_mean,
                                       running_var, momentum)
    y = _empty_like(x, None, x.dtype)
    mean, invstd, var = (_chan_out(call, False) for _ in range(3))
    call.launch(_k.OP_FWD, activation, [], [y], None, None, _prim(weight, call.acc),
                _prim(bias, call.acc), None, None, [mean, invstd, var], eps=eps)
    if running_mean is not None:
        reference.update_running_stats(running_mean, running_var, mean, var, call.M, momentum)
    return y, mean, invstd


def forward_eval(x, running_mean, running_var, weight, bias, eps, activation=None):
    call = _Call(x, [], [running_mean, running_var, weight, bias])
    if not call.ok or call.k is not None:
        return reference.forward_eval(x, running_mean, running_var, weight, bias, eps,
                                      activation)
    y = _empty_like(x, None, x.dtype)
    acc = call.acc
    call.launch(_k.OP_EVAL, activation, [], [y], _prim(running_mean, acc),
                _prim(running_var, acc), _prim(weight, acc), _prim(bias, acc), None, None,
                [], eps=eps)
    return y


def backward(grad_y, x, mean, invstd, weight, bias, activation=None):
    call = _Call(x, [grad_y], [mean, invstd, weight, bias])
    if not call.ok or mean.dim() != 1 or invstd.dim() != 1:
        return reference.backward(grad_y, x, mean, invstd, weight, bias, activation)
    acc = call.acc
    gx = _k_out(call, grad_y.dtype)
    gw, gb = _chan_out(call, call.k is not None), _chan_out(call, call.k is not None)
    call.launch(_k.OP_BWD, activation, [grad_y], [gx], _prim(mean, acc), _prim(invstd, acc),
                _prim(weight, acc), _prim(bias, acc), None, None, [gw, gb])
    return gx, gw.to(weight.dtype), gb.to(bias.dtype)


def forward_jvp(x_t, weight_t, bias_t, x, mean, invstd, weight, bias, activation=None):
    if x_t is None and weight_t is None and bias_t is None:
        return reference.forward_jvp(x_t, weight_t, bias_t, x, mean, invstd, weight, bias,
                                     activation)
    call = _Call(x, [x_t], [weight_t, bias_t, mean, invstd, weight, bias])
    if not call.ok or mean.dim() != 1 or invstd.dim() != 1:
        return reference.forward_jvp(x_t, weight_t, bias_t, x, mean, invstd, weight, bias,
                                     activation)
    acc = call.acc
    y_t = _k_out(call, x.dtype)
    call.launch(_k.OP_FJVP, activation, [x_t], [y_t], _prim(mean, acc), _prim(invstd, acc),
                _prim(weight, acc), _prim(bias, acc), weight_t, bias_t, [])
    return y_t


def backward_backward(gg_x, gg_weight, gg_bias, grad_y, x, mean, invstd, weight, bias,
                      activation=None):
    call = _Call(x, [grad_y, gg_x], [gg_weight, gg_bias, mean, invstd, weight, bias])
    if not call.ok or mean.dim() != 1 or invstd.dim() != 1:
        return reference.backward_backward(gg_x, gg_weight, gg_bias, grad_y, x, mean, invstd,
                                           weight, bias, activation)
    acc = call.acc
    g_g = _k_out(call, grad_y.dtype)
    g_x = _k_out(call, x.dtype)
    g_w = _chan_out(call, call.k is not None)
    call.launch(_k.OP_BB, activation, [grad_y, gg_x], [g_g, g_x], _prim(mean, acc),
                _prim(invstd, acc), _prim(weight, acc), _prim(bias, acc), gg_weight, gg_bias,
                [g_w])
    return g_g, g_x, g_w.to(weight.dtype)


def backward_jvp(grad_y_t, x_t, weight_t, bias_t, grad_y, x, mean, invstd, weight, bias,
                 activation=None):
    call = _Call(x, [grad_y, grad_y_t, x_t], [weight_t, mean, invstd, weight, bias])
    if not call.ok or mean.dim() != 1 or invstd.dim() != 1:
        return reference.backward_jvp(grad_y_t, x_t, weight_t, bias_t, grad_y, x, mean,
                                      invstd, weight, bias, activation)
    acc = call.acc
    gx_t = _k_out(call, x.dtype)
    batched = call.k is not None
    gw_t, gb_t = _chan_out(call, batched), _chan_out(call, batched)
    call.launch(_k.OP_BJVP, activation, [grad_y, grad_y_t, x_t], [gx_t], _prim(mean, acc),
                _prim(invstd, acc), _prim(weight, acc), _prim(bias, acc), weight_t, None,
                [gw_t, gb_t])
    return gx_t, gw_t.to(weight.dtype), gb_t.to(bias.dtype)
