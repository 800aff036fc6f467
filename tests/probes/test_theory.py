import copy
import math

import pytest
import torch
from torch import nn

import fastbn
from fastbn.probes import theory
from fastbn.probes.theory import pre_batch_norm_layers, theory_checks, without_layer
from tests.probes.helpers import TupleInputs



def network(inplace=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(inplace), nn.Linear(5, 5),
                          nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():  # non-trivial γ so the γ²/σ² factors are exercised
        model[1].weight.uniform_(0.5, 2.0)
        model[4].weight.uniform_(0.5, 2.0)
        model[4].bias.uniform_(-1.0, 1.0)
    return fastbn.convert(model)


def data():
    generator = torch.Generator().manual_seed(2)
    return (torch.randn(12, 4, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (12,), generator=generator))


def downstream_loss(model, start, criterion, targets):
    """y ↦ loss of model[start:] applied to y, BN on batch statistics (a throwaway copy)."""
    tail = copy.deepcopy(model[start:]).train()
    return lambda y: criterion(tail(y), targets)


def gradient_and_hvp(loss_of_y, y, v=None):
    y = y.detach().requires_grad_()
    (grad,) = torch.autograd.grad(loss_of_y(y), y, create_graph=True)
    if v is None:
        return grad.detach(), None
    (hv,) = torch.autograd.grad((grad * v).sum(), y)
    return grad.detach(), hv


def test_finds_the_layer_feeding_each_batch_norm():
    assert pre_batch_norm_layers(network(), data()) == {"1": "0", "4": "3"}


def test_theorem_4_1_against_direct_autograd():
    model, criterion = network(), nn.CrossEntropyLoss()
    inputs, targets = data()
    results = theory_checks(model, criterion, (inputs, targets), channels=0)
    with torch.no_grad():
        y = model[0](inputs)
    bn = model[1]
    g_hat, _ = gradient_and_hvp(downstream_loss(model, 1, criterion, targets), y)
    g_plain, _ = gradient_and_hvp(downstream_loss(model, 2, criterion, targets), y)
    m = y.shape[0]
    sigma = torch.sqrt(y.var(0, unbiased=False) + bn.eps)
    y_hat = (y - y.mean(0)) / sigma
    gamma = bn.weight.detach()
    rhs = (gamma ** 2 / sigma ** 2) * ((g_plain ** 2).sum(0) - g_plain.sum(0) ** 2 / m
                                       - (g_plain * y_hat).sum(0) ** 2 / math.sqrt(m))
    checks = results["1"]["theorem_4_1"]
    assert checks["per_channel"]["lhs"] == pytest.approx((g_hat ** 2).sum(0).tolist(), rel=1e-9)
    assert checks["per_channel"]["rhs"] == pytest.approx(rhs.tolist(), rel=1e-9)
    assert checks["held"] == all(a <= b for a, b in zip(checks["per_channel"]["lhs"],
                                                        rhs.tolist()))
    # With ∇_z L̂ and 1/m the two sides are the BN backward identity, up to O(eps/σ²).
    assert checks["identity_rel_error"] < 1e-4


def test_an_in_place_relu_after_a_batch_norm_changes_nothing():
    criterion, batch = nn.CrossEntropyLoss(), data()
    results = theory_checks(network(inplace=True), criterion, batch, channels=2,
                            lanczos_iterations=3)
    expected = theory_checks(network(), criterion, batch, channels=2, lanczos_iterations=3)
    assert results["1"]["theorem_4_1"]["identity_rel_error"] < 1e-4
    for name, result in results.items():
        first, want = result["theorem_4_1"], expected[name]["theorem_4_1"]
        for side in ("lhs", "rhs"):
            assert first["per_channel"][side] == pytest.approx(want["per_channel"][side],
                                                               rel=1e-12)
        rows = result["theorem_4_2"]["channels"]
        for row, want_row in zip(rows, expected[name]["theorem_4_2"]["channels"]):
            assert (row["lhs"], row["rhs"]) == pytest.approx(
                (want_row["lhs"], want_row["rhs"]), rel=1e-9)


def test_model_is_left_untouched():
    model = network().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    theory_checks(model, nn.CrossEntropyLoss(), data(), channels=1, lanczos_iterations=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m.training for m in model.modules())


def test_without_layer_replaces_only_that_layer():
    model = network()
    plain = without_layer(model, "4")
    assert isinstance(plain[4], nn.Identity) and isinstance(model[4], nn.BatchNorm1d)


def test_theorem_4_2_against_direct_double_backward():
    model, criterion = network(), nn.CrossEntropyLoss()
    inputs, targets = data()
    results = theory_checks(model, criterion, (inputs, targets), channels=5, layers=None,
                            lanczos_iterations=5)
    with torch.no_grad():
        y = model[:4](inputs)  # input of the second BN
    bn_loss = downstream_loss(model, 4, criterion, targets)
    plain_loss = downstream_loss(model, 5, criterion, targets)
    with torch.no_grad():
        z = copy.deepcopy(model[4]).train()(y)  # the BN output the network produces
    output_loss = downstream_loss(model, 5, criterion, targets)
    g_z, _ = gradient_and_hvp(output_loss, z)
    g_hat, _ = gradient_and_hvp(bn_loss, y)
    g_plain, _ = gradient_and_hvp(plain_loss, y)
    sigma = torch.sqrt(y.var(0, unbiased=False) + model[4].eps)
    y_hat = (y - y.mean(0)) / sigma
    gamma, m = model[4].weight.detach(), y.shape[0]
    rows = results["4"]["theorem_4_2"]["channels"]
    for j, row in enumerate(rows):
        v = torch.zeros_like(g_hat)
        v[:, j] = g_hat[:, j]
        _, bn_hv = gradient_and_hvp(bn_loss, y, v)
        _, plain_hv = gradient_and_hvp(plain_loss, y, v)
        inner = (g_plain[:, j] * y_hat[:, j]).sum()
        rhs = (gamma[j] ** 2 / sigma[j] ** 2 * (v * plain_hv).sum()
               - gamma[j] / (m * sigma[j] ** 2) * inner * (v * v).sum())
        assert row["lhs"] == pytest.approx((v * bn_hv).sum().item(), rel=1e-7, abs=1e-12)
        assert row["rhs"] == pytest.approx(rhs.item(), rel=1e-7, abs=1e-12)
        assert row["inner_g_yhat"] == pytest.approx(inner.item(), rel=1e-9)
        # In the proof's setting the right side is the left's exact value.
        assert row["rhs_same_point"] == pytest.approx((v * bn_hv).sum().item(), rel=1e-9)
        assert row["held_same_point"]
        inner_z = (g_z[:, j] * y_hat[:, j]).sum()
        assert row["inner_gz_yhat"] == pytest.approx(inner_z.item(), rel=1e-9)
        assert row["held"] == (row["lhs"] <= row["rhs"] + 1e-4 * max(abs(row["lhs"]),
                                                                      abs(row["rhs"])))
    summary = results["4"]["theorem_4_2"]
    assert summary["held_fraction"] == sum(row["held"] for row in rows) / len(rows)


@pytest.mark.parametrize("head", ["linear", "tanh"])
def test_theorem_4_2_curvature_fields_against_the_exact_block(head):
    """h_min_eig, h_max_eig, h_psd, preconditions, the fraction held given them and the
    layer's quadratic forms against the exact 12×12 block H_jj and direct gradients.
    Lanczos runs as many steps as the block has rows, so its extreme Ritz values are the
    block's eigenvalues. A linear head after the second BN: without the BN the loss is
    convex in y, every H_jj PSD, and the channels with ⟨g, ŷ⟩ > 0 meet the
    preconditions; a tanh before it makes some H_jj indefinite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 5),
                          nn.BatchNorm1d(5), *([nn.Tanh()] if head == "tanh" else []),
                          nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[4].weight.uniform_(0.5, 2.0)
    model = fastbn.convert(model)
    criterion = nn.CrossEntropyLoss()
    inputs, targets = data()
    summary = theory_checks(model, criterion, (inputs, targets), channels=5,
                            lanczos_iterations=12)["4"]["theorem_4_2"]
    with torch.no_grad():
        y = model[:4](inputs)
    bn_loss = downstream_loss(model, 4, criterion, targets)
    plain_loss = downstream_loss(model, 5, criterion, targets)
    g_plain, _ = gradient_and_hvp(plain_loss, y)
    y_hat = (y - y.mean(0)) / torch.sqrt(y.var(0, unbiased=False) + model[4].eps)
    met, indefinite = [], []
    for j, row in enumerate(summary["channels"]):
        block = torch.stack([gradient_and_hvp(plain_loss, y, torch.eye(12, dtype=y.dtype)[i]
                                              [:, None] * torch.eye(5, dtype=y.dtype)[j])[1][:, j]
                             for i in range(12)])
        eig = torch.linalg.eigvalsh((block + block.T) / 2)
        assert row["h_min_eig"] == pytest.approx(eig[0].item(), rel=1e-8, abs=1e-12)
        assert row["h_max_eig"] == pytest.approx(eig[-1].item(), rel=1e-8, abs=1e-12)
        psd = bool(eig[0] >= -1e-4 * eig.abs().max())
        assert row["h_psd"] == psd
        indefinite.append(not psd)
        inner = (g_plain[:, j] * y_hat[:, j]).sum().item()
        assert row["preconditions"] == (psd and inner > 0)
        if row["preconditions"]:
            met.append(row["held"])
    if head == "linear":   # channels of both kinds, so the filter is exercised
        assert 0 < len(met) < 5 and not any(indefinite)
    else:
        assert any(indefinite)
    assert summary["preconditions_fraction"] == len(met) / 5
    assert summary["held_fraction_given_preconditions"] == (sum(met) / len(met) if met
                                                            else None)
    for loss, key in ((plain_loss, "quadratic_form_plain"), (bn_loss, "quadratic_form_bn")):
        g, hg = gradient_and_hvp(loss, y, gradient_and_hvp(loss, y)[0])
        assert summary[key] == pytest.approx(((g * hg).sum() / (g * g).sum()).item(),
                                             rel=1e-8)


def test_the_proof_setting_keeps_eps_terms():
    """With a large eps the theorem's form at z, (γ²/σ²)vᵀH_z v − (γ/(mσ²))⟨g_z, ŷ⟩‖v‖²,
    is far from vᵀĤv; the identity with eps's terms is not."""
    model, criterion = network(), nn.CrossEntropyLoss()
    model[4].eps = 2.0
    inputs, targets = data()
    rows = theory_checks(model, criterion, (inputs, targets), channels=5,
                         lanczos_iterations=2)["4"]["theorem_4_2"]["channels"]
    with torch.no_grad():
        y = model[:4](inputs)
        z = copy.deepcopy(model[4]).train()(y)
    output_loss = downstream_loss(model, 5, criterion, targets)
    g_z, _ = gradient_and_hvp(output_loss, z)
    g_hat, _ = gradient_and_hvp(downstream_loss(model, 4, criterion, targets), y)
    sigma = torch.sqrt(y.var(0, unbiased=False) + model[4].eps)
    y_hat = (y - y.mean(0)) / sigma
    gamma, m = model[4].weight.detach(), y.shape[0]
    for j, row in enumerate(rows):
        v = torch.zeros_like(g_hat)
        v[:, j] = g_hat[:, j]
        _, output_hv = gradient_and_hvp(output_loss, z, v)
        printed = (gamma[j] ** 2 / sigma[j] ** 2 * (v * output_hv).sum()
                   - gamma[j] / (m * sigma[j] ** 2) * (g_z[:, j] * y_hat[:, j]).sum()
                   * (v * v).sum()).item()
        assert abs(printed - row["lhs"]) > 1e-3 * abs(row["lhs"])
        assert row["rhs_same_point"] == pytest.approx(row["lhs"], rel=1e-9)
        assert row["held_same_point"]


@pytest.mark.parametrize("rhs, agrees", [(1.0, True), (1.0 + 5e-5, True), (1.0 + 2e-4, False),
                                         (1.0 - 2e-4, False)])
def test_the_proof_setting_asks_for_agreement_either_way(rhs, agrees):
    assert theory._agrees(1.0, rhs, 1.0) is agrees
    # Relative to the identity's largest term, where its sides are small by cancellation.
    assert theory._agrees(1.0, rhs + 0.5, 1e4) is True


def test_a_non_finite_loss_is_refused_whatever_is_checked():
    model = network()
    with torch.no_grad():
        model[6].weight[0, 0] = math.nan
    for channels in (0, 1):
        with pytest.raises(fastbn.curvature.NonFiniteLossError, match="on the network;"):
            theory_checks(model, nn.CrossEntropyLoss(), data(), channels=channels)
    # Finite with the BN; without it exp(y) overflows.
    model = fastbn.convert(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), _Exp(),
                                         nn.Linear(5, 3)).double())
    with torch.no_grad():
        model[0].weight.mul_(1e4)
    with pytest.raises(fastbn.curvature.NonFiniteLossError, match="without BN layer '1'"):
        theory_checks(model, nn.CrossEntropyLoss(), data(), channels=0)


class _Exp(nn.Module):
    def forward(self, x):
        return x.exp()


def test_lanczos_extremes_of_a_known_matrix():
    matrix = torch.diag(torch.tensor([-2.0, 0.5, 1.0, 3.0], dtype=torch.float64))
    low, high = theory._extreme_eigenvalues(lambda v: matrix @ v,
                                            torch.ones(4, dtype=torch.float64), 4)
    assert (low, high) == pytest.approx((-2.0, 3.0))


class _ShortcutIntoBatchNorm(nn.Module):
    """`out = linear(x); out += shortcut; bn(out)`: the BN input is the linear layer's
    output changed in place."""

    def __init__(self):
        super().__init__()
        self.linear, self.bn, self.head = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)

    def forward(self, x):
        out = self.linear(x)
        out += x
        return self.head(self.bn(out))


class _SharedActivation(nn.Module):
    """One Tanh module feeds two BN layers."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(4, 5), nn.Linear(5, 5)
        self.act = nn.Tanh()
        self.bn1, self.bn2, self.head = nn.BatchNorm1d(5), nn.BatchNorm1d(5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.bn2(self.act(self.lin2(self.bn1(self.act(self.lin1(x)))))))


@pytest.mark.parametrize("model, message", [
    (_ShortcutIntoBatchNorm, "changed in place after that layer returned it"),
    (_SharedActivation, "'act' runs 2 times a forward"),
])
def test_a_batch_norm_input_the_probes_cannot_read_is_refused(model, message):
    """Reading the producing layer's output would check the theorems on another tensor."""
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=message):
        theory_checks(fastbn.convert(model().double()), nn.CrossEntropyLoss(), data(),
                      channels=0)


def test_a_parametrized_input_layer_is_found():
    model = network()
    nn.utils.parametrizations.weight_norm(model[0])
    assert pre_batch_norm_layers(model, data()) == {"1": "0", "4": "3"}


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_runs_under_no_grad_and_inference_mode(context):
    model, criterion = network(), nn.CrossEntropyLoss()
    expected = theory_checks(model, criterion, data(), channels=1, lanczos_iterations=3)
    with context():
        result = theory_checks(model, criterion, data(), channels=1, lanczos_iterations=3)
    assert result == expected


def test_rejects_bad_counts():
    for kwargs in ({"channels": -1}, {"channels": 1.5}, {"channels": True},
                   {"lanczos_iterations": 0}, {"lanczos_iterations": True},
                   {"layers": -1}, {"layers": 0}, {"layers": 1.5}, {"layers": "2"}):
        with pytest.raises(ValueError, match=f"^{next(iter(kwargs))} must be"):
            theory_checks(network(), nn.CrossEntropyLoss(), data(), **kwargs)
    for seed in (torch.Generator().manual_seed(0), None, 0.5):
        with pytest.raises(TypeError, match="seed must be an int"):
            theory_checks(network(), nn.CrossEntropyLoss(), data(), seed=seed)


def test_a_random_layer_repeats_with_the_seed_and_leaves_the_callers_random_numbers():
    model = network()
    model[5] = nn.RReLU()   # random in training mode
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = theory_checks(model, nn.CrossEntropyLoss(), data(), channels=1,
                          lanczos_iterations=3, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)   # another sequence around the checks: the seed alone decides
    assert theory_checks(model, nn.CrossEntropyLoss(), data(), channels=1,
                         lanczos_iterations=3, seed=0) == first


def test_a_batch_whose_inputs_are_a_tuple():
    """The second-order checks read such a pair as a list of two batches."""
    inputs, targets = data()
    model, criterion = TupleInputs(network()), nn.CrossEntropyLoss()
    split = theory_checks(model, criterion, ((inputs / 2, inputs / 2), targets), channels=1,
                          lanczos_iterations=3)
    whole = theory_checks(model.net, criterion, (inputs, targets), channels=1,
                          lanczos_iterations=3)
    for name, checks in whole.items():
        got = split["net." + name]["theorem_4_2"]["channels"][0]
        for key, value in checks["theorem_4_2"]["channels"][0].items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
