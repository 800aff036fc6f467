import pytest
import torch
from torch import nn

from fastbn.probes import SmoothnessProbe, top_hessian_eigenvalue


@pytest.mark.parametrize("batch_norm", [False, True])
def test_top_eigenvalue_matches_the_dense_hessian(batch_norm):
    torch.manual_seed(0)
    middle = [nn.BatchNorm1d(4)] if batch_norm else []
    stock = nn.Sequential(nn.Linear(3, 4), *middle, nn.Tanh(), nn.Linear(4, 2)).double()
    inputs = torch.randn(8, 3, dtype=torch.float64)
    targets = torch.randn(8, 2, dtype=torch.float64)
    criterion = nn.MSELoss()
    names = [n for n, _ in stock.named_parameters()]
    shapes = [p.shape for p in stock.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in stock.parameters()])

    def loss(vector):  # stock torch, BN on batch statistics (running stats passed as copies)
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = vector[offset:offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        buffers = {k: b.clone() for k, b in stock.named_buffers()}
        return criterion(torch.func.functional_call(stock, {**params, **buffers}, (inputs,)),
                         targets)

    expected = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))[-1].item()
    before = {k: v.clone() for k, v in stock.state_dict().items()}
    value = top_hessian_eigenvalue(stock, criterion, (inputs, targets), tol=1e-8,
                                   max_iter=len(flat))
    assert value == pytest.approx(expected, rel=1e-5)
    assert all(torch.equal(before[k], v) for k, v in stock.state_dict().items())


def _random_layer_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.RReLU(), nn.Linear(4, 2)).double()


def _regression_batch():
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(8, 3, generator=generator, dtype=torch.float64),
            torch.randn(8, 2, generator=generator, dtype=torch.float64))


def test_a_random_layer_repeats_with_the_seed_and_leaves_the_callers_random_numbers():
    model, criterion = _random_layer_model(), nn.MSELoss()
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = top_hessian_eigenvalue(model, criterion, _regression_batch(), seed=0, max_iter=10)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)   # another sequence around the probe: the seed alone decides
    assert top_hessian_eigenvalue(model, criterion, _regression_batch(), seed=0,
                                  max_iter=10) == first


@pytest.mark.parametrize("seed", [torch.Generator().manual_seed(3), None, 1.5, True])
def test_a_seed_that_is_not_an_int_is_refused(seed):
    """A probe's seed also seeds the random layers' generators (and SmoothnessProbe adds
    the step to it): an int only, checked before any work."""
    with pytest.raises(TypeError, match="seed must be an int"):
        top_hessian_eigenvalue(_random_layer_model(), nn.MSELoss(), _regression_batch(),
                               seed=seed)
    with pytest.raises(TypeError, match="seed must be an int"):
        SmoothnessProbe(_random_layer_model(), nn.MSELoss(), 0.1, seed=seed)


def test_a_seed_outside_torchs_range_is_refused_and_the_callbacks_seed_plus_step_wraps():
    with pytest.raises(ValueError, match=r"seed must be in torch's range"):
        top_hessian_eigenvalue(_random_layer_model(), nn.MSELoss(), _regression_batch(),
                               seed=2 ** 64)
    with pytest.raises(ValueError, match=r"seed must be in torch's range"):
        SmoothnessProbe(_random_layer_model(), nn.MSELoss(), 0.1, seed=-2 ** 63 - 1)
    probe = SmoothnessProbe(_random_layer_model(), nn.MSELoss(), 0.1, every=1,
                            multipliers=(1.0,), sharpness=True, sharpness_max_iter=5,
                            seed=2 ** 64 - 1)
    probe(0, _regression_batch())
    probe(1, _regression_batch())   # seed 2**64: taken as 0
    assert probe.records[1]["sharpness"] == top_hessian_eigenvalue(
        _random_layer_model(), nn.MSELoss(), _regression_batch(), seed=0, tol=1e-2,
        max_iter=5)


def test_the_sharpness_callback_leaves_the_training_runs_random_numbers():
    probe = SmoothnessProbe(_random_layer_model(), nn.MSELoss(), 0.1, every=1,
                            multipliers=(1.0,), sharpness=True, sharpness_max_iter=5)
    torch.manual_seed(5)
    probe(0, _regression_batch())
    after_probe = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after_probe)


@pytest.mark.parametrize("kwargs, message", [
    ({"tol": -1}, "^tol must be a positive finite number"),
    ({"tol": float("nan")}, "^tol must be a positive finite number"),
    ({"tol": True}, "^tol must be a positive finite number"),
    ({"tol": 1.5}, r"^tol is relative to \|λ\| and must be below 1, got 1.5"),
    ({"max_iter": 0}, "^max_iter must be a positive int"),
    ({"max_iter": 2.5}, "^max_iter must be a positive int"),
])
def test_bad_arguments_are_refused_in_words(kwargs, message):
    """By the probe, naming its own argument, before the operator is built."""
    with pytest.raises(ValueError, match=message):
        top_hessian_eigenvalue(_random_layer_model(), nn.MSELoss(), _regression_batch(),
                               **kwargs)
