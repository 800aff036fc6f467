import pytest
import torch
from torch import nn

import fastbn
from fastbn.experiments import models
from fastbn.experiments.training import train


@pytest.mark.parametrize("shape, stages", [((1, 8, 8), 3), ((1, 28, 28), 4), ((3, 32, 32), 5)])
def test_vgg_fits_the_input_size(shape, stages):
    model = models.vgg(shape, 10, batch_norm=True, width=0.0625, hidden=8)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model) == stages
    assert model(torch.randn(2, *shape)).shape == (2, 10)
    assert all(isinstance(m, fastbn.BatchNorm2d) for m in model if isinstance(m, nn.BatchNorm2d))


def test_variants_share_identical_weights():
    plain = models.vgg((1, 8, 8), 10, batch_norm=False, width=0.125, hidden=16, seed=3)
    bn = models.vgg((1, 8, 8), 10, batch_norm=True, width=0.125, hidden=16, seed=3)
    shared = [m for m in plain if isinstance(m, (nn.Conv2d, nn.Linear))]
    with_bn = [m for m in bn if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(shared) == len(with_bn)
    for a, b in zip(shared, with_bn):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    # BN right after each conv, before its ReLU
    layers = list(bn)
    for i, m in enumerate(layers):
        if isinstance(m, nn.Conv2d):
            assert isinstance(layers[i + 1], nn.BatchNorm2d) and isinstance(layers[i + 2], nn.ReLU)
    other = models.vgg((1, 8, 8), 10, batch_norm=False, width=0.125, hidden=16, seed=4)
    assert not torch.equal(other[0].weight, plain[0].weight)


def test_deep_linear_net_layout():
    plain = models.deep_linear_net(10, 25, batch_norm=False)
    bn = models.deep_linear_net(10, 25, batch_norm=True)
    assert sum(isinstance(m, nn.Linear) for m in plain) == 25
    assert sum(isinstance(m, nn.BatchNorm1d) for m in bn) == 24
    assert all(m.bias is None for m in plain if isinstance(m, nn.Linear))


def test_divergence_is_recorded_not_raised():
    model = models.deep_linear_net(4, 6, batch_norm=False)
    x = torch.randn(16, 4)
    result = train(model, nn.MSELoss(reduction="sum"), [(x, 100 * x)] * 20, 20, lr=10.0,
                   probe_every=5, multipliers=(1.0,), progress=False)
    assert result["diverged_at_step"] is not None
    assert result["steps_completed"] == result["diverged_at_step"]
    assert len(result["curves"]["loss"]) == result["diverged_at_step"] + 1


def test_final_evaluation_is_of_the_final_weights_once():
    """A divergence right after an evaluation step applies no update: the final weights
    were evaluated already, under the number of updates applied."""
    model = models.deep_linear_net(4, 6, batch_norm=False)
    x = torch.randn(16, 4)
    result = train(model, nn.MSELoss(reduction="sum"), [(x, 100 * x)] * 20, 20, lr=10.0,
                   eval_every=1, evaluate=lambda m: {"norm": float(m[0].weight.norm())},
                   progress=False)
    completed = result["steps_completed"]
    steps = [e["step"] for e in result["evaluations"]]
    assert steps == list(range(completed + 1))

