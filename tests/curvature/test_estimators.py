import math

import pytest
import torch
from torch import nn

from fastbn.curvature import (HessianOperator, eigenvalues, spectral_density,
                              stochastic_lanczos_quadrature, trace)
from fastbn.curvature.lanczos import random_vectors
from tests.curvature.helpers import (DTYPE, MatrixOperator, assert_unchanged, batch_for, cnn,
                                     exact_hessian, random_symmetric, snapshot)

CRITERION = nn.CrossEntropyLoss()


@pytest.fixture(scope="module")
def cnn_problem():
    model = cnn()
    batch = batch_for(model, 6, seed=0)
    _, hessian = exact_hessian(model, CRITERION, [batch])
    return model, batch, hessian


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


def test_seeds_reproduce(matrix):
    op = MatrixOperator(matrix)
    first = eigenvalues(op, k=2, seed=5)
    second = eigenvalues(op, k=2, seed=5)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
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


def test_slq_stops_runs_whose_krylov_space_is_invariant():
    # Four distinct eigenvalues: every Krylov space is invariant after four steps.
    spectrum = torch.tensor([3.0, 2.0, 1.0] + [0.0] * 17, dtype=DTYPE)
    op = MatrixOperator(random_symmetric(20, seed=6, spectrum=spectrum))
    nodes, weights = stochastic_lanczos_quadrature(op, num_runs=3, num_steps=12, seed=0)
    assert torch.allclose(weights.sum(1), torch.ones(3, dtype=DTYPE))
    assert ((weights > 0).sum(1) == 4).all()
    kept = nodes[weights > 0].reshape(3, 4).sort(dim=1).values
    assert torch.allclose(kept, torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=DTYPE).expand(3, 4),
                          atol=1e-8)
