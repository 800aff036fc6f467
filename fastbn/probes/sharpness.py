"""Sharpness: the top eigenvalue of the loss Hessian in weight space (via fastbn.curvature)."""

from fastbn import _checks, curvature
from fastbn.probes import _functional


def top_hessian_eigenvalue(model, criterion, batch, *, seed=0, tol=1e-3, max_iter=100,
                           process_group=None):
    """Largest Hessian eigenvalue of `criterion(model(x), y)` on `batch`, BN on batch stats.

    `seed` (an int) sets Lanczos's start vector and the draws of a random layer (nn.RReLU
    in training mode): the same seed gives the same value, and the caller's random number
    generators are left as they were. `tol` (in (0, 1)) is Lanczos's relative residual at
    convergence, `max_iter` its most steps.

    With `process_group`, `batch` is this process's shard and the Hessian that of the
    concatenated batch (criterion a mean over the batch), the same on every process.
    The operator runs a private copy of the model (synchronised over the group), so the
    model itself is only read.
    """
    _checks.check_relative_tol(tol)
    _checks.check_count(max_iter, "max_iter")
    _checks.check_seed(seed, generator=False)
    _functional.check_membership(process_group, "top_hessian_eigenvalue")
    with _functional.forked_rng(model, seed):
        # Reverse-over-reverse: on torch 2.13 jvp(grad(f)) fails for plain nn.Linear + MSE
        # ("ZeroTensors are immutable"); "auto" would first time both.
        # [batch]: one batch, whatever its inputs are (a pair whose inputs are a tuple reads
        # as a list of batches).
        operator = curvature.HessianOperator(model, criterion, [batch], bn_mode="train",
                                             method="reverse-over-reverse", progress=False,
                                             process_group=process_group)
        values, _ = curvature.eigenvalues(operator, k=1, method="lanczos", tol=tol,
                                          max_iter=max_iter, seed=seed)
    return float(values[0])
