"""Numerical checks of Theorems 4.1 and 4.2 of Santurkar et al. (2018), per BN layer.

Setting (the paper's Section 4): a BN layer normalises y, the output of the preceding
conv/linear layer; ŷ is the standardised y, z = γŷ + β; σ_j the batch standard deviation
of unit (channel) j, sqrt(Var_batch(y_j) + eps) as the layer computes it; m the number of
values per unit (batch size × spatial size). L̂ is the loss of the network as it is, L the
loss of the same network at the same weights with this one BN layer replaced by identity.
All gradients and Hessian-vector products are taken with respect to y with BN layers on
batch statistics, so both networks see the same y.

- Theorem 4.1, as printed: ‖∇_{y_j}L̂‖² ≤ (γ²/σ_j²)(‖ĝ_j‖² − ⟨1, ĝ_j⟩²/m − ⟨ĝ_j, ŷ_j⟩²/√m)
  with ĝ_j = ∇_{y_j}L. With ∇_z L̂ in place of ĝ and 1/m in place of 1/√m the two sides
  are equal up to O(eps/σ²) (the BN backward formula); `identity_rel_error` reports that
  as a check of the autodiff.
- Theorem 4.2: (∇_{y_j}L̂)ᵀ Ĥ_jj (∇_{y_j}L̂) ≤ (γ²/σ_j²)(∇_{y_j}L̂)ᵀ H_jj (∇_{y_j}L̂)
  − (γ/(mσ_j²))⟨ĝ_j, ŷ_j⟩‖∇_{y_j}L̂‖², where Ĥ and H are the Hessians of L̂ and L with
  respect to y; the proof needs H_jj PSD and ⟨ĝ_j, ŷ_j⟩ > 0. Also checked with L taken
  at the BN output z as in the paper's proof (`*_same_point`), where the two sides are
  equal (exactly once the terms of order eps/σ² are kept: `_proof_identity`), so
  `held_same_point` asks for agreement either way. Second-order quantities come
  from `fastbn.curvature.activation_hessian`.
"""

import collections
import copy
import math

import torch
from torch import nn
from torch.func import functional_call

from fastbn import _checks, curvature
from fastbn.curvature._functional import savable, split_batch
from fastbn.curvature.lanczos import orthogonalise, run_breakdown_threshold, tridiagonal
from fastbn.curvature.operator import check_finite_loss
from fastbn.probes import _functional

# Relative slack for "inequality held" (float32 round-off in sums over m values).
RELATIVE_TOLERANCE = 1e-4


def _holds(lhs, rhs):
    return lhs <= rhs + RELATIVE_TOLERANCE * max(abs(lhs), abs(rhs))


def _per_channel(t):
    """(N, C, *) -> (C, m): one row of m values per unit/channel."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def _run_capturing(model, criterion, batch, names):
    """Loss and the outputs of the named submodules (in the autograd graph), BN on batch stats."""
    inputs, targets = batch
    modules = dict(model.named_modules())
    captured = {}

    def capture(name, out):
        captured[name] = out
        # Downstream runs on a clone, so an in-place op there (ReLU(inplace=True)) leaves
        # the captured output as the layer computed it.
        return out.clone()

    handles = [modules[name].register_forward_hook(
        lambda module, args, out, name=name: capture(name, out)) for name in names]
    try:
        with _functional.probe_modes(model):
            params, constants = _functional.split_state(model)
            params = {k: p.requires_grad_() for k, p in params.items()}
            loss = criterion(functional_call(model, {**constants, **params}, (inputs,)), targets)
    finally:
        for h in handles:
            h.remove()
    return loss, captured


def _gradients(model, criterion, batch, names, network):
    """{name: (output, ∂loss/∂output)} for the named submodules; NonFiniteLossError where
    the loss is not finite (no bound to check there: NaN would fail every inequality)."""
    loss, captured = _run_capturing(model, criterion, batch, names)
    check_finite_loss(loss, network)
    grads = torch.autograd.grad(loss, [captured[n] for n in names])
    return {n: (captured[n].detach(), g.detach()) for n, g in zip(names, grads)}


def _one_layer(module):
    """Whether `module` computes one layer: no submodules but its parametrizations
    (torch.nn.utils.parametrize: weight_norm, spectral_norm)."""
    return all(name == "parametrizations" for name, _ in module.named_children())


def pre_batch_norm_layers(model, batch):
    """{BN layer name: name of the submodule whose output is that BN layer's input}.

    Refused (ValueError) where the probes would read another tensor than the BN's input:
    an input that no submodule returns, or that was changed in place after it was
    returned (`out += shortcut`), and a producing layer or BN layer that runs more than
    once a forward.
    """
    outputs = {}  # id(output) -> (name, output, version); holding it keeps the id unique
    producers, calls = {}, collections.Counter()

    def produced(name, out):
        calls[name] += 1
        if isinstance(out, torch.Tensor):
            outputs[id(out)] = (name, out, out._version)

    def consumed(name, x):
        calls[name] += 1
        producer, _, version = outputs.get(id(x), (None, None, None))
        if producer is not None and version != x._version:
            raise ValueError(f"the input of BN layer {name!r} is the output of {producer!r} "
                             "changed in place after that layer returned it (an in-place "
                             "add of a shortcut?): the probes need a BN input that a "
                             "submodule returns as it is")
        producers[name] = producer

    layers = [(n, m) for n, m in model.named_modules()
              if n and _one_layer(m) and not isinstance(m, _functional.TORCH_BATCH_NORMS)]
    handles = [m.register_forward_hook(lambda module, args, out, name=n: produced(name, out))
               for n, m in layers]
    handles += [m.register_forward_pre_hook(lambda module, args, name=n: consumed(name, args[0]))
                for n, m in _functional.batch_norm_layers(model)]
    try:
        _run_capturing(model, lambda out, targets: out.sum(), batch, [])
    finally:
        for h in handles:
            h.remove()
    missing = [bn for bn, pre in producers.items() if pre is None]
    if missing:
        raise ValueError(f"cannot find the layer feeding BN layer(s) {missing}: the BN input "
                         "must be the output of a submodule")
    for bn, pre in producers.items():
        for name in (bn, pre):
            if calls[name] > 1:
                raise ValueError(f"layer {name!r} runs {calls[name]} times a forward, and "
                                 f"the probes of BN layer {bn!r} need the one tensor it "
                                 "outputs or takes: give each use a module of its own")
    return producers


def without_layer(model, name):
    """A deep copy of `model` with submodule `name` replaced by identity."""
    copied = copy.deepcopy(model)
    parent_name, _, child = name.rpartition(".")
    parent = copied.get_submodule(parent_name) if parent_name else copied
    setattr(parent, child, nn.Identity())
    return copied


def _bn_statistics(bn, y):
    """Per-channel σ, ŷ and γ as the BN layer computes them in training mode."""
    rows = _per_channel(y).double()
    mean = rows.mean(dim=1, keepdim=True)
    sigma = torch.sqrt(rows.var(dim=1, unbiased=False, keepdim=True) + bn.eps)
    gamma = (bn.weight.detach().double() if bn.weight is not None
             else torch.ones(rows.shape[0], dtype=torch.float64, device=rows.device))
    return sigma.squeeze(1), (rows - mean) / sigma, gamma


def theorem_4_1(bn, y, grad_bn, grad_plain, grad_z):
    """Both sides of Theorem 4.1 for one BN layer, per channel and summed."""
    sigma, y_hat, gamma = _bn_statistics(bn, y)
    m = y_hat.shape[1]
    scale = gamma ** 2 / sigma ** 2
    g_hat, g_plain, g_z = (_per_channel(t).double() for t in (grad_bn, grad_plain, grad_z))

    def reduced(g, projection_weight):
        return (g.pow(2).sum(1) - g.sum(1).pow(2) / m
                - projection_weight * (g * y_hat).sum(1).pow(2))

    lhs = g_hat.pow(2).sum(1)
    rhs = scale * reduced(g_plain, 1 / math.sqrt(m))
    identity = scale * reduced(g_z, 1 / m)
    held = [_holds(a, b) for a, b in zip(lhs.tolist(), rhs.tolist())]
    return {
        "lhs": lhs.sum().item(),
        "rhs": rhs.sum().item(),
        "ratio": (lhs.sum() / rhs.sum()).item(),
        "held": all(held),
        "held_fraction": sum(held) / len(held),
        # The actual Lipschitz comparison: ‖∇_y L̂‖² / ‖∇_y L‖² (< 1: BN flattened it).
        "grad_norm_sq_ratio": (lhs.sum() / g_plain.pow(2).sum()).item(),
        "identity_rel_error": ((identity - lhs).abs().sum() / lhs.abs().sum()).item(),
        "per_channel": {"lhs": lhs.tolist(), "rhs": rhs.tolist(), "held": held},
    }


def _masked(t, channel):
    out = torch.zeros_like(t)
    out[:, channel] = t[:, channel]
    return out


def _dot(a, b):
    return (a.double() * b.double()).sum().item()


def _extreme_eigenvalues(matvec, start, iterations):
    """(smallest, largest) Ritz values of a symmetric operator after a few Lanczos steps.

    Full reorthogonalisation, twice a step as fastbn.curvature's Lanczos does: with one
    pass, on a block whose spectrum was narrow beside its level (eigenvalues 0.0022 to
    0.0028) the basis drifted off orthogonal by 25x a step and the Ritz values left the
    spectrum. A Ritz value below zero proves the operator indefinite.
    """
    shape = start.shape
    basis = torch.empty(iterations, start.numel(), dtype=start.dtype, device=start.device)
    basis[0] = start.reshape(-1) / start.norm()
    alphas, betas = [], []
    for j in range(iterations):
        w = matvec(basis[j].reshape(shape)).reshape(-1).to(basis.dtype)
        alphas.append(_dot(w, basis[j]))
        w = orthogonalise(w, basis[:j + 1])
        beta = w.norm().item()
        if j + 1 == iterations or beta <= run_breakdown_threshold(alphas, betas, basis.dtype):
            break   # the Krylov space is invariant, or the steps are spent
        betas.append(beta)
        basis[j + 1] = w / beta
    ritz = torch.linalg.eigvalsh(tridiagonal(alphas, betas))
    return ritz[0].item(), ritz[-1].item()


def _proof_identity(output_hessian, g_z, y_hat, v, channel, sigma, gamma):
    """vᵀĤv for a v in one channel, from the Hessian H_z of the loss w.r.t. the BN output z
    (the paper's proof), and the size of its largest term.

    Along y + tv, z moves by (γ/σ)u, u = w − ŷ⟨ŷ, w⟩/m with w = v − mean(v), and
    ⟨∇_z L̂, ŷ⟩ bends with ŷ's second derivative, so, with a = ⟨ŷ, w⟩ and g = ∇_z L̂:
    vᵀĤv = (γ²/σ²)uᵀH_z u + (γ/σ²)(−⟨g, ŷ⟩‖w‖²/m − 2⟨g, w⟩a/m + 3⟨g, ŷ⟩a²/m²).
    Along the gradient (w = v, a = O(eps/σ²)) it is the theorem's right side,
    (γ²/σ²)vᵀH_z v − (γ/(mσ²))⟨g, ŷ⟩‖v‖², up to O(eps/σ²): the exact form makes the
    comparison a check of the second-order autodiff to round-off.
    """
    rows = v[:, channel].reshape(-1).double()
    m = rows.numel()
    w = rows - rows.mean()
    a = _dot(y_hat, w)
    u = torch.zeros_like(v)
    u[:, channel] = (w - y_hat * (a / m)).reshape(v[:, channel].shape).to(v.dtype)
    moved = gamma ** 2 / sigma ** 2 * _dot(u, output_hessian.hvp(u).reshape(v.shape))
    inner = _dot(g_z, y_hat)
    bent = gamma / sigma ** 2 * (-inner * _dot(w, w) / m - 2 * _dot(g_z, w) * a / m
                                 + 3 * inner * a ** 2 / m ** 2)
    return moved + bent, max(abs(moved), abs(bent))


def _agrees(lhs, rhs, largest_term):
    """Two sides of an identity equal up to round-off in its largest term."""
    return abs(lhs - rhs) <= RELATIVE_TOLERANCE * max(abs(lhs), abs(rhs), largest_term)


def theorem_4_2(curvature, model, plain_model, criterion, batch, bn, bn_name, pre_name, *,
                channels, lanczos_iterations, seed):
    """Quadratic forms of Theorem 4.2 for the first `channels` channels of one BN layer.

    Besides L = the network with this BN removed (`rhs`, `held`), the `*_same_point`
    fields take L as the paper's proof does: the loss as a function of the BN output z,
    at the z the BN network produces (gradient and Hessian w.r.t. z), where the right
    side is the exact value of the left (`_proof_identity`).
    """
    # [batch]: one batch, whatever its inputs are (a pair whose inputs are a tuple reads
    # as a list of batches).
    bn_hessian = curvature.activation_hessian(model, criterion, [batch], pre_name,
                                              bn_mode="train")
    plain_hessian = curvature.activation_hessian(plain_model, criterion, [batch], pre_name,
                                                 bn_mode="train")
    output_hessian = curvature.activation_hessian(model, criterion, [batch], bn_name,
                                                  bn_mode="train")
    y = bn_hessian.activation.detach()
    g_bn, g_plain = bn_hessian.grad.detach(), plain_hessian.grad.detach()
    g_z = output_hessian.grad.detach()
    sigma, y_hat, gamma = _bn_statistics(bn, y)
    m = y_hat.shape[1]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    rows = []
    for j in range(min(channels, y.shape[1])):
        v = _masked(g_bn, j)
        g_j = _masked(g_plain, j)
        v_norm_sq = _dot(v, v)
        inner = _dot(_per_channel(g_plain)[j], y_hat[j])
        scale = (gamma[j] ** 2 / sigma[j] ** 2).item()
        lhs = _dot(v, bn_hessian.hvp(v).reshape(y.shape))
        plain_form_on_bn_grad = _dot(v, plain_hessian.hvp(v).reshape(y.shape))
        plain_form = _dot(g_j, plain_hessian.hvp(g_j).reshape(y.shape))
        reduction = (gamma[j] / (m * sigma[j] ** 2)).item() * inner * v_norm_sq
        rhs = scale * plain_form_on_bn_grad - reduction
        inner_z = _dot(_per_channel(g_z)[j], y_hat[j])
        rhs_same_point, terms = _proof_identity(
            output_hessian, _per_channel(g_z)[j], y_hat[j], v, j, sigma[j].item(),
            gamma[j].item())
        start = _masked(torch.randn(y.shape, generator=generator).to(y), j)
        lam_min, lam_max = _extreme_eigenvalues(
            lambda u, j=j: _masked(plain_hessian.hvp(u).reshape(y.shape), j),
            start, lanczos_iterations)
        psd = lam_min >= -RELATIVE_TOLERANCE * max(abs(lam_max), 1e-30)
        rows.append({"channel": j, "lhs": lhs, "rhs": rhs, "held": _holds(lhs, rhs),
                     "plain_form_on_bn_grad": plain_form_on_bn_grad,
                     "plain_form": plain_form, "inner_g_yhat": inner,
                     "h_min_eig": lam_min, "h_max_eig": lam_max, "h_psd": psd,
                     "preconditions": psd and inner > 0,
                     "rhs_same_point": rhs_same_point,
                     "held_same_point": _agrees(lhs, rhs_same_point, terms),
                     "inner_gz_yhat": inner_z})
    with_preconditions = [r for r in rows if r["preconditions"]]
    return {
        "channels": rows,
        "held_fraction": sum(r["held"] for r in rows) / len(rows),
        "preconditions_fraction": len(with_preconditions) / len(rows),
        "held_fraction_given_preconditions": (
            sum(r["held"] for r in with_preconditions) / len(with_preconditions)
            if with_preconditions else None),
        # Layer-level smoothness along the gradient, gᵀHg/‖g‖², with and without the BN.
        "quadratic_form_bn": float(bn_hessian.quadratic_form()),
        "quadratic_form_plain": float(plain_hessian.quadratic_form()),
    }


def _evenly_spaced(names, count):
    if count is None or count >= len(names):
        return list(names)
    picks = {round(i * (len(names) - 1) / max(1, count - 1)) for i in range(count)}
    return [names[i] for i in sorted(picks)]


def theory_checks(model, criterion, batch, *, channels=4, layers=None, lanczos_iterations=10,
                  seed=0):
    """Theorem 4.1 and 4.2 checks for the BN layers of `model` on one batch.

    Returns {BN layer name: {"input_layer", "theorem_4_1", "theorem_4_2"}}; the model is
    left untouched. Theorem 4.1 (first order) is checked on every BN layer and channel.
    The costlier second-order checks of Theorem 4.2 run on `layers` evenly spaced BN
    layers (None: all) and their first `channels` channels; `lanczos_iterations` sets the
    PSD test of H_jj; `channels=0` turns the second-order checks off. `seed` (an int)
    sets the Lanczos start vectors and the draws of a random layer (nn.RReLU in training
    mode): the same seed gives the same results, and the caller's random number
    generators are left as they were. Raises fastbn.curvature.NonFiniteLossError where the
    loss on the batch, of the network or of it with one BN layer removed, is not finite.
    """
    _checks.check_count(channels, "channels", allow_zero=True)
    if not (layers is None or _checks.is_count(layers)):
        raise ValueError(f"layers must be None (all BN layers) or a positive int, got "
                         f"{layers!r}")
    _checks.check_count(lanczos_iterations, "lanczos_iterations")
    _checks.check_seed(seed, generator=False)
    inputs, targets, _ = split_batch(savable(batch))
    work = _functional.transformable(model)
    with torch.inference_mode(False), torch.enable_grad(), _functional.forked_rng(work, seed):
        return _theory_checks(work, criterion, (inputs, targets), channels, layers,
                              lanczos_iterations, seed)


def _theory_checks(work, criterion, batch, channels, layers, lanczos_iterations, seed):
    producers = pre_batch_norm_layers(work, batch)
    second_order = set(_evenly_spaced(list(producers), layers))
    modules = dict(work.named_modules())
    results = {}
    for bn_name, pre_name in producers.items():
        bn = modules[bn_name]
        if getattr(bn, "activation", None):
            raise ValueError(f"{bn_name}: BN with a fused activation has no separate output z")
        plain = without_layer(work, bn_name)
        bn_grads = _gradients(work, criterion, batch, [pre_name, bn_name], "the network")
        (y, grad_bn), (_, grad_z) = bn_grads[pre_name], bn_grads[bn_name]
        _, grad_plain = _gradients(plain, criterion, batch, [pre_name],
                                   f"the network without BN layer {bn_name!r}")[pre_name]
        result = {"input_layer": pre_name,
                  "theorem_4_1": theorem_4_1(bn, y, grad_bn, grad_plain, grad_z)}
        if channels < 1:
            result["theorem_4_2"] = {"skipped": "channels=0: second-order checks off"}
        elif bn_name not in second_order:
            result["theorem_4_2"] = {"skipped": f"only {layers} evenly spaced BN layers get "
                                                "second-order checks"}
        else:
            result["theorem_4_2"] = theorem_4_2(
                curvature, work, plain, criterion, batch, bn, bn_name, pre_name,
                channels=channels,
                lanczos_iterations=lanczos_iterations, seed=seed)
        results[bn_name] = result
    return results
