"""Sharpness: the top eigenvalue of the loss Hessian in weight space (via fastbn.curvature)."""

from fastbn.probes import _functional


def top_hessian_eigenvalue(model, criterion, batch, *, seed=0, tol=1e-3, max_iter=100):
    """Largest Hessian eigenvalue of `criterion(model(x), y)` on `batch`, BN on batch stats.

    Raises RuntimeError while fastbn.curvature is not available.
    """
    try:
        from fastbn import curvature
    except ImportError as error:
        raise RuntimeError("sharpness needs fastbn.curvature (HessianOperator, eigenvalues), "
                           "which is not available") from error
    # Reverse-over-reverse: on torch 2.13 jvp(grad(f)) fails for plain nn.Linear + MSE
    # ("ZeroTensors are immutable"), which method="auto" would try first.
    operator = curvature.HessianOperator(_functional.transformable(model), criterion, batch,
                                         bn_mode="train", method="reverse-over-reverse")
    values, _ = curvature.eigenvalues(operator, k=1, method="lanczos", tol=tol,
                                      max_iter=max_iter, seed=seed)
    return float(values[0])
