"""Every order of autodiff through the op, in float64, against numerical derivatives."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.func import jvp

import fastbn
from fastbn.testing import NoGradient

SHAPES = [(3, 2), (2, 3, 5), (3, 2, 3, 2), (2, 2, 2, 3, 2)]   # 1d, 1d+L, 2d, 3d
DT = torch.float64


def _inputs(shape, affine):
    x = torch.randn(shape, dtype=DT, requires_grad=True)
    c = shape[1]
    params = (torch.randn(c, dtype=DT, requires_grad=True),
              torch.randn(c, dtype=DT, requires_grad=True)) if affine else ()
    running = (torch.randn(c, dtype=DT), torch.rand(c, dtype=DT) + 0.5)
    return x, params, running


def _op(training, activation, running, affine):
    def f(x, *params):
        weight, bias = params if affine else (None, None)
        rm, rv = (t.clone() for t in running)
        return fastbn.batch_norm(x, rm, rv, weight, bias, training=training,
                                 activation=activation)
    return f


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_gradcheck_and_gradgradcheck(backend, shape, training, affine, activation):
    if backend == "triton" and (shape, training, affine) != (SHAPES[2], True, True):
        pytest.skip("Triton interpreter: about 40 s a case; one 2d case per activation")
    x, params, running = _inputs(shape, affine)
    f = _op(training, activation, running, affine)
    assert gradcheck(f, (x, *params), check_forward_ad=True, check_backward_ad=True,
                     check_batched_grad=True, check_batched_forward_grad=True)
    assert gradgradcheck(f, (x, *params), check_fwd_over_rev=True, check_rev_over_rev=True,
                         check_batched_grad=True)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_nested_forward_mode_matches_finite_differences(backend, training, activation):
    x, (w, b), running = _inputs((4, 3, 5), True)
    f = _op(training, activation, running, True)
    u = torch.randn_like(x)
    cot = torch.randn_like(x)

    def first(x):
        return (jvp(lambda x: f(x, w, b), (x,), (u,))[1] * cot).sum()

    second = jvp(first, (x.detach(),), (u,))[1]
    h = 1e-5
    fd = (first(x.detach() + h * u) - first(x.detach() - h * u)) / (2 * h)
    assert second.item() == pytest.approx(fd.item(), rel=1e-6, abs=1e-9)


def test_jvp_of_backward_with_weight_and_input_tangents(backend):
    # The forward-over-reverse route of torch.func.hessian; stock torch is wrong here.
    x, (w, b), _ = _inputs((6, 3, 4), True)
    cot = torch.randn_like(x)

    def loss(x, w):
        return (fastbn.batch_norm(x, None, None, w, b, training=True) * cot).sum() \
            + (fastbn.batch_norm(x, None, None, w, b, training=True) ** 2).sum()

    v = (torch.randn_like(x), torch.randn_like(w))
    fwd = jvp(torch.func.grad(loss, argnums=(0, 1)), (x.detach(), w.detach()), v)[1]
    xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
    grads = torch.autograd.grad(loss(xs, ws), (xs, ws), create_graph=True)
    rev = torch.autograd.grad(grads, (xs, ws), grad_outputs=v)
    for a, b_ in zip(fwd, rev):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-10)


def test_third_order_reverse(backend):
    x, (w, b), _ = _inputs((5, 2, 3), True)

    def f(x):
        return (fastbn.batch_norm(x, None, None, w, b, training=True) ** 3).sum()

    def composite(x):
        var, mean = torch.var_mean(x, (0, 2), correction=0, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + 1e-5) * w[:, None] + b[:, None]
        return (y ** 3).sum()

    xs = x.detach()
    third = torch.func.jacrev(torch.func.jacrev(torch.func.grad(f)))(xs)
    expected = torch.func.jacrev(torch.func.jacrev(torch.func.grad(composite)))(xs)
    torch.testing.assert_close(third, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("training", [True, False])
def test_is_grads_batched_first_and_second_order(backend, training):
    # autograd.grad(is_grads_batched=True) runs the legacy vmap through the Functions.
    x, (w, b), running = _inputs((5, 3, 4), True)
    y = _op(training, "relu", running, True)(x, w, b)
    cotangents = torch.randn(4, *y.shape, dtype=DT)
    g = torch.autograd.grad(y, x, torch.randn_like(y), create_graph=True)[0]
    for out in (y, g):
        batched = torch.autograd.grad(out, (x, w), cotangents, is_grads_batched=True,
                                      retain_graph=True, allow_unused=True)
        for i in range(4):
            single = torch.autograd.grad(out, (x, w), cotangents[i], retain_graph=True,
                                         allow_unused=True)
            for a, b_ in zip(batched, single):
                assert (a is None) == (b_ is None)
                if a is not None:
                    torch.testing.assert_close(a[i], b_, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("training", [True, False])
def test_is_grads_batched_with_create_graph_stays_differentiable(backend, training):
    """The batched gradients of create_graph=True carry batch norm's part of the next
    derivative (under the legacy vmap, autograd gives a Function's outputs no graph)."""
    x, (w, b), running = _inputs((5, 3, 4), True)
    y = _op(training, "relu", running, True)(x, w, b)
    cotangents = torch.randn(2, *y.shape, dtype=DT)
    batched = torch.autograd.grad(y, (x, w), cotangents, is_grads_batched=True,
                                  create_graph=True)
    unused = dict(allow_unused=True, materialize_grads=True)   # b: only the ReLU mask's
    got = torch.autograd.grad(sum((g ** 2).sum() for g in batched), (x, w, b), **unused)
    single = [torch.autograd.grad(y, (x, w), c, create_graph=True) for c in cotangents]
    want = torch.autograd.grad(sum((g ** 2).sum() for pair in single for g in pair),
                               (x, w, b), **unused)
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-12)


def test_third_order_plain_autograd(backend):
    x, (w, _), _ = _inputs((5, 3, 4), True)

    def composite(x):
        var, mean = torch.var_mean(x, (0, 2), correction=0, keepdim=True)
        return torch.relu((x - mean) * torch.rsqrt(var + 1e-5) * w[:, None])

    def third(y_of_x):
        g, = torch.autograd.grad((y_of_x(x) ** 3).sum(), x, create_graph=True)
        h, = torch.autograd.grad((g ** 2).sum(), x, create_graph=True)
        return torch.autograd.grad(h.sum(), x)[0]

    fast = third(lambda x: fastbn.batch_norm(x, None, None, w, None, training=True,
                                             activation="relu"))
    torch.testing.assert_close(fast, third(composite), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("training", [True, False])
def test_fused_relu_at_a_zero_pre_activation_is_torchs(backend, training):
    """Weight and bias 0 on channel 0: every pre-activation there is exactly 0, where
    torch's relu passes no gradient (its mask is y > 0). First and second order and
    the jvp against batch_norm + relu in torch."""
    x = torch.randn(4, 3, 5, dtype=DT, requires_grad=True)
    w = torch.tensor([0.0, 1.0, 2.0], dtype=DT, requires_grad=True)
    b = torch.tensor([0.0, 0.5, -0.5], dtype=DT, requires_grad=True)
    running = (torch.randn(3, dtype=DT), torch.rand(3, dtype=DT) + 0.5)
    grad_y, x_t = torch.randn(4, 3, 5, dtype=DT), torch.randn(4, 3, 5, dtype=DT)

    def stock(x, w, b):
        rm, rv = (t.clone() for t in running)
        return torch.relu(torch.nn.functional.batch_norm(x, rm, rv, w, b, training=training))

    def second(fn):
        y = fn(x, w, b)
        first = torch.autograd.grad(y, (x, w, b), grad_y, create_graph=True)
        outer = sum((g ** 2).sum() for g in first)
        return (y, *first, *torch.autograd.grad(outer, (x, w, b)))
    ours = _op(training, "relu", running, True)
    for got, want in zip(second(ours), second(stock)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    tangents = (x_t, torch.randn(3, dtype=DT), torch.randn(3, dtype=DT))
    primals = (x.detach(), w.detach(), b.detach())
    torch.testing.assert_close(jvp(ours, primals, tangents)[1],
                               jvp(stock, primals, tangents)[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("training", [True, False])
def test_fused_relu_keeps_bias_in_the_second_order_graph(backend, training):
    """BN then relu keeps the bias in the graph of the first-order gradients (their
    derivative with respect to it is zero), so autograd.grad needs no allow_unused."""
    x = torch.randn(6, 4, dtype=DT, requires_grad=True)
    weight = torch.rand(4, dtype=DT, requires_grad=True)
    bias = torch.randn(4, dtype=DT, requires_grad=True)
    running = (torch.zeros(4, dtype=DT), torch.ones(4, dtype=DT))
    y = _op(training, "relu", running, True)(x, weight, bias)
    g_x, g_w = torch.autograd.grad((y * torch.randn_like(y)).sum(), (x, weight),
                                   create_graph=True)
    (g_bias,) = torch.autograd.grad((g_x ** 2).sum() + (g_w ** 2).sum(), bias)
    assert torch.equal(g_bias, torch.zeros_like(bias))
    # The same through the jvp's backward (forward-over-reverse's transpose).
    _, y_t = torch.func.jvp(lambda t: _op(training, "relu", running, True)(t, weight, bias),
                            (x,), (torch.randn_like(x),))
    (g_bias,) = torch.autograd.grad((y_t ** 2).sum(), bias)
    assert torch.equal(g_bias, torch.zeros_like(bias))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_bias_changed_in_place_before_the_backward(backend, training, activation):
    """As torch's: without the ReLU no derivative reads the bias, so a change to it in
    place (an optimiser step, say) before the backward is fine; with it the mask does,
    and autograd says so."""
    x = torch.randn(6, 3, 4, dtype=DT, requires_grad=True)
    weight, bias = (torch.rand(3, dtype=DT, requires_grad=True) for _ in range(2))
    running = (torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT))
    grad_y = torch.randn(6, 3, 4, dtype=DT)
    y = _op(training, activation, running, True)(x, weight, bias)
    expected = torch.autograd.grad(y, (x, weight, bias), grad_y, retain_graph=True)
    with torch.no_grad():
        bias.add_(1.0)
    if activation == "relu":
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(y, (x, weight, bias), grad_y)
        return
    for got, want in zip(torch.autograd.grad(y, (x, weight, bias), grad_y), expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("training", [True, False])
def test_a_float32_bias_beside_a_bfloat16_weight_keeps_its_gradients_dtype(backend, training):
    """weight=None is filled in x's dtype; the bias stays float32, and so must its
    gradient (sum of grad_y per channel, exact in float32, not in bfloat16)."""
    x = torch.randn(8, 3, 5).bfloat16()
    bias = torch.randn(3, requires_grad=True)
    y = fastbn.batch_norm(x, torch.zeros(3), torch.ones(3), None, bias, training=training)
    grad_y = torch.randn(8, 3, 5).bfloat16()
    (grad_bias,) = torch.autograd.grad(y, bias, grad_y)
    assert grad_bias.dtype == torch.float32
    torch.testing.assert_close(grad_bias.double(), grad_y.double().sum((0, 2)),
                               rtol=1e-6, atol=1e-6)


# grad_y's layouts: the other memory format, and ones whose spatial dims do not flatten
# (which the kernels hand to PyTorch ops, whose results take their operands' layout).
GRAD_LAYOUTS = {
    "other format": lambda g, x_layout: g.contiguous(memory_format=(
        torch.contiguous_format if x_layout == torch.channels_last else torch.channels_last)),
    "expanded": lambda g, x_layout: g[:1, :1, :1, :1].expand(g.shape),
    "sliced": lambda g, x_layout: torch.cat([g, g], 1)[:, ::2],
    "spatial dims swapped": lambda g, x_layout: g.transpose(2, 3).contiguous().transpose(2, 3),
}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("x_layout", [torch.channels_last, torch.contiguous_format], ids=str)
@pytest.mark.parametrize("grad_layout", GRAD_LAYOUTS)
def test_input_gradient_takes_the_inputs_layout(backend, training, x_layout, grad_layout):
    """As torch's: the input gradient is laid out like the input, whatever grad_y's."""
    x = torch.randn(3, 4, 5, 2, dtype=DT).contiguous(memory_format=x_layout).requires_grad_()
    weight = torch.rand(4, dtype=DT, requires_grad=True)
    running = (torch.zeros(4, dtype=DT), torch.ones(4, dtype=DT))
    y = _op(training, None, running, True)(x, weight, torch.zeros(4, dtype=DT))
    grad_y = GRAD_LAYOUTS[grad_layout](torch.randn(y.shape, dtype=DT), x_layout)
    (g_x,) = torch.autograd.grad(y, x, grad_y)
    assert g_x.is_contiguous(memory_format=x_layout)


def _composite_bn(w, b, activation=None):
    """Training-mode batch norm over (N, C, L) in PyTorch ops: the reference math."""
    def f(x):
        var, mean = torch.var_mean(x, (0, 2), correction=0, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + 1e-5) * w[:, None] + b[:, None]
        return torch.relu(y) if activation == "relu" else y
    return f


@pytest.mark.parametrize("activation", [None, "relu"])
def test_third_order_forward_over_reverse(backend, activation):
    # Forward mode through a double backward: the second-order Functions' jvp rules,
    # by torch.func and by plain forward-mode AD over autograd.grad(create_graph=True).
    import torch.autograd.forward_ad as fwAD
    x, (w, b), _ = _inputs((5, 3, 2), True)
    x = x.detach()
    c, v, t = torch.randn_like(x), torch.randn_like(x), torch.randn_like(x)

    def fast(x):
        return fastbn.batch_norm(x, None, None, w, b, training=True, activation=activation)

    def by_torch_func(bn):
        def hvp(x):
            loss = lambda y: ((bn(y) ** 3) * c).sum()   # noqa: E731
            return torch.func.grad(lambda y: (torch.func.grad(loss)(y) * v).sum())(x)
        return jvp(hvp, (x,), (t,))[1]

    def by_forward_ad(bn):
        with fwAD.dual_level():
            dual = fwAD.make_dual(x.clone().requires_grad_(), t)
            g, = torch.autograd.grad(((bn(dual) ** 3) * c).sum(), dual, create_graph=True)
            h, = torch.autograd.grad((g * v).sum(), dual, create_graph=True)
            return fwAD.unpack_dual(h).tangent

    reference = _composite_bn(w, b, activation)
    for route in (by_torch_func, by_forward_ad):
        torch.testing.assert_close(route(fast), route(reference), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("create_graph", [False, True])
def test_an_undefined_output_gradient_gives_none_as_torch_does(backend, training,
                                                               create_graph):
    """A downstream backward that gives y no gradient (None): x, weight and bias get
    none from batch norm either (x's comes from elsewhere), as in torch, rather than
    zero tensors computed by the kernels."""
    x = torch.randn(4, 3, 5, dtype=DT, requires_grad=True)
    weight, bias = (torch.rand(3, dtype=DT, requires_grad=True) for _ in range(2))
    running = (torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT))

    def grads(bn):
        y = bn(x, *(t.clone() for t in running), weight, bias, training)
        loss = NoGradient.apply(y).sum() + (x * 2).sum()
        return torch.autograd.grad(loss, (x, weight, bias), allow_unused=True,
                                   create_graph=create_graph)
    got, want = grads(fastbn.batch_norm), grads(torch.nn.functional.batch_norm)
    assert [g is None for g in got] == [g is None for g in want] == [False, True, True]
    torch.testing.assert_close(got[0], want[0])
