"""Loss landscape along the gradient (Santurkar et al. 2018, Section 3.2 and Figure 4).

At weights w with mini-batch B, g = ∇L(w; B). For each step length η on a grid the probe
evaluates, on the same batch B, the loss L(w − ηg) and the gradient change
‖∇L(w − ηg) − g‖₂; the "effective β-smoothness" is max_η ‖∇L(w − ηg) − g‖₂ / ‖ηg‖₂.
With a process group, B is the concatenation of every process's shard.
"""

import math

import numpy as np

from fastbn import _checks
from fastbn.curvature._functional import seed_from_callers_generator
from fastbn.probes import _functional

DEFAULT_MULTIPLIERS = tuple(np.geomspace(0.5, 4.0, 8).tolist())


def _max(values):
    """Maximum where a non-finite value (a blown-up step) counts as +inf."""
    return max((v if math.isfinite(v) else math.inf) for v in values)


def _min(values):
    """Minimum over the finite values; NaN when none is finite."""
    finite = [v for v in values if math.isfinite(v)]
    return min(finite) if finite else math.nan


def check_lr(lr):
    """`lr` as a float; ValueError unless it is a positive finite number."""
    return _checks.check_positive_number(lr, "lr")


def check_multipliers(multipliers):
    """The step lengths' multiples of lr as a list of floats (None: the default ones);
    ValueError unless a non-empty sequence of positive finite numbers."""
    multipliers = DEFAULT_MULTIPLIERS if multipliers is None else tuple(multipliers)
    if not multipliers or not all(_checks.is_positive_number(m) for m in multipliers):
        raise ValueError("multipliers must be a non-empty sequence of positive finite "
                         "numbers")
    return [float(m) for m in multipliers]


def gradient_step_probe(model, criterion, batch, lr, *, multipliers=None, bn_mode="train",
                        process_group=None):
    """Loss and gradient along −g at step lengths η = m·lr, all on the same batch.

    `batch` is (inputs, targets); `criterion(outputs, targets)` gives the scalar loss.
    BN layers use batch statistics (`bn_mode="train"`, the only mode: the paper's probe
    measures the training objective); dropout layers are off, as in the curvature
    operator (each evaluation would otherwise draw new masks). Other random operations
    (nn.RReLU in training mode, F.dropout(training=True), torch.rand*) draw the same
    numbers at every evaluated point, from a seed the caller's generator decides without
    moving: the probe measures the landscape of that one draw. The model, its
    parameters, buffers (running stats, num_batches_tracked) and training flags are left
    exactly as they were.

    Returns a dict of floats: `loss`, `grad_norm`, `loss_min`, `loss_max`,
    `grad_change_min`, `grad_change_max`, `beta_eff`, and per-η lists `etas`, `losses`,
    `grad_changes`, `betas`. Non-finite losses or gradients are kept as NaN/inf (in the
    maxima they count as +inf: the landscape blew up inside the probed range). Where the
    loss or gradient at the weights themselves is not finite no step is taken: the per-η
    losses and changes are NaN, and the maxima and `beta_eff` +inf (blown up already at
    η = 0). At a zero gradient the β values are NaN (0/0: undefined, not blown up), and
    so is `beta_eff`.

    process_group: data-parallel probe. Each process passes its shard of the batch (the
    criterion must be a mean over the batch); BN statistics, losses and gradients are
    those of the concatenated batch (one all_reduce per evaluated point), and every
    process returns the same numbers. Call it on every process of the group; where one
    process's shard is refused (an empty one), every process raises.
    """
    if bn_mode != "train":
        raise ValueError(f"bn_mode must be 'train' (batch statistics), got {bn_mode!r}")
    lr = check_lr(lr)
    multipliers = check_multipliers(multipliers)
    _functional.check_membership(process_group, "gradient_step_probe")
    inputs, targets = _functional.agreed_batch(batch, model, process_group,
                                               "gradient_step_probe")
    work = _functional.transformable(model, process_group)
    seed = seed_from_callers_generator()
    with _functional.probe_modes(work):
        params, constants = _functional.split_state(work)
        loss_function = _functional.grad_and_loss_function(work, criterion, constants, inputs,
                                                           targets, process_group)

        def grad_and_loss(point):
            with _functional.forked_rng(work, seed):
                return loss_function(point)

        grad, loss = grad_and_loss(params)
        grad_norm = _functional.flat_norm(grad)
        etas = [m * lr for m in multipliers]
        losses, grad_changes = [], []
        for eta in etas:
            if not math.isfinite(grad_norm):
                losses.append(math.nan)
                grad_changes.append(math.nan)
                continue
            moved = {k: p - eta * grad[k] for k, p in params.items()}
            grad_eta, loss_eta = grad_and_loss(moved)
            losses.append(loss_eta.item())
            grad_changes.append(_functional.flat_norm(
                {k: grad_eta[k] - grad[k] for k in grad}))
    betas = [change / (eta * grad_norm) if grad_norm > 0 else math.nan
             for change, eta in zip(grad_changes, etas)]
    return {
        "loss": loss.item(),
        "grad_norm": grad_norm,
        "loss_min": _min(losses),
        "loss_max": _max(losses),
        "grad_change_min": _min(grad_changes),
        "grad_change_max": _max(grad_changes),
        # A zero gradient moves nothing: β is undefined there (NaN), not a blow-up.
        "beta_eff": math.nan if grad_norm == 0 else _max(betas),
        "etas": etas,
        "losses": losses,
        "grad_changes": grad_changes,
        "betas": betas,
    }
