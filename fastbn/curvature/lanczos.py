"""Extreme eigenvalues of a symmetric operator: Lanczos and power iteration."""

import warnings

import torch
from tqdm.auto import tqdm

EIGEN_METHODS = ("lanczos", "power")


def random_vectors(op, count, seed, kind="gaussian"):
    """(P, count) random vectors, drawn on the CPU in float64 from `seed` (an int, or a
    CPU torch.Generator to continue drawing from; the same numbers on every device), then
    moved to the operator's device and dtype."""
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    shape = (op.shape[0], count)
    if kind == "rademacher":
        v = torch.randint(0, 2, shape, generator=generator).to(torch.float64) * 2 - 1
    else:
        v = torch.randn(shape, generator=generator, dtype=torch.float64)
    return v.to(device=op.device, dtype=op.dtype)


def check_finite_product(value):
    if not torch.isfinite(torch.tensor(value)):
        raise RuntimeError("non-finite Hessian-vector product; the curvature estimate would "
                           "be meaningless")


def _orthogonalise(w, basis):
    """w minus its projection on the orthonormal rows of basis, twice (one Gram-Schmidt
    pass loses orthogonality in floating point; two are enough)."""
    for _ in range(2):
        w = w - basis.t() @ (basis @ w)
    return w


# A β below this many ulps of ‖T‖ is rounding noise: the Krylov space is invariant.
BREAKDOWN_ULPS = 1000


def _breakdown_threshold(alphas, betas, dtype):
    scale = max([abs(a) for a in alphas] + betas + [1e-300])
    return scale * torch.finfo(dtype).eps * BREAKDOWN_ULPS


def _tridiagonal(alphas, betas):
    off = torch.tensor(betas, dtype=torch.float64)
    return (torch.diag(torch.tensor(alphas, dtype=torch.float64))
            + torch.diag(off, 1) + torch.diag(off, -1))


def lanczos_eigenvalues(op, k, *, tol, max_iter, seed, progress):
    """Top-k algebraic eigenpairs by Lanczos with full reorthogonalisation.

    Stops when every wanted Ritz pair has residual ‖H x − θ x‖ = β_j |s_j| ≤ tol · max|θ|
    (max|θ| estimates ‖H‖), when the Krylov space is invariant, or after max_iter steps.
    Returns (eigenvalues (k,), eigenvectors (P, k), converged).
    """
    size = op.shape[0]
    steps = min(max_iter, size)
    q = random_vectors(op, 1, seed)[:, 0]
    basis = torch.empty(steps, size, device=op.device, dtype=op.dtype)   # rows: contiguous
    basis[0] = q / q.norm()
    alphas, betas = [], []
    converged = False
    bar = tqdm(range(steps), desc="lanczos", disable=not progress, leave=False)
    for j in bar:
        w = op.matvec(basis[j])
        alphas.append(float(basis[j] @ w))
        check_finite_product(alphas[-1])
        w = _orthogonalise(w, basis[:j + 1])
        beta = float(w.norm())
        theta, s = torch.linalg.eigh(_tridiagonal(alphas, betas))
        if j + 1 >= k:
            residual = beta * s[-1, -k:].abs()
            converged = bool((residual <= tol * theta.abs().max()).all())
            bar.set_postfix(top=float(theta[-1]), residual=float(residual.max()))
        invariant = beta <= _breakdown_threshold(alphas, betas, op.dtype)
        if converged or invariant or j + 1 == steps:
            break
        betas.append(beta)
        basis[j + 1] = w / beta
    if len(alphas) < k:
        raise RuntimeError(f"Lanczos found an invariant subspace of dimension {len(alphas)} "
                           f"< k={k}: the start vector does not reach k eigenvectors")
    top = torch.arange(len(alphas) - 1, len(alphas) - 1 - k, -1)
    values = theta[top].to(device=op.device, dtype=op.dtype)
    vectors = basis[:len(alphas)].t() @ s[:, top].to(device=op.device, dtype=op.dtype)
    return values, vectors, converged


def power_eigenvalues(op, k, *, tol, max_iter, seed, progress):
    """k eigenpairs by power iteration with deflation (PyHessian's method).

    Power iteration converges to the eigenvalue of largest *magnitude* of the deflated
    operator, so these are the k largest in magnitude, returned in descending algebraic
    order. Each stops when |θ − θ_prev| ≤ tol · |θ| or after max_iter products.
    """
    values, vectors = [], []
    converged = True
    starts = random_vectors(op, k, seed)
    for i in range(k):
        v = starts[:, i] / starts[:, i].norm()
        theta = None
        done = False
        bar = tqdm(range(max_iter), desc=f"power {i + 1}/{k}", disable=not progress, leave=False)
        for _ in bar:
            w = op.matvec(v)
            check_finite_product(float(v @ w))
            for value, u in zip(values, vectors):
                w = w - value * (u @ v) * u
            previous, theta = theta, float(v @ w)
            bar.set_postfix(theta=theta)
            norm = w.norm()
            if norm == 0:
                done = True
                break
            v = w / norm
            if previous is not None and abs(theta - previous) <= tol * abs(theta):
                done = True
                break
        converged = converged and done
        values.append(theta)
        vectors.append(v)
    order = sorted(range(k), key=lambda i: -values[i])
    return (torch.tensor([values[i] for i in order], device=op.device, dtype=op.dtype),
            torch.stack([vectors[i] for i in order], dim=1), converged)


def eigenvalues(op, k=1, *, method="lanczos", tol=1e-3, max_iter=100, seed=0, progress=False):
    """The k largest algebraic eigenvalues of `op` (largest first) and their eigenvectors.

    op: a HessianOperator (anything with shape, dtype, device and matvec).
    method: "lanczos" (full reorthogonalisation, on the operator's device and dtype; at
        most max_iter Krylov steps, stopping when the k Ritz residuals are ≤ tol·‖H‖) or
        "power" (power iteration with deflation, max_iter products per eigenvalue; finds
        the k largest in *magnitude*, which equal the largest algebraic ones when those
        dominate, as for the top of a Hessian spectrum).
    Lanczos keeps its basis: max_iter · P values on the operator's device. It cannot see
    multiplicities: a repeated eigenvalue appears once.
    Returns (eigenvalues (k,), eigenvectors (P, k)); a run that stops at max_iter before
    reaching tol returns its best estimates with a RuntimeWarning.
    """
    if method not in EIGEN_METHODS:
        raise ValueError(f"unknown method {method!r}; expected 'lanczos' or 'power'")
    if not 1 <= k <= op.shape[0]:
        raise ValueError(f"k must be between 1 and P={op.shape[0]}, got {k}")
    if max_iter < k:
        raise ValueError(f"max_iter must be at least k={k}, got {max_iter}")
    solver = lanczos_eigenvalues if method == "lanczos" else power_eigenvalues
    values, vectors, converged = solver(op, k, tol=tol, max_iter=max_iter, seed=seed,
                                        progress=progress)
    if not converged:
        warnings.warn(f"{method} did not reach tol={tol} within max_iter={max_iter}",
                      RuntimeWarning, stacklevel=2)
    return values, vectors
