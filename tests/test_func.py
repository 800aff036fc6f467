"""torch.func on models built with fastbn layers in training mode, with no patching."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import fastbn

DT = torch.float64


def _model():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), fastbn.BatchNorm2d(3, activation="relu"),
        nn.Conv2d(3, 2, 1), fastbn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3),
    ).to(DT).train()


@pytest.fixture
def problem():
    model = _model()
    x = torch.randn(5, 2, 4, 4, dtype=DT)
    target = torch.randint(0, 3, (5,))
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    snapshot = {k: v.clone() for k, v in buffers.items()}

    def loss(p, inputs=x, buffers=buffers):
        return nn.functional.cross_entropy(functional_call(model, (p, buffers), (inputs,)), target)

    yield model, x, params, loss
    # Transforms never touch running statistics or num_batches_tracked.
    for k, v in buffers.items():
        assert torch.equal(v, snapshot[k]), k


def _flat(d):
    return torch.cat([t.reshape(-1) for t in d.values()])


def test_grad_and_vjp_match_autograd(backend, problem):
    model, x, params, loss = problem
    g = grad(loss)(params)
    out, pullback = vjp(loss, params)
    (g_vjp,) = pullback(torch.ones_like(out))
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    copies = {k: v.clone() for k, v in model.named_buffers()}   # plain autograd updates them
    plain = torch.autograd.grad(loss(leaves, buffers=copies), list(leaves.values()))
    g_autograd = dict(zip(leaves, plain))
    torch.testing.assert_close(_flat(g), _flat(g_vjp))
    torch.testing.assert_close(_flat(g), _flat(g_autograd))


def test_hvp_routes_agree(backend, problem):
    model, x, params, loss = problem
    v = {k: torch.randn_like(p) for k, p in params.items()}
    fwd_rev = jvp(grad(loss), (params,), (v,))[1]
    rev_rev = grad(lambda p: sum((grad(loss)(p)[k] * v[k]).sum() for k in v))(params)
    torch.testing.assert_close(_flat(fwd_rev), _flat(rev_rev), rtol=1e-9, atol=1e-12)
    # K tangents through vmap: one batched pass equals K single HVPs.
    vs = {k: torch.stack([t, -2 * t, torch.randn_like(t)]) for k, t in v.items()}
    batched = vmap(lambda u: jvp(grad(loss), (params,), (u,))[1])(vs)
    for i in range(3):
        single = jvp(grad(loss), (params,), ({k: t[i] for k, t in vs.items()},))[1]
        torch.testing.assert_close(_flat({k: t[i] for k, t in batched.items()}), _flat(single),
                                   rtol=1e-9, atol=1e-12)


def test_hessian_jacfwd_jacrev_agree(backend, problem):
    model, x, params, loss = problem
    names = ["1.weight", "1.bias", "3.weight"]

    def f(*ws):
        p = dict(params)
        p.update(zip(names, ws))
        return loss(p)

    args = tuple(params[n] for n in names)
    h1 = hessian(f, argnums=(0, 1, 2))(*args)
    h2 = jacrev(jacrev(f, argnums=(0, 1, 2)), argnums=(0, 1, 2))(*args)
    h3 = jacfwd(jacfwd(f, argnums=(0, 1, 2)), argnums=(0, 1, 2))(*args)
    for i in range(3):
        for j in range(3):
            torch.testing.assert_close(h1[i][j], h2[i][j], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(h1[i][j], h3[i][j], rtol=1e-9, atol=1e-12)


def test_input_hessian_matches_autograd_functional(backend, problem):
    model, x, params, loss = problem
    xs = x[:3, :, :2, :2].clone()

    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def f(inp):   # plain autograd below would update running statistics: use copies
        return functional_call(model, (params, buffers), (inp.repeat(1, 1, 2, 2),)) \
            .square().sum()

    expected = torch.autograd.functional.hessian(f, xs)
    torch.testing.assert_close(hessian(f)(xs), expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(jacfwd(jacrev(f))(xs), expected, rtol=1e-8, atol=1e-10)


def test_vmap_over_independent_batches(backend, problem):
    # Each vmapped instance is its own batch with its own statistics.
    model, x, params, loss = problem
    xs = torch.stack([x, 2 * x + 1])
    out = vmap(lambda inp: functional_call(model, params, (inp,)))(xs)
    copies = {k: v.clone() for k, v in model.named_buffers()}   # eager calls update them
    for i in range(2):
        torch.testing.assert_close(out[i], functional_call(model, (params, copies), (xs[i],)))
    per_batch = vmap(grad(lambda p, inp: loss(p, inp)), in_dims=(None, 0))(params, xs)
    torch.testing.assert_close(_flat({k: t[1] for k, t in per_batch.items()}),
                               _flat(grad(loss)(params, xs[1])))


@pytest.mark.parametrize("in_dim", (0, 1, 2, 3))
@pytest.mark.parametrize("activation", (None, "relu"))
def test_vmap_over_data_at_any_dimension(backend, in_dim, activation):
    """B = 2 instances of x (4, 3, 5) batched at each of its dimensions (B differs from
    the channel count, so a misplaced fold shows), each with its own statistics."""
    xs = torch.randn(2, 4, 3, 5, dtype=DT)
    w = torch.rand(3, dtype=DT, requires_grad=True)
    b = torch.randn(3, dtype=DT)

    def f(xi):
        return fastbn.batch_norm(xi, None, None, w, b, training=True, activation=activation)
    got = vmap(f, in_dims=in_dim)(xs.movedim(0, in_dim))
    want = torch.stack([f(xs[i]) for i in range(2)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad_y = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, w, grad_y)[0],
                               torch.autograd.grad(want, w, grad_y)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("in_dim", (0, 2))
def test_vmap_over_no_batches_gives_no_outputs(backend, in_dim):
    """A vmapped dimension of size 0: outputs of that size and the unbatched shapes (the
    channel count, not recoverable from the folded outputs, comes from x)."""
    x = torch.randn(4, 3, 5, dtype=DT).unsqueeze(in_dim).narrow(in_dim, 0, 0)
    w = torch.ones(3, dtype=DT, requires_grad=True)
    y = vmap(lambda xi: fastbn.batch_norm(xi, None, None, w, None, training=True),
             in_dims=in_dim)(x)
    assert y.shape == (0, 4, 3, 5)
    (g,) = torch.autograd.grad(y.sum(), w)
    assert torch.equal(g, torch.zeros(3, dtype=DT))


def test_stock_batchnorm_fails_where_fastbn_works():
    # Documents the gap fastbn closes: stock layers mutate buffers inside the transform.
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(DT).train()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(6, 3, dtype=DT)
    vs = {k: torch.randn(2, *v.shape, dtype=DT) for k, v in params.items()}

    def loss(p):
        return functional_call(model, p, (x,)).square().sum()

    with pytest.raises(RuntimeError):
        vmap(lambda v: jvp(grad(loss), (params,), (v,))[1])(vs)
    fastbn.convert(model)
    out = vmap(lambda v: jvp(grad(loss), (params,), (v,))[1])(vs)
    assert all(torch.isfinite(t).all() for t in out.values())


def test_vmap_over_tangents_is_one_batched_kernel_call(monkeypatch, problem):
    # The batched-HVP primitive: K tangents reach each kernel as one call with a K dim.
    from fastbn.backends import reference
    model, x, params, loss = problem
    calls = []
    for kernel in ("forward_jvp", "backward_jvp"):
        original = getattr(reference, kernel)

        def spy(*args, _original=original, _kernel=kernel, **kwargs):
            calls.append((_kernel, args[0].shape if args[0] is not None else None))
            return _original(*args, **kwargs)
        monkeypatch.setattr(reference, kernel, spy)
    vs = {k: torch.randn(5, *p.shape, dtype=DT) for k, p in params.items()}
    with fastbn.use_backend("reference"):
        vmap(lambda u: jvp(grad(loss), (params,), (u,))[1])(vs)
    assert {k for k, _ in calls} == {"forward_jvp", "backward_jvp"}
    assert all(shape is not None and shape[0] == 5 for _, shape in calls), calls
    assert len(calls) == 4   # two layers, one call each per kernel


def test_vmap_over_models_and_over_data_with_hvps(backend, problem):
    # vmap over an ensemble of weights, and per-batch Hessian-vector products.
    model, x, params, loss = problem
    ensemble = {k: torch.stack([v, 0.5 * v + 0.1]) for k, v in params.items()}
    losses = vmap(loss)(ensemble)
    copies = {k: v.clone() for k, v in model.named_buffers()}   # eager calls update them
    for i in range(2):
        torch.testing.assert_close(losses[i], loss({k: v[i] for k, v in ensemble.items()},
                                                   buffers=copies))
    xs = torch.stack([x, x.flip(0) * 1.5])
    v = {k: torch.randn_like(p) for k, p in params.items()}

    def hvp(inp):
        return jvp(grad(lambda p: loss(p, inp)), (params,), (v,))[1]

    batched = vmap(hvp)(xs)
    for i in range(2):
        torch.testing.assert_close(_flat({k: t[i] for k, t in batched.items()}),
                                   _flat(hvp(xs[i])), rtol=1e-9, atol=1e-12)


def _bn(x, w, b):
    return fastbn.batch_norm(x, None, None, w, b, training=True)


def _composite_bn(x, w, b):
    """Batch norm in PyTorch ops, over every dimension but the channels' (dim 1)."""
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
    shape = (-1,) + (1,) * (x.dim() - 2)
    return (x - mean) * torch.rsqrt(var + 1e-5) * w.view(shape) + b.view(shape)


def test_vmap_over_data_around_transforms_of_tangents(backend):
    # Per-batch Hessians: a vmapped x with an inner jacrev/jvp batching the tangents.
    xs = torch.randn(2, 4, 3, dtype=DT)
    w, b, c = torch.randn(3, dtype=DT), torch.randn(3, dtype=DT), torch.randn(4, 3, dtype=DT)

    def per_batch(bn):
        def loss(x, w):
            return (bn(x, w, b) ** 2 * c).sum()

        def hvp(x):
            return jvp(lambda w_: grad(loss, 1)(x, w_), (w,), (torch.ones_like(w),))[1]
        return (vmap(lambda x: hessian(loss, 1)(x, w))(xs),
                vmap(lambda x: jacrev(jacrev(loss, 1), 1)(x, w))(xs), vmap(hvp)(xs))

    for got, expected in zip(per_batch(_bn), per_batch(_composite_bn)):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 2, 2)], ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_reverse_over_forward(backend, relu, shape):
    """Derivatives of a jvp's tangent: grad and vjp over torch.func.jvp, plain autograd
    through it, and grad over a forward-over-reverse HVP (the backward's jvp rule),
    against the PyTorch-ops batch norm. (torch 2.13's own batch norm gets the x part of
    the first ones wrong.)"""
    x, w, b = torch.randn(shape, dtype=DT), torch.randn(3, dtype=DT), torch.randn(3, dtype=DT)
    x_t, w_t, c = torch.randn_like(x), torch.randn_like(w), torch.randn_like(x)

    def routes(bn):
        def f(x, w):
            return bn(x, w, b).relu() if relu else bn(x, w, b)

        def tangent(x, w):
            return jvp(f, (x, w), (x_t, w_t))[1]

        def hvp(x, w):
            return jvp(grad(lambda x: (f(x, w) ** 2 * c).sum()), (x,), (x_t,))[1]

        leaves = (x.clone().requires_grad_(), w.clone().requires_grad_())
        return (*grad(lambda x, w: (tangent(x, w) ** 3).sum(), (0, 1))(x, w),
                vjp(lambda x: tangent(x, w), x)[1](x_t)[0],
                *torch.autograd.grad((tangent(*leaves) ** 3).sum(), leaves),
                *grad(lambda x, w: (hvp(x, w) ** 2).sum(), (0, 1))(x, w))

    for got, expected in zip(routes(_bn), routes(_composite_bn)):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_jvp_under_no_grad_records_nothing(backend):
    """Under no_grad a jvp's outputs, primal and tangent, are not recorded for autograd,
    as with torch's own ops, also where an input requires grad (the forward's and the
    backward's jvp rules); their values are those computed outside it."""
    x = torch.randn(4, 3, 2, dtype=DT, requires_grad=True)
    w, b, c = torch.randn(3, dtype=DT), torch.randn(3, dtype=DT), torch.randn_like(x)
    x_t = torch.randn_like(x)

    def outputs():
        def f(x):
            return fastbn.batch_norm(x, None, None, w, b, training=True)

        return (*jvp(f, (x,), (x_t,)),
                *jvp(grad(lambda x: (f(x) ** 2 * c).sum()), (x,), (x_t,)))

    with torch.no_grad():
        quiet = outputs()
    assert not any(t.requires_grad for t in quiet)
    for got, expected in zip(quiet, outputs()):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_bias_tangents_alone_under_vmap(backend):
    # The jvp of a gradient that the bias does not reach: K tangents give K zeros.
    x, w, b = torch.randn(4, 3, 2, dtype=DT), torch.randn(3, dtype=DT), torch.randn(3, dtype=DT)
    c = torch.randn_like(x)

    def grad_x(b_):
        return grad(lambda x: (fastbn.batch_norm(x, None, None, w, b_, training=True)
                               * c).sum())(x)

    out = vmap(lambda t: jvp(grad_x, (b,), (t,))[1])(torch.randn(5, 3, dtype=DT))
    assert out.shape == (5, *x.shape)
    assert torch.equal(out, torch.zeros_like(out))


def test_eval_mode_channels_last_under_transforms(backend):
    # Batched cotangents of an eval-mode layer keep working with a channels-last input.
    x = torch.randn(2, 3, 2, 2, dtype=DT).contiguous(memory_format=torch.channels_last)
    rm, rv = torch.randn(3, dtype=DT), torch.rand(3, dtype=DT) + 0.5
    w, b = torch.randn(3, dtype=DT), torch.randn(3, dtype=DT)

    def f(bn):
        return lambda x, w: bn(x, rm, rv, w, b, training=False).square().sum()

    for transform in (lambda f: jacrev(f, (0, 1)), lambda f: hessian(f, 1)):
        got = transform(f(fastbn.batch_norm))(x, w)
        expected = transform(f(nn.functional.batch_norm))(x, w)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("training", [True, False])
def test_tracers_see_the_op(backend, training):
    # make_fx and linearize record the calls: a traced graph recomputes new inputs.
    from torch.fx.experimental.proxy_tensor import make_fx
    x, t = torch.randn(4, 3, 2, dtype=DT), torch.randn(4, 3, 2, dtype=DT)
    rm, rv = torch.randn(3, dtype=DT), torch.rand(3, dtype=DT) + 0.5
    w, b = torch.randn(3, dtype=DT), torch.randn(3, dtype=DT)

    def f(x):
        return fastbn.batch_norm(x, None if training else rm, None if training else rv,
                                 w, b, training=training, activation="relu")

    graph = make_fx(f)(x)
    x2 = 3 * torch.randn_like(x) + 1
    torch.testing.assert_close(graph(x2), f(x2), rtol=1e-12, atol=1e-12)
    _, linear = torch.func.linearize(f, x)
    torch.testing.assert_close(linear(t), jvp(f, (x,), (t,))[1], rtol=1e-10, atol=1e-12)


def test_hessian_runs_the_second_order_kernels(monkeypatch, backend, problem):
    """hessian = jacfwd(jacrev(f)): the inner jacrev of a scalar vmaps over one cotangent,
    which made the outer level see a K dimension and run the composite in PyTorch ops."""
    from fastbn.ops import autograd
    model, x, params, loss = problem
    composites = []
    original = autograd._composite
    monkeypatch.setattr(autograd, "_composite",
                        lambda *args: composites.append(args) or original(*args))
    name = "1.weight"
    h = hessian(lambda w: loss({**params, name: w}))(params[name])
    assert not composites
    copies = {k: v.clone() for k, v in model.named_buffers()}   # eager calls update them
    expected = torch.autograd.functional.hessian(
        lambda w: loss({**params, name: w}, buffers=copies), params[name])
    torch.testing.assert_close(h, expected, rtol=1e-9, atol=1e-11)


def _transform_uses(loss, params, x):
    """Every torch.func composition the op layer serves at its own levels: grad, vjp,
    forward-over-reverse and reverse-over-reverse HVPs, vmap over tangents and over
    data, hessian (jacfwd of jacrev) and jvp in x."""
    v = {k: torch.randn_like(p) for k, p in params.items()}
    vs = {k: torch.stack([t, -2 * t, torch.randn_like(t)]) for k, t in v.items()}
    name = "1.weight"
    return {
        "grad": grad(loss)(params),
        "vjp": vjp(loss, params)[1](torch.ones((), dtype=DT))[0],
        "forward-over-reverse": jvp(grad(loss), (params,), (v,))[1],
        "reverse-over-reverse": grad(
            lambda p: sum((grad(loss)(p)[k] * v[k]).sum() for k in v))(params),
        "vmap over tangents": vmap(lambda u: jvp(grad(loss), (params,), (u,))[1])(vs),
        "vmap over data": vmap(lambda inp: grad(loss)(params, inp))(torch.stack([x, -x])),
        "hessian": hessian(lambda w: loss({**params, name: w}))(params[name]),
        "jvp in x": jvp(lambda inp: loss(params, inp), (x,), (torch.ones_like(x),))[1],
    }


def test_transforms_apply_the_functions_at_their_levels_as_functorch(monkeypatch, backend,
                                                                     problem):
    """Under torch.func the Functions run at each level through the op layer's own
    single-level form (built once per Function), not functorch's custom_function_call
    (two classes and pytree maps per call): the same bits as through functorch's."""
    from torch._functorch.autograd_function import custom_function_call

    from fastbn.ops import autograd
    model, x, params, loss = problem
    generic = []
    monkeypatch.setattr(autograd, "custom_function_call",
                        lambda *args: generic.append(args[0]) or custom_function_call(*args))
    torch.manual_seed(1)
    own = _transform_uses(loss, params, x)
    assert not generic
    built = autograd._single_level.cache_info().currsize
    assert built
    own_again = _transform_uses(loss, params, x)
    assert autograd._single_level.cache_info().currsize == built   # none built again
    monkeypatch.setattr(autograd, "_apply_under_transform",
                        lambda cls, args: autograd.custom_function_call(cls, *args))
    torch.manual_seed(1)
    through_functorch = _transform_uses(loss, params, x)
    assert generic
    for use, expected in through_functorch.items():
        got = own[use]
        if isinstance(expected, dict):
            got, expected = _flat(got), _flat(expected)
        assert torch.equal(got, expected), use
    assert torch.equal(_flat(own_again["grad"]), _flat(own["grad"]))


@pytest.mark.parametrize("fused", [False, True])
def test_functionalize_updates_running_statistics_as_torch_does(fused, backend):
    """torch.func.functionalize has no rule for autograd.Function: fastbn runs a level
    below it. As torch's layer there, a training call updates the running statistics,
    captured ones and those passed in as the function's inputs."""
    x = torch.randn(4, 3, 5, 5, dtype=DT)
    bn = nn.BatchNorm2d(3).to(DT)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.running_var.fill_(2.0)
    stock = nn.Sequential(bn, nn.ReLU()) if fused else nn.Sequential(bn)
    ours = fastbn.convert(copy.deepcopy(stock), fuse_relu=fused)
    assert getattr(ours[0], "activation", None) == ("relu" if fused else None)
    for train in (True, False, True):
        stock.train(train), ours.train(train)
        want = stock(x)
        got = torch.func.functionalize(ours)(x)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for (name, b), (_, r) in zip(ours.named_buffers(), stock.named_buffers()):
            torch.testing.assert_close(b, r, rtol=1e-12, atol=0, msg=name)
    # Buffers as inputs of the functionalized function: updated in the caller's dict.
    buffers = {k: v.clone() for k, v in ours.named_buffers()}
    want = stock(x)
    got = torch.func.functionalize(lambda b, x: functional_call(ours, b, (x,)))(buffers, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for (name, b), (_, r) in zip(buffers.items(), stock.named_buffers()):
        torch.testing.assert_close(b, r, rtol=1e-12, atol=0, msg=name)


def test_functionalize_around_grad(problem):
    """Under grad too (running statistics untouched there, as under any transform that
    refuses writes to tensors from outside it)."""
    model, x, params, loss = problem
    got = torch.func.functionalize(grad(loss))(params)
    want = grad(loss)(params)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12)
