"""Extreme eigenvalues of a symmetric operator: Lanczos and power iteration."""

import functools
import math
import numbers
import warnings

import torch
from tqdm.auto import tqdm

from fastbn._checks import check_count, check_relative_tol, check_seed

EIGEN_METHODS = ("lanczos", "power")


def as_generator(seed):
    """A CPU torch.Generator: `seed` itself where it is one (to continue drawing from),
    else a new one seeded with it."""
    check_seed(seed)
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(int(seed))


def random_vectors(op, count, seed, kind="gaussian"):
    """(P, count) random vectors, drawn on the CPU in float64 from `seed` (an int, or a
    CPU torch.Generator to continue drawing from; the same numbers on every device), then
    moved to the operator's device and dtype."""
    generator = as_generator(seed)
    shape = (op.shape[0], count)
    if kind == "rademacher":
        v = torch.randint(0, 2, shape, generator=generator).to(torch.float64) * 2 - 1
    else:
        v = torch.randn(shape, generator=generator, dtype=torch.float64)
    return v.to(device=op.device, dtype=op.dtype)


def progress_for_all_bars(estimator):
    """Decorator for an estimator `f(op, ..., progress=None)`: its `progress` argument
    holds for the operator's own bars too (batches, matmat chunks) while it runs, and
    None follows the operator's setting; `f` receives the setting in force."""
    @functools.wraps(estimator)
    def run(op, *args, progress=None, **kwargs):
        if progress is None or not hasattr(op, "progress"):
            return estimator(op, *args, progress=getattr(op, "progress", progress),
                             **kwargs)
        saved, op.progress = op.progress, progress
        try:
            return estimator(op, *args, progress=progress, **kwargs)
        finally:
            op.progress = saved
    return run


def bar_disabled(progress):
    """tqdm's `disable` for a progress option: True shows bars, False hides them, None
    shows them where stderr is a terminal."""
    return None if progress is None else not progress


class NonFiniteProductError(RuntimeError):
    """A Hessian-vector product overflowed or is NaN (at a finite loss: a model far out on
    a blowing-up landscape): the estimate built on it would be meaningless."""


def check_finite_product(value):
    if not torch.isfinite(torch.tensor(value)):
        raise NonFiniteProductError("non-finite Hessian-vector product; the curvature "
                                    "estimate would be meaningless")


def orthogonalise(w, basis):
    """w minus its projection on the orthonormal rows of basis, twice (one Gram-Schmidt
    pass loses orthogonality in floating point; two are enough)."""
    for _ in range(2):
        w = w - basis.t() @ (basis @ w)
    return w


# A β below this many ulps of ‖T‖ (times √steps) is rounding noise: the Krylov space is
# invariant. Taking noise for a β costs nothing (with full reorthogonalisation the next
# vector is then a random one orthogonal to the basis, as after a restart); taking a real
# β for noise cuts the process short, so the bound stays near the noise.
BREAKDOWN_ULPS = 10


def breakdown_threshold(scale, steps, dtype):
    """The β below which step `steps` of a Lanczos process on a matrix of norm `scale`
    counts as a breakdown."""
    return scale * torch.finfo(dtype).eps * BREAKDOWN_ULPS * math.sqrt(steps)


def run_breakdown_threshold(alphas, betas, dtype):
    """breakdown_threshold for the next β of a run with these coefficients so far (the
    largest of them standing for ‖T‖)."""
    scale = max([abs(a) for a in alphas] + betas + [1e-300])
    return breakdown_threshold(scale, len(alphas), dtype)


def tolerance(theta, tol, norm):
    """The residual ‖H x − θ x‖ that counts as converged for a Ritz value θ: tol relative
    to θ, as ARPACK, with tol² ‖H‖ as the floor for θ near 0. (tol · ‖H‖ alone let a
    value among the bulk pass for the k-th largest where one eigenvalue dominates ‖H‖.)"""
    return tol * torch.clamp(torch.as_tensor(theta, dtype=torch.float64).abs(),
                             min=tol * norm)


def tridiagonal(alphas, betas):
    off = torch.tensor(betas, dtype=torch.float64)
    return (torch.diag(torch.tensor(alphas, dtype=torch.float64))
            + torch.diag(off, 1) + torch.diag(off, -1))


def _lanczos_run(op, want, *, locked, threshold, norm_estimate, generator, tol, max_iter,
                 progress):
    """One Lanczos process with full reorthogonalisation, from a random start, in the
    orthogonal complement of the orthonormal rows of `locked` (found eigenvectors).

    After a breakdown (an invariant Krylov space) it continues from a fresh random vector
    orthogonal to everything so far. It stops when the top Ritz pairs it looks for have
    residual ‖H x − θ x‖ = β_j |s_j| within `tolerance` (‖H‖ estimated by
    max(norm_estimate, max|θ|)): the top `want`, or fewer where the others lie at or
    below `threshold` (the top ones above it, and the next one); or when the complement
    is exhausted, or after max_iter steps. Returns (values descending, vectors (P, m),
    converged) of the top m pairs it looked for.
    """
    size = op.shape[0]
    steps = min(max_iter, size - len(locked))
    want = min(want, steps)
    # Rows: the locked vectors, then the Krylov basis (contiguous for one projection).
    basis = torch.empty(len(locked) + steps, size, device=op.device, dtype=op.dtype)
    basis[:len(locked)] = locked
    krylov = basis[len(locked):]

    def fresh_direction(used):
        q = orthogonalise(random_vectors(op, 1, generator)[:, 0], basis[:used])
        return q / q.norm()

    krylov[0] = fresh_direction(len(locked))
    alphas, betas = [], []
    converged = False
    bar = tqdm(range(steps), desc="lanczos", disable=bar_disabled(progress), leave=False)
    for j in bar:
        w = op.matvec(krylov[j])
        alphas.append(float(krylov[j] @ w))
        check_finite_product(alphas[-1])
        w = orthogonalise(w, basis[:len(locked) + j + 1])
        beta = float(w.norm())
        theta, s = torch.linalg.eigh(tridiagonal(alphas, betas))
        scale = max(norm_estimate, float(theta.abs().max()))
        bound = threshold + (0.0 if threshold == -math.inf
                             else float(tolerance(threshold, tol, scale)))
        above = int((theta > bound).sum())
        looked_for = min(want, above + 1)
        if j + 1 >= looked_for:
            residual = beta * s[-1, -looked_for:].abs()
            converged = bool((residual <= tolerance(theta[-looked_for:], tol, scale)).all())
            bar.set_postfix(top=float(theta[-1]), residual=float(residual.max()))
        if converged or j + 1 == steps:
            break
        if beta <= run_breakdown_threshold(alphas, betas, op.dtype):
            betas.append(0.0)           # the Krylov space is invariant: start another
            krylov[j + 1] = fresh_direction(len(locked) + j + 1)
        else:
            betas.append(beta)
            krylov[j + 1] = w / beta
    top = torch.arange(len(alphas) - 1, len(alphas) - 1 - min(looked_for, len(alphas)), -1)
    values = theta[top].to(device=op.device, dtype=op.dtype)
    vectors = krylov[:len(alphas)].t() @ s[:, top].to(device=op.device, dtype=op.dtype)
    return values, vectors, converged


def lanczos_eigenvalues(op, k, *, tol, max_iter, seed, progress):
    """Top-k algebraic eigenpairs by Lanczos with full reorthogonalisation and locking.

    A Krylov space from one start vector holds one direction of each eigenspace, so a
    repeated eigenvalue shows once. For k > 1, once the top k Ritz pairs converge they
    are locked, and Lanczos runs again from a random vector in the orthogonal complement
    of every locked vector; pairs it finds above the current k-th value by more than
    its `tolerance` are locked too, until a run finds none (or does not converge). The top
    value needs no locking: k = 1 is one run. Returns (eigenvalues (k,), eigenvectors
    (P, k), converged).
    """
    generator = as_generator(seed)
    run = dict(generator=generator, tol=tol, max_iter=max_iter, progress=progress)
    empty = torch.empty(0, op.shape[0], device=op.device, dtype=op.dtype)
    values, vectors, converged = _lanczos_run(op, k, locked=empty, threshold=-math.inf,
                                              norm_estimate=0.0, **run)
    while k > 1 and converged and len(values) < op.shape[0]:
        kth = float(values.topk(k).values[-1])
        norm_estimate = float(values.abs().max())
        found, found_vectors, converged = _lanczos_run(
            op, k, locked=vectors.t(), threshold=kth, norm_estimate=norm_estimate, **run)
        norm = max(norm_estimate, float(found.abs().max()))
        new = found > kth + float(tolerance(kth, tol, norm))
        if not new.any():
            break
        values = torch.cat([values, found[new]])
        vectors = torch.cat([vectors, found_vectors[:, new]], dim=1)
    order = values.argsort(descending=True)[:k]
    return values[order], vectors[:, order], converged


def _power_run(op, start, shift, found, *, tol, max_iter, progress, desc):
    """Power iteration on H + shift·I in the orthogonal complement of the eigenvectors
    `found` (eigenpairs of H): the pair of largest magnitude there, as (eigenvalue of H,
    vector, converged). Every iterate is projected off the found vectors, so a direction
    found before cannot come back (deflating their eigenvalues alone leaves them, and
    any eigenvector of H at -shift, as a zero eigenvalue that a start vector near them
    "converges" to at once). Stops when the residual of the deflated operator,
    ‖P (H v) − θ v‖ with P the projection off the found vectors, is within `tolerance`
    (‖H‖ estimated by max(shift, |θ|)), as Lanczos does, or after max_iter products. (A small
    change of θ between steps is no test: on a shifted operator the ratio of
    eigenvalues, and so the change per step, is close to 1 long before θ is accurate. Nor
    is ‖H v − θ v‖ where vectors were found: the error a found vector keeps, within its
    own tolerance, leaves that residual near tol·|λ| of the larger eigenvalue found, above
    tol·|λ| of a smaller one, and the run took every product and warned.)"""
    basis = torch.stack([u for _, u in found]) if found else None
    v = start if basis is None else orthogonalise(start, basis)
    v = v / v.norm()
    bar = tqdm(range(max_iter), desc=desc, disable=bar_disabled(progress), leave=False)
    for _ in bar:
        w = op.matvec(v) + shift * v
        if basis is not None:
            w = orthogonalise(w, basis)
        theta = float(v @ w)
        check_finite_product(theta)
        residual = float((w - theta * v).norm())
        bar.set_postfix(theta=theta - shift, residual=residual)
        if residual <= tolerance(theta - shift, tol, max(shift, abs(theta - shift))):
            return theta - shift, v, True
        v = w / w.norm()
    return theta - shift, v, False


def power_eigenvalues(op, k, *, tol, max_iter, seed, progress):
    """Top-k algebraic eigenpairs by power iteration with deflation (PyHessian's method)
    and a spectral shift.

    Power iteration finds the eigenvalue of largest magnitude, λ_abs. Where that is not
    the answer (λ_abs < 0, or k > 1), the k largest algebraic eigenvalues are the k
    largest of H + |λ_abs|·I, which is positive semidefinite, so there they are also the
    largest in magnitude: deflated power iteration runs on it (a positive λ_abs is its
    first pair) and the shift is subtracted. The shift brings the eigenvalues' ratios
    closer to 1, so these runs need more products than unshifted ones. Where the first
    run did not converge (λ and -λ both of largest magnitude: its iterates swing between
    them, or it crept towards a negative λ_abs with a close neighbour), its Rayleigh
    quotient is no eigenvalue: the shift is ‖H v‖ of its last vector where that is larger
    (still at most |λ_abs|) and the first pair is sought again on H + shift·I, for k = 1
    too, from the first start vector. (Not from the last iterate: max_iter products have
    all but removed the small-magnitude directions from it, the largest algebraic
    eigenvalue's among them where λ_abs < 0, and its residual then passed for the most
    negative pair's.)
    """
    starts = random_vectors(op, k, seed)

    def run(i, shift, found):
        return _power_run(op, starts[:, i], shift, found, tol=tol, max_iter=max_iter,
                          progress=progress, desc=f"power {i + 1}/{k}")

    value, vector, converged = run(0, 0.0, [])
    found = [(value, vector)]
    if value < 0 or k > 1 or not converged:
        shift = abs(value)
        if not converged:
            shift = max(shift, float(op.matvec(vector).norm()))
            value, vector, converged = run(0, shift, [])
            found = [(value, vector)]
        elif value < 0:     # the most negative eigenvalue: start again on H + shift·I
            found = []
        for i in range(len(found), k):
            value, vector, done = run(i, shift, found)
            found.append((value, vector))
            converged = converged and done
    order = sorted(range(k), key=lambda i: -found[i][0])
    return (torch.tensor([found[i][0] for i in order], device=op.device, dtype=op.dtype),
            torch.stack([found[i][1] for i in order], dim=1), converged)


@progress_for_all_bars
def eigenvalues(op, k=1, *, method="lanczos", tol=1e-3, max_iter=100, seed=0, progress=None):
    """The k largest algebraic eigenvalues of `op` (largest first, repeated ones as often
    as their multiplicity) and their eigenvectors.

    op: a HessianOperator (anything with shape, dtype, device and matvec).
    method: "lanczos" (full reorthogonalisation, on the operator's device and dtype; at
        most max_iter Krylov steps per run, stopping when the k Ritz residuals are
        ≤ tol·|λ| (tol²·‖H‖ at the least, for λ near 0); for k > 1, further runs in the
        complement of the eigenvectors found so far bring out repeated eigenvalues, see
        `lanczos_eigenvalues`) or "power" (power iteration with deflation, max_iter
        products per eigenvalue, on H shifted by its largest-magnitude eigenvalue where
        needed, see `power_eigenvalues`: where the first run stops at max_iter, one more
        run of max_iter on the shifted H seeks the first eigenvalue again; each
        eigenvalue stops when its residual, in the complement of the eigenvectors found
        before it, is within the same bound).
    Lanczos keeps its basis and the eigenvectors it has found, twice while it runs again:
    (max_iter + 2m) · P values on the operator's device, m the eigenvectors found (k, or
    more where repeated eigenvalues bring out more).
    tol: a relative tolerance, in (0, 1); max_iter: a positive int, at least k.
    seed: an int, or a CPU torch.Generator to continue drawing from (None is refused:
        the start vectors always come from a seed).
    progress: a tqdm bar per run (and the operator's own bars); None follows the
        operator's `progress`.
    Returns (eigenvalues (k,), eigenvectors (P, k)); a run that stops at max_iter before
    reaching tol returns its best estimates with a RuntimeWarning. The residual test puts
    an eigenvalue within tol·|λ| of each value returned, not the k largest: where the
    largest lies within a few tol·|λ| of a cluster of smaller ones, a start vector with
    little weight on it can converge to the cluster first (eigenvalues 7.02, 7.0 three
    times, 4 and 1, of P = 30: about 7.0 from 93 of 200 seeds at tol 1e-3 and from 8 at
    1e-4, each after 3 products).
    """
    if method not in EIGEN_METHODS:
        raise ValueError(f"eigenvalues: unknown method {method!r}; expected 'lanczos' or "
                         "'power'")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= op.shape[0]:
        raise ValueError(f"eigenvalues: k must be an int between 1 and P={op.shape[0]}, "
                         f"got {k!r}")
    check_relative_tol(tol, "eigenvalues")
    check_count(max_iter, "max_iter", "eigenvalues")
    if max_iter < k:
        raise ValueError(f"eigenvalues: max_iter must be at least k={k}, got {max_iter}")
    check_seed(seed, "eigenvalues")
    solver = lanczos_eigenvalues if method == "lanczos" else power_eigenvalues
    values, vectors, converged = solver(op, k, tol=tol, max_iter=max_iter, seed=seed,
                                        progress=progress)
    if not converged:
        warnings.warn(f"{method} did not reach tol={tol} within max_iter={max_iter}",
                      RuntimeWarning, stacklevel=3)   # the caller, past the decorator
    return values, vectors
