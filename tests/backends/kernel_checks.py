"""What every backend's kernel tests share: inputs of the named layouts, calling an op of
the kernel interface on one problem dict, and comparing with the reference backend (half
precision by the upcast rule: error vs the float64 reference at most twice
the reference backend's own error at that dtype, plus a small tolerance)."""

import torch

from fastbn.backends import reference

HALF = (torch.bfloat16, torch.float16)
OPS = ("forward_train", "forward_eval", "backward", "forward_jvp", "backward_backward",
       "backward_jvp")
K_OPS = OPS[2:]   # the ops whose tangent-like arguments may carry a leading K


class NoFallback:
    """Stands in for `reference` inside a backend module: kernel calls must not fall back."""

    def __init__(self, backend):
        self.backend = backend

    def __getattr__(self, attr):
        if attr in ("acc_dtype", "update_running_stats"):
            return getattr(reference, attr)
        raise AssertionError(f"{self.backend} backend fell back to reference.{attr}")


# The size of x in each layout: odd and prime sizes, C=1 and N=2 included.
SIZES = {
    "nchw": (2, 3, 5, 7),
    "channels_last": (3, 5, 7, 11),
    "channels_last_3d": (2, 3, 3, 5, 7),
    "2d": (13, 7),
    "3d": (2, 5, 13),
    "slice": (3, 7, 3, 5),         # channels 2:5 of it: not contiguous
    "strided_l": (2, 3, 5, 14),    # every other element of a row: the non-unit-stride loops
    "strided_short": (2, 3, 4, 10),  # the same with short runs (20), few rows: not folded
    # Runs of 15 (shorter than the float lanes) in 300 rows, not folded (a gap after each
    # channel's block): a channel's short runs add to the same lanes, which go to double
    # mid-unit.
    "short_runs": (300, 3, 6, 3),
    "c1": (5, 1, 5, 3),
    "c1_2d": (9, 1),
    "big_nchw": (4, 6, 23, 41),    # several work units, two threads with K=3
    "many_rows": (400, 3, 8, 8),   # several NCHW work units (row blocks) per channel
    "wide_c": (8, 70, 8, 8),       # NCHW channel blocks, the last one partial
    "threaded": (8, 64, 16, 16),   # enough work for two threads in every op
    "offset": (16, 5, 9, 13),      # x = 1e4 + N(0, 1): statistics without cancellation
    "long_rows": (2, 3, 4096 + 17),  # rows of several runs (RUN in csrc), and a short tail
    "big_cl": (4, 600, 5, 3),      # channels-last: two channel blocks, several row blocks
    # Channels-last rows of few channels, run in tiles of several rows (Geom.tile in csrc):
    "big_tiled": (16, 24, 12, 12),  # several tiled rows per sample, tasks and threads
    "cl_untiled": (2, 5, 103, 1),   # L prime: no tile divides it
    "2d_tiled": (24, 7),            # (N, C): N runs as the rows, tiled at every dtype
    # NCHW with few values per (n, c), run as channels-last rows (Geom.fold in csrc):
    "strided_fold": (8, 3, 5, 6),  # every other element: pass channels of stride 2
    "big_fold": (64, 300, 4, 5),   # several channel blocks and row blocks
    "few_rows_fold": (2, 700, 3),  # one row block (one thread: little work)
}
_CHANNELS_LAST = {"channels_last": torch.channels_last, "big_cl": torch.channels_last,
                  "big_tiled": torch.channels_last, "cl_untiled": torch.channels_last,
                  "channels_last_3d": torch.channels_last_3d}


def layout_x(name, gen, dtype, sizes=SIZES):
    """An x of the named layout, float64 N(0, 1) values cast to dtype; `sizes` maps
    layout names to the full tensor's shape (smaller ones for slow backends). The cast
    comes before the view: a cast of a strided view is contiguous."""
    if name not in sizes:
        raise ValueError(name)
    x = torch.randn(*sizes[name], generator=gen, dtype=torch.float64)
    if name == "offset":
        x = 1e4 + x
    x = x.to(dtype)
    if name == "slice":
        x = x[:, 2:5]
    elif name in ("strided_l", "strided_short", "strided_fold"):
        x = x[..., ::2]
    elif name == "short_runs":
        x = x[:, :, :5]
    elif name in _CHANNELS_LAST:
        x = x.contiguous(memory_format=_CHANNELS_LAST[name])
    return x


def call(backend, op, p, act):
    """Run `op` of `backend` on the problem dict p (see the test files' _problem)."""
    if op == "forward_train":
        return backend.forward_train(p["x"], p["weight"], p["bias"], 1e-5, act)
    if op == "forward_eval":
        return backend.forward_eval(p["x"], p["mean"], p["running_var"], p["weight"],
                                    p["bias"], 1e-5, act)
    args = (p["x"], p["mean"], p["invstd"], p["weight"], p["bias"], act)
    if op == "backward":
        return backend.backward(p["grad_y"], *args)
    if op == "forward_jvp":
        return backend.forward_jvp(p["x_t"], p["weight_t"], p["bias_t"], *args)
    if op == "backward_backward":
        return backend.backward_backward(p["gg_x"], p["weight_t"], p["bias_t"], p["grad_y"],
                                         *args)
    if op == "backward_jvp":
        return backend.backward_jvp(p["grad_y_t"], p["x_t"], p["weight_t"], p["bias_t"],
                                    p["grad_y"], *args)
    raise ValueError(op)


def upcast(p):
    return {key: None if v is None else v.double() for key, v in p.items()}


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def check(out, ref, ref64, dtype, half_atol):
    """out against the reference's ref (same dtype) and ref64 (float64 inputs);
    half_atol: {dtype: tolerance relative to the output's scale} for bf16/fp16."""
    for o, r, r64 in zip(as_tuple(out), as_tuple(ref), as_tuple(ref64)):
        assert o.shape == r.shape and o.dtype == r.dtype and o.device == r.device
        o, r, r64 = o.cpu(), r.cpu(), r64.cpu()
        scale = max(r64.abs().max().item(), 1.0) if r64.numel() else 1.0
        if dtype == torch.float64:
            torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10 * scale)
        elif dtype == torch.float32:
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5 * scale)
        else:
            err = (o.double() - r64).abs().max().item()
            stock = (r.double() - r64).abs().max().item()
            assert err <= 2 * stock + half_atol[dtype] * scale, (err, stock, scale)


ELEMENT_TANGENTS = ("grad_y", "x_t", "grad_y_t", "gg_x")


def check_offset_tangents(backend, op, p, act, first_bound, offset=1e3, other_bound=2.0):
    """Element cotangents and tangents with a large common part, `offset` + N(0, 1) (a
    loss with a large mean term gives such gradients), in float32: each output's RMS error
    against float64 on the same values, over the reference backend's, at most
    `first_bound` for the first output (the one centring the element inputs before they
    are scaled decides: folded into one per-channel constant, their common part cancelled
    only after the product's rounding) and `other_bound` for the others (2, the design's
    rule; None: not checked). p: a float32 problem dict, x of N(0, 1), with thousands of
    values (the ratio of two RMS errors over fewer is noise)."""
    p = dict(p)
    for key in ELEMENT_TANGENTS:
        p[key] = p[key].clone().add_(offset)
    out = as_tuple(call(backend, op, p, act))
    ref = as_tuple(call(reference, op, p, act))
    ref64 = as_tuple(call(reference, op, upcast(p), act))
    for i, (o, r, r64) in enumerate(zip(out, ref, ref64)):
        if i > 0 and other_bound is None:
            break
        o, r, r64 = o.cpu().double(), r.cpu().double(), r64.cpu()
        err, own = ((t - r64).square().mean().sqrt().item() for t in (o, r))
        assert err <= (first_bound if i == 0 else other_bound) * own, (i, err, own)


def check_statistics_as_given(backend, op, p, act):
    """The derivative kernels take mean and invstd as given, not as x's exact statistics
    (a float32 mean is x's rounded, so the sum of xhat is not 0): with both moved off
    x's (the mean by a tenth of a standard deviation, invstd by 5%) and the element inputs
    offset by 3 (so no pivot is near 0), every output equals the reference's. p: a
    float64 problem dict."""
    p = dict(p)
    p["mean"] = p["mean"] + 0.1 / p["invstd"]
    p["invstd"] = p["invstd"] * 1.05
    for key in ELEMENT_TANGENTS:
        p[key] = p[key] + 3.0
    ref = call(reference, op, p, act)
    check(call(backend, op, p, act), ref, ref, torch.float64, None)


# The tangent-like arguments of each second-order op that may be absent (None).
ABSENT = {"forward_jvp": ("x_t", "weight_t", "bias_t"),
          "backward_backward": ("gg_x", "weight_t", "bias_t"),
          "backward_jvp": ("grad_y_t", "x_t", "weight_t")}
# (op, where the non-finite value goes) for check_absent_with_non_finite.
NON_FINITE_CASES = [(op, where) for op in ABSENT for where in ("grad_y", "x")
                    if not (op == "forward_jvp" and where == "grad_y")]   # it has no grad_y


def check_absent_with_non_finite(backend, op, base, where):
    """An absent tangent contributes nothing, not 0 * inf = NaN, next to an inf in grad_y
    or a NaN in x (its channel's statistics NaN): for every pattern of None arguments and
    both activations, wherever the reference is finite the backend agrees with it, and it
    is non-finite where the reference is. `base`: a float64 problem dict."""
    base = dict(base)
    bad = base[where].clone()
    bad[(1, 1) + (0,) * (base["x"].dim() - 2)] = float("inf" if where == "grad_y" else "nan")
    base[where] = bad
    if where == "x":
        base["mean"], _, base["invstd"] = reference.statistics(bad, 1e-5)
    names = ABSENT[op]
    for mask in range(2 ** len(names) - (op == "forward_jvp")):   # not all None: zeros_like
        p = dict(base)
        for i, key in enumerate(names):
            if mask >> i & 1:
                p[key] = None
        for act in (None, "relu"):
            for got, want in zip(as_tuple(call(backend, op, p, act)),
                                 as_tuple(call(reference, op, p, act))):
                got, want = got.cpu(), want.cpu()
                finite = torch.isfinite(want)
                torch.testing.assert_close(got[finite], want[finite], rtol=1e-9, atol=1e-9)
                assert not torch.isfinite(got[~finite]).any()


def check_non_finite_forward(backend, x):
    """NaN survives the fused ReLU (torch's relu keeps it); an inf makes its channel's
    mean inf, wherever in the channel it sits (first, so the pivot, or last)."""
    c = x.shape[1]
    w, b = torch.rand(c, dtype=x.dtype) + 0.5, torch.randn(c, dtype=x.dtype)
    rm, rv = torch.zeros(c, dtype=x.dtype), torch.ones(c, dtype=x.dtype)
    w, b, rm, rv = (t.to(x.device) for t in (w, b, rm, rv))
    first = (0,) * x.dim()
    last = tuple(s - 1 for s in x.shape)
    for value, where in ((float("nan"), first), (float("nan"), last),
                         (float("inf"), first), (float("-inf"), last)):
        bad = x.clone()
        bad[where] = value
        for act in (None, "relu"):
            got = backend.forward_train(bad, w, b, 1e-5, act)
            want = reference.forward_train(bad, w, b, 1e-5, act)
            for g, v in zip(got, want):
                torch.testing.assert_close(g, v, equal_nan=True, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(backend.forward_eval(bad, rm, rv, w, b, 1e-5, act),
                                       reference.forward_eval(bad, rm, rv, w, b, 1e-5, act),
                                       equal_nan=True)
