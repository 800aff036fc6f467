"""Argument checks shared by the curvature estimators and the probes: a wrong count, tolerance
or seed is refused in words that name the argument (and the function, `where`), before
any work or collective starts."""

import math
import numbers

import torch


def _prefix(where):
    return f"{where}: " if where else ""


def is_count(value, allow_zero=False):
    """Whether `value` is an int (numpy's too, not a bool) above zero, or at zero with
    `allow_zero`."""
    return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
            and value >= (0 if allow_zero else 1))


def check_count(value, name, where=None, *, allow_zero=False):
    """`value` as an int; ValueError naming `name` unless `is_count(value, allow_zero)`."""
    if not is_count(value, allow_zero):
        kind = "a non-negative int" if allow_zero else "a positive int"
        raise ValueError(f"{_prefix(where)}{name} must be {kind}, got {value!r}")
    return int(value)


def is_positive_number(value):
    """Whether `value` is a finite real number (not a bool) above zero."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def check_positive_number(value, name, where=None):
    """`value` as a float; ValueError naming `name` unless it is a positive finite number."""
    if not is_positive_number(value):
        raise ValueError(f"{_prefix(where)}{name} must be a positive finite number, "
                         f"got {value!r}")
    return float(value)


def check_relative_tol(tol, where=None):
    """ValueError unless `tol` is a number in (0, 1): an eigenvalue's relative residual
    of |λ| or more accepts any vector, and the "eigenvalues" would be noise."""
    if check_positive_number(tol, "tol", where) >= 1:
        raise ValueError(f"{_prefix(where)}tol is relative to |λ| and must be below 1, "
                         f"got {tol!r}")


# The seeds torch.Generator.manual_seed takes.
SEED_RANGE = (-2 ** 63, 2 ** 64 - 1)


def check_seed(seed, where=None, *, generator=True):
    """TypeError unless `seed` is an int (numpy's too, not a bool) or, with `generator`,
    a torch.Generator; None is refused as well: every estimate is reproducible from its
    seed. ValueError for an int outside the seeds torch takes."""
    if generator and isinstance(seed, torch.Generator):
        return
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        kind = "an int or a torch.Generator" if generator else "an int"
        raise TypeError(f"{_prefix(where)}seed must be {kind}, got {seed!r} "
                        f"({type(seed).__name__})")
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ValueError(f"{_prefix(where)}seed must be in torch's range [-2**63, 2**64 - 1], "
                         f"got {seed}")


def wrapped_seed(seed):
    """`seed` (an int derived from a checked one, as seed + step) brought back into
    torch's range, unchanged where it is in it."""
    return seed if seed <= SEED_RANGE[1] else seed % 2 ** 64
