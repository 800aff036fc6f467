"""Run a model as a pure function of its parameters, with BN on batch statistics.

Every probe evaluates the loss at weights other than the model's own. Doing that through
torch.func.functional_call (instead of writing into the model) means the model's
parameters and buffers are never touched; the only state that changes, the training
flags of the BN layers (on) and of dropout layers (off), is put back on exit.

Data-parallel probes (`process_group`): each process holds a shard of the batch and runs
a private copy whose BN layers synchronise over the group, so the loss and gradient are
those of the concatenated batch on every process.
"""

import contextlib

import torch
from torch import nn
from torch.func import functional_call, grad_and_value
from torch.nn.modules.dropout import _DropoutNd

from fastbn.backends.distributed import all_reduce_packed, refuse_on_every_process
from fastbn.curvature._functional import (_retype_batch_norm_subclasses, check_membership,
                                          converted, forked_random_state, private_copy,
                                          savable, split_batch)
from fastbn.nn.batchnorm import TORCH_BATCH_NORMS, _FastBatchNorm


def batch_norm_layers(model):
    """(name, module) for every batch-norm layer of `model`, torch's or fastbn's."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, TORCH_BATCH_NORMS)]


def _reuses_a_module(model):
    """Whether a submodule is reached under more than one name (a layer applied twice):
    torch 2.13's functional_call then leaves the module's parameters replaced by the
    tensors it was called with (plain tensors, lost to the optimiser)."""
    return (sum(1 for _ in model.named_modules(remove_duplicate=False))
            != sum(1 for _ in model.named_modules()))


def transformable(model, process_group=None):
    """`model` itself if all its BN layers are fastbn's local ones and no submodule is
    reused (`_reuses_a_module`), else a converted deep copy: with `process_group`, its BN
    layers are fastbn.SyncBatchNorm over it; without, each normalises its own process's
    batch (a SyncBatchNorm of the model would synchronise the statistics over the whole
    world while the loss stays local).

    torch's own BN layers mutate running statistics in training mode, which torch.func
    transforms refuse; fastbn's layers leave them alone under a transform. Subclasses of
    torch's BN layers that keep torch's forward are converted too; one with its own
    forward runs as it is, or is refused where it would update running statistics or
    where its statistics would have to span `process_group` (see
    `_retype_batch_norm_subclasses`).
    """
    if process_group is None and not _reuses_a_module(model) and all(
            isinstance(m, _FastBatchNorm) and not isinstance(m, nn.SyncBatchNorm)
            for _, m in batch_norm_layers(model)):
        return model
    private = private_copy(model)
    # fastbn.convert replaces only torch's own classes.
    own_forward = _retype_batch_norm_subclasses(private, "train", process_group,
                                                eval_allowed=False)
    return converted(private, process_group, own_forward)


def agreed_batch(batch, model, process_group, caller):
    """(inputs, targets) of `batch`. With `process_group`, every process raises if one
    refuses its batch (an empty shard): the others would wait in their first collective
    until the group timed out."""
    try:
        inputs, targets, _ = split_batch(savable(batch))
        refusal = None
    except ValueError as error:
        refusal = error
    if process_group is not None:
        # The model's device: NCCL gathers only CUDA tensors.
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        refuse_on_every_process(refusal, process_group, device, caller, "batch")
    elif refusal is not None:
        raise refusal
    return inputs, targets


def forked_rng(model, seed=None):
    """The random number generators of the CPU and the model's GPUs, forked for a block:
    a random layer (nn.RReLU in training mode) draws without moving the caller's
    sequence (the training run around the probe). With `seed` (an int), the draws start
    from it, so a seeded probe gives the same result on every call."""
    return forked_random_state(sorted({t.device.index for t in (*model.parameters(),
                                                                 *model.buffers())
                                       if t.is_cuda}), seed)


@contextlib.contextmanager
def probe_modes(model):
    """Inside the block BN layers normalise with batch statistics and dropout layers are
    off (a randomly masked loss changes from one evaluation to the next, so differences
    along a path would measure the masks); flags restored after. Autograd records, also
    under torch.no_grad() or torch.inference_mode() around the probe. The random number
    generators are forked (`forked_rng`): another random layer stays random, but leaves
    the caller's sequence alone."""
    layers = [(m, True) for _, m in batch_norm_layers(model)]
    layers += [(m, False) for m in model.modules() if isinstance(m, _DropoutNd)]
    flags = [m.training for m, _ in layers]
    with forked_rng(model), torch.inference_mode(False), torch.enable_grad():
        try:
            for m, training in layers:
                m.train(training)
            yield model
        finally:
            for (m, _), flag in zip(layers, flags):
                m.training = flag


def split_state(model):
    """(trainable parameters, constants): detached copies safe to hand to functional_call.

    Constants are the buffers and the frozen parameters, cloned so that no code path can
    write into the model's own tensors.
    """
    params, constants = {}, {}
    for name, p in model.named_parameters():
        (params if p.requires_grad else constants)[name] = p.detach().clone()
    if not params:
        raise ValueError("no parameters to differentiate: the model has none with "
                         "requires_grad")
    for name, b in model.named_buffers():
        constants[name] = b.clone()
    return params, constants


def loss_function(model, criterion, constants, inputs, targets):
    """params -> criterion(model(inputs; params), targets), a pure function. The constants
    are cloned inside it, at the level of the transforms around it: a module that writes
    to a buffer in place (a call counter) writes to that clone, where torch.func refuses
    a write to a tensor from outside the transform."""
    def loss(params):
        state = {name: t.clone() for name, t in constants.items()}
        return criterion(functional_call(model, {**state, **params}, (inputs,)), targets)
    return loss


def grad_and_loss_function(model, criterion, constants, inputs, targets, process_group=None):
    """params -> (∇L, L), L = criterion(model(inputs; params), targets), a mean over the batch.

    With `process_group`, L is the mean loss of the batch that concatenates every process's
    shard, the same numbers on each. Every process differentiates n_r·L_r (its sample
    count times its mean loss; SyncBatchNorm's backward couples the processes, so all must
    scale alike), then one all_reduce sums gradients, losses and counts: divided by the
    total count they are the global gradient and loss.
    """
    loss = loss_function(model, criterion, constants, inputs, targets)
    if process_group is None:
        return grad_and_value(loss)
    _, _, count = split_batch((inputs, targets))
    weighted = grad_and_value(lambda params: count * loss(params))

    def global_grad_and_loss(params):
        grad, value = weighted(params)
        sums = list(grad.values())
        *grads, value, total = all_reduce_packed(
            sums + [value.reshape(()).to(sums[0].dtype), sums[0].new_full((), count)],
            process_group)
        return {name: g / total for name, g in zip(grad, grads)}, value / total

    return global_grad_and_loss


def flat_norm(tensors):
    """Euclidean norm of a dict of tensors as one vector, accumulated in float64."""
    return torch.sqrt(sum(t.double().pow(2).sum() for t in tensors.values())).item()
