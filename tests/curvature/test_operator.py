import copy
import functools
import math

import pytest
import torch
from torch import nn

import fastbn
from fastbn.curvature import HessianOperator
from tests.curvature.helpers import (DTYPE, SubclassedBatchNorm1d, assert_unchanged,
                                     batch_for, cnn, exact_hessian, flat_indices, mlp,
                                     snapshot, with_nontrivial_running_stats)

METHODS = ["forward-over-reverse", "reverse-over-reverse"]
CRITERION = nn.CrossEntropyLoss()


def close(actual, expected, rtol=1e-8):
    scale = expected.abs().max()
    assert (actual - expected).abs().max() <= rtol * scale, \
        float((actual - expected).abs().max() / scale)


@pytest.mark.parametrize("make_model", [mlp, cnn])
@pytest.mark.parametrize("method", METHODS)
def test_matvec_and_matmat_equal_exact_hessian(make_model, method, backend):
    model = make_model()
    batch = batch_for(model, 6, seed=0)
    gradient, hessian = exact_hessian(model, CRITERION, [batch])
    op = HessianOperator(model, CRITERION, batch, method=method)
    size = hessian.shape[0]
    assert op.shape == (size, size) and op.dtype == DTYPE and op.device.type == "cpu"
    v = torch.randn(size, dtype=DTYPE)
    close(op.grad(), gradient)
    close(op.matvec(v), hessian @ v)
    close(op.matmat(torch.eye(size, dtype=DTYPE)), hessian)


class _CountsItsCalls(nn.Module):
    """A layer whose forward writes to a buffer in place (torch.func refuses a write to a
    tensor from outside its transforms)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.register_buffer("calls", torch.zeros((), dtype=DTYPE))

    def forward(self, x):
        self.calls += 1
        return self.layer(x)


@pytest.mark.parametrize("method", METHODS)
def test_a_forward_that_writes_to_a_buffer(method):
    model = mlp()
    batch = batch_for(model, 6, seed=0)
    model[0] = _CountsItsCalls(model[0])
    gradient, hessian = exact_hessian(model, CRITERION, [batch])
    before = snapshot(model)
    op = HessianOperator(model, CRITERION, batch, method=method)
    v = torch.randn(hessian.shape[0], dtype=DTYPE)
    close(op.grad(), gradient)
    close(op.matvec(v), hessian @ v)
    close(op.matmat(torch.eye(hessian.shape[0], dtype=DTYPE)), hessian)
    assert_unchanged(model, before)
    assert model[0].calls.item() == 0


class _CallsItsBatchNormAlone(nn.Module):
    """A custom forward that uses the batch norm of a BN → ReLU pair on its own."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), fastbn.BatchNorm2d(3),
                                 nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 2))

    def forward(self, x):
        h = self.seq(x)
        return self.head(h + self.seq[1](self.seq[0](x)))


def _relu_models():
    torch.manual_seed(5)
    conv = lambda: nn.Conv2d(2, 3, 3, padding=1)    # noqa: E731
    head = lambda: (nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 2))   # noqa: E731
    shared = fastbn.BatchNorm2d(3)
    return {
        # fused: a plain Sequential, nested in one, torch's batch norm
        "torch_bn": (nn.Sequential(conv(), nn.BatchNorm2d(3), nn.ReLU(), *head()), True),
        "nested": (nn.Sequential(nn.Sequential(conv(), fastbn.BatchNorm2d(3), nn.ReLU()),
                                 *head()), True),
        # not fused: a fastbn layer used twice stays one layer, as convert leaves it
        "shared": (nn.Sequential(conv(), shared, nn.ReLU(), nn.Conv2d(3, 3, 1), shared,
                                 *head()), False),
        # not fused: a custom forward could call the pair's batch norm alone
        "custom_parent": (_CallsItsBatchNormAlone(), False),
    }


@pytest.mark.parametrize("name", ["torch_bn", "nested", "shared", "custom_parent"])
@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_batch_norm_then_relu_runs_fused_where_safe_and_equals_exact_hessian(name, bn_mode):
    model, fused = _relu_models()[name]
    model = with_nontrivial_running_stats(model.to(DTYPE))
    generator = torch.Generator().manual_seed(1)
    batch = (torch.randn(6, 2, 4, 4, generator=generator, dtype=DTYPE),
             torch.randint(0, 2, (6,), generator=generator))
    gradient, hessian = exact_hessian(model, CRITERION, [batch], bn_mode)
    before = [type(m) for m in model.modules()]
    op = HessianOperator(model, CRITERION, batch, bn_mode=bn_mode,
                         method="reverse-over-reverse")
    activations = [getattr(m, "activation", None) for m in op._model.copy.modules()]
    assert ("relu" in activations) == fused
    assert [type(m) for m in model.modules()] == before    # the user's model: as it was
    v = torch.randn(hessian.shape[0], dtype=DTYPE)
    close(op.grad(), gradient)
    close(op.matvec(v), hessian @ v)
    close(op.matmat(torch.eye(hessian.shape[0], dtype=DTYPE)), hessian)


def test_auto_times_both_and_keeps_the_faster():
    model = mlp()
    batch = batch_for(model, 6, seed=0)
    _, hessian = exact_hessian(model, CRITERION, [batch])
    op = HessianOperator(model, CRITERION, batch)
    v = torch.randn(op.shape[0], dtype=DTYPE)
    close(op.matvec(v), hessian @ v)
    assert set(op.timings["matvec"]) == set(METHODS)
    assert op.methods_used == {"matvec": min(METHODS, key=op.timings["matvec"].get)}


def test_multiple_batches_weight_by_sample_count():
    model = cnn()
    batches = [batch_for(model, 5, seed=1), batch_for(model, 8, seed=2)]
    gradient, hessian = exact_hessian(model, CRITERION, batches)
    V = torch.randn(hessian.shape[0], 3, dtype=DTYPE)
    for data in (batches, iter(batches)):      # a one-shot iterator is kept as a list
        op = HessianOperator(model, CRITERION, data, method="forward-over-reverse")
        close(op.matmat(V), hessian @ V)
        close(op.grad(), gradient)


def test_an_error_in_one_batch_names_the_batch():
    """A batch of one sample fails batch norm's training mode with torch's message; the
    error also says which batch it was."""
    model = mlp()
    batches = [batch_for(model, 5, seed=1), batch_for(model, 1, seed=2)]
    op = HessianOperator(model, CRITERION, batches)
    for call in (op.grad, lambda: op.matvec(torch.ones(op.shape[0], dtype=DTYPE))):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel") as err:
            call()
        assert "(in batch 1 of the operator's data, counted from 0)" in err.value.__notes__


def test_eval_mode_uses_running_statistics():
    model = with_nontrivial_running_stats(cnn())
    batch = batch_for(model, 6, seed=0)
    _, hessian = exact_hessian(model, CRITERION, [batch], bn_mode="eval")
    _, train_hessian = exact_hessian(model, CRITERION, [batch], bn_mode="train")
    assert not torch.allclose(hessian, train_hessian)
    for method in METHODS:
        op = HessianOperator(model, CRITERION, batch, bn_mode="eval", method=method)
        close(op.matmat(torch.eye(op.shape[0], dtype=DTYPE)), hessian)


def test_params_subset_is_the_matching_block():
    model = mlp()
    batch = batch_for(model, 6, seed=0)
    _, hessian = exact_hessian(model, CRITERION, [batch])
    op = HessianOperator(model, CRITERION, batch, params=[model[1].weight, "3.bias"])
    # Flat layout: named_parameters order (1.weight at 16..19, 3.bias at 36..38).
    index = torch.tensor([16, 17, 18, 19, 36, 37, 38])
    assert op.param_names == ["1.weight", "3.bias"]
    close(op.matmat(torch.eye(7, dtype=DTYPE)), hessian[index][:, index])
    pairs = [(n, p) for n, p in model.named_parameters() if n in ("1.weight", "3.bias")]
    for same in (iter(pairs), {"1.weight": model[1].weight, "3.bias": model[3].bias}):
        assert HessianOperator(model, CRITERION, batch, params=same).param_names == \
            op.param_names
    for one in ("3.bias", model[3].bias):
        assert HessianOperator(model, CRITERION, batch, params=one).param_names == ["3.bias"]
    assert HessianOperator(model, CRITERION, batch,
                           params=model.named_parameters()).param_names == \
        [n for n, _ in model.named_parameters()]


class _WithUnusedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = mlp()
        self.aux = nn.Linear(3, 3).to(DTYPE)   # a second head the loss does not use

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("method", METHODS)
def test_parameters_the_loss_never_reaches_have_a_zero_hessian(method):
    model = _WithUnusedHead()
    batch = batch_for(model.body, 6, seed=0)
    op = HessianOperator(model, CRITERION, batch, params=["aux.weight"], method=method)
    assert torch.equal(op.matvec(torch.ones(9, dtype=DTYPE)), torch.zeros(9, dtype=DTYPE))
    assert torch.equal(op.matmat(torch.ones(9, 2, dtype=DTYPE)),
                       torch.zeros(9, 2, dtype=DTYPE))


def test_a_tied_parameter_is_found_by_each_of_its_names():
    model = mlp()
    model.append(nn.Linear(3, 3).to(DTYPE))
    model[4].bias = model[3].bias   # held as 3.bias and 4.bias
    batch = batch_for(model, 6, seed=0)
    first = HessianOperator(model, CRITERION, batch, params=["3.bias"])
    second = HessianOperator(model, CRITERION, batch, params=["4.bias"])
    assert first.param_names == second.param_names == ["3.bias"]


def test_chunked_matmat_equals_unchunked():
    model = cnn()
    batch = batch_for(model, 6, seed=0)
    V = torch.randn(89, 7, dtype=DTYPE)
    whole = HessianOperator(model, CRITERION, batch, method="forward-over-reverse",
                            chunk_size=7).matmat(V)
    by_three = HessianOperator(model, CRITERION, batch, method="forward-over-reverse",
                               chunk_size=3).matmat(V)
    budget = HessianOperator(model, CRITERION, batch, method="forward-over-reverse",
                             max_memory=1)
    by_budget = budget.matmat(V)
    assert budget.chunk_size == 1 and len(budget.probe_peaks) == 2
    close(by_three, whole, rtol=1e-12)
    close(by_budget, whole, rtol=1e-12)


def test_matmat_budget_defaults_to_a_quarter_of_available_memory(monkeypatch):
    from fastbn.curvature import _memory
    model = cnn()
    batch = batch_for(model, 6, seed=0)
    V = torch.randn(89, 5, dtype=DTYPE)
    whole = HessianOperator(model, CRITERION, batch, chunk_size=5).matmat(V)
    roomy = HessianOperator(model, CRITERION, batch)
    close(roomy.matmat(V), whole, rtol=1e-12)
    assert roomy.chunk_size >= 5 and len(roomy.probe_peaks) == 2
    for budget in (1.5, 3, 6.5):   # per-tangent peaks: the width is a power of two
        per_tangent = roomy.probe_peaks[1] - roomy.probe_peaks[0]
        base = max(roomy.probe_peaks[0] - per_tangent, 0)
        sized = HessianOperator(model, CRITERION, batch, max_memory=base + budget * per_tangent)
        sized.matmat(V)
        assert sized.chunk_size == 2 ** math.floor(math.log2(budget))
    monkeypatch.setattr(_memory, "available_bytes", lambda device: 4)
    tight = HessianOperator(model, CRITERION, batch)
    close(tight.matmat(V[:, :2]), whole[:, :2], rtol=1e-12)
    # Two tangents: run as one pass, no probes.
    assert tight.chunk_size is None and tight.probe_peaks is None
    close(tight.matmat(V), whole, rtol=1e-12)
    assert tight.chunk_size == 1


def test_passes_whose_memory_does_not_grow_are_at_most_about_p_wide(monkeypatch):
    """Where the probe passes' peaks are equal (a small model's, say), the budget alone
    would allow 2**32 tangents a pass."""
    from fastbn.curvature import _memory
    monkeypatch.setattr(_memory, "peak_bytes", lambda fn, device: (fn(), 5520)[1])
    model = mlp()
    batch = batch_for(model, 6, seed=0)
    _, hessian = exact_hessian(model, CRITERION, [batch])
    op = HessianOperator(model, CRITERION, batch)
    V = torch.randn(39, 5, dtype=DTYPE)
    close(op.matmat(V), hessian @ V)
    assert op.probe_peaks == [5520, 5520] and op.chunk_size == 64


def test_chunk_sizing_inside_a_user_profiler_session_keeps_the_session():
    model = mlp()
    batch = batch_for(model, 6, seed=0)
    V = torch.randn(39, 5, dtype=DTYPE)
    whole = HessianOperator(model, CRITERION, batch, chunk_size=5).matmat(V)
    op = HessianOperator(model, CRITERION, batch)
    with pytest.warns(RuntimeWarning, match="chunk_size"):
        with torch.profiler.profile() as profiler:
            inside = op.matmat(V)
    assert len(profiler.events()) > 0
    assert op.chunk_size is None           # sized by the next matmat outside the session
    close(inside, whole, rtol=1e-12)
    close(op.matmat(V), whole, rtol=1e-12)
    assert op.chunk_size >= 5


def test_chunk_sizing_writes_nothing_to_stderr(capfd):
    model = mlp()
    HessianOperator(model, CRITERION, batch_for(model, 6, seed=0)).matmat(
        torch.randn(39, 5, dtype=DTYPE))
    assert "profiler_st" not in capfd.readouterr().err      # kineto's start/stop lines


def test_to_scipy_with_eigsh():
    from scipy.sparse.linalg import eigsh
    model = mlp()
    batch = batch_for(model, 6, seed=0)
    _, hessian = exact_hessian(model, CRITERION, [batch])
    op = HessianOperator(model, CRITERION, batch).to_scipy()
    values = eigsh(op, k=2, which="LA", return_eigenvectors=False, tol=1e-10)
    expected = torch.linalg.eigvalsh(hessian)[-2:].numpy()
    assert abs(sorted(values) - expected).max() <= 1e-7 * abs(expected).max()


def test_matmul_takes_tensors_and_numpy_arrays():
    model = mlp()
    batch = batch_for(model, 6, seed=0)
    _, hessian = exact_hessian(model, CRITERION, [batch])
    op = HessianOperator(model, CRITERION, batch)
    V = torch.randn(op.shape[0], 2, dtype=op.dtype)
    for operand in (V[:, 0], V, V[:, 0].numpy(), V.numpy()):
        close(op @ operand, hessian @ torch.as_tensor(operand), rtol=1e-8)


@pytest.mark.parametrize("make_model", [mlp, cnn])
def test_model_state_is_bitwise_unchanged(make_model):
    model = make_model()
    model(batch_for(model, 6, seed=9)[0])       # move running stats off their defaults
    batch = batch_for(model, 6, seed=0)
    for training in (True, False):
        model.train(training)
        before = snapshot(model)
        for bn_mode in ("train", "eval"):
            op = HessianOperator(model, CRITERION, batch, bn_mode=bn_mode, max_memory=10**6)
            op.grad()
            op.matvec(torch.ones(op.shape[0], dtype=DTYPE))
            op.matmat(torch.ones(op.shape[0], 2, dtype=DTYPE))
            assert_unchanged(model, before)


def test_model_state_is_unchanged_when_the_criterion_raises():
    model = cnn()
    model.train()
    before = snapshot(model)
    calls = []

    def failing(outputs, targets):
        calls.append(1)
        if len(calls) > 1:
            raise KeyError("boom")
        return CRITERION(outputs, targets)

    op = HessianOperator(model, failing, batch_for(model, 6, seed=0), method="reverse-over-reverse")
    op.grad()
    with pytest.raises(KeyError, match="boom"):
        op.matvec(torch.ones(op.shape[0], dtype=DTYPE))
    assert_unchanged(model, before)
    assert model.training


def test_errors():
    model = mlp()
    batch = batch_for(model, 6, seed=0)
    with pytest.raises(ValueError, match="no parameters"):
        HessianOperator(model, CRITERION, batch, params=[])
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters"):
        HessianOperator(frozen, CRITERION, batch)
    with pytest.raises(ValueError, match="not a parameter"):
        HessianOperator(model, CRITERION, batch, params=[torch.zeros(2)])
    with pytest.raises(ValueError, match="parameters or their names, got int"):
        HessianOperator(model, CRITERION, batch, params=[3])
    with pytest.raises(ValueError, match="a tuple of 3 items starting with a Tensor"):
        HessianOperator(model, CRITERION, (*batch, torch.ones(6)))
    with pytest.raises(ValueError, match="yields no batches"):
        HessianOperator(model, CRITERION, [])
    with pytest.raises(ValueError, match="yields no batches"):
        HessianOperator(model, CRITERION, iter([]))
    # A batch with tuple inputs reads as a list of batches: refused when made, not at the
    # first product inside the model's forward.
    with pytest.raises(ValueError, match="pair, got Tensor") as info:
        HessianOperator(model, CRITERION, ((batch[0], batch[0]), batch[1]))
    assert "passed as [(inputs, targets)]" in "".join(info.value.__notes__)
    with pytest.raises(ValueError, match="bn_mode"):
        HessianOperator(model, CRITERION, batch, bn_mode="frozen")
    with pytest.raises(ValueError, match="method"):
        HessianOperator(model, CRITERION, batch, method="finite-differences")
    for chunk_size in (0, True, 1.5):
        with pytest.raises(ValueError, match="chunk_size"):
            HessianOperator(model, CRITERION, batch, chunk_size=chunk_size)
    with pytest.raises(ValueError, match=r"scalar tensor, got shape \(6,\)"):
        HessianOperator(model, nn.CrossEntropyLoss(reduction="none"), batch).grad()
    op = HessianOperator(model, CRITERION, batch)
    with pytest.raises(ValueError, match="P=39"):
        op.matvec(torch.ones(38, dtype=DTYPE))
    with pytest.raises(ValueError, match="P=39"):
        op.matmat(torch.ones(39, dtype=DTYPE))
    with pytest.raises(ValueError, match="P=39"):
        op.matmat(torch.ones(40, 2, dtype=DTYPE))
    with pytest.raises(TypeError, match="real tensor"):
        op.matvec(torch.ones(39, dtype=torch.complex128))
    for chunk_size in (-1, 0, 2.0):   # set later too: -1 ran no pass and returned garbage
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            op.chunk_size = chunk_size
    assert op.chunk_size is None
    # An infinite budget failed at every matmat; True was a budget of one byte.
    for budget in (0, -1.0, math.inf, math.nan, True, "1e9"):
        with pytest.raises(ValueError, match="max_memory must be a positive finite number"):
            HessianOperator(model, CRITERION, batch, max_memory=budget)
        with pytest.raises(ValueError, match="max_memory must be a positive finite number"):
            op.max_memory = budget
    assert op.max_memory is None


@pytest.mark.parametrize("method", METHODS)
def test_a_model_converted_after_the_operator_was_made_is_refused(method):
    """The operator's dtype is its vectors': after model.float() its products would be
    rounded, or fail in a kernel."""
    model = mlp()
    op = HessianOperator(model, CRITERION, batch_for(model, 6, seed=0), method=method)
    v = torch.randn(op.shape[0], dtype=DTYPE)
    op.matvec(v)
    model.float()
    for call in (op.grad, lambda: op.matvec(v), lambda: op.matmat(v[:, None])):
        with pytest.raises(RuntimeError, match="now torch.float32.*make a new HessianOperator"):
            call()


def test_non_finite_loss_raises():
    model = mlp()
    batch = batch_for(model, 6, seed=0)
    op = HessianOperator(model, lambda out, y: CRITERION(out, y) * float("inf"), batch)
    with pytest.raises(RuntimeError, match="non-finite loss"):
        op.grad()
    with pytest.raises(RuntimeError, match="non-finite loss"):
        op.matvec(torch.ones(39, dtype=DTYPE))
    with pytest.raises(RuntimeError, match="non-finite loss"):
        fastbn.curvature.eigenvalues(op)


def test_a_non_finite_loss_leaves_auto_to_choose_later():
    """A NaN loss fails every method alike: "auto" must not take it for one method's
    failure and keep the other for good."""
    model = mlp()
    inputs, targets = batch_for(model, 6, seed=0)
    op = HessianOperator(model, CRITERION, (inputs, targets))
    v = torch.randn(39, dtype=DTYPE)
    with torch.no_grad():
        inputs[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite loss"):
        op.matvec(v)
    assert op.methods_used == {}
    with torch.no_grad():
        inputs[0, 0] = 0.0
    _, hessian = exact_hessian(model, CRITERION, [(inputs, targets)])
    close(op.matvec(v), hessian @ v)
    assert set(op.timings["matvec"]) == set(METHODS)
    assert all(math.isfinite(t) for t in op.timings["matvec"].values())


def test_data_that_changes_between_passes_is_refused():
    """The operator is the Hessian of fixed batches: a loader that shuffles, or a one-shot
    stream behind a re-iterable (which would lose the batch checked at construction),
    is refused on its next pass rather than giving another operator each time."""
    model = mlp()
    inputs, targets = batch_for(model, 12, seed=0)
    dataset = torch.utils.data.TensorDataset(inputs, targets)

    class Stream(torch.utils.data.IterableDataset):
        def __init__(self, batches):
            self.batches = iter(batches)

        def __iter__(self):
            return self.batches

    batches = [(inputs[i:i + 4], targets[i:i + 4]) for i in (0, 4, 8)]
    stream = torch.utils.data.DataLoader(Stream(batches), batch_size=None)
    shuffled = torch.utils.data.DataLoader(
        dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    for data in (stream, shuffled):
        op = HessianOperator(model, CRITERION, data)
        with pytest.raises(ValueError, match="same batches on every pass"):
            for _ in range(3):
                op.grad()
    ordered = HessianOperator(model, CRITERION,
                              torch.utils.data.DataLoader(dataset, batch_size=4))
    close(ordered.grad(), ordered.grad())
    close(ordered.grad(), HessianOperator(model, CRITERION, batches).grad())


def test_retained_graph_follows_in_place_updates_of_the_model():
    model = cnn()
    batch = batch_for(model, 6, seed=0)
    op = HessianOperator(model, CRITERION, batch, method="reverse-over-reverse")
    v = torch.randn(op.shape[0], dtype=DTYPE)
    _, hessian = exact_hessian(model, CRITERION, [batch])
    close(op.matvec(v), hessian @ v)
    with torch.no_grad():
        model[0].weight.mul_(1.5)          # as an optimizer step would
    _, updated = exact_hessian(model, CRITERION, [batch])
    close(op.matvec(v), updated @ v)
    with torch.no_grad():
        batch[0].mul_(2.0)                 # the batch itself changed in place
    _, rescaled = exact_hessian(model, CRITERION, [batch])
    close(op.matvec(v), rescaled @ v)
    op.clear_cache()
    close(op.matvec(v), rescaled @ v)


def test_dataloader_dict_inputs_and_progress_bars():
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp()

        def forward(self, inputs):
            return self.body(inputs["x"])

    model = DictModel()
    inputs, targets = batch_for(model.body, 8, seed=0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets),
                                         batch_size=4)
    batches = [(inputs[:4], targets[:4]), (inputs[4:], targets[4:])]
    _, hessian = exact_hessian(model.body, CRITERION, batches)
    V = torch.randn(39, 2, dtype=DTYPE)
    op = HessianOperator(model, lambda out, y: CRITERION(out, y),
                         [({"x": x}, y) for x, y in loader], progress=True, chunk_size=1)
    close(op.matmat(V), hessian @ V)
    single = HessianOperator(model, CRITERION, ({"x": inputs[:4]}, targets[:4]))
    _, first = exact_hessian(model.body, CRITERION, batches[:1])
    close(single.matvec(V[:, 0]), first @ V[:, 0])
    plain = HessianOperator(model.body, CRITERION, loader, method="forward-over-reverse")
    close(plain.matvec(V[:, 0]), hessian @ V[:, 0])


def test_matmat_calls_each_batch_norm_kernel_once_for_all_tangents(monkeypatch):
    from fastbn.backends import reference
    calls = []
    for kernel in ("forward_jvp", "backward_jvp"):
        original = getattr(reference, kernel)

        def counted(*args, kernel=kernel, original=original, **kwargs):
            calls.append((kernel, args[0].shape))
            return original(*args, **kwargs)
        monkeypatch.setattr(reference, kernel, counted)
    model = mlp()
    batch = batch_for(model, 6, seed=0)
    op = HessianOperator(model, CRITERION, batch, method="forward-over-reverse",
                         chunk_size=5)
    V = torch.randn(op.shape[0], 5, dtype=DTYPE)
    with fastbn.use_backend("reference"):
        result = op.matmat(V)
    # One BN layer: one K=5 call of each kernel (the tangent of x leads with K).
    assert sorted(calls) == [("backward_jvp", (5, 6, 4)), ("forward_jvp", (5, 6, 4))]
    _, hessian = exact_hessian(model, CRITERION, [batch])
    close(result, hessian @ V)


def _mse_problem():
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2)).to(DTYPE)
    inputs = torch.randn(6, 3, dtype=DTYPE)
    targets = torch.randn(6, 2, dtype=DTYPE)
    return model, nn.MSELoss(), (inputs, targets)


def test_auto_skips_a_method_that_fails():
    # torch 2.13: jvp(grad(mse_loss)) raises "ZeroTensors are immutable".
    model, criterion, batch = _mse_problem()
    _, hessian = exact_hessian(model, criterion, [batch])
    v = torch.randn(hessian.shape[0], dtype=DTYPE)
    op = HessianOperator(model, criterion, batch)
    close(op.matvec(v), hessian @ v)
    close(op.matmat(v[:, None])[:, 0], hessian @ v)
    for path in ("matvec", "matmat"):
        if op.timings[path]["forward-over-reverse"] == float("inf"):
            assert op.methods_used[path] == "reverse-over-reverse"


def test_forward_over_reverse_names_the_torch_limitation_it_hits():
    model, criterion, (inputs, targets) = _mse_problem()
    outputs = model(inputs).detach()
    try:
        torch.func.jvp(torch.func.grad(lambda z: criterion(z, targets)), (outputs,),
                       (torch.ones_like(outputs),))
    except RuntimeError:
        pass
    else:
        pytest.skip("this torch differentiates mse_loss forward-over-reverse")
    op = HessianOperator(model, criterion, (inputs, targets), method="forward-over-reverse")
    v = torch.ones(op.shape[0], dtype=DTYPE)
    for product in (lambda: op.matvec(v), lambda: op.matmat(v[:, None])):
        with pytest.raises(RuntimeError, match='limitation of torch.*'
                                              'method="reverse-over-reverse"') as raised:
            product()
        assert "ZeroTensors are immutable" in str(raised.value.__cause__)


def _weighted_cross_entropy():
    return nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0], dtype=DTYPE))


def _closed_over_weight():
    return functools.partial(nn.functional.cross_entropy,
                             weight=torch.tensor([1.0, 3.0], dtype=DTYPE))


# Class weights of a weighted mean: only their ratio matters.
_REWEIGHT = torch.tensor([1.0, 4.0], dtype=DTYPE)

# name: (edit(model, batch, criterion), criterion, bn_mode, parameter held fixed)
_EDITS = {
    "a parameter through .data":
        (lambda m, b, c: m[0].weight.data.mul_(1.5), nn.CrossEntropyLoss, "train", None),
    "a held parameter through .data":
        (lambda m, b, c: m[5].bias.data.mul_(-3.0), nn.CrossEntropyLoss, "train", "5.bias"),
    "running statistics through .data":
        (lambda m, b, c: m[1].running_var.data.mul_(3.0), nn.CrossEntropyLoss, "eval", None),
    "the inputs through .data":
        (lambda m, b, c: b[0].data.mul_(2.0), nn.CrossEntropyLoss, "train", None),
    "the targets through .data":
        (lambda m, b, c: b[1].data.copy_(1 - b[1]), nn.CrossEntropyLoss, "train", None),
    "a criterion buffer in place":
        (lambda m, b, c: c.weight.mul_(_REWEIGHT), _weighted_cross_entropy, "train", None),
    "a criterion buffer through .data":
        (lambda m, b, c: c.weight.data.mul_(_REWEIGHT), _weighted_cross_entropy, "train", None),
    "a criterion setting":
        (lambda m, b, c: setattr(c, "label_smoothing", 0.3), nn.CrossEntropyLoss, "train",
         None),
    "a tensor the criterion closes over, in place":
        (lambda m, b, c: c.keywords["weight"].mul_(_REWEIGHT), _closed_over_weight, "train", None),
}


@pytest.mark.parametrize("edit", list(_EDITS))
def test_retained_graph_follows_any_change_of_what_it_was_built_from(edit):
    change, make_criterion, bn_mode, held = _EDITS[edit]
    model = with_nontrivial_running_stats(cnn())
    batch = batch_for(model, 6, seed=0)
    criterion = make_criterion()
    names = [name for name, _ in model.named_parameters() if name != held]
    index = flat_indices(model, names)

    def hessian():
        return exact_hessian(model, criterion, [batch], bn_mode)[1][index][:, index]

    op = HessianOperator(model, criterion, batch, bn_mode=bn_mode, params=names,
                         method="reverse-over-reverse")
    v = torch.randn(op.shape[0], dtype=DTYPE)
    before = hessian()
    close(op.matvec(v), before @ v)
    graph = op._graph
    close(op.matvec(v), before @ v)
    assert op._graph is graph                   # unchanged: the kept graph is reused
    change(model, batch, criterion)
    after = hessian()
    assert not torch.allclose(after @ v, before @ v)
    close(op.matvec(v), after @ v)


@pytest.mark.parametrize("dropout", [nn.Dropout, nn.AlphaDropout])
def test_dropout_runs_in_eval_mode_and_the_model_keeps_its_flags(dropout):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), fastbn.BatchNorm1d(4), nn.Tanh(), dropout(0.5),
                          nn.Linear(4, 3)).to(DTYPE)
    batch = batch_for(model, 6, seed=0)
    without_dropout = copy.deepcopy(model)
    without_dropout[3].eval()
    _, hessian = exact_hessian(without_dropout, CRITERION, [batch])
    before = snapshot(model)
    v = torch.randn(hessian.shape[0], dtype=DTYPE)
    for method in METHODS:
        op = HessianOperator(model, CRITERION, batch, method=method)
        close(op.matvec(v), hessian @ v)
        close(op.matvec(v), hessian @ v)
        close(op.matmat(torch.eye(hessian.shape[0], dtype=DTYPE)), hessian)
    assert_unchanged(model, before)
    assert model[3].training


class _OwnForward(nn.BatchNorm1d):
    def forward(self, input):
        return super().forward(input)


def _model_with(batch_norm):
    torch.manual_seed(6)
    return nn.Sequential(nn.Linear(3, 4), batch_norm, nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_a_torch_batch_norm_subclass_with_torch_forward_runs_as_fastbn(bn_mode):
    model = with_nontrivial_running_stats(_model_with(SubclassedBatchNorm1d(4)))
    batch = batch_for(model, 6, seed=0)
    _, hessian = exact_hessian(model, CRITERION, [batch], bn_mode)
    before = snapshot(model)
    v = torch.randn(hessian.shape[0], dtype=DTYPE)
    for method in METHODS:
        op = HessianOperator(model, CRITERION, batch, bn_mode=bn_mode, method=method)
        close(op.matvec(v), hessian @ v)
        close(op.matmat(torch.eye(hessian.shape[0], dtype=DTYPE)), hessian)
    assert type(model[1]) is SubclassedBatchNorm1d
    assert_unchanged(model, before)


def test_a_batch_norm_subclass_with_its_own_forward():
    model = _model_with(_OwnForward(4))
    batch = batch_for(model, 6, seed=0)
    with pytest.raises(TypeError, match=r"'1' \(_OwnForward\).*overrides forward.*"
                                        r"fastbn\.BatchNorm1d.*bn_mode=\"eval\".*"
                                        r"track_running_stats=False"):
        HessianOperator(model, CRITERION, batch)
    # Where it cannot update running statistics, it runs as it is.
    for bn_mode, layer in (("eval", _OwnForward(4)),
                           ("train", _OwnForward(4, track_running_stats=False))):
        model = _model_with(layer)
        _, hessian = exact_hessian(model, CRITERION, [batch], bn_mode)
        op = HessianOperator(model, CRITERION, batch, bn_mode=bn_mode)
        close(op.matmat(torch.eye(hessian.shape[0], dtype=DTYPE)), hessian)


def test_a_criterion_assigned_later_rebuilds_the_kept_graph():
    model = mlp()
    batch = batch_for(model, 6, seed=0)
    # Two functions: no attributes to tell them apart, only their identity.
    op = HessianOperator(model, nn.functional.cross_entropy, batch,
                         method="reverse-over-reverse")
    v = torch.randn(op.shape[0], dtype=DTYPE)
    before = op.matvec(v)
    op.criterion = lambda out, target: 3 * nn.functional.cross_entropy(out, target)
    close(op.matvec(v), 3 * before)


@pytest.mark.parametrize("method", METHODS)
def test_a_batch_made_under_inference_mode(method):
    """The kept graph of reverse-over-reverse saves the batch, which autograd refuses for
    an inference tensor: a copy goes in."""
    model = mlp()
    with torch.inference_mode():
        batch = batch_for(model, 6, seed=0)
    gradient, hessian = exact_hessian(model, CRITERION, [tuple(t.clone() for t in batch)])
    op = HessianOperator(model, CRITERION, batch, method=method)
    v = torch.randn(op.shape[0], dtype=DTYPE)
    close(op.grad(), gradient)
    close(op.matvec(v), hessian @ v)


@pytest.mark.parametrize("method", METHODS)
def test_works_under_inference_mode(method):
    model = mlp()
    batch = batch_for(model, 6, seed=0)
    gradient, hessian = exact_hessian(model, CRITERION, [batch])
    op = HessianOperator(model, CRITERION, batch, method=method)
    v = torch.randn(op.shape[0], dtype=DTYPE)
    with torch.inference_mode():
        close(op.grad(), gradient)
        close(op.matvec(v), hessian @ v)
        close(op.matmat(v[:, None])[:, 0], hessian @ v)


class _WithAutogradAttribute(nn.Module):
    """A module holding a tensor autograd made (as nn.utils.weight_norm's weight, or a
    cached output), which copy.deepcopy refuses."""

    def __init__(self):
        super().__init__()
        self.net = mlp()
        self.last = None

    def forward(self, x):
        self.last = self.net(x)
        return self.last


def test_a_model_holding_a_non_leaf_tensor_attribute():
    model = _WithAutogradAttribute()
    batch = batch_for(model.net, 6, seed=0)
    model(batch[0])
    assert not model.last.is_leaf
    _, hessian = exact_hessian(model.net, CRITERION, [batch])
    op = HessianOperator(model, CRITERION, batch)
    v = torch.randn(op.shape[0], dtype=DTYPE)
    close(op.matvec(v), hessian @ v)
    assert fastbn.curvature.activation_hessian(model, CRITERION, batch, "net.1").loss > 0


def test_dict_inputs_with_a_shared_tensor_count_the_targets_samples():
    """A tensor every sample shares (leading size 3 here) must not be taken as the batch."""
    model = mlp()
    batches = [batch_for(model, n, seed=n) for n in (6, 2)]

    class DictInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, inputs):
            return self.net(inputs["x"] * inputs["scale"])

    scale = torch.ones(3, dtype=DTYPE)
    for order in (("scale", "x"), ("x", "scale")):
        data = [({name: {"scale": scale, "x": x}[name] for name in order}, y)
                for x, y in batches]
        op = HessianOperator(DictInputs(), CRITERION, data)
        close(op.grad(), exact_hessian(model, CRITERION, batches)[0])
    with pytest.raises(ValueError, match="cannot tell the number of samples"):
        HessianOperator(DictInputs(), CRITERION,
                        [({"scale": scale, "x": batches[0][0]}, None)]).grad()


def test_to_scipy_takes_complex_operands():
    model = mlp()
    batch = batch_for(model, 6, seed=0)
    _, hessian = exact_hessian(model, CRITERION, [batch])
    op = HessianOperator(model, CRITERION, batch).to_scipy()
    z = torch.randn(op.shape[0], dtype=DTYPE) + 1j * torch.randn(op.shape[0], dtype=DTYPE)
    got = torch.from_numpy(op.matvec(z.numpy()))
    close(got.real, hessian @ z.real)
    close(got.imag, hessian @ z.imag)


class _Scaled(nn.Module):
    """An MLP whose output a plain tensor attribute and a number attribute scale."""

    def __init__(self):
        super().__init__()
        self.net = mlp()
        self.scale = torch.ones(3, dtype=DTYPE)
        self.power = 1.0

    def forward(self, x):
        return self.net(x) * self.scale ** self.power


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("change", ["in place", "assigned", "number", "batch norm eps"])
def test_attribute_changes_after_construction_are_seen(method, change):
    model = _Scaled()
    batch = batch_for(model.net, 6, seed=0)
    op = HessianOperator(model, CRITERION, batch, method=method)
    v = torch.randn(op.shape[0], dtype=DTYPE)
    close(op.matvec(v), exact_hessian(model, CRITERION, [batch])[1] @ v)
    if change == "in place":
        model.scale.mul_(2.0)
    elif change == "assigned":
        model.scale = torch.full((3,), 0.5, dtype=DTYPE)
    elif change == "number":
        model.power = 3.0
        model.scale = torch.full((3,), 1.5, dtype=DTYPE)
        op.matvec(v)
        model.power = 2.0
    else:
        model.net[1].eps = 0.5
    expected = exact_hessian(model, CRITERION, [batch])[1] @ v
    close(op.matvec(v), expected)
    close(op.matmat(v[:, None])[:, 0], expected)


def test_peak_bytes_measures_what_a_call_holds_at_once():
    from fastbn.curvature._memory import peak_bytes
    mib = 2 ** 20

    def in_turn():
        a = torch.ones(mib)   # 4 MiB, freed before the next
        del a
        torch.ones(mib)

    def at_once():
        a = torch.ones(mib)
        b = torch.ones(mib)
        return a, b

    assert 4 * mib <= peak_bytes(in_turn, "cpu") < 5 * mib
    assert 8 * mib <= peak_bytes(at_once, "cpu") < 9 * mib


def test_matmat_stays_within_its_budget():
    # The chunk is sized from probes of narrow passes; the whole call, measured on its
    # own, holds no more than the budget beyond its result.
    from fastbn.curvature._memory import peak_bytes
    model = cnn()
    batch = batch_for(model, 6, seed=0)
    V = torch.randn(89, 16, dtype=DTYPE)
    roomy = HessianOperator(model, CRITERION, batch, method="forward-over-reverse")
    roomy.matmat(V)
    per_tangent = roomy.probe_peaks[1] - roomy.probe_peaks[0]
    budget = max(roomy.probe_peaks[0] - per_tangent, 0) + 4.5 * per_tangent
    sized = HessianOperator(model, CRITERION, batch, method="forward-over-reverse",
                            max_memory=budget)
    sized.matmat(V)    # probes and the cached gradient graph: not part of later calls
    assert sized.chunk_size == 4
    result_bytes = V.numel() * V.element_size()
    peak = peak_bytes(lambda: sized.matmat(V), "cpu")
    assert peak <= budget + result_bytes, (peak, budget, result_bytes)
    sized.max_memory = budget + 4 * per_tangent   # a new budget: the chunks follow it
    sized.matmat(V)
    assert sized.chunk_size == 8
    sized.chunk_size = 2                           # an explicit chunk stays
    sized.max_memory = budget
    assert sized.chunk_size == 2
    unchunked = HessianOperator(model, CRITERION, batch, method="forward-over-reverse",
                                chunk_size=16)
    unchunked.matmat(V)
    assert peak_bytes(lambda: unchunked.matmat(V), "cpu") > budget + result_bytes


def test_matmat_stays_within_its_budget_when_a_small_batch_comes_first():
    # The chunk is sized on the batch with the most samples, wherever it sits in data.
    from fastbn.curvature._memory import peak_bytes
    model = cnn()
    small, large = batch_for(model, 2, seed=1), batch_for(model, 300, seed=2)
    V = torch.randn(89, 16, dtype=DTYPE)
    roomy = HessianOperator(model, CRITERION, large, method="forward-over-reverse")
    roomy.matmat(V)
    per_tangent = roomy.probe_peaks[1] - roomy.probe_peaks[0]
    budget = max(roomy.probe_peaks[0] - per_tangent, 0) + 4.5 * per_tangent
    sized = HessianOperator(model, CRITERION, [small, large], method="forward-over-reverse",
                            max_memory=budget)
    sized.matmat(V)
    assert sized.chunk_size == 4
    result_bytes = V.numel() * V.element_size()
    peak = peak_bytes(lambda: sized.matmat(V), "cpu")
    assert peak <= budget + result_bytes, (peak, budget, result_bytes)


def test_options_fixed_at_construction_are_read_only():
    model = mlp()
    op = HessianOperator(model, CRITERION, batch_for(model, 6, seed=0), params=["3.bias"],
                         bn_mode="eval", method="reverse-over-reverse")
    for name, value in [("bn_mode", "train"), ("method", "forward-over-reverse"),
                        ("param_names", ["3.weight"]), ("shape", (39, 39)),
                        ("dtype", torch.float32), ("device", torch.device("meta"))]:
        before = getattr(op, name)
        with pytest.raises(AttributeError, match=f"{name} is fixed at construction"):
            setattr(op, name, value)
        assert getattr(op, name) == before
    op.param_names.append("3.weight")       # a copy: the operator's own list stays
    assert op.param_names == ["3.bias"]
    op.chunk_size, op.progress = 2, False    # settings read at each call stay settable


@pytest.mark.parametrize("method", METHODS)
def test_products_of_an_operand_that_requires_grad_are_plain_tensors(method):
    model = mlp()
    op = HessianOperator(model, CRITERION, batch_for(model, 6, seed=0), method=method)
    V = torch.randn(39, 3, dtype=DTYPE, requires_grad=True)
    for product in (op.matvec(V[:, 0]), op.matmat(V), op @ V):
        assert not product.requires_grad and product.grad_fn is None


def test_vectors_of_another_dtype_are_cast_to_the_operators():
    model = mlp()
    op = HessianOperator(model, CRITERION, batch_for(model, 6, seed=0))
    v = torch.randn(39, dtype=torch.float32)
    for product, expected in [(op.matvec(v), op.matvec(v.to(DTYPE))),
                              (op.matmat(v[:, None])[:, 0], op.matmat(v[:, None].to(DTYPE))[:, 0])]:
        assert product.dtype == DTYPE
        assert torch.equal(product, expected)
    assert "cast to the operator's dtype" in " ".join(HessianOperator.matvec.__doc__.split())


@pytest.mark.parametrize("data", ["one batch", "two batches"])
def test_auto_chooses_for_matvec_and_matmat_apart_and_gives_their_results(data):
    model = cnn()
    batches = [batch_for(model, 6, seed=0), batch_for(model, 4, seed=1)]
    batches = batches[0] if data == "one batch" else batches
    V = torch.randn(89, 3, dtype=DTYPE)
    op = HessianOperator(model, CRITERION, batches, chunk_size=3)
    kept_graph_products = []
    retained_graph_hvp = op._retained_graph_hvp
    op._retained_graph_hvp = lambda v: kept_graph_products.append(v) or retained_graph_hvp(v)
    by_auto = op.matvec(V[:, 0])
    assert list(op.methods_used) == ["matvec"] and set(op.timings["matvec"]) == set(METHODS)
    # On one batch, matvec's reverse-over-reverse is timed as it runs: through the kept
    # graph (a warm-up product, which builds it, and a timed one).
    if data == "one batch":
        assert len(kept_graph_products) >= 2
    else:   # no kept graph over several batches
        assert not kept_graph_products
    assert op.methods_used["matvec"] == min(METHODS, key=op.timings["matvec"].get)
    named = HessianOperator(model, CRITERION, batches, method=op.methods_used["matvec"])
    assert torch.equal(by_auto, named.matvec(V[:, 0]))
    by_auto = op.matmat(V)
    assert set(op.methods_used) == {"matvec", "matmat"}
    assert op.methods_used["matmat"] == min(METHODS, key=op.timings["matmat"].get)
    named = HessianOperator(model, CRITERION, batches, method=op.methods_used["matmat"],
                            chunk_size=3)
    assert named.methods_used == {"matvec": named.method, "matmat": named.method}
    assert torch.equal(by_auto, named.matmat(V))


class _RandomInForward(nn.Module):
    """Linear → batch norm → F.dropout in training mode, plus uniform noise → Linear."""

    def __init__(self):
        super().__init__()
        self.linear, self.bn, self.head = nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, x):
        h = nn.functional.dropout(torch.tanh(self.bn(self.linear(x))), 0.5, self.training)
        return self.head(h + 0.1 * torch.rand_like(h))


def _random_models():
    torch.manual_seed(6)
    return {"F.dropout and torch.rand": _RandomInForward().to(DTYPE),
            "nn.RReLU": nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.RReLU(),
                                      nn.Linear(5, 3)).to(DTYPE)}


def _hessian_of_one_draw(model, batch, seed):
    """The Hessian by torch.autograd.functional, its one evaluation of the loss drawing
    from the global generator seeded with `seed`."""
    reference = copy.deepcopy(model)
    names = [name for name, _ in reference.named_parameters()]
    shapes = [p.shape for p in reference.parameters()]
    buffers = {name: b.clone() for name, b in reference.named_buffers()}

    def loss(theta):
        pieces = dict(zip(names, (piece.reshape(shape) for piece, shape in
                                  zip(theta.split([s.numel() for s in shapes]), shapes))))
        return CRITERION(torch.func.functional_call(reference, (pieces, buffers),
                                                    (batch[0],)), batch[1])

    torch.manual_seed(seed)
    return torch.autograd.functional.hessian(
        loss, torch.cat([p.detach().reshape(-1) for p in reference.parameters()]))


@pytest.mark.parametrize("name", ["F.dropout and torch.rand", "nn.RReLU"])
@pytest.mark.parametrize("method", METHODS)
def test_random_operations_in_the_forward_give_one_fixed_draws_hessian(name, method):
    model = _random_models()[name]
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randn(6, 3, generator=generator, dtype=DTYPE),
             torch.randint(0, 3, (6,), generator=generator))
    at_construction = torch.get_rng_state()
    op = HessianOperator(model, CRITERION, batch, method=method)
    assert torch.equal(torch.get_rng_state(), at_construction)   # its seed moved nothing
    assert HessianOperator(model, CRITERION, batch).random_seed == op.random_seed
    hessian = _hessian_of_one_draw(model, batch, op.random_seed)
    torch.manual_seed(11)
    callers_state = torch.get_rng_state()
    u, v = torch.randn(2, op.shape[0], dtype=DTYPE)
    torch.set_rng_state(callers_state)
    hv = op.matvec(v)
    assert torch.equal(torch.get_rng_state(), callers_state)
    assert torch.equal(op.matvec(v), hv)
    close(hv, hessian @ v)
    assert float(u @ hv) == pytest.approx(float(v @ op.matvec(u)), rel=1e-10)
    if name == "nn.RReLU":    # vmap has no batching rule for its random op
        with pytest.raises(RuntimeError, match="no batching rule.*Use matvec"):
            op.matmat(torch.stack([u, v], 1))
    else:
        close(op.matmat(torch.stack([u, v], 1)), torch.stack([op.matvec(u), hv], 1),
              rtol=1e-12)
    assert torch.equal(torch.get_rng_state(), callers_state)


def test_each_batch_draws_its_own_random_numbers():
    """Batch b's loss draws from random_seed + b: two copies of one batch are two draws,
    not one counted twice."""
    model = _random_models()["F.dropout and torch.rand"]
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randn(6, 3, generator=generator, dtype=DTYPE),
             torch.randint(0, 3, (6,), generator=generator))
    twice = HessianOperator(model, CRITERION, [batch, batch], method="reverse-over-reverse")
    v = torch.randn(twice.shape[0], dtype=DTYPE)
    draws = [_hessian_of_one_draw(model, batch, twice.random_seed + b) @ v for b in (0, 1)]
    assert not torch.equal(draws[0], draws[1])
    close(twice.matvec(v), (draws[0] + draws[1]) / 2)
