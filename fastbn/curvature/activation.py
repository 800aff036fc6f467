"""Gradients and Hessian-vector products of the loss with respect to a layer's output."""

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils._pytree import tree_map

from fastbn.curvature._functional import (FunctionalModel, forked_random_state,
                                          is_single_batch, outside_inference_mode,
                                          seed_from_callers_generator, split_batch,
                                          to_device)
from fastbn.curvature.operator import check_finite_loss, scalar_loss


@dataclass
class ActivationHessian:
    """The loss as a function of one layer's output z, at the value z had in the forward.

    activation: z (detached). grad: dL/dz. loss: L. hvp(v): (∂²L/∂z²) v with everything
    upstream of the layer fixed and everything downstream (batch norms in the chosen
    mode included) differentiated, by jvp of grad (reverse-over-reverse where the
    forward-mode route raises). quadratic_form(): gᵀHg/‖g‖² for g = grad, the quantity
    of Theorem 4.2 of Santurkar et al. (2018).
    """

    activation: torch.Tensor
    grad: torch.Tensor
    loss: torch.Tensor
    _loss_of_activation: Callable = field(repr=False)
    _reverse_only: bool = field(default=False, repr=False)

    @outside_inference_mode
    def hvp(self, v):
        v = torch.as_tensor(v)
        if v.shape != self.activation.shape:
            raise ValueError(f"hvp expects a tensor of the activation's shape "
                             f"{tuple(self.activation.shape)}, got {tuple(v.shape)}")
        v = v.to(device=self.activation.device, dtype=self.activation.dtype)
        gradient = torch.func.grad(self._loss_of_activation)
        if not self._reverse_only:
            try:
                return torch.func.jvp(gradient, (self.activation,), (v,))[1]
            except RuntimeError:
                # e.g. torch 2.13's forward-mode rule of mse_loss's backward ("ZeroTensors
                # are immutable"): reverse-over-reverse gives the same product.
                self._reverse_only = True
        return torch.func.grad(lambda z: (gradient(z) * v).sum())(self.activation)

    def quadratic_form(self):
        """gᵀHg/‖g‖²; NaN where the gradient is zero (the direction is undefined)."""
        g = self.grad
        return float((g * self.hvp(g)).sum() / (g * g).sum())


def _clone(t):
    return t.clone() if isinstance(t, torch.Tensor) else t


@contextlib.contextmanager
def _forward_hook(module, hook):
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@outside_inference_mode
def activation_hessian(model, criterion, data, layer, *, bn_mode="train"):
    """Hook the output of `layer` (a name from model.named_modules()) on one batch.

    data: one (inputs, targets) batch (or an iterable holding exactly one). The layer
    must be called once per forward and return a tensor. The model is only read: the
    computation runs on a private fastbn copy fed copies of the model's current tensors
    and of the batch, so the result describes that moment even after they change. With
    bn_mode="train" every batch norm uses batch statistics (running statistics untouched),
    so a batch norm downstream of the layer couples the samples of the batch.
    Dropout layers run in eval mode (a randomly masked loss has no Hessian); other random
    operations (F.dropout with training=True, nn.RReLU, torch.rand*) draw the same
    numbers in the recording forward and in every evaluation of the loss (a seed drawn
    from the caller's generator without moving it, as HessianOperator's `random_seed`).
    Returns an ActivationHessian.
    """
    functional = FunctionalModel(model, bn_mode)
    module = functional.named_module(layer)
    if not is_single_batch(data):
        batches = list(data)
        if len(batches) != 1:
            # A pair whose inputs are a tuple reads as two batches.
            hint = ("; a batch whose inputs are a tuple goes in a list of one: [batch]"
                    if len(batches) == 2 and isinstance(batches[0], (tuple, list)) else "")
            raise ValueError("activation_hessian takes one (inputs, targets) batch, got "
                             f"{len(batches)} batches{hint}")
        data = batches[0]
    inputs, targets, _ = split_batch(data)
    params, buffers = functional.state()
    device = next(iter(params.values())).device if params else None
    if device is not None:
        inputs, targets = to_device(inputs, device), to_device(targets, device)
    cuda = [device.index] if device is not None and device.type == "cuda" else []
    seed = seed_from_callers_generator()

    outputs = []

    def record(_module, _args, output):
        # A clone: an in-place op downstream (ReLU(inplace=True), `out += identity`)
        # would overwrite the output itself.
        outputs.append(output.clone() if isinstance(output, torch.Tensor) else output)

    with torch.no_grad(), _forward_hook(module, record), forked_random_state(cuda, seed):
        functional(params, buffers, inputs)
    if len(outputs) != 1:
        raise ValueError(f"layer {layer!r} ran {len(outputs)} times in one forward; it must "
                         "run exactly once")
    if not isinstance(outputs[0], torch.Tensor):
        raise ValueError(f"layer {layer!r} returns {type(outputs[0]).__name__}, not a tensor")
    activation = outputs[0].detach()
    # Fresh buffer clones: the recording forward ran outside a transform, where a
    # train-mode batch norm updates (its clones of) the running statistics. Parameters and
    # the batch are cloned too: hvp must use the state that activation and grad came
    # from, whatever happens to the model (an optimizer step) or the batch afterwards.
    params, buffers = functional.state()
    params = {name: p.clone() for name, p in params.items()}
    inputs, targets = tree_map(_clone, (inputs, targets))

    def loss_of_activation(z):
        # The layer returns a clone of z: an in-place op downstream must not write to z,
        # the variable being differentiated.
        with (_forward_hook(module, lambda _m, _a, _o: z.clone()),
              forked_random_state(cuda, seed)):
            value = criterion(functional(params, buffers, inputs), targets)
        return scalar_loss(value)

    gradient, loss = torch.func.grad_and_value(loss_of_activation)(activation)
    check_finite_loss(loss, f"layer {layer!r}")
    return ActivationHessian(activation=activation, grad=gradient, loss=loss.detach(),
                             _loss_of_activation=loss_of_activation)
