"""fastbn.batch_norm against stock torch and a float64 reference: values, dtypes,
layouts, numerics and bad input."""

import numpy
import pytest
import torch
import torch.nn.functional as F

import fastbn

SHAPES = [(2, 1), (7, 3), (2, 5, 13), (3, 4, 5, 7), (2, 3, 1, 1), (5, 2, 3, 4, 3),
          (4, 1, 3, 3)]
LAYOUTS = ["contiguous", "channels_last", "strided", "transposed"]
HALF = [torch.bfloat16, torch.float16]


def _layout(x, layout):
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last" and x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    if layout == "strided":   # every other element of a wider tensor along dim 0 and -1
        wide = torch.cat([x, x], dim=-1).repeat_interleave(2, dim=0)
        return wide[::2, ..., : x.shape[-1]]
    if layout == "transposed":  # dense, neither contiguous nor channels-last: N and C swapped
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    return x


def _run(fn, x, dtype_params, training, activation, seed=1):
    gen = torch.Generator().manual_seed(seed)
    c = x.shape[1]
    w = torch.randn(c, generator=gen).to(dtype_params).requires_grad_()
    b = torch.randn(c, generator=gen).to(dtype_params).requires_grad_()
    rm = torch.randn(c, generator=gen).to(dtype_params)
    rv = (torch.rand(c, generator=gen) + 0.5).to(dtype_params)
    x = x.detach().requires_grad_()
    if fn is fastbn.batch_norm:
        y = fn(x, rm, rv, w, b, training=training, momentum=0.3, eps=1e-4,
               activation=activation)
    else:
        y = fn(x, rm, rv, w, b, training=training, momentum=0.3, eps=1e-4)
        if activation == "relu":
            y = torch.relu(y)
    gy = torch.randn(y.shape, generator=gen).to(y.dtype)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), gy)
    return y, gx, gw, gb, rm, rv


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_float32_matches_stock(backend, shape, layout, training, activation):
    if training and shape[0] * (torch.Size(shape[2:]).numel()) == 1:
        pytest.skip("one value per channel")
    x = _layout(torch.randn(shape), layout)
    got = _run(fastbn.batch_norm, x, torch.float32, training, activation)
    want = _run(F.batch_norm, x.double(), torch.float64, training, activation)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)
    y = got[0]
    assert y.dtype == x.dtype
    # The output's memory format is torch's (not x's, where the two differ).
    assert y.stride() == F.batch_norm(x, None, None, training=True).stride()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("params_dtype", ["same", "float32"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
def test_half_precision_within_twice_stock_error(backend, dtype, params_dtype, layout,
                                                 training):
    pdt = dtype if params_dtype == "same" else torch.float32
    x = _layout(torch.randn(8, 6, 5, 7) * 3 + 1, layout).to(dtype)
    got = _run(fastbn.batch_norm, x, pdt, training, "relu")
    ref64 = _run(F.batch_norm, x.double(), torch.float64, training, "relu")
    try:
        stock = _run(F.batch_norm, x, pdt, training, "relu")
    except RuntimeError:   # stock has no kernel for this dtype mix: compare with float32
        stock = _run(F.batch_norm, x.float(), torch.float32, training, "relu")
    for name, g, s, r in zip(["y", "grad_x", "grad_w", "grad_b", "running_mean",
                              "running_var"], got, stock, ref64):
        assert g.dtype == (x.dtype if name in ("y", "grad_x") else pdt), name
        err = (g.double() - r).abs()
        bound = 2 * (s.double() - r).abs() + torch.finfo(dtype).eps * (1 + r.abs())
        assert bool((err <= bound).all()), (name, (err - bound).max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, layout", [((64, 3, 40), "contiguous"),
                                           ((64, 3, 40), "strided"),
                                           ((64, 3, 40), "transposed"),
                                           ((16, 3, 4, 10), "channels_last"),
                                           ((8, 3, 2, 4, 5), "channels_last"),
                                           ((640, 3), "contiguous")])
def test_large_offset_is_accurate(backend, dtype, shape, layout):
    x = _layout((1e4 + torch.randn(shape, dtype=torch.float64)).to(dtype), layout)
    reduce = (0, *range(2, x.dim()))
    rm, rv = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    y = fastbn.batch_norm(x, rm, rv, training=True, momentum=1.0)
    ref = F.batch_norm(x.double(), None, None, training=True)
    tol = 1e-3 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(rv.double(), x.double().var(reduce), rtol=tol, atol=tol)
    if backend == "cpu" and dtype == torch.float32:
        # x - mean first: y's error is the float32 mean's, half an ulp of 1e4 at most
        # (x * scale + shift rounds x * scale to that ulp before the shift cancels it).
        assert (y.double() - ref).abs().max().item() <= 2.0 ** -11 * 1.1   # invstd ~ 1


@pytest.mark.parametrize("shape, layout", [((4, 2, 512, 512), "contiguous"),
                                           ((4, 2, 512, 512), "channels_last"),
                                           ((1 << 20, 2), "contiguous")])
def test_million_elements_per_channel(backend, shape, layout):
    """1,048,576 values a channel of x = 1e4 + N(0, 1) (torch's own channels-last and
    (N, C) statistics give a variance of 18442 there)."""
    if backend == "triton":
        pytest.skip("4 M values through Triton's CPU interpreter: too slow for the suite")
    x = _layout(1e4 + torch.randn(shape), layout)
    reduce = (0, *range(2, x.dim()))
    rm, rv = torch.zeros(2), torch.ones(2)
    y = fastbn.batch_norm(x, rm, rv, training=True, momentum=1.0)
    xd = x.double()
    # The mean within half a float32 ulp of 1e4 (2^-11), plus the sum's rounding.
    torch.testing.assert_close(rm.double(), xd.mean(reduce), rtol=0, atol=1e-3)
    torch.testing.assert_close(rv.double(), xd.var(reduce), rtol=1e-4, atol=0)
    torch.testing.assert_close(y.double(), F.batch_norm(xd, None, None, training=True),
                               rtol=0, atol=2e-3)


def test_deterministic(backend):
    x = torch.randn(16, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, requires_grad=True)

    def once():
        xs = x.clone().requires_grad_()
        y = fastbn.batch_norm(xs, None, None, w, None, training=True, activation="relu")
        return (y, *torch.autograd.grad(y, (xs, w), torch.ones_like(y)))

    for a, b in zip(once(), once()):
        assert torch.equal(a, b)


def test_empty_batch_and_non_finite_values_behave_as_torch(backend):
    empty = torch.randn(0, 3, 4, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = fastbn.batch_norm(empty, rm, rv, torch.ones(3), torch.zeros(3), training=True)
    assert y.shape == empty.shape and torch.equal(rm, torch.zeros(3))
    y.sum().backward()
    x = torch.randn(4, 3, 5)
    x[1, 1, 2] = float("nan")
    x[2, 2, 0] = float("inf")
    got = fastbn.batch_norm(x, None, None, training=True)
    want = F.batch_norm(x, None, None, training=True)
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got[:, 0], want[:, 0])


def _state():
    return torch.randn(3), torch.rand(3) + 0.5


def _inference_tensor():
    with torch.inference_mode():
        return torch.randn(4, 3)


@pytest.mark.parametrize("call, error, message", [
    (lambda rm, rv: fastbn.batch_norm(torch.ones(2, 3, dtype=torch.long), rm, rv,
                                      training=True),
     NotImplementedError, "\"batch_norm\" not implemented for 'Long'"),
    (lambda rm, rv: fastbn.batch_norm(torch.randn(3), rm, rv, training=True),
     ValueError, "expected 2D or higher input"),
    (lambda rm, rv: fastbn.batch_norm(torch.randn(2, 4), rm, rv, training=True),
     RuntimeError, "running_mean should contain 4 elements not 3"),
    (lambda rm, rv: fastbn.batch_norm(torch.randn(2, 3), rm, rv, torch.ones(4),
                                      training=True),
     RuntimeError, "weight should contain 3 elements not 4"),
    (lambda rm, rv: fastbn.batch_norm(torch.randn(2, 3), rm, rv, None, torch.ones(2),
                                      training=True),
     RuntimeError, "bias should contain 3 elements not 2"),
    (lambda rm, rv: fastbn.batch_norm(torch.randn(1, 3), rm, rv, training=True),
     ValueError, "Expected more than 1 value per channel when training"),
    (lambda rm, rv: fastbn.batch_norm(torch.randn(2, 3), rm, rv,
                                      torch.ones(3, dtype=torch.float64), training=True),
     RuntimeError, "mixed dtype"),
    # A half input takes half or float32 per-channel tensors, but one dtype for all.
    (lambda rm, rv: fastbn.batch_norm(torch.randn(2, 3).half(), rm, rv,
                                      torch.ones(3).half(), training=True),
     RuntimeError, "expected weight to have dtype torch.float32 as running_mean has"),
    (lambda rm, rv: fastbn.batch_norm(torch.randn(2, 3).half(), rm.half(), rv.half(),
                                      torch.ones(3), training=True),
     RuntimeError, "expected weight to have dtype torch.float16 as running_mean has"),
    (lambda rm, rv: fastbn.batch_norm(torch.randn(1, 0), None, None, training=True),
     ValueError, "Expected more than 1 value per channel when training"),
    (lambda rm, rv: fastbn.batch_norm(torch.randn(2, 3), rm, rv, training=True,
                                      activation="gelu"),
     ValueError, "unknown activation"),
    (lambda rm, rv: fastbn.batch_norm(torch.randn(2, 3), rm, rv, torch.ones(3, device="meta"),
                                      training=True),
     RuntimeError, "same device"),
    (lambda rm, rv: fastbn.batch_norm(torch.randn(2, 3), rm, None, training=False),
     RuntimeError, "running_var must be defined in evaluation mode"),
    (lambda rm, rv: fastbn.batch_norm(torch.randn(2, 3), rm, None, training=True),
     ValueError, "running_mean and running_var must either both be None or neither be None"),
    (lambda rm, rv: fastbn.batch_norm(torch.randn(2, 3), rm.view(1, 3), rv, training=True),
     RuntimeError, "TensorAccessor expected 1 dims but tensor has 2: running_mean must be a "
                   "vector of 3 elements"),
    (lambda rm, rv: fastbn.batch_norm(torch.randn(2, 3), rm, rv.view(3, 1), training=False),
     RuntimeError, "running_var must be a vector"),
    (lambda rm, rv: fastbn.batch_norm(torch.randn(2, 3), rm, rv, training=True, eps=0.0),
     ValueError, "batch_norm eps must be positive during training, but got 0.0"),
    (lambda rm, rv: fastbn.batch_norm(torch.randn(2, 3), rm, rv, training=False, eps=-1.0),
     ValueError, "batch_norm eps must be non-negative, but got -1.0"),
    (lambda rm, rv: fastbn.batch_norm(torch.randn(2, 3), rm, rv, training=torch.tensor(True)),
     TypeError, "argument 'training' \\(position 6\\) must be bool, not Tensor"),
    (lambda rm, rv: fastbn.batch_norm(torch.randn(2, 3), rm.requires_grad_(), rv,
                                      training=True),
     RuntimeError, "not differentiable with respect to argument 'running_mean'"),
    (lambda rm, rv: fastbn.batch_norm(torch.randn(2, 3), rm, rv.requires_grad_(),
                                      training=False),
     RuntimeError, "not differentiable with respect to argument 'running_var'"),
    (lambda rm, rv: fastbn.batch_norm(torch.randn(2, 3), rm, rv, training=True,
                                      momentum="0.1"),
     TypeError, "argument 'momentum' \\(position 7\\) must be float, not str"),
    (lambda rm, rv: fastbn.batch_norm(torch.randn(2, 3), rm, rv, training=True, eps=None),
     TypeError, "argument 'eps' \\(position 8\\) must be float, not NoneType"),
    (lambda rm, rv: fastbn.batch_norm(_inference_tensor(), rm, rv,
                                      torch.ones(3, requires_grad=True), training=True),
     RuntimeError, "Inference tensors cannot be saved for backward"),
])
def test_bad_input_raises_and_changes_nothing(call, error, message):
    # Refused by the argument checks, before any backend runs.
    rm, rv = _state()
    before = rm.clone(), rv.clone()
    with pytest.raises(error, match=message):
        call(rm, rv)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


FLOAT8 = [d for d in (getattr(torch, name, None) for name in (
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"))
    if d is not None]


@pytest.mark.parametrize("training", (True, False))
@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
def test_float8_is_refused_as_torch_refuses_it(dtype, training):
    """Floating-point types without a kernel: torch's NotImplementedError, state unchanged,
    through the function (per-channel tensors of the input's dtype, which the eval fast
    path takes) and the layer."""
    x = torch.randn(8, 3).to(dtype)
    rm, rv = torch.zeros(3).to(dtype), torch.ones(3).to(dtype)
    before = rm.float(), rv.float()   # (float8_e8m0fnu has no 0: its zeros are 2**-127)
    messages = []
    for call in (F.batch_norm, fastbn.batch_norm):
        with pytest.raises(NotImplementedError) as info:
            call(x, rm, rv, rm.clone(), rm.clone(), training=training)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert torch.equal(rm.float(), before[0]) and torch.equal(rv.float(), before[1])
    layer = fastbn.BatchNorm1d(3).to(dtype).train(training)
    with pytest.raises(NotImplementedError, match="not implemented for"):
        layer(x)
    assert layer.num_batches_tracked.item() == 0
    assert torch.equal(layer.running_mean.float(), before[0])


@pytest.mark.parametrize("name", ("weight", "bias", "running_mean", "running_var"))
@pytest.mark.parametrize("value", (numpy.zeros(3, numpy.float32), [0.0, 0.0, 0.0], 0),
                         ids=("ndarray", "list", "int"))
@pytest.mark.parametrize("training", (True, False))
def test_a_per_channel_argument_that_is_not_a_tensor_is_refused_in_torchs_words(
        name, value, training):
    messages = []
    for call in (F.batch_norm, fastbn.batch_norm):
        args = dict(running_mean=torch.zeros(3), running_var=torch.ones(3),
                    weight=torch.ones(3), bias=torch.zeros(3))
        args[name] = value
        before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
        with pytest.raises(TypeError) as info:
            call(torch.randn(4, 3), args["running_mean"], args["running_var"],
                 args["weight"], args["bias"], training=training)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert all(torch.equal(args[k], v) for k, v in before.items())   # fastbn's call


def test_a_training_flag_of_an_extension_type_is_named_as_torch_names_it():
    messages = []
    for call in (F.batch_norm, fastbn.batch_norm):
        with pytest.raises(TypeError) as info:
            call(torch.randn(2, 3), None, None, training=numpy.bool_(True))
        messages.append(str(info.value))
    assert messages[0] == messages[1] and messages[0].endswith("not numpy.bool")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_running_statistics_made_in_inference_mode_update_outside_it(backend, dtype):
    """torch's kernels write them from anywhere; bfloat16 statistics are not the kernels'
    accumulation dtype, so fastbn updates them with torch ops."""
    x = torch.randn(10, 3, 6, dtype=dtype)
    results = []
    for call in (F.batch_norm, fastbn.batch_norm):
        with torch.inference_mode():
            rm, rv = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
        call(x, rm, rv, training=True, momentum=0.5)
        results.append((rm, rv))
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected)


def test_an_expanded_running_statistic_is_refused_before_either_is_written(backend):
    """torch's kernel writes every channel's value into the one element (the last
    wins); fastbn refuses in training, before the running mean is written, and reads it
    in eval."""
    x = torch.randn(4, 3, 2)
    rm, rv = torch.zeros(3), torch.ones(1).expand(3)
    with pytest.raises(RuntimeError, match="running_var is expanded"):
        fastbn.batch_norm(x, rm, rv, training=True, momentum=0.5)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    torch.testing.assert_close(fastbn.batch_norm(x, rm, rv, training=False),
                               F.batch_norm(x, rm, rv, training=False))


def test_a_running_variance_made_in_inference_mode_updates_beside_a_normal_mean(backend):
    """Either statistic made in inference mode has both written there (a strided one
    goes through torch ops: it was refused after the mean had been written)."""
    x = torch.randn(4, 3, 2)
    results = []
    for call in (F.batch_norm, fastbn.batch_norm):
        rm = torch.zeros(3)
        with torch.inference_mode():
            rv = torch.ones(6)[::2]
        call(x, rm, rv, training=True, momentum=0.5)
        results.append((rm, rv))
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected)


def test_running_statistics_update(backend):
    x = torch.randn(10, 3, 6)
    rm, rv = _state()
    rm_t, rv_t = rm.clone(), rv.clone()
    for momentum in (0.1, 0.5, 1.0, 0.0):
        fastbn.batch_norm(x, rm, rv, training=True, momentum=momentum)
        F.batch_norm(x, rm_t, rv_t, training=True, momentum=momentum)
        torch.testing.assert_close(rm, rm_t)
        torch.testing.assert_close(rv, rv_t)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_running_statistics_update_is_seen_by_autograd(backend, dtype):
    """The kernels write the running statistics through raw addresses; autograd must still
    see each as modified in place (as torch's), so a graph that saved one fails loudly
    instead of differentiating the new values."""
    x = torch.randn(10, 3, 6, dtype=dtype)
    rm, rv = (t.to(dtype) for t in _state())
    w = torch.randn(3, dtype=dtype, requires_grad=True)
    versions = rm._version, rv._version
    saved = (rm * w).sum() + (rv * w).sum()   # mul saves rm and rv for w's gradient
    fastbn.batch_norm(x, rm, rv, training=True)
    assert rm._version > versions[0] and rv._version > versions[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


@pytest.mark.parametrize("training", [True, False])
def test_autograd_function_only_where_something_differentiates(monkeypatch, training):
    """A call nothing can differentiate runs the Function's forward alone (a graph node
    costs microseconds), also a backward without create_graph; any grad-requiring input
    under grad mode, forward-AD level or torch.func transform builds the node, and the
    results agree."""
    from fastbn.ops import autograd
    calls = []
    for name in ("unwrap_dead_wrappers", "_apply_under_transform"):
        original = getattr(autograd, name)
        monkeypatch.setattr(autograd, name,
                            lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    x, w = torch.randn(4, 3, 5), torch.randn(3, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)

    def run(inp=x):
        return fastbn.batch_norm(inp, rm, rv, w, None, training=training)

    with torch.no_grad():
        plain = run()
    assert calls == [] and plain.grad_fn is None
    differentiated = run()
    assert calls == ["unwrap_dead_wrappers"] and differentiated.grad_fn is not None
    calls.clear()
    torch.func.vmap(lambda t: fastbn.batch_norm(t, None, None, training=True))(x[None])
    assert "_apply_under_transform" in calls
    calls.clear()
    with torch.autograd.forward_ad.dual_level(), torch.no_grad():
        run()
    assert calls == ["unwrap_dead_wrappers"]
    torch.testing.assert_close(plain, differentiated.detach(), rtol=0, atol=0)
    if training:
        # The backward's own Function: a node only when the backward is differentiated.
        leaf = x.clone().requires_grad_()
        run(leaf).sum().backward()
        calls.clear()
        first = leaf.grad.clone()
        leaf.grad = None
        run(leaf).sum().backward()
        assert calls == ["unwrap_dead_wrappers"]   # the forward's node only
        calls.clear()
        (grad,) = torch.autograd.grad(run(leaf).sum(), leaf, create_graph=True)
        assert calls == ["unwrap_dead_wrappers"] * 2 and grad.grad_fn is not None
        torch.testing.assert_close(leaf.grad, first, rtol=0, atol=0)
        torch.testing.assert_close(grad.detach(), first, rtol=0, atol=0)


@pytest.mark.parametrize("x, with_var, training, eps", [
    (torch.ones(2, 3, dtype=torch.int32), True, True, 1e-5),
    (torch.ones(2, 3, dtype=torch.complex64), True, True, 1e-5),
    (torch.randn(1, 3), True, True, 1e-5),
    (torch.randn(2, 3), False, True, 1e-5),
    (torch.randn(2, 3), False, False, 1e-5),
    (torch.randn(2, 3), True, True, 0.0),
    (torch.randn(2, 3), True, False, -1.0),
    # Two faults: torch's batch-size and eps checks come before its kernel's.
    (torch.randn(1, 5), True, True, 1e-5),
    (torch.ones(1, 3, dtype=torch.int64), True, True, 1e-5),
    (torch.randn(3, 5), True, True, 0.0),
    (torch.randn(3, 5, dtype=torch.float64), True, False, -1.0),
], ids=str)
def test_errors_in_torchs_words(x, with_var, training, eps):
    def raised(batch_norm):
        rm, rv = _state()
        before = rm.clone(), rv.clone()
        with pytest.raises(Exception) as info:
            batch_norm(x, rm, rv if with_var else None, training=training, eps=eps)
        return type(info.value), str(info.value), (rm, rv), before
    *ours, state, before = raised(fastbn.batch_norm)
    assert tuple(ours) == raised(F.batch_norm)[:2]
    assert all(torch.equal(t, b) for t, b in zip(state, before))   # no state changed


class _Tagged(torch.Tensor):
    """A tensor subclass that records the functions it intercepts."""
    seen = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_torch_function_subclasses_see_the_call():
    _Tagged.seen.clear()
    x = torch.randn(4, 3, 5).as_subclass(_Tagged)
    y = fastbn.batch_norm(x, None, None, training=True)
    assert fastbn.batch_norm in _Tagged.seen and type(y) is _Tagged
    torch.testing.assert_close(y.as_subclass(torch.Tensor),
                               F.batch_norm(x.as_subclass(torch.Tensor), None, None,
                                            training=True))
    _Tagged.seen.clear()
    fastbn.BatchNorm1d(3)(x)
    assert fastbn.batch_norm in _Tagged.seen


@pytest.mark.parametrize("training", [True, False])
def test_inference_running_statistics_refused_where_saved_for_backward(training):
    """Running statistics made under inference_mode cannot be saved for backward (torch's
    error); training must not update them before failing."""
    with torch.inference_mode():
        rm, rv = torch.zeros(3), torch.ones(3)
    weight = torch.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        fastbn.batch_norm(torch.randn(4, 3), rm, rv, weight, training=training)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    with torch.no_grad():   # nothing is saved: torch updates them, and so does fastbn
        fastbn.batch_norm(torch.randn(4, 3), rm, rv, weight, training=training)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_takes_float32_per_channel_tensors(dtype):
    x = torch.randn(6, 3, 4, dtype=dtype)
    rm, rv, weight, bias = torch.zeros(3), torch.ones(3), torch.rand(3), torch.randn(3)
    got = fastbn.batch_norm(x, rm, rv, weight, bias, training=True)
    want = F.batch_norm(x, torch.zeros(3), torch.ones(3), weight, bias, training=True)
    torch.testing.assert_close(got, want)


def _eval_args(dtype=torch.float32, stats_dtype=None, channels=3, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    stats_dtype = stats_dtype or dtype
    x = torch.randn(4, 3, 5, 2, generator=gen).to(dtype)
    rm, w, b = (torch.randn(channels, generator=gen).to(stats_dtype) for _ in range(3))
    rv = (torch.rand(channels, generator=gen) + 0.5).to(stats_dtype)
    return x, rm, rv, w.requires_grad_(requires_grad), b


def _through_general_path(monkeypatch, call):
    """(whether `call` ran the general path's checks, its result or the error raised)."""
    from fastbn import functional
    checked = []
    original = functional.check_args
    monkeypatch.setattr(functional, "check_args",
                        lambda *a, **k: checked.append(1) or original(*a, **k))
    try:
        out = call()
    except Exception as err:  # noqa: BLE001 - the general path's errors are tested elsewhere
        out = err
    return bool(checked), out


_DIRECT_CALLS = {
    "float32": lambda: fastbn.batch_norm(*_eval_args(), eps=1e-3),
    "relu": lambda: fastbn.batch_norm(*_eval_args(), activation="relu"),
    "channels_last": lambda: fastbn.batch_norm(
        *((t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)
          for t in _eval_args())),
    "strided": lambda: fastbn.batch_norm(_eval_args()[0][:, :, ::2], *_eval_args()[1:]),
    "float64": lambda: fastbn.batch_norm(*_eval_args(torch.float64)),
    "bfloat16, float32 statistics": lambda: fastbn.batch_norm(
        *_eval_args(torch.bfloat16, torch.float32)),
    "float16": lambda: fastbn.batch_norm(*_eval_args(torch.float16)),
    "parameters requiring grad under no_grad": lambda: _no_grad(
        lambda: fastbn.batch_norm(*_eval_args(requires_grad=True))),
    "weight requiring grad": lambda: fastbn.batch_norm(*_eval_args(requires_grad=True)),
    "output and gradients": lambda: _with_gradients(),
    "layer": lambda: _no_grad(lambda: fastbn.BatchNorm2d(3).eval()(_eval_args()[0])),
    "layer with cumulative momentum": lambda: _no_grad(
        lambda: fastbn.BatchNorm2d(3, momentum=None).eval()(_eval_args()[0])),
}


def _no_grad(call):
    with torch.no_grad():
        return call()


def _with_gradients():
    """An eval call autograd records: its output and its gradients, end to end."""
    x, rm, rv, w, b = _eval_args()
    leaves = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    y = fastbn.batch_norm(x, rm, rv, w, b, activation="relu")
    grads = torch.autograd.grad(y.square().sum(), leaves)
    return torch.cat([y.detach().flatten(), *(g.flatten() for g in grads)])


@pytest.mark.parametrize("name", _DIRECT_CALLS)
def test_common_eval_calls_skip_the_general_path_with_the_same_result(monkeypatch, name):
    """An eval call of the common kind goes straight to the backend's kernel, or to the
    Function around it where autograd records it (the general path's checks and layers
    cost a small layer's call more than the kernel on a cold cache), and gives the bits
    the general path gives."""
    from fastbn import functional
    checked, direct = _through_general_path(monkeypatch, _DIRECT_CALLS[name])
    assert not checked and isinstance(direct, torch.Tensor)
    monkeypatch.setattr(functional, "direct_eval", lambda *args: None)
    checked, general = _through_general_path(monkeypatch, _DIRECT_CALLS[name])
    assert checked
    assert direct.dtype == general.dtype and direct.stride() == general.stride()
    assert (direct.grad_fn is None) == (general.grad_fn is None)
    torch.testing.assert_close(direct, general, rtol=0, atol=0)


def _dual_call():
    with torch.autograd.forward_ad.dual_level():
        return fastbn.batch_norm(*_eval_args())


def _inference_statistics():
    with torch.inference_mode():
        rm, rv = _eval_args()[1:3]
    x, _, _, w, b = _eval_args(requires_grad=True)
    return fastbn.batch_norm(x, rm, rv, w, b)


def _vmapped():
    x, *stats = _eval_args()
    return torch.func.vmap(lambda x: fastbn.batch_norm(x, *stats))(x[None])


_GENERAL_CALLS = {
    "running mean requiring grad": lambda: fastbn.batch_norm(
        _eval_args()[0], _eval_args()[1].requires_grad_(), *_eval_args()[2:]),
    "inference statistics saved for backward": lambda: _inference_statistics(),
    "no weight": lambda: fastbn.batch_norm(*_eval_args()[:3], None, _eval_args()[4]),
    "forward AD level": _dual_call,
    "torch.func transform": _vmapped,
    "tensor subclass": lambda: fastbn.batch_norm(_eval_args()[0].as_subclass(_Tagged),
                                                 *_eval_args()[1:]),
    "mixed statistics dtypes": lambda: fastbn.batch_norm(
        *_eval_args()[:3], *(t.double() for t in _eval_args()[3:])),
    "float16 with float16 and float32 statistics": lambda: fastbn.batch_norm(
        *_eval_args(torch.float16)[:3], *(t.float() for t in _eval_args(torch.float16)[3:])),
    "float32 input, float64 statistics": lambda: fastbn.batch_norm(
        _eval_args()[0], *_eval_args(torch.float64)[1:]),
    "wrong channel count": lambda: fastbn.batch_norm(_eval_args()[0],
                                                     *_eval_args(channels=4)[1:]),
    "weight of shape (1, C)": lambda: fastbn.batch_norm(
        *_eval_args()[:3], _eval_args()[3][None], _eval_args()[4]),
    "integer eps": lambda: fastbn.batch_norm(*_eval_args(), eps=1),
    "negative eps": lambda: fastbn.batch_norm(*_eval_args(), eps=-1.0),
    "integer momentum": lambda: fastbn.batch_norm(*_eval_args(), momentum=0),
    "unknown activation": lambda: fastbn.batch_norm(*_eval_args(), activation="gelu"),
    "empty input": lambda: fastbn.batch_norm(_eval_args()[0][:0], *_eval_args()[1:]),
    "integer input": lambda: fastbn.batch_norm(_eval_args()[0].int(), *_eval_args()[1:]),
    "layer without affine parameters": lambda: _no_grad(
        lambda: fastbn.BatchNorm2d(3, affine=False).eval()(_eval_args()[0])),
}


@pytest.mark.parametrize("name", _GENERAL_CALLS)
def test_other_eval_calls_take_the_general_path(monkeypatch, name):
    """Anything but autograd recording the call, and any argument off the common kind
    (whose errors and conversions the general path owns), is checked and run by the
    general path."""
    checked, _ = _through_general_path(monkeypatch, _GENERAL_CALLS[name])
    assert checked


def _train(*args, **kwargs):
    """A training call on (x, running_mean, running_var, weight, bias): its output and
    the running statistics after it."""
    x, rm, rv, w, b = args
    rm, rv = (None if t is None else t.clone() for t in (rm, rv))
    y = fastbn.batch_norm(x, rm, rv, w, b, training=True, **kwargs)
    return torch.cat([y.flatten(), *(t.flatten().to(y.dtype) for t in (rm, rv)
                                     if t is not None)])


def _train_with_gradients(dtype=torch.float32):
    x, rm, rv, w, b = _eval_args(dtype)
    leaves = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    y = fastbn.batch_norm(x, rm, rv, w, b, training=True, activation="relu")
    grads = torch.autograd.grad(y.square().sum(), leaves)
    return torch.cat([y.detach().flatten(), rm, rv, *(g.flatten() for g in grads)])


def _layer_steps(**options):
    """Three training steps of a layer: outputs, running statistics and count."""
    layer = fastbn.BatchNorm2d(3, **options)
    x = _eval_args()[0]
    outs = [layer(x * (i + 1)).flatten() for i in range(3)]
    buffers = [t.flatten().float() for t in layer.buffers()]
    return torch.cat([*outs, *buffers]).detach()


_DIRECT_TRAIN_CALLS = {
    "float32": lambda: _train(*_eval_args(), eps=1e-3),
    "relu": lambda: _train(*_eval_args(), activation="relu"),
    "channels_last": lambda: _train(
        *((t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)
          for t in _eval_args())),
    "strided": lambda: _train(_eval_args()[0][:, :, ::2], *_eval_args()[1:]),
    "float64": lambda: _train(*_eval_args(torch.float64)),
    "bfloat16, float32 parameters": lambda: _train(
        *_eval_args(torch.bfloat16, torch.float32)),
    "float16": lambda: _train(*_eval_args(torch.float16)),
    "no running statistics": lambda: _train(
        *_eval_args()[:1], None, None, *_eval_args()[3:]),
    "output and gradients": lambda: _train_with_gradients(),
    "float64 output and gradients": lambda: _train_with_gradients(torch.float64),
    "layer": lambda: _layer_steps(),
    "layer with cumulative momentum": lambda: _layer_steps(momentum=None),
    "layer without running statistics": lambda: _layer_steps(track_running_stats=False),
    "layer in eval without running statistics": lambda: _no_grad(
        lambda: fastbn.BatchNorm2d(3, track_running_stats=False).eval()(_eval_args()[0])),
}


@pytest.mark.parametrize("name", _DIRECT_TRAIN_CALLS)
def test_common_training_calls_skip_the_general_path_with_the_same_result(monkeypatch, name):
    """A training call of the common kind goes straight to its Function (the general
    path's checks and frames cost a small layer's call more than the Function), and
    gives the bits the general path gives, running statistics and count included."""
    from fastbn import functional
    checked, direct = _through_general_path(monkeypatch, _DIRECT_TRAIN_CALLS[name])
    assert not checked and isinstance(direct, torch.Tensor)
    monkeypatch.setattr(functional, "direct_train_backend", lambda *args: None)
    checked, general = _through_general_path(monkeypatch, _DIRECT_TRAIN_CALLS[name])
    assert checked
    assert direct.dtype == general.dtype
    torch.testing.assert_close(direct, general, rtol=0, atol=0)


def _train_dual_call():
    with torch.autograd.forward_ad.dual_level():
        return _train(*_eval_args())


def _train_inference_statistics():
    with torch.inference_mode():
        rm, rv = _eval_args()[1:3]
    x, _, _, w, b = _eval_args(requires_grad=True)
    return fastbn.batch_norm(x, rm, rv, w, b, training=True)


def _train_vmapped():
    x, _, _, w, b = _eval_args()
    return torch.func.vmap(lambda x: fastbn.batch_norm(x, None, None, w, b, training=True))(
        x[None])


_GENERAL_TRAIN_CALLS = {
    "running mean requiring grad": lambda: _train(
        _eval_args()[0], _eval_args()[1].requires_grad_(), *_eval_args()[2:]),
    "inference statistics saved for backward": _train_inference_statistics,
    "no weight": lambda: _train(*_eval_args()[:3], None, _eval_args()[4]),
    "forward AD level": _train_dual_call,
    "torch.func transform": lambda: _train_vmapped(),
    "tensor subclass": lambda: _train(_eval_args()[0].as_subclass(_Tagged), *_eval_args()[1:]),
    "mixed parameter dtypes": lambda: _train(
        *_eval_args()[:3], *(t.double() for t in _eval_args()[3:])),
    "float16 with float16 and float32 statistics": lambda: _train(
        *_eval_args(torch.float16)[:3], *(t.float() for t in _eval_args(torch.float16)[3:])),
    "float32 input, float64 parameters": lambda: _train(
        _eval_args()[0], *_eval_args(torch.float64)[1:]),
    "float32 parameters, float64 statistics": lambda: _train(
        _eval_args()[0], *_eval_args(torch.float64)[1:3], *_eval_args()[3:]),
    "wrong channel count": lambda: _train(_eval_args()[0], *_eval_args(channels=4)[1:]),
    "weight of shape (1, C)": lambda: _train(
        *_eval_args()[:3], _eval_args()[3][None], _eval_args()[4]),
    "integer eps": lambda: _train(*_eval_args(), eps=1),
    "zero eps": lambda: _train(*_eval_args(), eps=0.0),
    "integer momentum": lambda: _train(*_eval_args(), momentum=0),
    "unknown activation": lambda: _train(*_eval_args(), activation="gelu"),
    "one value per channel": lambda: _train(_eval_args()[0][:1, :, :1, :1],
                                            *_eval_args()[1:]),
    "empty input": lambda: _train(_eval_args()[0][:0], *_eval_args()[1:]),
    "integer input": lambda: _train(_eval_args()[0].int(), *_eval_args()[1:]),
    "running mean alone": lambda: _train(*_eval_args()[:2], None, *_eval_args()[3:]),
    # Not through _train, whose copies of the statistics are contiguous.
    "expanded running mean": lambda: fastbn.batch_norm(
        _eval_args()[0], torch.zeros(1).expand(3), *_eval_args()[2:], training=True),
    "strided running variance": lambda: fastbn.batch_norm(
        *_eval_args()[:2], torch.ones(6)[::2], *_eval_args()[3:], training=True),
}


@pytest.mark.parametrize("name", _GENERAL_TRAIN_CALLS)
def test_other_training_calls_take_the_general_path(monkeypatch, name):
    """As for eval calls: anything but autograd recording the call, and any argument off
    the common kind, is checked and run by the general path."""
    checked, _ = _through_general_path(monkeypatch, _GENERAL_TRAIN_CALLS[name])
    assert checked


def test_layers_count_a_batch_of_the_common_kind_once():
    layer = fastbn.BatchNorm2d(3)
    layer(_eval_args()[0])
    assert layer.num_batches_tracked.item() == 1


def test_torch_function_modes_see_eval_calls():
    class Recording(torch.overrides.TorchFunctionMode):
        seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.seen.append(func)
            return func(*args, **(kwargs or {}))

    args = _eval_args()
    with Recording():
        y = fastbn.batch_norm(*args)
    assert Recording.seen[0] is fastbn.batch_norm
    torch.testing.assert_close(y, F.batch_norm(*args))


def test_eval_under_legacy_batching_runs_the_reference_math(backend):
    """torch's older vmap (behind autograd.grad(..., is_grads_batched=True)) hands over
    tensors without storage: an eval call there runs PyTorch ops whatever the backend."""
    x, rm, rv, w, b = _eval_args()
    xs = torch.stack([x, 2 * x])
    batched = torch._vmap_internals._vmap(lambda t: fastbn.batch_norm(t, rm, rv, w, b))(xs)
    torch.testing.assert_close(batched, torch.stack([F.batch_norm(t, rm, rv, w, b)
                                                     for t in xs]))


@pytest.mark.parametrize("training", [False, True])
def test_torch_function_modes_see_a_call_before_the_gates_read_its_arguments(training):
    """The direct paths' gates ask for torch functions first: a mode that handles the
    call gets it, whatever its other arguments would make of the gate's checks."""
    class Unequal:
        def __eq__(self, other):
            raise TypeError("cannot be compared")
        __hash__ = object.__hash__

    class Handles(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is fastbn.batch_norm:
                return "handled"
            return func(*args, **(kwargs or {}))

    with Handles():
        assert fastbn.batch_norm(*_eval_args(), training=training,
                                 activation=Unequal()) == "handled"
