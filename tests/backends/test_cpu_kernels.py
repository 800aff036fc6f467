"""The compiled CPU kernels (fastbn.backends.cpu) against the reference backend.

Native cases run with the reference fallback disabled, so they exercise the C++ kernels;
half-precision results follow the upcast rule (error vs the float64 reference
at most twice the reference backend's own error at that dtype, plus a small atol).
"""

import math

import pytest
import torch

pytest.importorskip("fastbn._C")

from fastbn.backends import cpu, reference  # noqa: E402
from tests.backends.kernel_checks import (ELEMENT_TANGENTS, HALF, K_OPS,  # noqa: E402
                                          NON_FINITE_CASES, OPS, SIZES, NoFallback,
                                          as_tuple as _tuple, call as _call,
                                          check, check_absent_with_non_finite,
                                          check_non_finite_forward, check_offset_tangents,
                                          check_statistics_as_given, layout_x,
                                          upcast as _upcast)

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _check(out, ref, ref64, dtype):
    check(out, ref, ref64, dtype, half_atol={torch.bfloat16: 1e-3, torch.float16: 1e-3})


@pytest.fixture
def native(monkeypatch):
    monkeypatch.setattr(cpu, "reference", NoFallback("cpu"))


@pytest.fixture
def num_threads():
    """torch.set_num_threads for one test; the count before it is restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


LAYOUTS = ("nchw", "channels_last", "channels_last_3d", "2d", "3d", "slice", "strided_l",
           "strided_short", "short_runs", "c1", "c1_2d", "strided_fold", "cl_untiled",
           "2d_tiled")
BIG = ("big_nchw", "many_rows", "wide_c", "long_rows", "big_cl", "big_fold", "few_rows_fold",
       "big_tiled")
# Layouts the kernels run folded (few values per (n, c): csrc's Geom.fold).
FOLDED = ("3d", "slice", "c1", "strided_fold", "big_fold", "few_rows_fold")
# Channels-last layouts whose rows run in tiles (csrc's Geom.tile).
TILED = ("channels_last", "channels_last_3d", "2d_tiled", "big_tiled")
# Small layouts at every dtype; the larger ones (multi-segment, multi-thread) at two.
CASES = [(layout, dtype) for layout in LAYOUTS for dtype in DTYPES] + \
        [(layout, dtype) for layout in BIG for dtype in (torch.float32, torch.float16)]


def _like(x, gen, k):
    """A random element tensor like x (x's memory format), K-batched when k is set."""
    shape = x.shape if k is None else (k, *x.shape)
    t = torch.randn(shape, generator=gen, dtype=torch.float64).to(x.dtype)
    if k is None:
        return torch.empty_like(x).copy_(t)
    return t


def _problem(layout, dtype, k, seed=0, half_weight_fp32=False):
    gen = torch.Generator().manual_seed(seed)
    x = layout_x(layout, gen, dtype)
    c = x.shape[1]
    pdtype = torch.float32 if (dtype in HALF and half_weight_fp32) else dtype
    chan_shape = (c,) if k is None else (k, c)

    def chan(shape=(c,)):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(pdtype)

    weight, bias = chan(), chan()
    mean, var, invstd = reference.statistics(x, 1e-5)
    return dict(x=x, weight=weight, bias=bias, mean=mean, invstd=invstd,
                running_var=var + 0.25,
                grad_y=_like(x, gen, k), x_t=_like(x, gen, k), grad_y_t=_like(x, gen, k),
                gg_x=_like(x, gen, k), weight_t=chan(chan_shape), bias_t=chan(chan_shape))


@pytest.mark.parametrize("act", [None, "relu"])
@pytest.mark.parametrize("layout,dtype", CASES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_matches_reference(native, op, layout, dtype, act):
    ks = (None, 1, 3) if layout not in BIG else (None, 3)
    for k in ks if op in K_OPS else (None,):
        p = _problem(layout, dtype, k, half_weight_fp32=(layout == "nchw"))
        out = _call(cpu, op, p, act)
        ref = _call(reference, op, p, act)
        ref64 = _call(reference, op, _upcast(p), act) if dtype in HALF else ref
        _check(out, ref, ref64, dtype)


@pytest.mark.parametrize("layout", FOLDED)
def test_folding_is_taken_and_unfolded_runs_agree(native, monkeypatch, layout):
    """Folded layouts run as channels-last pass channels; with folding off the NCHW
    passes give the same values (up to summation order)."""
    p = _problem(layout, torch.float64, None)
    assert cpu._plan(p["x"]).fold == p["x"].shape[2:].numel()
    calls = _record_calls(monkeypatch)
    folded = {op: _call(cpu, op, p, "relu") for op in OPS}
    assert {fold for (kernel, _), fold in zip(calls, _folds(calls))
            if kernel != "forward_eval"} == {p["x"].shape[2:].numel()}
    monkeypatch.setattr(cpu, "FOLD_MAX_L", dict.fromkeys(cpu.FOLD_MAX_L, 0))
    monkeypatch.setattr(cpu, "EVAL_FOLD_MAX_L", dict.fromkeys(cpu.EVAL_FOLD_MAX_L, 0))
    assert cpu._plan(p["x"]).fold == 1
    calls.clear()
    unfolded = {op: _call(cpu, op, p, "relu") for op in OPS}
    assert set(_folds(calls)) == {1}   # eval's cached plan too
    for op in OPS:
        for a, b in zip(_tuple(folded[op]), _tuple(unfolded[op])):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", TILED)
def test_tiling_is_taken_and_untiled_runs_agree(native, monkeypatch, layout, dtype):
    """Tiled layouts run several channels-last rows as one; untiled, the passes give the
    same values (up to summation order; eval, which sums nothing, the same bits)."""
    p = _problem(layout, dtype, None, seed=2)
    plan = cpu._plan(p["x"])
    assert plan.tile > 1 and plan.tile * plan.C * p["x"].itemsize <= cpu.TILE_ROW_BYTES
    calls = _record_calls(monkeypatch)
    tiled = {op: _call(cpu, op, p, "relu") for op in OPS}
    assert {tile for (kernel, _), tile in zip(calls, _tiles(calls))
            if kernel != "forward_eval"} == {plan.tile}
    monkeypatch.setattr(cpu, "TILE_ROW_BYTES", 0)
    assert cpu._plan(p["x"]).tile == 1
    calls.clear()
    untiled = {op: _call(cpu, op, p, "relu") for op in OPS}
    assert set(_tiles(calls)) == {1}   # eval's cached plan too
    for op in OPS:
        for a, b in zip(_tuple(tiled[op]), _tuple(untiled[op])):
            if op == "forward_eval":
                assert torch.equal(a, b)
            elif dtype == torch.float64:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
            else:   # both within the kernel tests' bounds; here a loose sanity check
                torch.testing.assert_close(a.double(), b.double(), rtol=0.05, atol=0.05)


def _record_calls(monkeypatch):
    """A list that collects (kernel name, its arguments) for each kernel called from now
    on; the arguments start (dtype code, geom, ...)."""
    calls, extension = [], cpu._C

    class Recording:
        def __getattr__(self, name):
            kernel = getattr(extension, name)
            return lambda *args: calls.append((name, args)) or kernel(*args)

    monkeypatch.setattr(cpu, "_C", Recording())
    return calls


def _folds(calls):
    return [args[1][4] for _, args in calls]


def _tiles(calls):
    return [args[1][5] for _, args in calls]


def _close_to_reference(op, *args):
    """The cpu backend's op against the reference's (float64 arguments)."""
    for got, want in zip(_tuple(getattr(cpu, op)(*args)),
                         _tuple(getattr(reference, op)(*args))):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _channels_last_problem(gen, shape):
    """A float64 channels-last x of `shape`, its weight and bias and its statistics."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last)
    w, b = (torch.randn(shape[1], generator=gen, dtype=x.dtype) for _ in range(2))
    return x, w, b, reference.statistics(x, 1e-5)


def test_tiling_needs_every_element_tensor_and_output_end_to_end(native, monkeypatch):
    """A channels-last x runs untiled where another element tensor's rows do not lie end
    to end, or where torch lays its outputs out otherwise (a 3-D x with C innermost gets
    contiguous outputs)."""
    gen = torch.Generator().manual_seed(4)
    x, w, b, (mean, var, invstd) = _channels_last_problem(gen, (4, 6, 8, 8))
    grad_y = torch.randn(x.shape, generator=gen, dtype=x.dtype)   # contiguous: NCHW
    x3 = torch.randn(4, 64, 6, generator=gen, dtype=x.dtype).transpose(1, 2)
    calls = _record_calls(monkeypatch)
    _close_to_reference("backward", grad_y, x, mean, invstd, w, b)
    _close_to_reference("forward_train", x3, w, b, 1e-5)
    _close_to_reference("forward_eval", x3, mean, var, w, b, 1e-5)
    cpu.forward_train(x, w, b, 1e-5)   # x alone tiles
    assert cpu._plan(x3).tile == 1 and _tiles(calls) == [1, 1, 1, 8]


def test_tiling_takes_k_batched_tensors_and_strides_of_size_one_dims(native, monkeypatch):
    """K-batched element tensors tile where each instance is in x's layout (not where the
    K tensor is contiguous); strides of size-1 dims, on which x and its outputs may
    differ, do not keep eval from tiling."""
    gen = torch.Generator().manual_seed(5)
    x, w, b, (mean, _, invstd) = _channels_last_problem(gen, (4, 6, 8, 8))
    per_instance = torch.stack([torch.randn(x.shape, generator=gen, dtype=x.dtype)
                                .contiguous(memory_format=torch.channels_last)
                                for _ in range(3)])
    contiguous = torch.randn((3, *x.shape), generator=gen, dtype=x.dtype)
    # Strides (16, 1, 16, 16) (torch's channels-last gives (16, 1, 1, 1)): contiguous, so
    # its outputs get (16, 1, 1, 1)
    x1, w1, b1, (mean1, var1, _) = _channels_last_problem(gen, (64, 16, 1, 1))
    x1 = x1.view(64, 1, 1, 16).permute(0, 3, 1, 2)
    assert x1.stride() == (16, 1, 16, 16) and x1.is_contiguous()
    calls = _record_calls(monkeypatch)
    for grad_y in (per_instance, contiguous):
        _close_to_reference("backward", grad_y, x, mean, invstd, w, b)
    _close_to_reference("forward_train", x1, w1, b1, 1e-5)
    _close_to_reference("forward_eval", x1, mean1, var1, w1, b1, 1e-5)
    assert _tiles(calls) == [8, 1, 4, 4]


def test_tiling_takes_a_channels_last_x_that_is_not_dense(native, monkeypatch):
    """Every second sample of a channels-last x: each sample's rows lie end to end, and
    so do those of its outputs (dense, channels-last), so every op tiles."""
    gen = torch.Generator().manual_seed(6)
    x, w, b, _ = _channels_last_problem(gen, (8, 6, 8, 8))
    x = x[::2]
    mean, var, invstd = reference.statistics(x, 1e-5)   # of the samples kept
    grad_y = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    grad_y = grad_y.contiguous(memory_format=torch.channels_last)
    calls = _record_calls(monkeypatch)
    _close_to_reference("forward_train", x, w, b, 1e-5)
    _close_to_reference("forward_eval", x, mean, var, w, b, 1e-5)
    _close_to_reference("backward", grad_y, x, mean, invstd, w, b)
    _close_to_reference("backward", grad_y[None].expand(3, *x.shape), x, mean, invstd, w, b)
    assert _tiles(calls) == [8, 8, 8, 8]


@pytest.mark.parametrize("layout", SIZES)
def test_planned_outputs_are_in_the_view_of_the_outputs_made(native, layout):
    """A call's plan has its element outputs' strides (in its folded or tiled view): those
    of the tensors `_empty` makes, which as element arguments of the call would plan the
    same geometry."""
    for k in (None, 3):
        p = _problem(layout, torch.float32, k)
        plan = cpu._plan(p["x"], (p["grad_y"],))
        out = cpu._empty(p["x"], plan)
        with_out = cpu._plan(p["x"], (p["grad_y"], out))
        assert with_out.geom == plan.geom and with_out.inputs[2] == plan.out, (k, out.stride())


@pytest.mark.parametrize("shape, reductions, evaluation", [
    ((8, 64, 5, 5), 25, 25), ((2, 64, 3, 5), 15, 1), ((2, 64, 4, 4), 1, 1),
    ((2, 64, 5, 5), 1, 1), ((2, 64, 7, 7), 1, 1)], ids=str)
def test_fewer_than_8_rows_fold_only_short_runs_and_never_for_eval(native, monkeypatch, shape,
                                                                   reductions, evaluation):
    """With few rows the copies that folding makes weigh as much as the rows."""
    x, c = torch.randn(shape), shape[1]
    calls = _record_calls(monkeypatch)
    ones, zeros = torch.ones(c), torch.zeros(c)
    _, mean, invstd = cpu.forward_train(x, ones, zeros, 1e-5)
    cpu.backward(x, x, mean, invstd, ones, zeros)
    cpu.forward_eval(x, zeros, ones, ones, zeros, 1e-5)
    assert _folds(calls) == [reductions, reductions, evaluation]


@pytest.mark.parametrize("dtype, shape, reductions, evaluation", [
    (torch.float16, (8, 16, 7, 8), 56, 1), (torch.bfloat16, (8, 16, 4, 8), 32, 32),
    (torch.bfloat16, (8, 16, 8, 8), 1, 1), (torch.float32, (8, 16, 5, 9), 45, 1),
    (torch.float32, (8, 16, 7, 7), 1, 1), (torch.float64, (8, 16, 5, 9), 45, 45)], ids=str)
def test_fold_limit_depends_on_element_size(native, monkeypatch, dtype, shape, reductions,
                                            evaluation):
    """2-byte types pay a conversion per NCHW run and fold longer runs than float32; the
    eval of both folds only to 32 values."""
    x, c = torch.randn(shape).to(dtype), shape[1]
    calls = _record_calls(monkeypatch)
    acc = reference.acc_dtype(dtype)
    ones, zeros = torch.ones(c, dtype=acc), torch.zeros(c, dtype=acc)
    cpu.forward_train(x, ones, zeros, 1e-5)
    cpu.forward_eval(x, zeros, ones, ones, zeros, 1e-5)
    assert _folds(calls) == [reductions, evaluation]


@pytest.mark.parametrize("shape", [(4, 20000, 3), (64, 300, 4, 5)], ids=str)
def test_channels_last_threads_sum_their_channel_spans(native, num_threads, shape):
    """With few rows a thread's channels-last tasks reach a span of the channels, one
    channel possibly split between two threads' spans (4 threads here)."""
    num_threads(4)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    c = shape[1]
    w, b = torch.randn(c, generator=gen, dtype=x.dtype), torch.randn(c, generator=gen,
                                                                     dtype=x.dtype)
    for got, want in zip(cpu.forward_train(x, w, b, 1e-5),
                         reference.forward_train(x, w, b, 1e-5)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    mean, _, invstd = reference.statistics(x, 1e-5)
    grad_y = torch.randn((3, *shape), generator=gen, dtype=x.dtype)
    for got, want in zip(cpu.backward(grad_y, x, mean, invstd, w, b),
                         reference.backward(grad_y, x, mean, invstd, w, b)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.fixture
def stream_min_bytes():
    """Sets the output size from which the kernels stream (non-temporal stores)."""
    previous = cpu._C.set_stream_min_bytes(-1)
    yield cpu._C.set_stream_min_bytes
    cpu._C.set_stream_min_bytes(previous)


@pytest.mark.parametrize("layout", LAYOUTS + BIG)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_streamed_outputs_same_bits(native, stream_min_bytes, op, layout, dtype):
    """Outputs staged and written with non-temporal stores (forced here for every size)
    equal the plain stores' bits: runs that start and end mid-line, short runs, K forms."""
    for k in (None, 3) if op in K_OPS else (None,):
        p = _problem(layout, dtype, k, seed=5)
        stream_min_bytes(1 << 62)
        plain = _tuple(_call(cpu, op, p, "relu"))
        stream_min_bytes(0)
        streamed = _tuple(_call(cpu, op, p, "relu"))
        for a, b in zip(plain, streamed):
            assert (a is None and b is None) or torch.equal(a, b)


@pytest.fixture
def fuse_max_bytes():
    """Sets the input bytes an NCHW block may hold for its two passes to run back to back."""
    previous = cpu._C.set_fuse_max_bytes(-1)
    yield cpu._C.set_fuse_max_bytes
    cpu._C.set_fuse_max_bytes(previous)


FUSED = ("nchw", "strided_l", "short_runs", "big_nchw", "many_rows", "wide_c", "long_rows",
         "threaded")
WIDE = ("big_nchw", "long_rows", "threaded")   # rows long enough for blocks per thread


@pytest.mark.parametrize("layout", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_fused_passes_same_bits(native, num_threads, fuse_max_bytes, op, layout, dtype):
    """NCHW channel blocks whose two passes run back to back give the bits of the whole
    passes: one block (one thread), one per thread, and blocks of a few channels. K forms
    run whole."""
    for k in (None, 3) if op in K_OPS else (None,):
        p = _problem(layout, dtype, k, seed=6)
        plan = cpu._plan(p["x"])
        per_value = 8 * p["x"].element_size() * (k or 1)   # more than any kernel reads
        few = -(-cpu._C.FUSE_MIN_RUN // plan.L)               # channels per narrowest block
        fuse_max_bytes(0)
        whole = _tuple(_call(cpu, op, p, "relu"))
        narrow = plan.N * plan.L * per_value * few
        for nth, budget in ((1, 1 << 40), (2, 1 << 40), (2, narrow)):
            num_threads(nth)
            fuse_max_bytes(budget)
            blocks = cpu._C.fused_block(plan.geom, nth, k or 1, per_value)
            assert blocks == 0 if k else blocks >= 1 or (nth > 1 and layout not in WIDE)
            for a, b in zip(whole, _tuple(_call(cpu, op, p, "relu"))):
                assert (a is None and b is None) or torch.equal(a, b)


def test_a_channel_beyond_the_budget_is_a_block_of_its_own_up_to_its_limit(native,
                                                                          fuse_max_bytes):
    plan = cpu._plan(torch.empty(32, 8, 64, 64))
    per_channel = 32 * 64 * 64 * 4   # float32 x alone
    limit = cpu._C.ONE_CHANNEL_FUSE
    for budget, block in ((per_channel * 2, 2), (per_channel, 1),
                          (math.ceil(per_channel / limit), 1),
                          (math.floor(per_channel / limit) - 1, 0)):
        fuse_max_bytes(budget)
        assert cpu._C.fused_block(plan.geom, 2, 1, 4) == block, budget


def test_fused_statistics_move_a_far_pivot_per_block(native, fuse_max_bytes):
    """A channel whose first values are outliers repeats its block's statistics pass; the
    other blocks do not, and all match the whole passes bit for bit."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(128, 4, 32, 32, generator=gen)
    # Channel 1's pivot, the mean of its first 64 values, lands 1e5 / 64 from 0, beyond
    # 4 standard deviations (1e5 / sqrt(131072) each) of its mean.
    x[0, 1, 0, 0] = 1e5
    w, b = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    fuse_max_bytes(0)
    whole = cpu.forward_train(x, w, b, 1e-5)
    fuse_max_bytes(128 * 32 * 32 * 4)        # one channel per block
    assert cpu._C.fused_block(cpu._plan(x).geom, torch.get_num_threads(), 1, 4) == 1
    for a, b in zip(whole, cpu.forward_train(x, w, b, 1e-5)):
        assert torch.equal(a, b)
    torch.testing.assert_close(whole[1], x.double().mean((0, 2, 3)).float())


@pytest.mark.parametrize("shape", [(24, 8192), (24, 4096, 2, 2)], ids=("rows", "folded"))
def test_many_channels_finish_their_statistics_in_ranges(native, num_threads, shape):
    """From 4096 channels the per-channel step runs in one range per thread: a range
    whose pivots land far (its channels' first values are outliers: 4.8 standard
    deviations) repeats the statistics pass and finishes again, the others finish once;
    each running statistic moves once. (2-D rows: the pivot is row 0; folded: row 0's
    four values.)"""
    num_threads(2)
    gen = torch.Generator().manual_seed(14)
    x64 = torch.randn(shape, generator=gen, dtype=torch.float64)
    c = shape[1]
    x64[0, c // 2:] = 1e4
    x = x64.float()
    assert cpu._plan(x).geom[4] == (1 if len(shape) == 2 else 4)
    w, b = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    running_mean, running_var = torch.zeros(c), torch.ones(c)
    y, mean, invstd = cpu.forward_train(x, w, b, 1e-5, None, running_mean, running_var,
                                        0.1)
    y64, mean64, invstd64 = reference.forward_train(x64, w.double(), b.double(), 1e-5)
    dims = [0, *range(2, x.dim())]
    unbiased64 = x64.var(dims, unbiased=True)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=1e-6)
    # (float32 lanes: the statistics of a few dozen values lose a few ulps)
    torch.testing.assert_close(invstd.double(), invstd64, rtol=4e-6, atol=0)
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=1e-4)
    torch.testing.assert_close(running_mean.double(), 0.1 * mean64, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(running_var.double(), 0.9 + 0.1 * unbiased64, rtol=1e-6,
                               atol=0)


def test_fuse_size_from_the_environment():
    import os
    import subprocess
    import sys
    code = "from fastbn import _C; print(_C.fuse_max_bytes(), _C.build_info())"
    env = {**os.environ, "FASTBN_FUSE_MAX_BYTES": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.startswith("0 ") and "blocks of up to 0 input bytes" in out.stdout
    previous = cpu._C.set_fuse_max_bytes(4096)
    try:
        assert cpu._C.fuse_max_bytes() == 4096
    finally:
        cpu._C.set_fuse_max_bytes(previous)


def test_stream_size_from_the_environment():
    import os
    import subprocess
    import sys
    code = "from fastbn import _C; print(_C.stream_min_bytes())"
    env = {**os.environ, "FASTBN_STREAM_MIN_BYTES": "5000000"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "5000000"
    previous = cpu._C.set_stream_min_bytes(123)
    try:
        assert cpu._C.stream_min_bytes() == 123
    finally:
        cpu._C.set_stream_min_bytes(previous)


@pytest.mark.parametrize("layout", ("nchw", "channels_last", "2d"))
@pytest.mark.parametrize("k", (None, 3))
@pytest.mark.parametrize("op", K_OPS[1:])
def test_absent_tangents(native, op, layout, k):
    """Every pattern of None tangents/cotangents (None = zero)."""
    names = {"forward_jvp": ("x_t", "weight_t", "bias_t"),
             "backward_backward": ("gg_x", "weight_t", "bias_t"),
             "backward_jvp": ("grad_y_t", "x_t", "weight_t", "bias_t")}[op]
    base = _problem(layout, torch.float64, k)
    for mask in range(1, 2 ** len(names)):
        p = dict(base)
        for i, key in enumerate(names):
            if mask >> i & 1:
                p[key] = None
        if op == "forward_jvp" and all(p[key] is None for key in names):
            continue  # all-zero tangents: answered by the reference (zeros_like)
        for act in (None, "relu"):
            _check(_call(cpu, op, p, act), _call(reference, op, p, act),
                   _call(reference, op, p, act), torch.float64)


@pytest.mark.parametrize("layout", ("nchw", "channels_last", "2d"))
@pytest.mark.parametrize("k", (None, 3))
@pytest.mark.parametrize("op,where", NON_FINITE_CASES)
def test_absent_tangents_with_a_non_finite_input(native, op, where, layout, k):
    check_absent_with_non_finite(cpu, op, _problem(layout, torch.float64, k), where)


# The first output's RMS error over the reference's, measured over 15 seeds, K None and 3,
# with and without ReLU, on each op's layouts below. Centred inputs: at most 1.25
# (backward), 0.63 (forward_jvp), 0.65 (backward_backward), 0.46 (backward_jvp). Folded
# into one per-channel constant, they reached 1.7-2.5, 1.0-1.3 and 1.0-1.6; with the raw
# products of two offset inputs summed (gg_x grad_y, x_t grad_y), backward_backward and
# backward_jvp reached 1.35 and 2.3 (their other outputs 2.3) on big_cl: float lanes
# summing a channel's 60 raw products of about 1e6 round each addition by up to 2, in all
# as much as the centred sum they keep (RMS about 8).
FIRST_BOUND = {"backward": 1.5, "forward_jvp": 0.8, "backward_backward": 0.8,
               "backward_jvp": 0.7}
OFFSET_CASES = ([(op, layout) for op in K_OPS for layout in ("threaded", "big_fold",
                                                             "big_tiled")]
                + [(op, "big_cl") for op in ("backward_backward", "backward_jvp")])


@pytest.mark.parametrize("k", (None, 3))
@pytest.mark.parametrize("op,layout", OFFSET_CASES)
def test_tangents_with_a_large_common_part(native, op, layout, k):
    for seed in range(3):
        for act in (None, "relu"):
            check_offset_tangents(cpu, op, _problem(layout, torch.float32, k, seed), act,
                                  FIRST_BOUND[op])


# Per-channel outputs (sums over a channel's values): RMS error over the reference's,
# pooled over 12 seeds, K None and 3, with and without ReLU, on long NCHW channels. The
# float lanes go to double every RUN / W = 32 values a lane: at most 1.64 here (with 128
# values a lane, up to 2.52). The reference's own error is mostly its outputs' rounding
# to float32, so over 6 seeds (18 values a case) one case's ratio went from 1.36 to 2.22
# when the problems' statistics changed by their rounding; over 18 seeds it is at 1.44.
PER_CHANNEL_OUTPUTS = {"backward": (1, 2), "backward_backward": (2,), "backward_jvp": (1, 2)}


@pytest.mark.parametrize("layout", ("many_rows", "long_rows", "offset", "big_nchw"))
@pytest.mark.parametrize("op", tuple(PER_CHANNEL_OUTPUTS))
def test_per_channel_sums_of_long_nchw_channels(native, op, layout):
    for k in (None, 3):
        for act in (None, "relu"):
            err = torch.zeros(3, dtype=torch.float64)
            own = torch.zeros(3, dtype=torch.float64)
            for seed in range(12):
                p = _problem(layout, torch.float32, k, seed)
                out = _call(cpu, op, p, act)
                ref = _call(reference, op, p, act)
                ref64 = _call(reference, op, _upcast(p), act)
                for i in PER_CHANNEL_OUTPUTS[op]:
                    err[i] += (out[i].double() - ref64[i]).square().sum()
                    own[i] += (ref[i].double() - ref64[i]).square().sum()
            for i in PER_CHANNEL_OUTPUTS[op]:
                assert err[i] <= 1.8 ** 2 * own[i], (k, act, i, (err[i] / own[i]).sqrt())


@pytest.mark.parametrize("layout", ("nchw", "channels_last", "2d", "big_fold", "big_tiled",
                                    "strided_fold", "big_cl"))
@pytest.mark.parametrize("k", (None, 3))
@pytest.mark.parametrize("op", K_OPS)
def test_statistics_as_given(native, op, layout, k):
    for act in (None, "relu"):
        check_statistics_as_given(cpu, op, _problem(layout, torch.float64, k), act)


@pytest.mark.parametrize("op", K_OPS)
def test_mixed_k(native, op):
    """Batched per-channel tangents with an unbatched element argument, and vice versa."""
    batched = _problem("channels_last", torch.float64, 3, seed=1)
    plain = _problem("channels_last", torch.float64, None, seed=1)
    for swap in (("grad_y", "x_t"), ("weight_t", "bias_t", "grad_y_t", "gg_x")):
        p = dict(batched)
        for key in swap:
            p[key] = plain[key]
        for act in (None, "relu"):
            _check(_call(cpu, op, p, act), _call(reference, op, p, act),
                   _call(reference, op, p, act), torch.float64)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
def test_large_offset_statistics(native, layout, dtype):
    """x = 1e4 + N(0, 1): statistics against float64 math on the same values."""
    gen = torch.Generator().manual_seed(3)
    x = (1e4 + torch.randn(16, 5, 9, 13, generator=gen, dtype=torch.float64)).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(5, dtype=dtype) + 0.5, torch.randn(5, dtype=dtype)
    y, mean, invstd = cpu.forward_train(x, w, b, 1e-5)
    y64, mean64, invstd64 = reference.forward_train(x.double(), w.double(), b.double(), 1e-5)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(mean.double(), mean64, rtol=tol, atol=0)
    torch.testing.assert_close(invstd.double(), invstd64, rtol=100 * tol, atol=0)
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=1e-9 if tol < 1e-9 else 2e-3)


@pytest.mark.parametrize("layout", ("nchw", "channels_last", "short_rows"))
@pytest.mark.parametrize("data", ("outlier", "padded"))
def test_statistics_when_the_channel_starts_far_from_its_mean(native, layout, data):
    """The one-pass statistics shift x by a pivot taken from the channel's start; an
    outlier there (or a zero-padded corner of otherwise narrow data) must not cost the
    variance its float32 precision. Short rows: the pivot sample is two values."""
    gen = torch.Generator().manual_seed(12)
    shape = (50000, 5, 2, 1) if layout == "short_rows" else (16, 5, 9, 13)
    x64 = torch.randn(shape, generator=gen, dtype=torch.float64)
    if data == "outlier":
        x64[0, :, 0, 0] = 300.0 if layout == "short_rows" else 100.0
    else:
        x64 = 0.5 + 0.005 * x64
        x64[0, :, :2, :2] = 0.0
    x = x64.float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(5) + 0.5, torch.randn(5)
    _, mean, invstd = cpu.forward_train(x, w, b, 1e-5)
    _, mean64, invstd64 = reference.forward_train(x.double(), w.double(), b.double(), 1e-5)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(invstd.double(), invstd64, rtol=1e-6, atol=0)


@pytest.mark.parametrize("eps", (0.0, 1e-3, 0.5, 10.0))
@pytest.mark.parametrize("layout", ("nchw", "channels_last", "2d", "strided_fold"))
@pytest.mark.parametrize("act", (None, "relu"))
def test_forward_with_other_eps_and_momentum(native, layout, eps, act):
    """The forward kernels against the reference at eps values other than the suite's
    1e-5, with running statistics (momentum 0.3) in training."""
    x = layout_x(layout, torch.Generator().manual_seed(21), torch.float64)
    c = x.shape[1]
    gen = torch.Generator().manual_seed(22)
    w, b, rm = (torch.randn(c, generator=gen, dtype=torch.float64) for _ in range(3))
    rv = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    got_running, want_running = (rm.clone(), rv.clone()), (rm.clone(), rv.clone())
    got = cpu.forward_train(x, w, b, eps, act, *got_running, 0.3)
    want = reference.forward_train(x, w, b, eps, act, *want_running, 0.3)
    for g, v in zip((*got, *got_running), (*want, *want_running)):
        torch.testing.assert_close(g, v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cpu.forward_eval(x, rm, rv, w, b, eps, act),
                               reference.forward_eval(x, rm, rv, w, b, eps, act),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ("nchw", "channels_last", "2d"))
def test_non_finite_values_propagate_as_in_torch(native, layout):
    check_non_finite_forward(cpu, layout_x(layout, torch.Generator().manual_seed(13),
                                           torch.float32))


def test_zero_tensors_and_batched_statistics_fall_back():
    """Inputs the kernels cannot read go to the reference: autograd's ZeroTensor (no
    memory behind it) and per-problem (K, C) statistics or weights (the kernels read one
    value per channel)."""
    p = _problem("nchw", torch.float64, None)
    x, w, b, mean, invstd = (p[k] for k in ("x", "weight", "bias", "mean", "invstd"))
    zero = torch._efficientzerotensor(x.shape, dtype=x.dtype)
    for got, want in zip(cpu.forward_train(zero, w, b, 1e-5),
                         reference.forward_train(torch.zeros_like(x), w, b, 1e-5)):
        torch.testing.assert_close(got, want)
    for got, want in zip(cpu.backward(zero, x, mean, invstd, w, b),
                         reference.backward(torch.zeros_like(x), x, mean, invstd, w, b)):
        torch.testing.assert_close(got, want)
    k_weight = torch.stack([w, 2 * w])
    grad_y = torch.stack([p["grad_y"], p["x_t"]])
    for got, want in zip(cpu.backward(grad_y, x, mean, invstd, k_weight, b),
                         reference.backward(grad_y, x, mean, invstd, k_weight, b)):
        torch.testing.assert_close(got, want)


def _misaligned(t):
    """A copy of t at an address that is not a multiple of its element size."""
    out = torch.frombuffer(bytearray(t.numel() * t.element_size() + 1), dtype=t.dtype,
                           offset=1).view(t.shape)
    assert out.data_ptr() % t.element_size()
    return out.copy_(t)


def test_misaligned_tensors_fall_back(monkeypatch):
    """The kernels read through typed pointers: an address that is not a multiple of the
    element size (a torch.frombuffer view at an odd offset) goes to the reference."""
    x = _misaligned(torch.randn(4, 3, 2))
    monkeypatch.setattr(cpu._C, "forward_train", None)   # a kernel call would fail
    w, b = torch.ones(3), torch.zeros(3)
    for got, want in zip(cpu.forward_train(x, w, b, 1e-5), reference.forward_train(x, w, b,
                                                                                   1e-5)):
        torch.testing.assert_close(got, want)


_UNREADABLE = {"negative view": lambda t: torch._neg_view(-t), "misaligned": _misaligned,
               "zero tensor": lambda t: torch._efficientzerotensor(t.shape, dtype=t.dtype)}


@pytest.mark.parametrize("kind", _UNREADABLE)
@pytest.mark.parametrize("argument", range(5), ids=("x", "running_mean", "running_var",
                                                    "weight", "bias"))
def test_eval_falls_back_on_tensors_the_kernel_cannot_read(monkeypatch, argument, kind):
    """forward_eval plans on its own (not through _plan): each argument that the kernel
    cannot read through its address goes to the reference, with its values."""
    args = [torch.randn(4, 3, 5), torch.randn(3), torch.rand(3) + 0.5, torch.randn(3),
            torch.randn(3)]
    args[argument] = _UNREADABLE[kind](args[argument])
    monkeypatch.setattr(cpu._C, "forward_eval", None)   # a kernel call would fail
    # The same values in plain memory. Compared to rounding, not bits: with plain tensors
    # the reference runs torch's native kernel, with a ZeroTensor its PyTorch ops.
    dense = [t.clone() for t in args]
    torch.testing.assert_close(cpu.forward_eval(*args, 1e-5),
                               reference.forward_eval(*dense, 1e-5))


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.float8_e4m3fn,
                                   torch.int32], ids=str)
def test_eval_of_a_dtype_without_kernels_is_the_references_call(dtype):
    """Whatever the element size (a 1-byte dtype failed a lookup by size, KeyError)."""
    x = torch.zeros(4, 3, 5).to(dtype)
    args = (torch.zeros(3), torch.ones(3), torch.ones(3), torch.zeros(3), 1e-5)
    errors = []
    for backend in (cpu, reference):
        with pytest.raises((RuntimeError, NotImplementedError)) as info:
            backend.forward_eval(x, *args)
        errors.append((info.type, str(info.value)))
    assert errors[0] == errors[1]


def test_million_elements_per_channel(native):
    gen = torch.Generator().manual_seed(4)
    x = 1e3 + torch.randn(4, 2, 512, 512, generator=gen)
    w, b = torch.tensor([1.5, -0.5]), torch.tensor([0.1, 0.2])
    y, mean, invstd = cpu.forward_train(x, w, b, 1e-5)
    x64 = x.double()
    _, mean64, invstd64 = reference.forward_train(x64, w.double(), b.double(), 1e-5)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-7, atol=0)
    torch.testing.assert_close(invstd.double(), invstd64, rtol=1e-5, atol=0)
    dy = torch.randn(x.shape, generator=gen)
    gx, gw, gb = cpu.backward(dy, x, mean, invstd, w, b)
    gx64, gw64, gb64 = reference.backward(dy.double(), x64, mean.double(), invstd.double(),
                                          w.double(), b.double())
    torch.testing.assert_close(gb.double(), gb64, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(gw.double(), gw64, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(gx.double(), gx64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("x_dtype,running_dtype,strided", [
    (torch.float32, torch.float32, False), (torch.float32, torch.float64, False),
    (torch.float32, torch.bfloat16, False), (torch.float32, torch.float32, True),
    (torch.float64, torch.float64, False), (torch.bfloat16, torch.float32, False),
    (torch.float16, torch.float32, False), (torch.bfloat16, torch.bfloat16, False),
    (torch.float16, torch.float16, False), (torch.float16, torch.float16, True)], ids=str)
def test_running_stats(native, x_dtype, running_dtype, strided):
    """In the kernel (accumulation dtype, or x's with parameters of x's: a half layer's,
    contiguous) or after it (any other buffer)."""
    p = _problem("channels_last", x_dtype, None, half_weight_fp32=running_dtype != x_dtype)
    c = p["x"].shape[1]

    def buffers():
        gen = torch.Generator().manual_seed(2)
        base = torch.randn(2, 2 * c, generator=gen, dtype=torch.float64).to(running_dtype)
        pair = (base[0, ::2], base[1, ::2].abs() + 0.5) if strided else \
            (base[0, :c].clone(), base[1, :c].abs() + 0.5)
        return tuple(t.clone() if not strided else t for t in pair)

    got, want = buffers(), buffers()
    versions = [t._version for t in got]
    cpu.forward_train(p["x"], p["weight"], p["bias"], 1e-5, None, *got, 0.1)
    reference.forward_train(p["x"].double(), p["weight"].double(), p["bias"].double(), 1e-5,
                            None, *want, 0.1)
    tol = 1e-12 if x_dtype == torch.float64 else \
        {torch.bfloat16: 1e-2, torch.float16: 1e-3}.get(running_dtype, 1e-5)
    for g, w, v in zip(got, want, versions):
        assert g.dtype == running_dtype and g._version > v   # autograd sees the update
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("layout", ("nchw", "channels_last", "big_fold"))
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_parameters_read_as_they_are(native, monkeypatch, layout, dtype):
    """A half layer's parameters and buffers go to the forward kernels as they are
    (`stats_in_t`), and give the bits of the same values in float32, the buffers blended
    in float and rounded once (as the float32 parameters' update after the kernel)."""
    p = _problem(layout, dtype, None)
    x = p["x"]
    stats = [t.to(dtype) for t in (p["mean"], p["running_var"], p["weight"], p["bias"])]
    as_float = [t.float() for t in stats]
    calls = _record_calls(monkeypatch)
    torch.testing.assert_close(cpu.forward_eval(x, *stats, 1e-5, "relu"),
                               cpu.forward_eval(x, *as_float, 1e-5, "relu"), rtol=0, atol=0)
    start = [torch.zeros_like(stats[0]), torch.ones_like(stats[1])]
    running, running_of_float = [t.clone() for t in start], [t.clone() for t in start]
    for a, b in zip(cpu.forward_train(x, *stats[2:], 1e-5, "relu", *running, 0.1),
                    cpu.forward_train(x, *as_float[2:], 1e-5, "relu", *running_of_float, 0.1)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b, before in zip(running, running_of_float, start):
        assert a.dtype == dtype and torch.equal(a, b) and not torch.equal(a, before)
    # stats_in_t: argument 9 of forward_eval, 7 of forward_train (after code, geom, nth,
    # x, y and the per-channel pointers).
    flags = [args[9] if name == "forward_eval" else args[7] for name, args in calls]
    assert flags == [True, False, True, False]


@pytest.mark.parametrize("layout", ("nchw", "channels_last", "big_fold"))
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_parameters_and_their_gradients_in_the_derivative_kernels(native, monkeypatch,
                                                                       layout, dtype):
    """A half layer's parameters and per-channel tangents go to the derivative kernels as
    they are, and its parameter gradients come out of them (`params_in_t`): the bits of
    the same values in float32, each per-channel output rounded once."""
    for op in K_OPS:
        for k in (None, 3):
            p = _problem(layout, dtype, k)
            as_float = {**p, **{name: p[name].float() for name in
                                ("weight", "bias", "weight_t", "bias_t")}}
            calls = _record_calls(monkeypatch)
            got = _tuple(_call(cpu, op, p, "relu"))
            want = _tuple(_call(cpu, op, as_float, "relu"))
            for g, w in zip(got, want):
                assert g.dtype == dtype and torch.equal(g, w.to(dtype)), (op, k)
            flags = [[a for a in args[5:] if isinstance(a, bool)] for _, args in calls]
            assert flags == [[True], [False]], (op, k)


@pytest.mark.parametrize("layout", BIG)
def test_bitwise_deterministic(native, num_threads, layout):
    num_threads(2)
    for op in OPS:
        for k in (3,) if op in K_OPS else (None,):
            p = _problem(layout, torch.float32, k, seed=5)
            first, second = _call(cpu, op, p, "relu"), _call(cpu, op, p, "relu")
            for a, b in zip(_tuple(first), _tuple(second)):
                assert torch.equal(a, b), op


@pytest.mark.parametrize("layout", ("big_nchw", "many_rows", "wide_c"))
def test_nchw_thread_count_invariant(native, num_threads, layout):
    """NCHW sums are combined per fixed work unit, so the bits do not depend on threads."""
    for op in OPS:
        for k in (3,) if op in K_OPS else (None,):
            p = _problem(layout, torch.float32, k, seed=7)
            num_threads(1)
            one = _call(cpu, op, p, "relu")
            num_threads(2)
            two = _call(cpu, op, p, "relu")
            for a, b in zip(_tuple(one), _tuple(two)):
                assert torch.equal(a, b), op


def test_output_memory_format(native):
    p = _problem("channels_last", torch.float32, 3)
    y, _, _ = cpu.forward_train(p["x"], p["weight"], p["bias"], 1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    gx, _, _ = _call(cpu, "backward", p, None)
    assert gx[0].is_contiguous(memory_format=torch.channels_last)


def test_fallbacks_agree():
    """Cases the kernels do not take still give the reference answer."""
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(3, 4, 5, 8, generator=gen, dtype=torch.float64)
    x = base[..., :6]  # spatial dims that do not flatten to one stride
    w, b = torch.rand(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    for got, want in zip(cpu.forward_train(x, w, b, 1e-5), reference.forward_train(x, w, b, 1e-5)):
        torch.testing.assert_close(got, want)
    mean, _, invstd = reference.statistics(x, 1e-5)
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float32)  # dtype differs from x
    for got, want in zip(cpu.backward(dy, x, mean, invstd, w, b),
                         reference.backward(dy, x, mean, invstd, w, b)):
        torch.testing.assert_close(got, want)
    assert torch.equal(cpu.forward_jvp(None, None, None, x, mean, invstd, w, b),
                       torch.zeros_like(x))


_POOL_SCRIPT = """
import sys, torch
from fastbn import _C
from tests.backends import test_cpu_kernels as t
torch.set_num_threads(2)
out = {"threading": _C.threading()}
for layout in t.BIG + ("threaded",):
    for op in t.OPS:
        k = 3 if op in t.K_OPS else None
        out[layout, op] = t._tuple(t._call(t.cpu, op, t._problem(layout, torch.float32, k, seed=8),
                                           "relu"))
torch.save(out, sys.argv[1])
"""


def test_own_pool_matches_openmp_team(tmp_path):
    """The kernels run on torch's OpenMP team where the runtime exports it, else on their
    own pool (FASTBN_CPU_POOL=own forces it): the same shares, so the same bits."""
    import os
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parents[2]
    results = {}
    for pool in ("own", "openmp"):
        path = tmp_path / f"{pool}.pt"
        env = dict(os.environ, FASTBN_CPU_POOL=pool, PYTHONPATH=str(root))
        subprocess.run([sys.executable, "-c", _POOL_SCRIPT, str(path)], check=True, env=env,
                       cwd=root, timeout=300)
        results[pool] = torch.load(path)
    assert results["own"].pop("threading") == "own pool"
    if results["openmp"].pop("threading") != "torch's OpenMP team":
        pytest.skip("torch's OpenMP runtime does not export GOMP_parallel")
    for key, outs in results["own"].items():
        for a, b in zip(outs, results["openmp"][key]):
            assert torch.equal(a, b), key


_FORK_SCRIPT = """
import os, torch
from tests.backends import test_cpu_kernels as t
torch.set_num_threads(2)
p = t._problem("threaded", torch.float32, None, seed=9)
before = t._call(t.cpu, "forward_train", p, None)
pid = os.fork()
if pid == 0:   # torch's own multi-threaded ops hang in a forked child: compare on one
    after = t._call(t.cpu, "forward_train", p, None)
    torch.set_num_threads(1)
    os._exit(0 if all(torch.equal(a, b) for a, b in zip(before, after)) else 1)
_, status = os.waitpid(pid, 0)
raise SystemExit(os.waitstatus_to_exitcode(status))
"""


def test_kernels_run_in_a_forked_child():
    """A child forked after the kernels ran on torch's OpenMP team runs them on a fresh
    pool of its own, with the same bits."""
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], cwd=root, timeout=120,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("op", K_OPS)
@pytest.mark.parametrize("size, shape, stride", [
    (200, (3, 2, 2, 5), (2, 0, 5, 1)),   # N's stride between the spatial dims' strides
    (64, (8, 3, 4), (1, 4, 1)),          # folded runs, x's order puts C outside N
])
def test_k_batched_outputs_of_an_x_that_overlaps_itself(native, op, size, shape, stride):
    """An as_strided or expanded x: K-batched outputs in x's order would not flatten (or
    fold); they are laid out contiguously instead."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(size, generator=gen, dtype=torch.float64).as_strided(shape, stride)
    c, k = shape[1], 3

    def rand(*dims):
        return torch.randn(dims, generator=gen, dtype=torch.float64)

    mean, var, invstd = reference.statistics(x, 1e-5)
    p = dict(x=x, weight=rand(c), bias=rand(c), mean=mean, invstd=invstd,
             running_var=var + 0.25, grad_y=rand(k, *shape), x_t=rand(k, *shape),
             grad_y_t=rand(k, *shape), gg_x=rand(k, *shape), weight_t=rand(k, c),
             bias_t=rand(k, c))
    for act in (None, "relu"):
        ref = _call(reference, op, p, act)
        _check(_call(cpu, op, p, act), ref, ref, torch.float64)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_every_half_value_converts_exactly(native, dtype):
    """Each 16-bit pattern through y = (x - 0) * 1 + 0 comes back as it went in (bar -0,
    which + 0 makes +0, and NaN payloads); through y = x * w + 0 (w not a power of two)
    it rounds as torch's conversion of the same float, to nearest, ties to even.
    A variance of 0 and eps = 1 keep the scale exactly w."""
    bits = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype).reshape(1, 1, -1)
    zero = torch.zeros(1)
    nan = torch.isnan(x)
    y = cpu.forward_eval(x, zero, zero, torch.ones(1), zero, 1.0)
    kept = ~nan & (bits.reshape(x.shape) != -2 ** 15)
    assert torch.equal(y[kept].view(torch.int16), x[kept].view(torch.int16))
    assert torch.isnan(y[nan]).all()
    w = torch.tensor([1.2345678])
    y = cpu.forward_eval(x, zero, zero, w, zero, 1.0)
    expected = (x.float() * w + 0.0).to(dtype)
    assert torch.equal(y[~nan].view(torch.int16), expected[~nan].view(torch.int16))


# Run lengths around the float16 conversions' vectors (8 and 16 values), the 2-byte runs
# an elementwise pass takes a row at a time (up to 255: AffineMap::short_run), the staged
# output runs (MAP_RUN = 1024) and the reduction's runs (RUN = 1024).
_RUN_LENGTHS = (*range(1, 36), 47, 100, 196, 255, 256, 1023, 1025, 2049)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "tiled"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_half_kernels_are_float32_kernels_rounded_once(native, stream_min_bytes, op, dtype,
                                                       layout):
    """A half-precision kernel computes in float what the float32 kernel computes on the
    same values, and rounds each output element once: the same bits, for runs of every
    length (NCHW rows of L values, channels-last rows of C), plain and streamed, with
    and without K-batched element inputs, wherever the two run the same geometry (the
    fold and tile limits depend on the element size: see cpu.FOLD_MAX_L and
    cpu.TILE_ROW_BYTES). "channels_last": 3-D, C innermost, never tiled; "tiled": 4-D
    channels-last, rows of 3 values per sample tiled while 3 * C values fit the limit."""
    gen = torch.Generator().manual_seed(3)
    tiled_compared = 0
    for n, k in [(n, k) for n in _RUN_LENGTHS for k in ((None, 3) if op in K_OPS else (None,))]:
        shape = {"nchw": (3, 2, n), "channels_last": (2, n, 3), "tiled": (2, n, 3, 1)}[layout]
        x = torch.randn(shape, generator=gen).to(dtype)
        if layout == "channels_last":  # (N, C, L) with C the fast dimension
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        elif layout == "tiled":
            x = x.contiguous(memory_format=torch.channels_last)
        plan = cpu._plan(x)
        if plan.geom != cpu._plan(x.float()).geom:
            continue
        tiled_compared += plan.tile > 1
        c = shape[1]
        mean, var, invstd = reference.statistics(x.float(), 1e-5)
        p = dict(x=x, weight=torch.randn(c, generator=gen), bias=torch.randn(c, generator=gen),
                 mean=mean, invstd=invstd, running_var=var + 0.25,
                 weight_t=torch.randn(3, c, generator=gen), bias_t=torch.randn(3, c, generator=gen))
        for name in ELEMENT_TANGENTS:
            t = torch.randn(shape if k is None else (k, *shape), generator=gen).to(dtype)
            # x's memory format, per instance where K-batched
            p[name] = torch.empty_like(x).copy_(t) if k is None else \
                torch.stack([torch.empty_like(x).copy_(e) for e in t])
        if k is None:
            p["weight_t"], p["bias_t"] = p["weight_t"][0], p["bias_t"][0]
        as_float = {name: value.float() for name, value in p.items()}
        want = _tuple(_call(cpu, op, as_float, "relu"))
        for stream in (1 << 62, 0):
            stream_min_bytes(stream)
            for got, w in zip(_tuple(_call(cpu, op, p, "relu")), want):
                assert (got is None and w is None) or torch.equal(got, w.to(got.dtype)), \
                    (n, k, stream)
    assert tiled_compared > 0 or layout != "tiled"
