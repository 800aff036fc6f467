import copy
import math

import pytest
import torch
from torch import nn

from fastbn.curvature import activation_hessian
from tests.curvature.helpers import (DTYPE, SubclassedBatchNorm1d, assert_unchanged,
                                     batch_for, cnn, mlp, snapshot, stock_copy,
                                     with_nontrivial_running_stats)

CRITERION = nn.CrossEntropyLoss()


def by_hand(model, batch, layer_index, bn_mode):
    """Activation, gradient and Hessian of the loss as a function of the output of
    model[layer_index], written with the stock-BN layers that follow it."""
    reference = stock_copy(model, bn_mode)
    inputs, targets = batch
    with torch.no_grad():
        activation = reference[:layer_index + 1](inputs)
    downstream = reference[layer_index + 1:]

    def loss(z):
        return CRITERION(downstream(z), targets)

    gradient = torch.autograd.functional.jacobian(loss, activation)
    hessian = torch.autograd.functional.hessian(loss, activation)
    return activation, gradient, hessian.reshape(activation.numel(), activation.numel())


@pytest.mark.parametrize("make_model", [mlp, cnn])
@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_hvp_and_quadratic_form_match_the_hessian_by_hand(make_model, bn_mode):
    model = with_nontrivial_running_stats(make_model())
    batch = batch_for(model, 5, seed=0)
    before = snapshot(model)
    result = activation_hessian(model, CRITERION, batch, "0", bn_mode=bn_mode)
    activation, gradient, hessian = by_hand(model, batch, 0, bn_mode)
    assert torch.allclose(result.activation, activation, rtol=0, atol=1e-12)
    assert torch.allclose(result.grad, gradient, rtol=0, atol=1e-12)
    v = torch.randn(activation.shape, dtype=DTYPE)
    expected = (hessian @ v.reshape(-1)).reshape(v.shape)
    assert (result.hvp(v) - expected).abs().max() <= 1e-8 * expected.abs().max()
    g = gradient.reshape(-1)
    expected_form = float(g @ hessian @ g / (g @ g))
    assert math.isclose(result.quadratic_form(), expected_form, rel_tol=1e-8)
    assert_unchanged(model, before)


def test_works_under_inference_mode():
    """torch.inference_mode() around a measurement is natural to write; the derivatives
    are taken with it off, batch made under it included."""
    model = mlp()
    expected = activation_hessian(model, CRITERION, batch_for(model, 5, seed=0), "1")
    v = torch.randn(expected.activation.shape, dtype=DTYPE)
    with torch.inference_mode():
        result = activation_hessian(model, CRITERION, batch_for(model, 5, seed=0), "1")
        product, form = result.hvp(v), result.quadratic_form()
    assert torch.equal(result.grad, expected.grad)
    assert torch.equal(product, expected.hvp(v)) and form == expected.quadratic_form()


def test_batch_norm_output_as_the_variable():
    model = mlp()
    batch = batch_for(model, 5, seed=0)
    result = activation_hessian(model, CRITERION, batch, "1")
    activation, gradient, hessian = by_hand(model, batch, 1, "train")
    v = torch.randn(activation.shape, dtype=DTYPE)
    assert torch.allclose(result.grad, gradient, atol=1e-12)
    assert torch.allclose(result.hvp(v), (hessian @ v.reshape(-1)).reshape(v.shape), atol=1e-10)


def test_errors_leave_the_model_alone():
    model = cnn()
    batch = batch_for(model, 5, seed=0)
    before = snapshot(model)
    with pytest.raises(ValueError, match="unknown layer 'conv9'"):
        activation_hessian(model, CRITERION, batch, "conv9")
    with pytest.raises(ValueError, match="bn_mode"):
        activation_hessian(model, CRITERION, batch, "0", bn_mode="running")
    with pytest.raises(RuntimeError, match="non-finite"):
        activation_hessian(model, lambda out, y: CRITERION(out, y) / 0.0, batch, "0")
    with pytest.raises(ValueError, match="criterion must return a scalar tensor"):
        activation_hessian(model, nn.CrossEntropyLoss(reduction="none"), batch, "0")
    inputs, targets = batch
    with pytest.raises(ValueError, match=r"got 2 batches; a batch whose inputs are a tuple "
                                         r"goes in a list of one: \[batch\]"):
        activation_hessian(model, CRITERION, ((inputs, inputs), targets), "0")
    with pytest.raises(ValueError, match=r"got 3 batches$"):
        activation_hessian(model, CRITERION, [batch] * 3, "0")
    result = activation_hessian(model, CRITERION, [batch], "1")
    with pytest.raises(ValueError, match="activation's shape"):
        result.hvp(torch.ones(3))
    assert_unchanged(model, before)


def test_a_layer_called_twice_is_refused():
    shared = nn.Linear(4, 4).to(DTYPE)
    model = nn.Sequential(shared, nn.BatchNorm1d(4).to(DTYPE), shared)
    batch = (torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 4, (5,)))
    with pytest.raises(ValueError, match="ran 2 times"):
        activation_hessian(model, CRITERION, batch, "0")


def test_hvp_with_an_mse_loss():
    model = mlp()
    inputs = torch.randn(5, 3, dtype=DTYPE)
    targets = torch.randn(5, 3, dtype=DTYPE)
    criterion = nn.MSELoss()
    result = activation_hessian(model, criterion, (inputs, targets), "1")
    reference = stock_copy(model, "train")
    activation = reference[:2](inputs).detach()
    hessian = torch.autograd.functional.hessian(
        lambda z: criterion(reference[2:](z), targets), activation).reshape(20, 20)
    v = torch.randn(activation.shape, dtype=DTYPE)
    assert torch.allclose(result.hvp(v), (hessian @ v.reshape(-1)).reshape(v.shape),
                          atol=1e-12)


def test_dropout_downstream_runs_in_eval_mode():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.5), nn.BatchNorm1d(4),
                          nn.Linear(4, 3)).to(DTYPE)
    batch = batch_for(model, 5, seed=0)
    before = snapshot(model)
    result = activation_hessian(model, CRITERION, batch, "0")
    without_dropout = copy.deepcopy(model)
    without_dropout[2].eval()
    activation, gradient, hessian = by_hand(without_dropout, batch, 0, "train")
    v = torch.randn(activation.shape, dtype=DTYPE)
    expected = (hessian @ v.reshape(-1)).reshape(v.shape)
    assert torch.allclose(result.grad, gradient, atol=1e-12)
    for _ in range(2):
        assert (result.hvp(v) - expected).abs().max() <= 1e-8 * expected.abs().max()
    assert_unchanged(model, before)


class _NoisyDownstream(nn.Module):
    """Linear → tanh → uniform noise and F.dropout in training mode → BN → Linear."""

    def __init__(self):
        super().__init__()
        self.first, self.bn, self.head = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.first(x))
        h = nn.functional.dropout(h + 0.1 * torch.rand_like(h), 0.5, self.training)
        return self.head(self.bn(h))


def test_random_operations_draw_the_same_numbers_in_every_evaluation():
    torch.manual_seed(4)
    model = _NoisyDownstream().to(DTYPE)
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randn(6, 3, generator=generator, dtype=DTYPE),
             torch.randint(0, 3, (6,), generator=generator))
    state = torch.get_rng_state()
    result = activation_hessian(model, CRITERION, batch, "first")
    assert torch.equal(torch.get_rng_state(), state)
    v = torch.randn(result.activation.shape, dtype=DTYPE)
    u = torch.randn(result.activation.shape, dtype=DTYPE)
    hv = result.hvp(v)
    assert torch.equal(result.hvp(v), hv)
    assert float((u * hv).sum()) == pytest.approx(float((v * result.hvp(u)).sum()), rel=1e-10)
    # The caller's generator state decides the draws.
    torch.set_rng_state(state)
    again = activation_hessian(model, CRITERION, batch, "first")
    assert torch.equal(again.grad, result.grad) and torch.equal(again.loss, result.loss)


def test_a_torch_batch_norm_subclass_downstream():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), SubclassedBatchNorm1d(4), nn.Tanh(),
                          nn.Linear(4, 3)).to(DTYPE)
    batch = batch_for(model, 5, seed=0)
    result = activation_hessian(model, CRITERION, batch, "0")
    activation, _, hessian = by_hand(model, batch, 0, "train")
    v = torch.randn(activation.shape, dtype=DTYPE)
    expected = (hessian @ v.reshape(-1)).reshape(v.shape)
    assert (result.hvp(v) - expected).abs().max() <= 1e-8 * expected.abs().max()


class _AddOne(nn.Module):
    """x + 1, in place (like a residual block's `out += identity`) or not."""

    def __init__(self, inplace):
        super().__init__()
        self.inplace = inplace

    def forward(self, x):
        return x.add_(1.0) if self.inplace else x + 1.0


@pytest.mark.parametrize("follower", [nn.ReLU, _AddOne])
def test_an_in_place_op_downstream_of_the_layer(follower):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), follower(inplace=True),
                          nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)
    not_in_place = copy.deepcopy(model)
    not_in_place[2] = follower(inplace=False)
    batch = batch_for(model, 5, seed=0)
    result = activation_hessian(model, CRITERION, batch, "1")
    activation, gradient, hessian = by_hand(not_in_place, batch, 1, "train")
    # The batch norm's output, not the in-place op's.
    assert torch.allclose(result.activation, activation, rtol=0, atol=1e-12)
    assert torch.allclose(result.grad, gradient, rtol=0, atol=1e-12)
    v = torch.randn(activation.shape, dtype=DTYPE)
    expected = (hessian @ v.reshape(-1)).reshape(v.shape)
    assert (result.hvp(v) - expected).abs().max() <= 1e-8 * expected.abs().max()


def test_the_result_describes_the_moment_it_was_made():
    # An optimizer step or an in-place change of the batch afterwards leaves hvp on the
    # state that activation and grad came from.
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)
    x, y = torch.randn(8, 3, dtype=DTYPE), torch.randint(0, 3, (8,))
    result = activation_hessian(model, nn.CrossEntropyLoss(), (x, y), "0")
    before = result.hvp(result.grad)
    with torch.no_grad():
        model[3].weight.mul_(3.0)
        x.mul_(2.0)
    assert torch.equal(result.hvp(result.grad), before)
