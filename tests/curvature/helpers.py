"""Tiny float64 models, data and exact references for the curvature tests."""

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import fastbn

DTYPE = torch.float64


def mlp():
    """Linear → fastbn.BatchNorm1d → Tanh → Linear: 39 parameters."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), fastbn.BatchNorm1d(4), nn.Tanh(),
                         nn.Linear(4, 3)).to(DTYPE)


def cnn():
    """Conv → torch nn.BatchNorm2d → Tanh → pool → Linear: 89 parameters."""
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 2)).to(DTYPE)


class SubclassedBatchNorm1d(nn.BatchNorm1d):
    """A subclass of torch's batch norm that keeps torch's forward."""


def batch_for(model, n, seed):
    generator = torch.Generator().manual_seed(seed)
    shape = (n, 3) if isinstance(model[0], nn.Linear) else (n, 2, 4, 4)
    classes = model[-1].out_features
    inputs = torch.randn(shape, generator=generator, dtype=DTYPE)
    return inputs, torch.randint(0, classes, (n,), generator=generator)


def with_nontrivial_running_stats(model):
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model


def stock_copy(model, bn_mode):
    """A deepcopy in which every batch norm is torch's own class (the reference: stock
    double backward, which is correct), in the requested mode."""
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if isinstance(module, _BatchNorm):
            module.__class__ = next(cls for cls in type(module).__mro__
                                    if cls.__module__.startswith("torch."))
            module.train(bn_mode == "train")
    return reference


def exact_hessian(model, criterion, batches, bn_mode="train"):
    """(gradient, Hessian) of Σ_b n_b L_b / Σ_b n_b by torch.autograd.functional on a
    stock-BN copy, over all parameters flattened in named_parameters() order."""
    reference = stock_copy(model, bn_mode)
    names = [name for name, _ in reference.named_parameters()]
    shapes = [p.shape for p in reference.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    total = sum(inputs.shape[0] for inputs, _ in batches)

    def loss(theta):
        pieces = dict(zip(names, (piece.reshape(shape) for piece, shape in
                                  zip(theta.split([s.numel() for s in shapes]), shapes))))
        buffers = {name: b.clone() for name, b in reference.named_buffers()}
        return sum(inputs.shape[0] * criterion(torch.func.functional_call(
            reference, (pieces, buffers), (inputs,)), targets) for inputs, targets in batches) / total

    gradient = torch.autograd.functional.jacobian(loss, flat)
    return gradient, torch.autograd.functional.hessian(loss, flat)


def flat_indices(model, names):
    """Where the named parameters sit in the flat vector of all of the model's."""
    index, start = [], 0
    for name, p in model.named_parameters():
        if name in names:
            index.extend(range(start, start + p.numel()))
        start += p.numel()
    return torch.tensor(index)


def snapshot(model):
    """Everything a curvature call must leave bitwise unchanged."""
    return ({name: t.detach().clone() for name, t in model.state_dict(keep_vars=True).items()},
            {name: m.training for name, m in model.named_modules()},
            {name: p.requires_grad for name, p in model.named_parameters()})


def assert_unchanged(model, before):
    tensors, flags, requires_grad = snapshot(model)
    assert flags == before[1]
    assert requires_grad == before[2]
    assert tensors.keys() == before[0].keys()
    for name, t in tensors.items():
        assert t.dtype == before[0][name].dtype and torch.equal(t, before[0][name]), name


class MatrixOperator:
    """A known symmetric matrix with HessianOperator's interface, to test estimators."""

    def __init__(self, matrix):
        self.matrix = matrix
        self.shape = tuple(matrix.shape)
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.progress = False

    def matvec(self, v):
        return self.matrix @ v

    def matmat(self, V):
        return self.matrix @ V


def random_symmetric(size, seed, spectrum=None):
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=DTYPE))
    if spectrum is None:
        spectrum = torch.randn(size, generator=generator, dtype=DTYPE)
    return (q * spectrum) @ q.t()
