"""The reference backend's two paths: torch's native batch-norm kernels serve plain local
forward and backward calls; the composed definition serves everything that is
differentiated, batched or synchronised. Both must give the same values."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import fastbn
from fastbn.backends import reference
from tests.backends.kernel_checks import HALF, check, layout_x

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _problem(layout, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = layout_x(layout, gen, dtype)
    c = x.shape[1]
    pdtype = torch.float32 if dtype in HALF and layout == "nchw" else dtype
    weight, bias = (torch.randn(c, generator=gen, dtype=torch.float64).to(pdtype)
                    for _ in range(2))
    mean, _, invstd = reference.statistics(x, 1e-5)
    grad_y = torch.empty_like(x).copy_(torch.randn(x.shape, generator=gen))
    return dict(x=x, weight=weight, bias=bias, mean=mean, invstd=invstd, grad_y=grad_y)


def _run(p, act):
    """forward_train (with running statistics), forward_eval and backward on problem p."""
    acc = reference.acc_dtype(p["x"].dtype)
    c = p["x"].shape[1]
    running = (torch.linspace(-1, 1, c, dtype=acc), torch.linspace(0.5, 2, c, dtype=acc))
    y, mean, invstd = reference.forward_train(p["x"], p["weight"], p["bias"], 1e-5, act,
                                              *running, 0.1)
    y_eval = reference.forward_eval(p["x"], *running, p["weight"], p["bias"], 1e-5, act)
    grads = reference.backward(p["grad_y"], p["x"], p["mean"], p["invstd"], p["weight"],
                               p["bias"], act)
    return (y, mean, invstd, *running, y_eval, *grads)


def _upcast(p):
    return {key: v.double() for key, v in p.items()}


@pytest.fixture
def definition(monkeypatch):
    """Runs a function with the native path switched off."""
    def run(fn, *args):
        with monkeypatch.context() as m:
            m.setattr(reference, "_native_ok", lambda *_: False)
            return fn(*args)
    return run


@pytest.mark.parametrize("act", (None, "relu"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ("nchw", "channels_last", "channels_last_3d", "2d", "3d",
                                    "slice", "offset"))
def test_native_path_matches_definition(definition, layout, dtype, act):
    if layout == "offset" and dtype in HALF:
        pytest.skip("1e4 + N(0, 1) is not representable in half precision")
    p = _problem(layout, dtype)
    native = _run(p, act)
    spec = definition(_run, p, act)
    offset32 = layout == "offset" and dtype == torch.float32
    spec64 = definition(_run, _upcast(p), act) if dtype in HALF or offset32 else spec
    for got, want in zip(native, spec):
        assert got.stride() == want.stride() or got.dim() == 1
    if offset32:
        # Both compute y as x * scale + (bias - mean * scale), which rounds x * scale to
        # an ulp of 1e4 before the shift cancels it: an invstd one ulp apart moves y by
        # 2e-4. Each within twice the other's error of float64's.
        for got, want, want64 in zip(native, spec, spec64):
            scale = max(want64.abs().max().item(), 1.0)
            err, spec_err = ((t.double() - want64).abs().max().item() for t in (got, want))
            assert err <= 2 * spec_err + 1e-6 * scale, (err, spec_err, scale)
            assert spec_err <= 2 * err + 1e-6 * scale, (err, spec_err, scale)
        return
    check(native, spec, spec64, dtype, half_atol={torch.bfloat16: 1e-2, torch.float16: 2e-3})


def test_plain_calls_take_the_native_path(monkeypatch):
    """The autograd layer's kernel calls are plain: forward and backward of a training
    step run torch's kernels; a call under autograd or forward AD does not."""
    calls = []
    for name in ("_native_forward", "_native_backward"):
        fn = getattr(reference, name)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)
        monkeypatch.setattr(reference, name, counted)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    w = torch.rand(3, requires_grad=True)
    with fastbn.use_backend("reference"):
        y = fastbn.batch_norm(x, torch.zeros(3), torch.ones(3), w, None, training=True)
        y.square().sum().backward()
        fastbn.batch_norm(x, torch.zeros(3), torch.ones(3), w, None, training=False)
    assert calls == ["_native_forward", "_native_backward", "_native_forward"]
    calls.clear()
    with torch.enable_grad():
        xr = x.detach().requires_grad_()
        out = reference.forward_train(xr, w, torch.zeros(3), 1e-5)[0]
    assert calls == [] and out.grad_fn is not None
    with fwAD.dual_level():
        dual = fwAD.make_dual(x.detach(), torch.randn_like(x))
        out = reference.forward_train(dual, w.detach(), torch.zeros(3), 1e-5)[0]
        assert fwAD.unpack_dual(out).tangent is not None
    assert calls == []


def test_one_value_per_channel_keeps_running_variance_finite(definition):
    """torch's own kernel would set NaN (n / (n - 1) with n = 1); the definition serves."""
    x = torch.randn(1, 3, dtype=torch.float64)
    w, b = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    got = (torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    want = tuple(t.clone() for t in got)
    reference.forward_train(x, w, b, 1e-5, None, *got, 0.1)
    definition(reference.forward_train, x, w, b, 1e-5, None, *want, 0.1)
    for g, v in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, v)


@pytest.mark.parametrize("grad_layout", ("contiguous", "like_x"))
def test_mixed_layouts_backward_matches_definition(definition, grad_layout):
    """A channels-last x whose size-1 spatial dim has non-canonical strides, next to a
    contiguous grad_y, is a case torch 2.13's native backward gets wrong: the definition
    serves it."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 5, 1, generator=gen, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last).transpose(2, 3)
    grad_y = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    if grad_layout == "like_x":
        grad_y = torch.empty_like(x).copy_(grad_y)
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    mean, _, invstd = reference.statistics(x, 1e-5)
    got = reference.backward(grad_y, x, mean, invstd, w, b)
    want = definition(reference.backward, grad_y, x, mean, invstd, w, b)
    for g, v in zip(got, want):
        torch.testing.assert_close(g, v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ("2d", "channels_last", "channels_last_3d", "nchw"))
def test_strided_weight_backward_matches_definition(definition, layout):
    """torch 2.13's native backward reads a strided weight (a view like w[::2]) wrongly
    for (N, C) and channels-last x: grad_x came out wrong by O(1)."""
    gen = torch.Generator().manual_seed(4)
    x = layout_x(layout, gen, torch.float64)
    c = x.shape[1]
    w = (torch.rand(2 * c, generator=gen, dtype=torch.float64) + 0.5)[::2]
    b = torch.randn(c, generator=gen, dtype=torch.float64)
    grad_y = torch.empty_like(x).copy_(torch.randn(x.shape, generator=gen))
    mean, _, invstd = reference.statistics(x, 1e-5)
    got = reference.backward(grad_y, x, mean, invstd, w, b)
    want = definition(reference.backward, grad_y, x, mean, invstd, w, b)
    for g, v in zip(got, want):
        torch.testing.assert_close(g, v, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ("nchw", "channels_last", "2d"))
def test_an_inf_gives_its_channel_an_inf_mean_in_the_definition(definition, layout):
    """Wherever it sits, as in torch's kernel (Welford updates gave NaN for an inf
    first: inf - inf)."""
    x = layout_x(layout, torch.Generator().manual_seed(2), torch.float32)
    c = x.shape[1]
    w, b = torch.ones(c), torch.zeros(c)
    for where, value in (((0,) * x.dim(), float("inf")),
                         (tuple(s - 1 for s in x.shape), float("-inf"))):
        bad = x.clone()
        bad[where] = value
        channel = where[1]
        mean = definition(reference.forward_train, bad, w, b, 1e-5)[1]
        assert mean[channel] == value
        assert torch.isfinite(mean[torch.arange(c) != channel]).all()
