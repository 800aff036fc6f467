import io
import math
import re
import sys
import warnings

import numpy
import pytest
import torch
from torch import nn

from fastbn.curvature import (HessianOperator, NonFiniteProductError, eigenvalues,
                              smoothed_density, spectral_density,
                              stochastic_lanczos_quadrature, trace)
from fastbn.curvature.lanczos import random_vectors
from tests.curvature.helpers import (DTYPE, MatrixOperator, assert_unchanged, batch_for, cnn,
                                     exact_hessian, mlp, random_symmetric, snapshot)

CRITERION = nn.CrossEntropyLoss()


@pytest.fixture(scope="module")
def cnn_problem():
    model = cnn()
    batch = batch_for(model, 6, seed=0)
    _, hessian = exact_hessian(model, CRITERION, [batch])
    return model, batch, hessian


@pytest.fixture(scope="module")
def mlp_problem():
    """A batch-norm MLP's Hessian: several exact zero eigenvalues (batch norm cancels the
    first layer's bias), and a most negative eigenvalue larger in magnitude than the
    sixth largest."""
    model = mlp()
    batch = batch_for(model, 8, seed=0)
    _, hessian = exact_hessian(model, CRITERION, [batch])
    return model, batch, hessian


def assert_eigenpairs(matrix, values, vectors, atol):
    """Orthonormal eigenvectors with the largest algebraic eigenvalues of `matrix`."""
    expected = torch.linalg.eigvalsh(matrix).flip(0)[:len(values)]
    assert (values - expected).abs().max() <= atol
    assert (matrix @ vectors - vectors * values).norm(dim=0).max() <= 10 * atol
    identity = torch.eye(len(values), dtype=DTYPE)
    assert (vectors.t() @ vectors - identity).abs().max() <= 1e-8


@pytest.fixture
def matrix():
    # A spectrum with a clear top (like a Hessian's) and both signs.
    spectrum = torch.cat([torch.tensor([9.0, 5.0, 3.0], dtype=DTYPE),
                          torch.linspace(-1.0, 1.0, 37, dtype=DTYPE)])
    return random_symmetric(40, seed=4, spectrum=spectrum)


def test_lanczos_on_the_hessian_matches_eigvalsh(cnn_problem):
    model, batch, hessian = cnn_problem
    before = snapshot(model)
    op = HessianOperator(model, CRITERION, batch, method="forward-over-reverse")
    values, vectors = eigenvalues(op, k=3, tol=1e-10, max_iter=89)
    expected = torch.linalg.eigvalsh(hessian).flip(0)[:3]
    assert torch.allclose(values, expected, rtol=0, atol=1e-8 * expected.abs().max())
    residual = hessian @ vectors - vectors * values
    assert residual.norm(dim=0).max() <= 1e-6 * expected.abs().max()
    assert_unchanged(model, before)


def test_lanczos_and_power_on_a_known_matrix(matrix):
    op = MatrixOperator(matrix)
    expected = torch.linalg.eigvalsh(matrix).flip(0)
    values, vectors = eigenvalues(op, k=2, tol=1e-10)
    assert torch.allclose(values, expected[:2], atol=1e-9)
    assert torch.allclose(vectors.t() @ vectors, torch.eye(2, dtype=DTYPE), atol=1e-8)
    values, vectors = eigenvalues(op, k=2, method="power", tol=1e-12, max_iter=500)
    assert torch.allclose(values, expected[:2], rtol=1e-6)
    assert torch.allclose((matrix @ vectors).abs(), (vectors * values).abs(), atol=1e-4)


def _dominated(size, seed=3):
    """A Hessian-like spectrum: one eigenvalue two orders above the next few, then a bulk
    near zero. tol·‖H‖ at tol=1e-3 is 1, wider than the gaps below the top."""
    spectrum = torch.tensor([1000.0, 5.0, 4.0, 3.0, 2.0]
                            + [0.45 * (2 * i / (size - 6) - 1) for i in range(size - 5)],
                            dtype=DTYPE)
    return random_symmetric(size, seed=seed, spectrum=spectrum), spectrum[:5]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lanczos_finds_the_k_largest_next_to_a_dominant_eigenvalue(seed):
    """Converged means within tol of each eigenvalue, not of ‖H‖: a bulk Ritz value passed
    for the 3rd largest after six products."""
    matrix, top = _dominated(95)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values, vectors = eigenvalues(MatrixOperator(matrix), k=5, seed=seed)
    assert ((values - top).abs() <= 1e-3 * top).all(), values
    residuals = (matrix @ vectors - vectors * values).norm(dim=0)
    assert (residuals <= 1e-3 * values.abs()).all()


def test_power_next_to_a_dominant_eigenvalue_converges_or_warns():
    # On H + 1000·I the deflated eigenvalues converge slowly: never a silent wrong answer.
    matrix, top = _dominated(40)
    with pytest.warns(RuntimeWarning, match="did not reach"):
        eigenvalues(MatrixOperator(matrix), k=3, method="power", max_iter=100)
    values, _ = eigenvalues(MatrixOperator(matrix), k=3, method="power", max_iter=100000)
    assert ((values - top[:3]).abs() <= 1e-3 * top[:3]).all(), values


def test_float32_lanczos_runs_past_small_betas():
    """A β of 1e-4·‖T‖ is no breakdown in float32: density runs keep their steps and
    eigenvalues converge."""
    matrix, top = _dominated(120)
    op = MatrixOperator(matrix.float())
    nodes, weights = stochastic_lanczos_quadrature(op, num_runs=2, num_steps=40, seed=0)
    assert ((weights > 0).sum(1) >= 30).all()
    values, _ = eigenvalues(op, k=5)
    assert ((values.double() - top).abs() <= 1e-3 * top).all(), values


def test_lanczos_warns_when_not_converged(matrix):
    with pytest.warns(RuntimeWarning, match="did not reach"):
        eigenvalues(MatrixOperator(matrix), k=1, tol=1e-14, max_iter=3)


def test_trace_hutch_plus_plus_is_exact_with_p_samples(cnn_problem):
    model, batch, hessian = cnn_problem
    op = HessianOperator(model, CRITERION, batch, chunk_size=32)
    estimate, error = trace(op, num_samples=89)
    assert error == 0.0
    assert math.isclose(estimate, float(hessian.trace()), rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_trace_estimators_are_within_their_error(matrix, method):
    op = MatrixOperator(matrix)
    exact = float(matrix.trace())
    estimate, error = trace(op, num_samples=30, method=method, seed=1)
    assert error > 0
    assert abs(estimate - exact) <= 5 * error
    assert trace(op, num_samples=30, method=method, seed=1) == (estimate, error)
    assert trace(op, num_samples=30, method=method, seed=2) != (estimate, error)


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_trace_standard_error_is_the_spread_of_the_estimates(matrix, method):
    """Over many seeds the reported error matches the estimates' actual spread, and for
    Hutchinson the exact Rademacher variance 2(‖A‖²_F − Σ a_ii²) / n."""
    op, n, seeds = MatrixOperator(matrix), 30, 300
    estimates, errors = map(torch.tensor, zip(*(trace(op, num_samples=n, method=method,
                                                      seed=seed) for seed in range(seeds))))
    assert abs(float(estimates.mean()) - float(matrix.trace())) <= 4 * float(estimates.std()) \
        / math.sqrt(seeds)
    reported = float(errors.square().mean().sqrt())
    assert 0.85 <= reported / float(estimates.std()) <= 1.15
    if method == "hutchinson":
        variance = 2 * (matrix.square().sum() - matrix.diagonal().square().sum()) / n
        assert 0.9 <= reported / float(variance.sqrt()) <= 1.1


def test_trace_in_several_blocks_is_exact_or_unbiased(matrix):
    op = MatrixOperator(matrix)       # P = 40 > BLOCK = 32 probes per matmat
    assert trace(op, num_samples=40) == (pytest.approx(float(matrix.trace()), abs=1e-10), 0.0)
    estimate, error = trace(op, num_samples=70, method="hutchinson")
    assert abs(estimate - float(matrix.trace())) <= 5 * error


def test_hutch_plus_plus_beats_hutchinson_on_a_dominated_spectrum(matrix):
    op = MatrixOperator(matrix)
    _, hutchinson_error = trace(op, num_samples=30, method="hutchinson")
    _, hutch_error = trace(op, num_samples=30, method="hutch++")
    assert hutch_error < hutchinson_error


def test_slq_density_integrates_to_one_and_its_mean_is_trace_over_p(matrix):
    op = MatrixOperator(matrix)
    size = matrix.shape[0]
    nodes, weights = stochastic_lanczos_quadrature(op, num_runs=50, num_steps=size, seed=3)
    assert torch.allclose(weights.sum(1), torch.ones(50, dtype=DTYPE))
    # With num_steps = P, each run's quadrature is exact for polynomials: its first
    # moment is the Rayleigh quotient of its start vector.
    starts = random_vectors(op, 50, seed=3)
    rayleigh = (starts * (matrix @ starts)).sum(0) / (starts * starts).sum(0)
    assert torch.allclose((nodes * weights).sum(1), rayleigh, atol=1e-10)

    grid, density = spectral_density(op, num_runs=50, num_steps=size, seed=3)
    assert math.isclose(float(torch.trapezoid(density, grid)), 1.0, rel_tol=1e-12)
    mean = float(torch.trapezoid(grid * density, grid))
    assert math.isclose(mean, float(rayleigh.mean()), abs_tol=1e-8)
    standard_error = float(rayleigh.std()) / math.sqrt(50)
    assert abs(mean - float(matrix.trace()) / size) <= 5 * standard_error
    # The density of a quadrature computed once is the one spectral_density computes.
    again = smoothed_density(nodes, weights)
    assert torch.equal(again[0], grid) and torch.equal(again[1], density)
    with pytest.raises(ValueError, match="smoothed_density: sigma must be a positive"):
        smoothed_density(nodes, weights, sigma=0.0)


def test_density_on_the_hessian(cnn_problem):
    model, batch, hessian = cnn_problem
    op = HessianOperator(model, CRITERION, batch, method="forward-over-reverse")
    grid, density = spectral_density(op, num_runs=4, num_steps=16, seed=0)
    again = spectral_density(op, num_runs=4, num_steps=16, seed=0)
    assert torch.equal(grid, again[0]) and torch.equal(density, again[1])
    assert math.isclose(float(torch.trapezoid(density, grid)), 1.0, rel_tol=1e-12)
    eigen = torch.linalg.eigvalsh(hessian)
    # Ritz values lie inside the spectrum; the grid pads them by 8σ.
    assert grid[0] >= eigen[0] - 0.09 * (eigen[-1] - eigen[0])
    assert grid[-1] <= eigen[-1] + 0.09 * (eigen[-1] - eigen[0])
    custom_grid = torch.linspace(float(eigen[0]) - 1, float(eigen[-1]) + 1, 2001)
    grid, density = spectral_density(op, num_runs=4, num_steps=16, grid=custom_grid,
                                     sigma=0.05)
    assert torch.equal(grid, custom_grid.to(DTYPE))


def test_density_moments_on_the_hessian(cnn_problem):
    """Each run's quadrature has the moments of its start vector's Rayleigh quotients
    (Gauss quadrature with 8 nodes is exact to degree 15), whose mean estimates trace/P;
    the smoothed density keeps the quadrature's mean."""
    model, batch, hessian = cnn_problem
    op = HessianOperator(model, CRITERION, batch, method="forward-over-reverse")
    runs, size = 48, hessian.shape[0]
    nodes, weights = stochastic_lanczos_quadrature(op, num_runs=runs, num_steps=8, seed=3)
    assert torch.allclose(weights.sum(1), torch.ones(runs, dtype=DTYPE))
    first, second = (weights * nodes).sum(1), (weights * nodes ** 2).sum(1)
    scale = float(torch.linalg.eigvalsh(hessian).abs().max())
    for moment, exact in ((first, hessian.trace() / size),
                          (second, (hessian @ hessian).trace() / size)):
        error = float(moment.std()) / math.sqrt(runs)
        assert abs(float(moment.mean() - exact)) <= 4 * error + 1e-10 * scale
    grid, density = spectral_density(op, num_runs=runs, num_steps=8, seed=3)
    mean = float(torch.trapezoid(grid * density, grid))
    assert math.isclose(mean, float(first.mean()), rel_tol=1e-3, abs_tol=1e-6 * scale)


def test_default_sigma_when_every_eigenvalue_is_equal():
    # Rotated, (2/3)·I is not exactly scalar: its Ritz values differ by rounding.
    spectrum = torch.full((6,), 2 / 3, dtype=DTYPE)
    op = MatrixOperator(random_symmetric(6, seed=0, spectrum=spectrum))
    grid, density = spectral_density(op, num_runs=4, num_steps=3, seed=0)
    sigma = 0.01 * 2 / 3
    assert math.isclose(float(grid[-1] - grid[0]), 16 * sigma, rel_tol=1e-6)
    assert math.isclose(float(density.max()), 1 / (sigma * math.sqrt(2 * math.pi)),
                        rel_tol=1e-3)
    grid, _ = spectral_density(MatrixOperator(torch.zeros(6, 6, dtype=DTYPE)), num_steps=3)
    assert (float(grid[0]), float(grid[-1])) == (-8.0, 8.0)     # sigma 1


def test_seeds_reproduce(matrix):
    op = MatrixOperator(matrix)
    first = eigenvalues(op, k=2, seed=5)
    second = eigenvalues(op, k=2, seed=5)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for method in ("lanczos", "power"):   # a generator continues its stream, as an int's
        from_generator = eigenvalues(op, k=2, method=method,
                                     seed=torch.Generator().manual_seed(5))
        assert torch.equal(from_generator[0], eigenvalues(op, k=2, method=method, seed=5)[0])
        # ... and another seed another start: the estimates of one step differ.
        with pytest.warns(RuntimeWarning, match="did not reach tol"):
            one_step = [eigenvalues(op, k=1, method=method, max_iter=1, seed=s)[0]
                        for s in (5, 6)]
        assert not torch.equal(*one_step)
    nodes, weights = stochastic_lanczos_quadrature(op, num_runs=3, num_steps=10, seed=5)
    other_nodes, _ = stochastic_lanczos_quadrature(op, num_runs=3, num_steps=10, seed=6)
    assert torch.equal(nodes, stochastic_lanczos_quadrature(op, num_runs=3, num_steps=10,
                                                            seed=5)[0])
    assert not torch.equal(nodes, other_nodes)


def test_estimator_errors(matrix):
    op = MatrixOperator(matrix)
    with pytest.raises(ValueError, match="method"):
        eigenvalues(op, method="arnoldi")
    with pytest.raises(ValueError, match="k must be"):
        eigenvalues(op, k=41)
    with pytest.raises(ValueError, match="max_iter"):
        eigenvalues(op, k=3, max_iter=2)
    with pytest.raises(ValueError, match="method"):
        trace(op, method="exact")
    with pytest.raises(ValueError, match="num_samples"):
        trace(op, num_samples=0)
    with pytest.raises(ValueError, match="sigma"):
        spectral_density(op, num_steps=4, sigma=0.0)
    with pytest.raises(ValueError, match="increasing"):
        spectral_density(op, num_steps=4, grid=torch.linspace(1.0, -1.0, 11))
    with pytest.raises(ValueError, match="an int"):
        eigenvalues(op, k=2.0)
    with pytest.raises(TypeError, match="seed must be an int or a torch.Generator"):
        eigenvalues(op, seed=None)
    # Any integer type seeds, numpy's too.
    assert torch.equal(eigenvalues(op, seed=numpy.int64(3))[0], eigenvalues(op, seed=3)[0])


def test_slq_stops_runs_whose_krylov_space_is_invariant():
    """Four distinct eigenvalues: every Krylov space is invariant after four steps. A run
    stops there, or (a β just above the noise bound) takes one more step from a rounding
    direction, which splits a node's weight between two copies of that eigenvalue."""
    spectrum = torch.tensor([3.0, 2.0, 1.0] + [0.0] * 17, dtype=DTYPE)
    op = MatrixOperator(random_symmetric(20, seed=6, spectrum=spectrum))
    nodes, weights = stochastic_lanczos_quadrature(op, num_runs=3, num_steps=12, seed=0)
    assert torch.allclose(weights.sum(1), torch.ones(3, dtype=DTYPE))
    assert ((weights > 0).sum(1) <= 5).all()
    levels = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=DTYPE)
    distance = (nodes[weights > 0][:, None] - levels).abs().min(1).values
    assert distance.max() <= 1e-8
    for level in levels:   # every level carries weight in every run
        assert (((nodes - level).abs() <= 1e-8) & (weights > 0)).any(1).all()


def test_lanczos_returns_repeated_eigenvalues_as_often_as_their_multiplicity():
    spectrum = torch.tensor([5.0, 5.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0, -1.0, -2.0], dtype=DTYPE)
    matrix = random_symmetric(10, seed=0, spectrum=spectrum)
    for k in (2, 4, 7, 10):
        values, vectors = eigenvalues(MatrixOperator(matrix), k=k, tol=1e-10)
        assert_eigenpairs(matrix, values, vectors, atol=1e-8)
    values, vectors = eigenvalues(MatrixOperator(torch.zeros(5, 5, dtype=DTYPE)), k=2)
    assert torch.equal(values, torch.zeros(2, dtype=DTYPE))
    assert torch.allclose(vectors.t() @ vectors, torch.eye(2, dtype=DTYPE))


def test_lanczos_on_a_hessian_with_exact_zero_eigenvalues(mlp_problem):
    model, batch, hessian = mlp_problem
    exact = torch.linalg.eigvalsh(hessian).flip(0)
    scale = float(exact.abs().max())
    zeros = int((exact.abs() <= 1e-12 * scale).sum())
    assert zeros >= 4
    positive = int((exact > 1e-12 * scale).sum())
    op = HessianOperator(model, CRITERION, batch, method="reverse-over-reverse")
    for k in (positive + zeros // 2, op.shape[0]):    # the top k reach into the zeros
        values, vectors = eigenvalues(op, k=k, tol=1e-10, max_iter=op.shape[0])
        assert_eigenpairs(hessian, values, vectors, atol=1e-8 * scale)


def test_lanczos_with_k_one_is_a_single_run(matrix):
    counting = MatrixOperator(matrix)
    products = []
    counting.matvec = lambda v: products.append(1) or matrix @ v
    values, _ = eigenvalues(counting, k=1, tol=1e-10)
    # One Krylov run, stopped as soon as the top Ritz pair converged: running it with
    # one step fewer must fall short of tol.
    with pytest.warns(RuntimeWarning, match="did not reach"):
        eigenvalues(MatrixOperator(matrix), k=1, tol=1e-10, max_iter=len(products) - 1)
    assert math.isclose(float(values[0]), float(torch.linalg.eigvalsh(matrix)[-1]),
                        rel_tol=1e-9)


@pytest.mark.parametrize("spectrum", [
    [-10.0, -9.0, -8.0, 4.0, 3.0, 2.0] + [0.1 * i for i in range(-7, 7)],   # indefinite
    [-1.0 - 0.5 * i for i in range(20)],                                     # negative
])
def test_power_finds_the_largest_algebraic_eigenvalues(spectrum):
    matrix = random_symmetric(20, seed=5, spectrum=torch.tensor(spectrum, dtype=DTYPE))
    for k in (1, 3):
        values, vectors = eigenvalues(MatrixOperator(matrix), k=k, method="power",
                                      tol=1e-10, max_iter=2000)
        assert_eigenpairs(matrix, values, vectors, atol=1e-8)


@pytest.mark.parametrize("spectrum, k, tol", [
    ([1.0, 0.5, -0.9995], 3, 1e-3),             # the 3rd at -shift, within tol of it
    ([1.0, 1.0, 0.0, 0.0, 0.0] + [-1.0] * 5 + [-2.0, -2.0], 12, 1e-9),   # all, repeated
])
def test_power_vectors_are_eigenvectors_where_an_eigenvalue_sits_at_minus_the_shift(
        spectrum, k, tol):
    """Deflation alone maps the found directions and the eigenspace at -shift to the
    same zero: without projecting them out a run returned a found vector again."""
    matrix = random_symmetric(len(spectrum), seed=2,
                              spectrum=torch.tensor(spectrum, dtype=DTYPE))
    values, vectors = eigenvalues(MatrixOperator(matrix), k=k, method="power", tol=tol,
                                  max_iter=5000)
    assert_eigenpairs(matrix, values, vectors, atol=10 * tol)


def test_power_where_the_largest_magnitude_is_a_plus_minus_pair():
    """λ and -λ both of largest magnitude: the first run's iterates swing between them and
    never converge; the shifted runs must not take its Rayleigh quotient for a pair."""
    matrix = random_symmetric(4, seed=0, spectrum=torch.tensor([2.0, -2.0, 1.0, 0.5],
                                                                dtype=DTYPE))
    values, vectors = eigenvalues(MatrixOperator(matrix), k=2, method="power", tol=1e-9,
                                  max_iter=2000)
    assert_eigenpairs(matrix, values, vectors, atol=1e-7)


class CountingOperator(MatrixOperator):
    def __init__(self, matrix):
        super().__init__(matrix)
        self.products = 0

    def matvec(self, v):
        self.products += 1
        return super().matvec(v)


def test_power_after_the_first_pair_converges_in_the_complement_of_those_found():
    """A found vector keeps an error within its tolerance, which leaves ‖H v − θ v‖ of a
    later run near tol·λ of the larger eigenvalue: above its own tol·λ, so every later
    run took max_iter products and warned (111 products here, 1011 with max_iter=1000)."""
    op = CountingOperator(torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=DTYPE)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values, _ = eigenvalues(op, k=2, method="power", max_iter=1000)
    assert op.products < 100
    assert ((values - torch.tensor([4.0, 2.0], dtype=DTYPE)).abs() <= 1e-3 * 2).all()


def test_power_for_one_eigenvalue_where_the_largest_magnitude_is_a_plus_minus_pair():
    """The unconverged first run's Rayleigh quotient (1.86 here) is no eigenvalue: k = 1
    seeks the pair again on the shifted operator, as k > 1 does."""
    matrix = random_symmetric(4, seed=0, spectrum=torch.tensor([2.0, -2.0, 1.0, 0.5],
                                                                dtype=DTYPE))
    for seed in range(4):
        values, vectors = eigenvalues(MatrixOperator(matrix), k=1, method="power",
                                      tol=1e-9, max_iter=2000, seed=seed)
        assert_eigenpairs(matrix, values, vectors, atol=1e-7)


def test_power_on_a_hessian_with_a_large_negative_eigenvalue(mlp_problem):
    _, _, hessian = mlp_problem
    exact = torch.linalg.eigvalsh(hessian).flip(0)
    assert -exact[-1] > exact[5]     # in magnitude, the most negative comes before the 6th
    tol = 1e-3
    values, _ = eigenvalues(MatrixOperator(hessian), k=6, method="power", tol=tol,
                            max_iter=2000)
    assert (values - exact[:6]).abs().max() <= tol * exact.abs().max()


_ESTIMATES = {
    "eigenvalues": lambda op, progress: eigenvalues(op, k=2, progress=progress),
    "trace": lambda op, progress: trace(op, num_samples=10, progress=progress),
    "spectral_density": lambda op, progress: spectral_density(op, num_runs=2, num_steps=4,
                                                              progress=progress),
}


@pytest.mark.parametrize("estimate", list(_ESTIMATES))
def test_progress_bars_follow_the_operator_unless_told_otherwise(matrix, capsys, estimate):
    op = MatrixOperator(matrix)
    for operator_progress, progress, shown in ((False, None, False), (True, None, True),
                                               (True, False, False), (False, True, True),
                                               (None, None, False)):   # not a terminal
        op.progress = operator_progress
        _ESTIMATES[estimate](op, progress)
        assert bool(capsys.readouterr().err) == shown, (operator_progress, progress)


def test_progress_false_silences_the_operators_own_bars(capsys):
    model = mlp()
    batches = [batch_for(model, 6, seed=s) for s in range(2)]
    op = HessianOperator(model, nn.CrossEntropyLoss(), batches, progress=True,
                         chunk_size=1)
    for estimate in _ESTIMATES.values():
        estimate(op, False)
        assert capsys.readouterr().err == ""
        assert op.progress is True
    estimate(op, None)
    assert "batches" in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("estimate", list(_ESTIMATES))
def test_progress_bars_by_default_on_a_terminal_only(matrix, monkeypatch, estimate):
    op = MatrixOperator(matrix)
    op.progress = None   # HessianOperator's default
    for stderr, shown in ((_Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stderr)
        _ESTIMATES[estimate](op, None)
        assert bool(stderr.getvalue()) == shown


@pytest.mark.parametrize("call, message", [
    (lambda op: trace(op, num_samples=2.5), "trace: num_samples must be a positive int, got 2.5"),
    (lambda op: trace(op, num_samples="10"), "trace: num_samples must be a positive int"),
    (lambda op: trace(op, num_samples=-3), "trace: num_samples must be a positive int"),
    (lambda op: trace(op, num_samples=True), "trace: num_samples must be a positive int"),
    (lambda op: eigenvalues(op, max_iter=0), "eigenvalues: max_iter must be a positive int"),
    (lambda op: eigenvalues(op, max_iter=50.0), "eigenvalues: max_iter must be a positive int"),
    (lambda op: eigenvalues(op, k="2"), "eigenvalues: k must be an int"),
    (lambda op: eigenvalues(op, tol=0), "eigenvalues: tol must be a positive finite number"),
    (lambda op: eigenvalues(op, tol="1e-3"), "eigenvalues: tol must be a positive"),
    (lambda op: eigenvalues(op, tol=math.nan), "eigenvalues: tol must be a positive"),
    (lambda op: eigenvalues(op, tol=1.0), "eigenvalues: tol is relative to |λ| and must be "
     "below 1, got 1.0"),
    (lambda op: eigenvalues(op, method="power", tol=10), "eigenvalues: tol is relative"),
    (lambda op: spectral_density(op, num_runs=0), "spectral_density: num_runs must be"),
    (lambda op: spectral_density(op, num_steps=4.0), "spectral_density: num_steps must be"),
    (lambda op: spectral_density(op, num_steps=4, sigma="1"), "spectral_density: sigma must"),
    (lambda op: stochastic_lanczos_quadrature(op, num_runs=None),
     "stochastic_lanczos_quadrature: num_runs must be a positive int"),
])
def test_bad_estimator_arguments_are_named(matrix, call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call(MatrixOperator(matrix))


@pytest.mark.parametrize("call", [
    lambda op: eigenvalues(op, seed=None), lambda op: eigenvalues(op, seed=1.5),
    lambda op: trace(op, seed=None), lambda op: trace(op, seed="0"),
    lambda op: spectral_density(op, num_steps=4, seed=None),
    lambda op: stochastic_lanczos_quadrature(op, num_steps=4, seed=True),
])
def test_a_seed_that_is_not_an_int_or_a_generator_is_refused(matrix, call):
    with pytest.raises(TypeError, match=r"^\w+: seed must be an int or a torch.Generator"):
        call(MatrixOperator(matrix))


def test_power_where_the_first_run_creeps_towards_a_negative_pair():
    """The most negative eigenvalue (-10) with a close neighbour (-9.63): the unshifted
    run stops at max_iter, its last iterate all but free of the top eigenvector's
    direction. The shifted run started from it returned -9.63 or -10 for the largest
    eigenvalue (1.0) without a warning, on 20 of 200 seeds for k = 1."""
    spectrum = torch.tensor([1.0, 0.5] + torch.linspace(-10, 0, 28).tolist(), dtype=DTYPE)
    matrix = torch.diag(spectrum)
    for seed in (15, 61, 102):
        for k in (1, 2):
            with warnings.catch_warnings():
                # Allowed: on H + 9.9·I the top two's ratio, 10.4 / 10.9, leaves a
                # residual above tol·‖H‖ = 0.01 after max_iter products.
                warnings.simplefilter("ignore", RuntimeWarning)
                values, vectors = eigenvalues(MatrixOperator(matrix), k=k, method="power",
                                              seed=seed)
            assert_eigenpairs(matrix, values, vectors, atol=2e-2)   # were off by 9


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("estimate", [
    lambda op: eigenvalues(op, k=2),
    lambda op: eigenvalues(op, k=2, method="power"),
    lambda op: trace(op, num_samples=4),                        # sketch and probes
    lambda op: trace(op, num_samples=100),                      # exact: P unit vectors
    lambda op: trace(op, num_samples=10, method="hutchinson"),
    lambda op: spectral_density(op, num_runs=2, num_steps=3),
], ids=["lanczos", "power", "hutch++", "exact trace", "hutchinson", "density"])
def test_every_estimator_refuses_a_non_finite_product(estimate, bad):
    matrix = torch.diag(torch.tensor([3.0, bad, 1.0, 0.5, 0.25, 0.1], dtype=DTYPE))
    with pytest.raises(NonFiniteProductError, match="non-finite Hessian-vector product"):
        estimate(MatrixOperator(matrix))
