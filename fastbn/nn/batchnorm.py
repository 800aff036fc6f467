"""Drop-in batch-norm modules backed by fastbn.batch_norm.

Each class subclasses its torch counterpart, so parameters, buffers, state_dict keys,
`isinstance` checks and torch's own tooling see an ordinary batch-norm layer. The one
addition is `activation` ("relu" fuses a following ReLU into the kernel).

Under torch.func transforms a module in training mode normalises with batch statistics
and leaves `running_mean`, `running_var` and `num_batches_tracked` untouched.
"""

import collections

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import has_torch_function_variadic

from fastbn import functional
from fastbn.ops import transforms


def _torch_bias_kwargs(bias):
    """torch's keyword for `bias`, passed only when False: older torch releases have no
    such argument."""
    return {} if bias else {"bias": False}


def _version_of(t):
    """t's version counter, or None where it has none (absent, or an inference tensor).
    Dynamo cannot trace is_inference(): compiled code reads the counter."""
    if t is None or (not torch.compiler.is_compiling() and t.is_inference()):
        return None
    return t._version


def _layer_forward(layer, input):
    """A batch-norm layer's forward without its hooks (the call an fx graph records)."""
    return layer.forward(input)


class _FastBatchNorm:
    """The forward shared by BatchNorm1d/2d/3d (mixed in before torch's class)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, activation=None, *,
                 bias=True):
        functional.check_activation(activation)
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, **_torch_bias_kwargs(bias))
        self.activation = activation

    def _sync_group(self, batch_stats):
        """The process group whose batches share statistics, or None (local layers)."""
        return None

    def _check_input(self, input):
        self._check_input_dim(input)

    def forward(self, input):
        if isinstance(input, torch.fx.Proxy):
            # torch.fx symbolic tracing. fx takes only torch.nn's own modules for leaves, so
            # it has run this layer's hooks on proxies already (they are in the graph): the
            # graph calls the forward alone, on the layer itself (its training flag and
            # statistics as they are when the graph runs), not the layer with its hooks.
            tracer = input.tracer
            path = tracer.path_of_module(self)
            if not path:
                # The layer is the traced root: a graph cannot hold its own root (torch's
                # layer fails here too, on its control flow).
                raise torch.fx.proxy.TraceError(
                    f"fastbn.{type(self).__name__} cannot be the root of torch.fx."
                    "symbolic_trace; trace a module that contains it")
            layer = tracer.create_proxy("get_attr", path, (), {})
            return tracer.create_proxy("call_function", _layer_forward, (layer, input), {})
        self._check_input(input)
        # Each parameter and buffer read once, from nn.Module's dicts where they are there:
        # its attribute fallback (__getattr__, in Python) costs several microseconds for
        # the four on a cold cache. functional_call swaps tensors in the dicts; a
        # parametrization takes the name out of them (a property serves it).
        training = bool(self.training)   # as torch: a truthy flag set directly counts
        params, buffers = self._parameters, self._buffers
        running_mean = (buffers["running_mean"] if "running_mean" in buffers
                        else self.running_mean)
        running_var = buffers["running_var"] if "running_var" in buffers else self.running_var
        weight = params["weight"] if "weight" in params else self.weight
        bias = params["bias"] if "bias" in params else self.bias
        batch_stats = training or (running_mean is None and running_var is None)
        factor = 0.0 if self.momentum is None else self.momentum
        if not batch_stats:
            out = functional.direct_eval(input, running_mean, running_var, weight, bias,
                                         factor, self.eps, self.activation)
            if out is not None:
                return out
        if training and not self.track_running_stats:
            running_mean = running_var = None
        group = self._sync_group(batch_stats)
        tracked = None
        if training:
            tracked = (buffers["num_batches_tracked"] if "num_batches_tracked" in buffers
                       else self.num_batches_tracked)
        counts = (tracked is not None and self.track_running_stats
                  and not transforms.under_transform())
        # Check everything before num_batches_tracked moves: errors change no state. The
        # count first, as torch moves it before its functional form checks anything.
        if counts:
            functional.check_updatable(tracked)
        # Asked with momentum=None's placeholder 0.0: a float, as the factor that follows.
        backend = (functional.direct_train_backend(input, running_mean, running_var, weight,
                                                   bias, factor, self.eps, self.activation)
                   if batch_stats and group is None else None)
        if backend is None:
            functional.check_scalars(factor, self.eps)
            functional.check_args(input, running_mean, running_var, weight, bias,
                                  batch_stats, self.activation, self.eps, group is not None)
        if counts and self.momentum is None:
            factor = 1.0 / (float(tracked) + 1.0)   # the cumulative average, this batch in
        if counts:
            # Counted before the call, as torch does: a non-reentrant checkpoint's
            # recomputation stops inside it (once its last tensor is saved), after the
            # running statistics moved. A call that raises before they moved (say, in a
            # collective) counts nothing.
            stats_version = _version_of(running_mean)
            tracked.add_(1)
        try:
            if backend is not None:   # a call of the common kind: straight to its Function
                return functional.direct_train(input, running_mean, running_var, weight,
                                               bias, factor, self.eps, self.activation,
                                               backend)
            call = (functional.batch_norm if has_torch_function_variadic(
                input, running_mean, running_var, weight, bias)
                else functional.checked_batch_norm)
            return call(input, running_mean, running_var, weight, bias, batch_stats, factor,
                        self.eps, self.activation, process_group=group)
        except BaseException:
            if counts and (stats_version is None or running_mean._version == stats_version):
                tracked.sub_(1)
            raise

    def __prepare_scriptable__(self):
        # torch.jit.script's hook, called before it compiles: its compiler cannot read
        # this forward, and would fail deep inside torch with an unrelated message.
        raise RuntimeError(f"fastbn.{type(self).__name__} has no TorchScript form; use "
                           "torch.compile, torch.export or torch.jit.trace (torch.jit.script "
                           "is deprecated)")

    def extra_repr(self):
        text = super().extra_repr()
        return text + (f", activation={self.activation!r}" if self.activation else "")


class BatchNorm1d(_FastBatchNorm, nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on fastbn kernels; input (N, C) or (N, C, L)."""


class BatchNorm2d(_FastBatchNorm, nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on fastbn kernels; input (N, C, H, W)."""


class BatchNorm3d(_FastBatchNorm, nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on fastbn kernels; input (N, C, D, H, W)."""


class SyncBatchNorm(_FastBatchNorm, nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm on fastbn: statistics over every process of the group.

    In training mode inside an initialised process group of more than one process, the
    forward's statistics travel in one collective and each reduction of the backward in
    one all_reduce; double backward, jvp and vmap over tangents work across processes
    (stock SyncBatchNorm has none of them). Otherwise it behaves as the local layer.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None,
                 activation=None, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, activation=activation, bias=bias)
        self.process_group = process_group

    def _check_input(self, input):
        super()._check_input(input)
        self._check_non_zero_input_channels(input)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """torch's classmethod, giving fastbn layers: `convert(module, sync=True,
        process_group=process_group)` (torch's would make torch layers and drop a fused
        ReLU)."""
        return convert(module, sync=True, process_group=process_group)

    def _sync_group(self, batch_stats):
        if not (batch_stats and self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None


class _LazyFastBatchNorm(_FastBatchNorm):
    """torch's lazy batch norm (num_features from the first input), becoming the fastbn
    layer of `cls_to_become` on that first call. Each lazy class subclasses torch's lazy
    class of its dimension, and, as that, not its batch norm before the first call
    (an initialisation loop over `isinstance(m, nn.BatchNorm2d)` would meet
    uninitialised parameters), so that `isinstance` checks hold as they do for torch's
    layers before and after."""

    def __init__(self, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, activation=None, *, bias=True):
        functional.check_activation(activation)
        # torch's lazy constructor (past _FastBatchNorm's, which takes num_features).
        nn.modules.batchnorm._LazyNormBase.__init__(
            self, eps, momentum, affine, track_running_stats, device, dtype,
            **_torch_bias_kwargs(bias))
        self.activation = activation


class LazyBatchNorm1d(_LazyFastBatchNorm, nn.LazyBatchNorm1d):
    """torch.nn.LazyBatchNorm1d on fastbn kernels."""
    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_LazyFastBatchNorm, nn.LazyBatchNorm2d):
    """torch.nn.LazyBatchNorm2d on fastbn kernels."""
    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_LazyFastBatchNorm, nn.LazyBatchNorm3d):
    """torch.nn.LazyBatchNorm3d on fastbn kernels."""
    cls_to_become = BatchNorm3d


_REPLACEMENTS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d,
                 nn.BatchNorm3d: BatchNorm3d, nn.SyncBatchNorm: SyncBatchNorm}
TORCH_BATCH_NORMS = tuple(_REPLACEMENTS)   # the torch classes convert replaces (exact types)
# Lazy layers not yet run: they become fastbn's when they first see an input.
_LAZY_REPLACEMENTS = {nn.LazyBatchNorm1d: LazyBatchNorm1d, nn.LazyBatchNorm2d: LazyBatchNorm2d,
                      nn.LazyBatchNorm3d: LazyBatchNorm3d}


def _take_over(layer, cls):
    """A `cls` layer that shares `layer`'s parameters, buffers, flags and hooks in the
    dicts themselves (the handles of hooks registered on `layer` still remove them)."""
    new = cls.__new__(cls)
    new.__dict__.update(layer.__dict__)
    return new


def _converted(layer, sync, process_group):
    """The fastbn layer that takes over `layer`'s parameters, buffers, flags and hooks."""
    cls = SyncBatchNorm if sync else _REPLACEMENTS[type(layer)]
    new = _take_over(layer, cls)
    new.activation = getattr(layer, "activation", None)   # a fastbn layer keeps its fusion
    if cls is SyncBatchNorm:
        new.process_group = process_group if sync else layer.process_group
    return new


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hooked(module):
    """Whether hooks would see `module`'s output: its own or global module hooks."""
    return any(getattr(module, name, None) or getattr(nn.modules.module, "_global" + name, None)
               for name in _HOOKS)


def _plain_sequential(module):
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _shared(root):
    """ids of the modules that two places in `root`'s tree hold (two parents, or two
    names in one)."""
    holders = collections.Counter(id(child) for module in root.modules()
                                  for child in module._modules.values() if child is not None)
    return {key for key, count in holders.items() if count > 1}


def _fuse_relu(seq, shared):
    """In a plain nn.Sequential, a fastbn layer that an nn.ReLU directly follows becomes a
    fused copy of itself (its parameters and buffers), and the ReLU nn.Identity. Not
    where either has a hook (it would see the other's output), nor for subclasses with
    their own forward, nor for a layer compiled with Module.compile() (its compiled call
    runs it unfused), nor for a layer held at another place too (`shared`): that one
    stays one layer, where a fused copy would part from it under .to(), .eval() or a
    changed momentum."""
    if not _plain_sequential(seq):
        return
    names = list(seq._modules)
    for first, second in zip(names, names[1:]):
        bn, relu = seq._modules[first], seq._modules[second]
        if (isinstance(bn, _FastBatchNorm) and type(bn).forward is _FastBatchNorm.forward
                and bn.activation is None and type(relu) is nn.ReLU
                and id(bn) not in shared and not (_hooked(bn) or _hooked(relu))
                and not _compiled(bn)):
            fused = _take_over(bn, type(bn))
            fused.activation = "relu"
            seq._modules[first] = fused
            seq._modules[second] = nn.Identity().train(relu.training)


def fuse_relu_along_sequentials(module):
    """Fuse batch norm + ReLU pairs (as `convert(fuse_relu=True)`) only in `module` and
    the nn.Sequentials nested in it through plain nn.Sequentials: there nothing but
    Sequential.forward calls a layer, so fusing cannot change what any other code sees
    (a custom module's forward might call `self.seq[1]` alone). Returns `module`."""
    shared = _shared(module)

    def along(seq):
        if _plain_sequential(seq):
            _fuse_relu(seq, shared)
            for child in seq.children():
                along(child)
    along(module)
    return module


def convert(module, *, fuse_relu=False, sync=False, process_group=None):
    """Replace every torch BatchNorm1d/2d/3d and SyncBatchNorm in `module` by fastbn's
    (a LazyBatchNorm that has not run yet by fastbn's lazy layer of the same kind).

    Parameters and buffers are kept (the same tensors), and so are the training flag,
    device and dtype. With `fuse_relu=True`, a batch norm directly followed by nn.ReLU
    inside an nn.Sequential becomes one fused layer, a copy sharing its tensors (the ReLU
    becomes nn.Identity), except where either module has hooks, the Sequential or the
    batch norm overrides forward, or the batch norm is held at another place too; fusion
    assumes no custom forward calls the batch norm of a pair on its own (a slice of the
    Sequential that ends at it, or a hook added to it afterwards, sees the ReLU's
    output). With
    `sync=True` every batch norm, fastbn's local layers and subclasses of torch's
    included (as torch's `convert_sync_batchnorm` does), becomes a
    fastbn.SyncBatchNorm over `process_group` (default: the whole world). A layer
    reached at several places becomes one converted layer. A batch norm with
    parametrizations or compiled with Module.compile() is refused (ValueError, before
    anything changes). Returns the converted module (a new object only when `module`
    itself is a batch norm). A replaced layer's successor shares its parameter, buffer
    and hook dicts, so that hooks registered before still fire and their handles still
    remove them, but not its flags (training, momentum, eps): use the successor, not the
    replaced layer.
    """
    for child in module.modules():
        _check_convertible(child, sync)
    new = _convert(module, sync, process_group, {})
    if fuse_relu:
        shared = _shared(new)
        for seq in list(new.modules()):
            _fuse_relu(seq, shared)
    return new


def convert_sync_except(module, process_group, keep):
    """`convert(module, sync=True, process_group=process_group)` leaving the modules in
    `keep` as they are (batch norms whose own forward a SyncBatchNorm would drop)."""
    kept = {id(m) for m in keep}
    for child in module.modules():
        if id(child) not in kept:
            _check_convertible(child, True)
    return _convert(module, True, process_group, {id(m): (m, m) for m in keep})


def _replaced(cls, sync):
    """Whether convert puts another object in the place of a module of class `cls`."""
    if sync and issubclass(cls, SyncBatchNorm):
        return False   # kept, with the process group set
    return cls in _REPLACEMENTS or cls in _LAZY_REPLACEMENTS or (sync and issubclass(
        cls, (nn.modules.batchnorm._BatchNorm, _FastBatchNorm)))


def _compiled(module):
    """Whether Module.compile() made `module` run a compiled call of itself: a bound
    method of that object, which another object taking over its dicts would still run."""
    return getattr(module, "_compiled_call_impl", None) is not None


def _check_convertible(module, sync):
    """Refuse, before anything changes, a batch norm that convert cannot replace: one
    with parametrizations (torch.nn.utils.parametrize makes a class for it, which another
    class cannot take: it was skipped, or left broken), one compiled with
    Module.compile() (it would go on running torch's layer), or, for SyncBatchNorm, a
    lazy one that has no channel count yet."""
    if parametrize.is_parametrized(module):
        cls = parametrize.type_before_parametrizations(module)
        if _replaced(cls, sync):
            raise ValueError(f"convert: a {cls.__name__} with parametrizations (on "
                             f"{', '.join(module.parametrizations)}) cannot be converted; "
                             "convert before registering them, or remove them first "
                             "(torch.nn.utils.parametrize.remove_parametrizations)")
    if _compiled(module) and _replaced(type(module), sync):
        raise ValueError(f"convert: a {type(module).__name__} compiled with "
                         "Module.compile() cannot be converted (its compiled call runs "
                         "this layer's forward); convert before compiling it")
    if sync and (type(module) in _LAZY_REPLACEMENTS or isinstance(module, _LazyFastBatchNorm)):
        raise ValueError(f"convert(sync=True): a {type(module).__name__} that has not "
                         "seen an input yet has no channel count; run one forward first")


def _convert(module, sync, process_group, done):
    """`convert`, with `done` mapping id(original) -> (original, its conversion)."""
    if id(module) in done:
        return done[id(module)][1]
    if sync and isinstance(module, SyncBatchNorm):
        module.process_group = process_group
        new = module
    elif type(module) in _LAZY_REPLACEMENTS:
        new = _take_over(module, _LAZY_REPLACEMENTS[type(module)])
        new.activation = None
    elif type(module) in _REPLACEMENTS or (sync and isinstance(
            module, (nn.modules.batchnorm._BatchNorm, _FastBatchNorm))):
        new = _converted(module, sync, process_group)
    else:
        # Every name, not named_children(): that lists a child held twice only once.
        for name, child in list(module._modules.items()):
            if child is not None:
                setattr(module, name, _convert(child, sync, process_group, done))
        new = module
    done[id(module)] = (module, new)   # the original kept alive: its id stays unique
    return new
