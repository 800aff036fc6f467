"""Stochastic trace estimation with Rademacher probes, batched through op.matmat."""

import math

import torch
from tqdm.auto import tqdm

from fastbn._checks import check_count, check_seed
from fastbn.curvature.lanczos import (as_generator, bar_disabled, check_finite_product,
                                      progress_for_all_bars, random_vectors)

TRACE_METHODS = ("hutch++", "hutchinson")
BLOCK = 32   # probes drawn and applied per op.matmat call (fixed: results depend on it)


def _mean_and_error(samples):
    """Mean and its standard error (nan with fewer than two samples)."""
    mean = float(samples.mean())
    if samples.numel() < 2:
        return mean, math.nan
    return mean, float(samples.std() / math.sqrt(samples.numel()))


def _probe_quadratic_forms(op, count, seed, bar, basis=None):
    """gᵀHg for `count` Rademacher probes g, in blocks of BLOCK columns; with `basis`
    (orthonormal columns Q), for the projected probes (I − QQᵀ)g instead. `seed`: an int
    or a generator to continue drawing from."""
    generator = as_generator(seed)
    forms = []
    for start in range(0, count, BLOCK):
        probes = random_vectors(op, min(BLOCK, count - start), generator, kind="rademacher")
        if basis is not None:
            probes = probes - basis @ (basis.t() @ probes)
        forms.append((probes * _products(op, probes, bar)).sum(0))
    forms = torch.cat(forms)
    check_finite_product(float(forms.sum()))
    return forms


def _products(op, vectors, bar):
    """op.matmat(vectors), counted on the progress bar."""
    products = op.matmat(vectors)
    bar.update(vectors.shape[1])
    return products


def _exact_trace(op, bar):
    """Σ_i e_iᵀ H e_i from P unit vectors, BLOCK at a time."""
    size = op.shape[0]
    total = 0.0
    for start in range(0, size, BLOCK):
        width = min(BLOCK, size - start)
        units = torch.zeros(size, width, device=op.device, dtype=op.dtype)
        units[start:start + width] = torch.eye(width, device=op.device, dtype=op.dtype)
        total += float(_products(op, units, bar)[start:start + width].diagonal().sum())
    check_finite_product(total)
    return total


def _hutch_plus_plus(op, num_samples, seed, bar):
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021): the trace of H on the range of a
    sketch exactly, Hutchinson on the rest. A third of the budget sketches (HS), a third
    applies H to its orthonormal basis Q, and the last third probes (I − QQᵀ)H(I − QQᵀ)."""
    sketch_size = num_samples // 3
    exact_part = 0.0
    basis = None
    generator = as_generator(seed)   # one stream: the probes follow the sketch's draws
    if sketch_size > 0:
        sketch = _products(op, random_vectors(op, sketch_size, generator, kind="rademacher"),
                           bar)
        basis = torch.linalg.qr(sketch).Q
        exact_part = float((basis * _products(op, basis, bar)).sum())
    residual = _probe_quadratic_forms(op, num_samples - 2 * sketch_size, generator, bar,
                                      basis)
    mean, error = _mean_and_error(residual)
    return exact_part + mean, error


@progress_for_all_bars
def trace(op, *, num_samples=100, method="hutch++", seed=0, progress=None):
    """(estimate, standard_error) of trace(H) from about num_samples Hessian-vector
    products, computed in batched op.matmat calls.

    method "hutchinson": the mean of gᵀHg over Rademacher probes g. "hutch++": the exact
    trace on a low-rank sketch plus Hutchinson on the remainder (much lower variance when
    a few eigenvalues dominate); when num_samples ≥ P it returns the exact trace from P
    unit vectors instead (standard error 0). The standard error covers the stochastic
    part only and is nan when that part has fewer than two samples.
    num_samples: a positive int. seed: an int, or a CPU torch.Generator to continue
        drawing from (None is refused: the probes always come from a seed).
    progress: a tqdm bar over the products (and the operator's own bars); None follows
        the operator's `progress`.
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"trace: unknown method {method!r}; expected 'hutch++' or "
                         "'hutchinson'")
    check_count(num_samples, "num_samples", "trace")
    check_seed(seed, "trace")
    exact = method == "hutch++" and num_samples >= op.shape[0]
    with tqdm(total=op.shape[0] if exact else num_samples, desc="trace", unit="HVP",
              disable=bar_disabled(progress), leave=False) as bar:
        if method == "hutchinson":
            return _mean_and_error(_probe_quadratic_forms(op, num_samples, seed, bar))
        if exact:
            return _exact_trace(op, bar), 0.0
        return _hutch_plus_plus(op, num_samples, seed, bar)
