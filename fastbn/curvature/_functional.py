"""Run a user's model functionally without ever touching it.

`FunctionalModel` keeps a private structural copy of the model whose batch norms are
fastbn layers and whose parameters and buffers are meta placeholders (so the copy costs
no memory). Every call feeds the user's *current* parameters and fresh clones of its
buffers through `torch.func.functional_call`, so the user's model (tensors, buffers,
training flags, hooks) is only ever read, whatever happens inside the call.
"""

import contextlib
import copy
import functools
import itertools
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.utils._pytree import tree_flatten, tree_map

import fastbn
from fastbn.nn.batchnorm import (TORCH_BATCH_NORMS, _FastBatchNorm, convert_sync_except,
                                 fuse_relu_along_sequentials)

BN_MODES = ("train", "eval")


def check_bn_mode(bn_mode):
    if bn_mode not in BN_MODES:
        raise ValueError(f"unknown bn_mode {bn_mode!r}; expected 'train' or 'eval'")


def _retype_batch_norm_subclasses(copy_of_model, bn_mode, process_group=None, *,
                                  eval_allowed=True):
    """In the private copy, make each subclass of a torch batch norm that keeps torch's
    forward an instance of that torch class, so that fastbn.convert replaces it too
    (torch's forward updates running statistics in place, which torch.func refuses).
    Any other subclass (its own forward) runs as it is where it cannot update them
    (bn_mode "eval", or no running statistics) and is refused where it would; the error
    offers bn_mode="eval" where the caller takes it (`eval_allowed`). With a
    `process_group`, a layer with its own forward (fastbn's subclasses too) is refused
    where it would normalise with batch statistics: they would be its own process's.
    Returns the layers that run their own forward, which `converted` leaves alone."""
    own_forward = []
    for name, module in copy_of_model.named_modules():
        if (not isinstance(module, _BatchNorm) or type(module) in TORCH_BATCH_NORMS
                or isinstance(module, fastbn.SyncBatchNorm)):
            continue
        fast = isinstance(module, _FastBatchNorm)
        if fast and type(module).forward is _FastBatchNorm.forward:
            continue
        base = next((cls for cls in type(module).__mro__ if cls in TORCH_BATCH_NORMS), None)
        if not fast and base is not None and type(module).forward is base.forward:
            module.__class__ = base
            continue
        layer = f"layer {name or '(the model)'!r} ({type(module).__name__})"
        if not fast and bn_mode == "train" and module.track_running_stats:
            reason = ("it overrides forward" if base is not None
                      else "it derives from none of " + ", ".join(c.__name__ for c in
                                                                  TORCH_BATCH_NORMS))
            fastbn_class = f"fastbn.{base.__name__}" if base is not None else "a fastbn layer"
            raise TypeError(
                f"{layer} subclasses torch's batch norm but cannot run as a fastbn layer "
                f"({reason}), and in training mode it would update its running statistics "
                "in place, which fails inside torch.func transforms. Derive it from "
                f"{fastbn_class} instead, "
                + ("or use bn_mode=\"eval\", " if eval_allowed else "")
                + "or construct it with track_running_stats=False.")
        if process_group is not None and (bn_mode == "train" or module.running_mean is None):
            raise TypeError(
                f"{layer} overrides forward, so its batch statistics cannot be "
                "synchronised over process_group: each process would normalise with its "
                "own batch. Derive it from fastbn.SyncBatchNorm instead"
                + (", or use bn_mode=\"eval\" with running statistics" if eval_allowed
                   else "") + ".")
        own_forward.append(module)
    return own_forward


def check_membership(process_group, caller):
    """ValueError where this process is outside `process_group`: a collective skips a
    process outside its group, so the result would silently be the local one."""
    if process_group is not None and dist.get_rank(process_group) < 0:
        raise ValueError(f"{caller}: this process is not a member of process_group")


def plain_attributes(obj):
    """`obj`'s attributes holding numbers, strings or None (a loss module's reduction,
    a layer's eps or momentum, a training flag, ...)."""
    return {name: value for name, value in getattr(obj, "__dict__", {}).items()
            if isinstance(value, (bool, int, float, complex, str, type(None)))}


def tensor_attributes(model):
    """The tensors `model`'s modules hold as plain attributes (neither parameters nor
    buffers)."""
    return [value for module in model.modules() for value in vars(module).values()
            if isinstance(value, torch.Tensor)]


def private_copy(model, memo=None):
    """copy.deepcopy(model, memo), sharing the model's process groups (they cannot be
    copied) and copying detached the tensor attributes that autograd made (a weight a
    forward pre-hook computes, a cached output), which deepcopy refuses."""
    memo = {} if memo is None else memo
    for module in model.modules():
        group = getattr(module, "process_group", None)
        if group is not None:
            memo[id(group)] = group
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


class _LocalSyncBatchNorm(fastbn.SyncBatchNorm):
    """A SyncBatchNorm that normalises with its own process's batch only (the private
    copy of a model without a process group is a local model)."""

    def _sync_group(self, batch_stats):
        return None


def converted(private, process_group, own_forward=()):
    """`private` (a copy of a model) with fastbn batch norms that synchronise over
    `process_group`, or, without one, each over its own process's batch only (the model's
    SyncBatchNorms would synchronise over the whole world). The layers in `own_forward`
    (`_retype_batch_norm_subclasses`'s) stay as they are: a SyncBatchNorm in their place
    would drop their forward."""
    if process_group is not None:
        return convert_sync_except(private, process_group, own_forward)
    model = fastbn.convert(private)
    for module in model.modules():
        if type(module) is fastbn.SyncBatchNorm:
            module.__class__ = _LocalSyncBatchNorm
    return model


def _placeholder(tensor):
    meta = torch.empty_like(tensor, device="meta")
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(meta, requires_grad=tensor.requires_grad)
    return meta


class FunctionalModel:
    """`model` as a pure function of (parameters, inputs).

    bn_mode "train": every batch norm normalises with batch statistics (running
    statistics unused and untouched); "eval": with running statistics. Subclasses of
    torch's batch norms run as fastbn layers where they keep torch's forward (see
    `_retype_batch_norm_subclasses`). Dropout layers (subclasses of torch's _DropoutNd:
    nn.Dropout, Dropout1d/2d/3d, AlphaDropout, FeatureAlphaDropout) always run in eval
    mode: the loss of a randomly masked model has no Hessian, and torch.func's vmap
    refuses random operations. Every other module follows the user's model's training
    flag at the time of the call. With a `process_group`, batch statistics span the
    batches of every process in it. With `fuse_relu`, the copy fuses batch norm + ReLU
    pairs in nested plain nn.Sequentials from the root down
    (`fuse_relu_along_sequentials`: the same function, faster; the batch norm's own
    output is then not computed, so layer probes keep them apart).
    """

    def __init__(self, model, bn_mode, process_group=None, *, fuse_relu=False):
        check_bn_mode(bn_mode)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        self.model = model
        self.bn_mode = bn_mode
        memo = {id(t): _placeholder(t)
                for t in itertools.chain(model.parameters(), model.buffers())}
        private = private_copy(model, memo)
        own_forward = _retype_batch_norm_subclasses(private, bn_mode, process_group)
        self.copy = converted(private, process_group, own_forward)
        if fuse_relu:
            fuse_relu_along_sequentials(self.copy)
        # The batch norms the copy runs with a ReLU that the model's do not have.
        self._fused = {name for name, module in self.copy.named_modules()
                       if getattr(module, "activation", None) == "relu"
                       and getattr(model.get_submodule(name), "activation", None) != "relu"}

    def _sync_from_model(self):
        """Bring the copy's modules up to the model's as they are now: its plain
        attributes (see `plain_attributes`), its tensor attributes (cloned: the copy never
        writes to the model's), the training flags (batch norms and dropout as the mode
        says), and the ReLU of the batch norms the copy fuses."""
        user = dict(self.model.named_modules(remove_duplicate=False))
        for name, module in self.copy.named_modules(remove_duplicate=False):
            source = user[name]
            for attribute, value in vars(source).items():
                if isinstance(value, torch.Tensor):
                    module.__dict__[attribute] = value.detach().clone()
            attributes = plain_attributes(source)
            attributes.pop("process_group", None)   # the copy's group is the operator's
            module.__dict__.update(attributes)
            if name in self._fused:
                module.activation = "relu"
            if isinstance(module, _BatchNorm):
                module.training = self.bn_mode == "train"
            elif isinstance(module, _DropoutNd):
                module.training = False

    def state(self):
        """(parameters, buffers) for one call: the user's parameters and buffers
        detached (read only: the call clones the buffers)."""
        self._sync_from_model()
        params = {name: p.detach() for name, p in self.model.named_parameters()}
        buffers = {name: b.detach() for name, b in self.model.named_buffers()}
        return params, buffers

    def __call__(self, params, buffers, inputs):
        # Cloned here, at the level of the transforms around the call: a module that
        # writes to a buffer in place (a call counter) writes to the clone, where
        # torch.func refuses a write to a tensor from outside the transform.
        buffers = {name: b.clone() for name, b in buffers.items()}
        return torch.func.functional_call(self.copy, (params, buffers), (inputs,))

    def named_module(self, name):
        """The copy's module called `name` (as in model.named_modules())."""
        modules = dict(self.copy.named_modules())
        if name not in modules:
            known = ", ".join(repr(n) for n in list(modules)[:20] if n)
            raise ValueError(f"unknown layer {name!r}; the model's modules include {known}")
        return modules[name]


def outside_inference_mode(function):
    """Run `function` with inference mode off: under it no tensor could be saved for the
    derivatives it takes (torch.inference_mode() around a curvature computation is a
    natural thing to write)."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        with torch.inference_mode(False):
            return function(*args, **kwargs)
    return run


def same_batch(a, b):
    """Whether two batches hold the same tensors (values, NaNs included) in the same
    structure; other leaves are not compared."""
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    if spec_a != spec_b:
        return False
    for x, y in zip(leaves_a, leaves_b):
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            continue
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x is y or torch.equal(x, y):
            continue
        if not (x.is_floating_point() and bool(((x == y) | (x.isnan() & y.isnan())).all())):
            return False
    return True


def split_batch(batch):
    """(inputs, targets, number of samples) of one `(inputs, targets)` batch."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError("each batch must be an (inputs, targets) pair, got "
                         f"{type(batch).__name__}"
                         + (f" of length {len(batch)}" if hasattr(batch, "__len__") else ""))
    inputs, targets = batch
    sizes = {t.shape[0] for t in tree_flatten(inputs)[0]
             if isinstance(t, torch.Tensor) and t.dim() > 0}
    if not sizes:
        raise ValueError("batch inputs must contain a tensor with a leading batch dimension")
    if len(sizes) > 1:
        # Inputs with a tensor shared by all samples: the targets say which is the batch.
        if isinstance(targets, torch.Tensor) and targets.dim() > 0 and targets.shape[0] in sizes:
            sizes = {targets.shape[0]}
        else:
            raise ValueError("the batch's input tensors have different leading sizes "
                             f"{sorted(sizes)} and the targets do not pick one: cannot "
                             "tell the number of samples")
    (n,) = sizes
    if n == 0:
        raise ValueError("empty batch (0 samples)")
    return inputs, targets, n


def is_single_batch(data):
    """Whether `data` is one (inputs, targets) batch rather than an iterable of batches:
    a pair whose inputs are a tensor or a dict of tensors. (A batch whose inputs are a
    tuple is ambiguous: pass it as [batch].)"""
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and isinstance(data[0], (torch.Tensor, Mapping)))


def savable(tree):
    """`tree` with its inference tensors cloned to normal ones: autograd cannot save one
    for backward (a batch made under torch.inference_mode())."""
    with torch.inference_mode(False):
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor)
                        and t.is_inference() else t, tree)


def to_device(tree, device):
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, tree)


def seed_from_callers_generator():
    """An int drawn from a copy of torch's global generator: the caller's state decides
    it, and does not move."""
    generator = torch.Generator().set_state(torch.get_rng_state())
    return int(torch.randint(2 ** 62, (), generator=generator))


@contextlib.contextmanager
def forked_random_state(cuda_devices=(), seed=None):
    """torch's CPU generator and those of `cuda_devices`, forked for the block (the
    caller's sequence is as it was after it) and, with `seed` (an int), seeded with it:
    draws inside repeat with the seed."""
    cuda_devices = list(cuda_devices)
    with torch.random.fork_rng(devices=cuda_devices):
        if seed is not None:
            torch.default_generator.manual_seed(seed)
            for index in cuda_devices:
                torch.cuda.default_generators[index].manual_seed(seed)
        yield
