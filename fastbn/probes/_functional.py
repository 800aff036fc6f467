"""Run a model as a pure function of its parameters, with BN on batch statistics.

Every probe evaluates the loss at weights other than the model's own. Doing that through
torch.func.functional_call (instead of writing into the model) means the model's
parameters and buffers are never touched; the only state that changes, the training
flags of the BN layers, is put back on exit.
"""

import contextlib
import copy

import torch
from torch import nn
from torch.func import functional_call

from fastbn.nn.batchnorm import _FastBatchNorm

TORCH_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batch_norm_layers(model):
    """(name, module) for every batch-norm layer of `model`, torch's or fastbn's."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, TORCH_BATCH_NORMS)]


def transformable(model):
    """`model` itself if all its BN layers are fastbn's, else a converted deep copy.

    torch's own BN layers mutate running statistics in training mode, which torch.func
    transforms refuse; fastbn's layers leave them alone under a transform.
    """
    if all(isinstance(m, _FastBatchNorm) for _, m in batch_norm_layers(model)):
        return model
    import fastbn
    return fastbn.convert(copy.deepcopy(model))


@contextlib.contextmanager
def batch_norm_in_train_mode(model):
    """BN layers normalise with batch statistics inside the block; flags restored after."""
    layers = [m for _, m in batch_norm_layers(model)]
    flags = [m.training for m in layers]
    try:
        for m in layers:
            m.train()
        yield model
    finally:
        for m, flag in zip(layers, flags):
            m.training = flag


def split_state(model):
    """(trainable parameters, constants): detached copies safe to hand to functional_call.

    Constants are the buffers and the frozen parameters, cloned so that no code path can
    write into the model's own tensors.
    """
    params, constants = {}, {}
    for name, p in model.named_parameters():
        (params if p.requires_grad else constants)[name] = p.detach().clone()
    for name, b in model.named_buffers():
        constants[name] = b.clone()
    return params, constants


def loss_function(model, criterion, constants, inputs, targets):
    """params -> criterion(model(inputs; params), targets), a pure function."""
    def loss(params):
        return criterion(functional_call(model, {**constants, **params}, (inputs,)), targets)
    return loss


def flat_norm(tensors):
    """Euclidean norm of a dict of tensors as one vector, accumulated in float64."""
    return torch.sqrt(sum(t.double().pow(2).sum() for t in tensors.values())).item()
