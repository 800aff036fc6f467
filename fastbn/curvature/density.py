"""Spectral density by stochastic Lanczos quadrature (SLQ)."""

import math

import torch
from tqdm.auto import tqdm

from fastbn._checks import check_count, check_positive_number, check_seed
from fastbn.curvature.lanczos import (bar_disabled, breakdown_threshold, check_finite_product,
                                      progress_for_all_bars, random_vectors)

# Node spans below this fraction of max|θ| count as zero in the default sigma.
SPAN_RESOLUTION = 1e-6


def _check_quadrature_arguments(num_runs, num_steps, seed, where):
    check_count(num_runs, "num_runs", where)
    check_count(num_steps, "num_steps", where)
    check_seed(seed, where)


@progress_for_all_bars
def stochastic_lanczos_quadrature(op, *, num_runs=8, num_steps=64, seed=0, progress=None):
    """Quadrature (nodes, weights) of the spectral measure (1/P) Σ_i δ(λ − λ_i).

    Runs `num_runs` independent Lanczos processes (full reorthogonalisation) from
    normalised Gaussian vectors, all advanced together: each step is one op.matmat with
    num_runs columns. Run r gives the Ritz values θ_rj and weights τ_rj = (s_rj[0])², the
    squared first components of the eigenvectors of its tridiagonal matrix, so that
    Σ_j τ_rj f(θ_rj) ≈ v_rᵀ f(H) v_r. Returns (nodes, weights), both (num_runs, m) with
    m = min(num_steps, P) on the CPU in float64; each row of weights sums to 1, and a run
    whose Krylov space became invariant early is padded with zero weights.
    Memory: the bases take num_runs · m · P values.
    num_runs, num_steps: positive ints. seed: an int, or a CPU torch.Generator to
        continue drawing from (None is refused: the start vectors always come from a seed).
    progress: a tqdm bar over the steps (and the operator's own bars); None follows the
        operator's `progress`.
    """
    _check_quadrature_arguments(num_runs, num_steps, seed, "stochastic_lanczos_quadrature")
    size = op.shape[0]
    steps = min(num_steps, size)
    start = random_vectors(op, num_runs, seed)
    basis = torch.empty(num_runs, steps, size, device=op.device, dtype=op.dtype)
    basis[:, 0] = (start / start.norm(dim=0)).t()
    alphas = torch.zeros(num_runs, steps, dtype=torch.float64)
    betas = torch.zeros(num_runs, steps, dtype=torch.float64)
    lengths = torch.full((num_runs,), steps)
    active = torch.ones(num_runs, dtype=torch.bool)
    bar = tqdm(range(steps), desc="SLQ", disable=bar_disabled(progress),
               leave=False)
    for j in bar:
        current = basis[:, j]                                    # (runs, P)
        w = op.matmat(current.t()).t()
        alphas[:, j] = (current * w).sum(1).to("cpu", torch.float64)
        check_finite_product(float(alphas[:, j].sum()))
        for _ in range(2):   # full reorthogonalisation, twice (see lanczos.orthogonalise)
            previous = basis[:, :j + 1]                          # (runs, j+1, P)
            w = w - torch.einsum("rjp,rj->rp", previous, torch.einsum("rjp,rp->rj", previous, w))
        beta = w.norm(dim=1).to("cpu", torch.float64)
        if j + 1 == steps:
            break
        scale = torch.maximum(alphas[:, :j + 1].abs().amax(1), betas[:, :j].abs().amax(1)
                              if j else torch.zeros(num_runs))
        finished = active & (beta <= breakdown_threshold(scale, j + 1, op.dtype))
        lengths[finished] = j + 1
        active &= ~finished
        if not active.any():
            break
        betas[:, j] = torch.where(active, beta, 0.0)
        safe = torch.where(active, beta, 1.0).to(device=op.device, dtype=op.dtype)
        basis[:, j + 1] = w / safe[:, None] * active.to(device=op.device, dtype=op.dtype)[:, None]
    nodes = torch.zeros(num_runs, steps, dtype=torch.float64)
    weights = torch.zeros(num_runs, steps, dtype=torch.float64)
    for r in range(num_runs):
        m = int(lengths[r])
        tridiagonal = (torch.diag(alphas[r, :m]) + torch.diag(betas[r, :m - 1], 1)
                       + torch.diag(betas[r, :m - 1], -1))
        theta, s = torch.linalg.eigh(tridiagonal)
        nodes[r, :m] = theta
        weights[r, :m] = s[0] ** 2
    return nodes, weights


def spectral_density(op, *, num_runs=8, num_steps=64, grid=None, sigma=None, seed=0,
                     progress=None):
    """(grid, density) of the Hessian's eigenvalues by SLQ with Gaussian smoothing.

    `stochastic_lanczos_quadrature` (num_runs, num_steps, seed, progress as there), then
    `smoothed_density` of its nodes and weights (grid, sigma as there).
    """
    _check_quadrature_arguments(num_runs, num_steps, seed, "spectral_density")
    if sigma is not None:   # refused before the Lanczos runs, not after
        check_positive_number(sigma, "sigma", "spectral_density")
    nodes, weights = stochastic_lanczos_quadrature(op, num_runs=num_runs,
                                                   num_steps=num_steps, seed=seed,
                                                   progress=progress)
    return smoothed_density(nodes, weights, grid=grid, sigma=sigma)


def smoothed_density(nodes, weights, *, grid=None, sigma=None):
    """(grid, density) of a quadrature (nodes, weights), each (runs, m), as returned by
    `stochastic_lanczos_quadrature`, with Gaussian smoothing.

    density(t) = (1/runs) Σ_rj τ_rj N(t; θ_rj, σ²), renormalised so that its
    trapezoid integral over the grid is 1; its first moment estimates trace(H)/P.
    grid: points to evaluate at (default: 1001 points over the node range ± 8σ, which
    loses no visible mass at the ends).
    sigma: smoothing width, a positive number (default: 1% of the node range; where the
    range is below 1e-6 of max|θ|, as when every eigenvalue is equal up to rounding, 1%
    of max|θ|, or 1.0 when every node is 0). CPU float64 tensors.
    """
    if sigma is not None:
        check_positive_number(sigma, "sigma", "smoothed_density")
    used = nodes[weights > 0]
    low, high = float(used.min()), float(used.max())
    if sigma is None:
        largest = max(abs(low), abs(high))
        span = high - low
        if span > SPAN_RESOLUTION * largest:
            sigma = 0.01 * span
        else:   # one eigenvalue: the span is rounding noise
            sigma = 0.01 * largest if largest > 0 else 1.0
    if grid is None:
        grid = torch.linspace(low - 8 * sigma, high + 8 * sigma, 1001, dtype=torch.float64)
    grid = torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
    if grid.numel() < 2:
        raise ValueError("grid needs at least two points")
    if not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError("grid must be strictly increasing")
    gaussians = torch.exp(-0.5 * ((grid[:, None] - nodes.reshape(1, -1)) / sigma) ** 2)
    runs = nodes.shape[0]
    density = gaussians @ weights.reshape(-1) / (runs * sigma * math.sqrt(2 * math.pi))
    mass = torch.trapezoid(density, grid)
    if not mass > 0:
        raise ValueError("the grid carries no spectral mass; widen it")
    return grid, density / mass
