import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import fastbn
from fastbn import curvature
from fastbn.probes import (DEFAULT_MULTIPLIERS, SmoothnessProbe, _functional,
                           gradient_step_probe, theory_checks, top_hessian_eigenvalue)
from fastbn.testing import run_processes
from tests.probes.helpers import TupleInputs


def tiny_model(torch_bn=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    model = model.double()
    # Non-trivial running statistics and counter, so restoration is really tested.
    model.train()
    for _ in range(3):
        model(torch.randn(8, 4, dtype=torch.float64))
    return model if torch_bn else fastbn.convert(model)


def batch():
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(10, 4, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (10,), generator=generator))


def direct_probe(model, criterion, data, lr, multipliers):
    """The probe by hand: plain torch model copies, BN in train mode, autograd gradients."""
    inputs, targets = data

    def loss_and_grad(m):
        m = copy.deepcopy(m).train()
        loss = criterion(m(inputs), targets)
        return loss.item(), torch.autograd.grad(loss, list(m.parameters()))

    loss0, grad0 = loss_and_grad(model)
    losses, changes = [], []
    for mult in multipliers:
        eta = mult * lr
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for p, g in zip(moved.parameters(), grad0):
                p -= eta * g
        loss, grad = loss_and_grad(moved)
        losses.append(loss)
        changes.append(math.sqrt(sum((a - b).pow(2).sum().item() for a, b in zip(grad, grad0))))
    grad_norm = math.sqrt(sum(g.pow(2).sum().item() for g in grad0))
    return loss0, grad_norm, losses, changes


@pytest.mark.parametrize("torch_bn", [True, False])
def test_probe_matches_direct_computation(torch_bn):
    model, criterion, data, lr = tiny_model(torch_bn), nn.CrossEntropyLoss(), batch(), 0.3
    multipliers = (0.5, 1.0, 4.0)
    result = gradient_step_probe(model, criterion, data, lr, multipliers=multipliers)
    loss0, grad_norm, losses, changes = direct_probe(model, criterion, data, lr, multipliers)
    assert result["loss"] == pytest.approx(loss0, rel=1e-10)
    assert result["grad_norm"] == pytest.approx(grad_norm, rel=1e-10)
    assert result["etas"] == pytest.approx([m * lr for m in multipliers])
    assert result["losses"] == pytest.approx(losses, rel=1e-10)
    assert result["grad_changes"] == pytest.approx(changes, rel=1e-8)
    assert result["loss_min"] == pytest.approx(min(losses), rel=1e-10)
    assert result["loss_max"] == pytest.approx(max(losses), rel=1e-10)
    assert result["grad_change_min"] == pytest.approx(min(changes), rel=1e-8)
    assert result["grad_change_max"] == pytest.approx(max(changes), rel=1e-8)
    betas = [c / (m * lr * grad_norm) for c, m in zip(changes, multipliers)]
    assert result["betas"] == pytest.approx(betas, rel=1e-8)
    assert result["beta_eff"] == pytest.approx(max(betas), rel=1e-8)


def test_default_grid_is_eight_log_spaced_points():
    assert len(DEFAULT_MULTIPLIERS) == 8
    assert DEFAULT_MULTIPLIERS[0] == pytest.approx(0.5)
    assert DEFAULT_MULTIPLIERS[-1] == pytest.approx(4.0)
    ratios = [b / a for a, b in zip(DEFAULT_MULTIPLIERS, DEFAULT_MULTIPLIERS[1:])]
    assert ratios == pytest.approx([ratios[0]] * 7)


@pytest.mark.parametrize("torch_bn", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_model_state_is_restored_bitwise(torch_bn, training):
    model = tiny_model(torch_bn).train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    kinds = [type(m) for m in model.modules()]
    gradient_step_probe(model, nn.CrossEntropyLoss(), batch(), 0.1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == flags
    assert [type(m) for m in model.modules()] == kinds  # never converted in place
    assert all(p.grad is None for p in model.parameters())


def test_a_layer_applied_twice_stays_the_models():
    """functional_call on a model that reaches one module under two names leaves that
    module's parameters replaced by plain tensors (torch 2.13): every probe runs on a
    copy of such a model, which keeps its parameters, their values and the optimiser's
    hold on them; the probe's values are the direct computation's."""
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), fastbn.BatchNorm1d(4),
                          nn.Linear(4, 3)).double()
    params = list(model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data, criterion = batch(), nn.CrossEntropyLoss()
    result = gradient_step_probe(model, criterion, data, 0.1, multipliers=(1.0, 2.0))
    theory_checks(model, criterion, data)
    SmoothnessProbe(model, criterion, lr=0.1, every=1, multipliers=(1.0,))(0, data)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    _, _, losses, changes = direct_probe(model, criterion, data, 0.1, (1.0, 2.0))
    assert result["losses"] == pytest.approx(losses, rel=1e-12)
    assert result["grad_changes"] == pytest.approx(changes, rel=1e-10)


class _CountsItsCalls(nn.Linear):
    """A layer whose forward writes to a buffer in place."""

    def __init__(self, *sizes):
        super().__init__(*sizes)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


@pytest.mark.parametrize("torch_bn", [True, False])
def test_a_forward_that_writes_to_a_buffer(torch_bn):
    """torch.func refuses a write to a tensor from outside its transforms: the probe
    clones the buffers inside them, and the model's are left alone."""
    model = tiny_model(torch_bn)
    torch.manual_seed(3)
    model[3] = _CountsItsCalls(6, 3).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = gradient_step_probe(model, nn.CrossEntropyLoss(), batch(), 0.1,
                                 multipliers=(1.0, 2.0))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    _, _, losses, changes = direct_probe(model, nn.CrossEntropyLoss(), batch(), 0.1,
                                         (1.0, 2.0))
    assert result["losses"] == pytest.approx(losses, rel=1e-12)
    assert result["grad_changes"] == pytest.approx(changes, rel=1e-10)


@pytest.mark.parametrize("torch_bn", [True, False])
def test_dropout_is_off_during_the_probe(torch_bn):
    """Each evaluated point would draw new masks: the probe matches the model without
    its dropout layer, and leaves the layer in training mode."""
    model = tiny_model(torch_bn)
    with_dropout = nn.Sequential(*model[:3], nn.Dropout(0.5), *model[3:]).train()
    result = gradient_step_probe(with_dropout, nn.CrossEntropyLoss(), batch(), 0.3)
    without = gradient_step_probe(model, nn.CrossEntropyLoss(), batch(), 0.3)
    assert result["losses"] == without["losses"]
    assert result["grad_changes"] == without["grad_changes"]
    assert with_dropout[3].training


def test_blown_up_steps_are_data_not_errors():
    model = nn.Sequential(nn.Linear(3, 3)).double()
    inputs = torch.randn(5, 3, dtype=torch.float64)
    result = gradient_step_probe(model, nn.MSELoss(), (inputs, 1e150 * torch.ones(5, 3,
                                 dtype=torch.float64)), 1e150, multipliers=(1.0, 2.0))
    assert result["loss_max"] == math.inf
    assert result["beta_eff"] == math.inf


def test_rejects_eval_mode_and_bad_grids():
    with pytest.raises(ValueError, match="bn_mode"):
        gradient_step_probe(tiny_model(), nn.CrossEntropyLoss(), batch(), 0.1, bn_mode="eval")
    for multipliers in ([0], [1.0, math.nan], []):
        with pytest.raises(ValueError, match="multipliers"):
            gradient_step_probe(tiny_model(), nn.CrossEntropyLoss(), batch(), 0.1,
                                multipliers=multipliers)
    for lr in (0.0, -0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="lr must be a positive finite number"):
            gradient_step_probe(tiny_model(), nn.CrossEntropyLoss(), batch(), lr)


def test_zero_gradient_has_undefined_not_blown_up_smoothness():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    inputs = torch.randn(5, 3, dtype=torch.float64)
    result = gradient_step_probe(model, lambda out, target: (out * 0).sum(), (inputs, None),
                                 0.1, multipliers=(1.0, 2.0))
    assert result["grad_norm"] == 0 and result["loss_max"] == 0
    assert math.isnan(result["beta_eff"])


def test_callback_probes_every_k_steps_and_logs_json_lines(tmp_path):
    model = tiny_model()
    log = tmp_path / "probe.jsonl"
    probe = SmoothnessProbe(model, nn.CrossEntropyLoss(), 0.1, every=2, log_path=log,
                            multipliers=(0.5, 1.0))
    records = [probe(step, batch()) for step in range(5)]
    assert [r is not None for r in records] == [True, False, True, False, True]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 2, 4]
    assert lines[0]["loss_max"] == pytest.approx(records[0]["loss_max"])
    assert probe.seconds > 0
    assert len(probe.records) == 3


class _SubclassedBatchNorm1d(nn.BatchNorm1d):
    """A subclass of torch's batch norm that keeps torch's forward."""


def test_a_torch_batch_norm_subclass_that_keeps_torch_forward():
    model = tiny_model()
    model[1].__class__ = _SubclassedBatchNorm1d
    criterion, data, multipliers = nn.CrossEntropyLoss(), batch(), (0.5, 2.0)
    result = gradient_step_probe(model, criterion, data, 0.3, multipliers=multipliers)
    loss0, grad_norm, losses, changes = direct_probe(model, criterion, data, 0.3, multipliers)
    assert (result["loss"], result["grad_norm"]) == pytest.approx((loss0, grad_norm), rel=1e-10)
    assert result["losses"] == pytest.approx(losses, rel=1e-10)
    assert result["grad_changes"] == pytest.approx(changes, rel=1e-8)
    assert type(model[1]) is _SubclassedBatchNorm1d


class _OwnForwardBatchNorm1d(nn.BatchNorm1d):
    def forward(self, input):
        return super().forward(input)


def test_a_batch_norm_subclass_with_its_own_forward_is_refused_in_words():
    """The probes measure training mode only: the error offers no bn_mode."""
    model = tiny_model()
    model[1].__class__ = _OwnForwardBatchNorm1d
    with pytest.raises(TypeError, match="overrides forward") as info:
        gradient_step_probe(model, nn.CrossEntropyLoss(), batch(), 0.3)
    assert "bn_mode" not in str(info.value) and "track_running_stats=False" in str(info.value)


class _DictInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = tiny_model()
        # 0-dim: its gradient keeps its shape through the packed all_reduce
        self.scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, inputs):
        return self.net(inputs["x"]) * self.scale


SHARDS = (3, 7)   # unequal, and neither equal to the number of dict keys


def _probe_of_a_dict_shard(rank, world):
    inputs, targets = batch()
    start = sum(SHARDS[:rank])
    shard = slice(start, start + SHARDS[rank])
    return gradient_step_probe(_DictInputs(), nn.CrossEntropyLoss(),
                               ({"x": inputs[shard], "unused": inputs[shard]}, targets[shard]),
                               0.1, multipliers=(1.0,), process_group=dist.group.WORLD)


def _group_gradient_shapes(rank, world):
    model = _DictInputs()
    inputs, targets = batch()
    params, constants = _functional.split_state(model)
    gradient, loss = _functional.grad_and_loss_function(
        model, nn.CrossEntropyLoss(), constants, {"x": inputs[rank::world]},
        targets[rank::world], dist.group.WORLD)(params)
    return {name: tuple(g.shape) for name, g in gradient.items()}, tuple(loss.shape)


def test_data_parallel_gradients_keep_their_parameters_shapes():
    """A 0-dim parameter's summed gradient came back as (1,) (divided by the count
    packed as (1,)), and a model that stacks such parameters failed at the next point."""
    expected = {name: tuple(p.shape) for name, p in _DictInputs().named_parameters()}
    for result in run_processes(_group_gradient_shapes, 2):
        assert "value" in result, result.get("trace", result)
        assert result["value"] == (expected, ())


def test_data_parallel_probe_weighs_dict_shards_by_their_samples():
    inputs, targets = batch()
    expected = gradient_step_probe(_DictInputs(), nn.CrossEntropyLoss(),
                                   ({"x": inputs}, targets), 0.1, multipliers=(1.0,))
    for result in run_processes(_probe_of_a_dict_shard, len(SHARDS)):
        assert "value" in result, result.get("trace", result)
        for key in ("loss", "grad_norm", "losses", "grad_changes"):
            assert result["value"][key] == pytest.approx(expected[key], rel=1e-10), key


def _local_probes_of_a_synchronised_model(rank, world):
    inputs, targets = batch()
    shard = (inputs[rank::world], targets[rank::world])
    model = fastbn.convert(tiny_model(), sync=True)
    local = fastbn.convert(tiny_model())
    return [(probe(model, nn.CrossEntropyLoss(), shard), probe(local, nn.CrossEntropyLoss(),
                                                               shard))
            for probe in (lambda *args: gradient_step_probe(*args, 0.1, multipliers=(1.0,)),
                          lambda *args: {"sharpness": top_hessian_eigenvalue(*args)})]


def test_without_a_process_group_a_synchronised_model_is_probed_on_the_local_batch():
    """Its statistics synchronised over the world while the loss stayed local: neither
    the local nor the global answer (and top_hessian_eigenvalue gave the local one)."""
    for result in run_processes(_local_probes_of_a_synchronised_model, 2):
        assert "value" in result, result.get("trace", result)
        for synchronised, local in result["value"]:
            for key in local:
                assert synchronised[key] == pytest.approx(local[key], rel=1e-10), key


def test_a_batch_whose_inputs_are_a_tuple():
    inputs, targets = batch()
    model, criterion = TupleInputs(tiny_model()), nn.CrossEntropyLoss()
    split = ((inputs / 2, inputs / 2), targets)
    assert (gradient_step_probe(model, criterion, split, 0.1)["loss"]
            == pytest.approx(gradient_step_probe(model.net, criterion, batch(), 0.1)["loss"]))
    assert (top_hessian_eigenvalue(model, criterion, split)
            == pytest.approx(top_hessian_eigenvalue(model.net, criterion, batch()), rel=1e-6))


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_runs_under_no_grad_and_inference_mode(context):
    model, criterion = tiny_model(), nn.CrossEntropyLoss()
    expected = gradient_step_probe(model, criterion, batch(), 0.1)
    with context():
        assert gradient_step_probe(model, criterion, batch(), 0.1) == expected


def test_a_random_layer_does_not_move_the_training_runs_random_numbers():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.RReLU(), nn.Linear(6, 3))
    torch.manual_seed(5)
    gradient_step_probe(model.double(), nn.CrossEntropyLoss(), batch(), 0.1)
    after_probe = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after_probe)


def test_a_random_layer_draws_the_same_numbers_at_every_point():
    """nn.RReLU's slopes are one draw for the whole probe: a vanishing step moves neither
    the loss nor the gradient (new slopes at each point would measure their noise)."""
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.RReLU(), nn.Linear(6, 3))
    torch.manual_seed(5)
    found = gradient_step_probe(model.double(), nn.CrossEntropyLoss(), batch(), 1e-12,
                                multipliers=[1.0])
    assert found["losses"][0] == pytest.approx(found["loss"], rel=1e-9, abs=0)
    assert found["grad_changes"][0] < 1e-9 * found["grad_norm"]
    torch.manual_seed(5)
    again = gradient_step_probe(model, nn.CrossEntropyLoss(), batch(), 1e-12,
                                multipliers=[1.0])
    assert again == found   # the caller's generator decides the draw


def test_bad_arguments_are_refused_in_words():
    model, criterion = tiny_model(), nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        gradient_step_probe(model, criterion, batch(), True)
    with pytest.raises(ValueError, match=r"\(inputs, targets\) pair"):
        gradient_step_probe(model, criterion, (*batch(), None), 0.1)
    for frozen in model.parameters():
        frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters to differentiate"):
        gradient_step_probe(model, criterion, batch(), 0.1)
    for every in (0, 1.5):
        with pytest.raises(ValueError, match="every must be a positive int"):
            SmoothnessProbe(model, criterion, 0.1, every=every)
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        SmoothnessProbe(model, criterion, -0.1)
    for max_iter in (0, 2.5, True):   # when made, not at the first probed step
        with pytest.raises(ValueError, match="sharpness_max_iter must be a positive int"):
            SmoothnessProbe(model, criterion, 0.1, sharpness=True, sharpness_max_iter=max_iter)
    for multipliers in ([-1.0], [], [float("inf")]):
        with pytest.raises(ValueError, match="multipliers must be a non-empty sequence"):
            SmoothnessProbe(model, criterion, 0.1, multipliers=multipliers)


def test_the_callback_takes_multipliers_from_a_generator_at_every_probed_step():
    """Read once when made: the first probe spent the generator, and the second refused
    its (empty) multipliers mid-training."""
    probe = SmoothnessProbe(tiny_model(), nn.CrossEntropyLoss(), 0.1, every=1,
                            multipliers=(m for m in (0.5, 1.0)))
    assert probe(0, batch())["etas"] == probe(1, batch())["etas"] == pytest.approx([0.05, 0.1])


def test_callback_logs_numpy_numbers(tmp_path):
    log = tmp_path / "probe.jsonl"
    probe = SmoothnessProbe(tiny_model(), nn.CrossEntropyLoss(), np.float32(0.1),
                            log_path=log, multipliers=np.array([0.5, 1.0], dtype=np.float32))
    record = probe(0, batch())
    (line,) = [json.loads(text) for text in log.read_text().splitlines()]
    assert line["etas"] == pytest.approx(record["etas"]) and line["step"] == 0


def test_callback_sharpness_of_a_non_finite_loss_is_nan():
    """A diverging run's probe: no eigenvalue of a NaN loss to compute, and no error that
    would stop the training around it."""
    model = tiny_model()
    with torch.no_grad():
        model[0].weight[0, 0] = math.inf
    record = SmoothnessProbe(model, nn.CrossEntropyLoss(), 0.1, sharpness=True)(0, batch())
    assert math.isnan(record["loss"]) and math.isnan(record["sharpness"])


def test_callback_sharpness_where_the_products_overflow_at_a_finite_loss_is_nan():
    """exp(w x) at w x = 88 is finite in float32, its Hessian x² exp(w x) is not: a run
    blowing up, whose probe must not stop the training around it either."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(8.8)
    data = (torch.tensor([[10.0]]), torch.zeros(1))
    record = SmoothnessProbe(model, lambda out, _: out.exp().sum(), 0.1,
                             sharpness=True)(0, data)
    assert math.isfinite(record["loss"]) and math.isnan(record["sharpness"])
    with pytest.raises(curvature.NonFiniteProductError, match="non-finite Hessian-vector"):
        top_hessian_eigenvalue(model, lambda out, _: out.exp().sum(), data)
