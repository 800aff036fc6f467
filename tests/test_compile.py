"""The torch.compile route: custom ops with fake and autograd registrations."""

import copy

import pytest
import torch
from torch import nn

import fastbn
from fastbn.ops import library


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    eager = fastbn.convert(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)), fuse_relu=True)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x, target = torch.randn(5, 3, 6, 6), torch.randint(0, 3, (5,))
    for _ in range(2):
        for model in (eager, compiled):
            nn.functional.cross_entropy(model(x), target).backward()
    for p, q in zip(eager.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6)
    for b, c in zip(eager.buffers(), compiled_model.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6)
    eager.eval()
    compiled_model.eval()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", [None, "relu"])
def test_compiled_double_backward_matches_stock(activation):
    """The second derivative through the custom ops' autograd registrations (Dynamo's
    eager backend: aot_autograd has no double backward), against stock batch norm."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def stock(x, w, b):
        y = nn.functional.batch_norm(x, None, None, w, b, training=True)
        return y.relu() if activation else y

    def ours(x, w, b):
        return fastbn.batch_norm(x, None, None, w, b, training=True, activation=activation)

    def second(fn):
        gx, gw, gb = torch.autograd.grad((fn(x, w, b) ** 3).sum(), (x, w, b),
                                         create_graph=True)
        return torch.autograd.grad((gx ** 2).sum() + (gw ** 2).sum() + gb.sum() ** 2,
                                   (x, w, b), allow_unused=True, materialize_grads=True)
    want = second(stock)
    got = second(torch.compile(ours, backend="eager", fullgraph=True))
    for g, v in zip(got, want):
        torch.testing.assert_close(g, v, rtol=1e-9, atol=1e-9)


def test_compiled_cumulative_average_with_a_backward_each_step():
    # momentum=None blends with 1/n, a float that changes every step: inductor once kept
    # a stale value of it from the third step on (torch's layer was right).
    torch.manual_seed(0)
    layers = [fastbn.BatchNorm2d(2, momentum=None).double(),
              nn.BatchNorm2d(2, momentum=None).double()]
    compiled = [torch.compile(layer) for layer in layers]
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    for _ in range(4):
        for model in compiled:
            model(x.clone().requires_grad_()).sum().backward()
    ours, stock = layers
    torch.testing.assert_close(ours.running_mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(ours.running_mean, stock.running_mean)
    torch.testing.assert_close(ours.running_var, stock.running_var)
    assert ours.num_batches_tracked == stock.num_batches_tracked == 4


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_compiled_bias_changed_in_place_before_the_backward(training, activation):
    """As eager (tests/test_autograd.py): fine without the ReLU, refused with it.
    aot_eager runs the custom ops' registered derivatives (inductor's partitioner picks
    what to save itself)."""
    x = torch.randn(6, 3, 4, requires_grad=True)
    weight, bias = torch.rand(3, requires_grad=True), torch.rand(3, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    f = torch.compile(lambda x, w, b: fastbn.batch_norm(x, rm, rv, w, b, training=training,
                                                        activation=activation),
                      backend="aot_eager", fullgraph=True)
    y = f(x, weight, bias)
    expected = torch.autograd.grad(y.sum(), (x, weight), retain_graph=True)
    with torch.no_grad():
        bias.add_(1.0)
    if activation == "relu":
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(y.sum(), (x, weight))
        return
    for got, want in zip(torch.autograd.grad(y.sum(), (x, weight)), expected):
        torch.testing.assert_close(got, want)


_LAYOUTS = {"contiguous": lambda x: x.contiguous(),
            "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
            "permuted": lambda x: x.permute(0, 1, 3, 2)}   # spatial dims that do not flatten


@pytest.mark.parametrize("activation", ["", "relu"])
@pytest.mark.parametrize("layout", list(_LAYOUTS))
@pytest.mark.parametrize("grad_layout", ["same", "contiguous", "channels_last"])
def test_opcheck(backend, activation, layout, grad_layout):
    """Fake and real kernels agree on shapes and strides, whatever the layouts."""
    x = _LAYOUTS[layout](torch.randn(4, 3, 5, 6))
    w, b = torch.randn(3), torch.randn(3)
    torch.library.opcheck(library.forward_train, (x, w, b, 1e-5, activation))
    _, mean, invstd, _ = library.forward_train(x, w, b, 1e-5, activation)
    gy = torch.randn_like(x) if grad_layout == "same" else \
        _LAYOUTS[grad_layout](torch.randn(x.shape))
    torch.library.opcheck(library.backward, (gy, x, mean, invstd, w, b, activation))
    torch.library.opcheck(library.backward_backward,
                          (torch.randn_like(x), torch.randn(3), None, gy, x, mean, invstd, w, b,
                           activation))
    torch.library.opcheck(library.forward_eval,
                          (x, torch.zeros(3), torch.ones(3), w, b, 1e-5, activation))


def test_compiled_running_variance_is_exact_below_eps():
    # A variance far below eps: recovering it from invstd would leave rounding noise.
    torch.manual_seed(0)
    stock = nn.BatchNorm2d(3, momentum=1.0)
    eager = fastbn.convert(copy.deepcopy(stock))
    compiled_model = fastbn.convert(copy.deepcopy(stock))
    compiled = torch.compile(compiled_model, backend="eager", fullgraph=True)
    x = 1e-4 * torch.randn(8, 3, 4, 4)
    for model in (stock, eager, compiled):
        model(x)
    torch.testing.assert_close(compiled_model.running_var, stock.running_var, rtol=1e-6, atol=0)
    torch.testing.assert_close(compiled_model.running_var, eager.running_var, rtol=0, atol=0)
    torch.testing.assert_close(compiled_model.running_mean, eager.running_mean, rtol=0, atol=0)


@pytest.mark.parametrize("capture", ["export", "jit.trace"])
def test_captured_training_graphs_keep_the_running_statistics_out_of_autograd(capture):
    """torch.export and jit.trace drop the no_grad around the running-statistics update:
    the statistics took a grad_fn, held every past input alive, and the next eager call
    of the layer refused them."""
    torch.manual_seed(0)
    layer = fastbn.BatchNorm2d(3).train()
    x = torch.randn(4, 3, 2, 2)
    captured = (torch.export.export(layer, (x,)).module() if capture == "export"
                else torch.jit.trace(layer, x, check_trace=False))
    stock = nn.BatchNorm2d(3).train()
    if capture == "jit.trace":
        stock(x)   # tracing runs the layer
    for _ in range(3):
        x = torch.randn(4, 3, 2, 2, requires_grad=True)
        captured(x).sum().backward()
        stock(x)
    for buffer in ("running_mean", "running_var"):
        got = getattr(layer, buffer)
        assert not got.requires_grad and got.grad_fn is None
        torch.testing.assert_close(got, getattr(stock, buffer))
    layer(torch.randn(4, 3, 2, 2, requires_grad=True))


@pytest.mark.parametrize("training", [True, False])
def test_compiled_forward_mode_ad_keeps_the_tangent(training):
    """The custom ops that graph capture records have no forward-mode rule: torch
    dropped the tangent of a dual input silently."""
    import torch.autograd.forward_ad as fwAD
    torch.manual_seed(0)
    layer = fastbn.BatchNorm2d(3, activation="relu").double().train(training)
    layer.running_var.fill_(2.0)
    eager_layer = copy.deepcopy(layer)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x, tangent = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 3, 2, 2,
                                                                         dtype=torch.float64)
    results = []
    for model in (compiled, eager_layer):
        with fwAD.dual_level():
            out = fwAD.unpack_dual(model(fwAD.make_dual(x, tangent)))
            results.append((out.primal, out.tangent))
    (primal, tangent_out), (expected_primal, expected_tangent) = results
    assert tangent_out is not None
    torch.testing.assert_close(tangent_out, expected_tangent)
    torch.testing.assert_close(primal, expected_primal)
    for got, want in zip(layer.buffers(), eager_layer.buffers()):
        torch.testing.assert_close(got, want)
