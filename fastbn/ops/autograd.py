"""The op contract: batch norm and all its derivatives as autograd Functions.

Every derivative of batch norm is itself a kernel call wrapped in a Function that knows
its own derivatives, so any backend's kernels serve every order of autodiff:

    TrainForward    y = BN(x, w, b)                      backward -> TrainBackward
                                                         jvp      -> ForwardJvp
    TrainBackward   (gx, gw, gb) = vjp of BN at gy       backward -> BackwardBackward
                                                         jvp      -> BackwardJvp
    ForwardJvp      y_t = J (x_t, w_t, b_t)              backward -> TrainBackward +
                                                                     BackwardBackward
    BackwardBackward, BackwardJvp                        backward, jvp -> the composite
                                                                     in PyTorch ops (3rd order)
    EvalForward     y = BN with running statistics       derivatives in PyTorch ops

`mean` and `invstd` travel with x as a cache of its statistics: no Function takes
derivatives through them; each derivative formula includes their dependence on x.

vmap rules: when only the tangent-like arguments (cotangents, tangents, grad_y) are
batched, the batch becomes the kernels' leading K dimension and one kernel call serves
all K (the batched-HVP primitive). A batched x or weight (vmap over data or models) folds
the batch into the channels: B batch norms of C channels are one of B * C. Nested
batching of tangents runs the composite (PyTorch ops with statistics recomputed from x)
under torch.vmap.
"""

import functools

import torch
from torch._C._functorch import (TransformType, _add_batch_dim, _unwrap_batched,
                                 _unwrap_for_grad, _unwrap_functional_tensor, _wrap_for_grad,
                                 _wrap_functional_tensor, is_functionaltensor,
                                 is_legacy_batchedtensor, unwrap_if_dead)
from torch._functorch.autograd_function import VmapInfo, custom_function_call
from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter
from torch._functorch.utils import enable_single_level_autograd_function, unwrap_dead_wrappers

from fastbn.backends import reference
from fastbn.backends.layout import as_output

# Positions: every Function below except TrainForward and EvalForward takes
#   (*tangent_like, x, mean, invstd, weight, bias, eps, activation, backend).
_PRIMAL = 5


def _has_k(t, x_dim, per_channel, vmapped):
    """Whether a tangent-like argument carries a leading K dimension besides the one
    the current vmap level adds (`vmapped`); `x_dim`: x's dimensions without that one."""
    return t is not None and t.dim() - vmapped > (1 if per_channel else x_dim)


def _mask_only_grad(ctx, index, bias, activation):
    """The gradient with respect to the bias of a derivative that depends on it only
    through the ReLU mask: zero, not None, so that the bias stays part of the graph, as
    it is in PyTorch's batch norm followed by relu."""
    if activation == "relu" and bias is not None and ctx.needs_input_grad[index]:
        return torch.zeros_like(bias)
    return None


def _sum_k(t, like):
    """Fold the K dimension of a gradient w.r.t. an argument that had none."""
    if like is None or t is None:
        return None
    return t.sum(0) if t.dim() > like.dim() else t


def _legacy_batched(tensors):
    """Whether the legacy vmap behind `autograd.grad(..., is_grads_batched=True)` batches
    any of these: its tensors have no storage."""
    for t in tensors:   # a loop, not any() over a generator: every backward asks
        if t is not None and is_legacy_batchedtensor(t):
            return True
    return False


def _runnable(backend, tensors):
    """The backend, or the reference where it cannot run: legacy batched tensors, which
    only PyTorch ops accept."""
    if not _legacy_batched(tensors):
        return backend
    if _reduction(backend) is not reference.LOCAL:
        raise NotImplementedError(
            "fastbn: autograd.grad(..., is_grads_batched=True) through a synchronised "
            "batch norm is not supported (collectives have no legacy batching rule); "
            "use torch.func.vmap over torch.func.vjp instead")
    return backend if getattr(backend, "runs_pytorch_ops", False) else reference


_PRIMAL_PER_CHANNEL = (False, True, True, True, True)   # x, mean, invstd, weight, bias


def _fold(t, bdim, batch, per_channel):
    """Fold a vmap batch into the channel dimension: B independent batch norms of C
    channels are one of B * C channels. (B, N, C, *) -> (N, B*C, *), (B, C) -> (B*C,)."""
    if t is None:
        return None
    t = t.expand(batch, *t.shape) if bdim is None else t.movedim(bdim, 0)
    if per_channel:
        return t.reshape(-1)
    # Sizes spelled out, no -1: a process's shard of a synchronised batch may hold no
    # samples, and -1 is ambiguous in a reshape of no elements.
    return t.movedim(0, 1).reshape(t.shape[1], t.shape[0] * t.shape[2], *t.shape[3:])


def _channels(x, bdim):
    """The channel count of x as the vmapped function sees it (without dimension bdim)."""
    return x.shape[2 if bdim is not None and bdim <= 1 else 1]


def _unfold(t, batch, per_channel, channels):
    if per_channel:
        return t.reshape(batch, channels)
    return t.reshape(t.shape[0], batch, channels, *t.shape[2:]).movedim(1, 0)


def _unfold_all(out, batch, per_channel, channels):
    """The inverse of _fold for the outputs; `channels` of the unbatched problem (not
    recoverable from the folded outputs for a vmapped dimension of size 0)."""
    if isinstance(out, torch.Tensor):
        return _unfold(out, batch, per_channel[0], channels)
    return tuple(_unfold(t, batch, pc, channels) for t, pc in zip(out, per_channel))


def _all_batched(out):
    """(output, out_dims) for a vmap rule whose outputs all carry the batch at dim 0."""
    return out, (0 if isinstance(out, torch.Tensor) else (0,) * len(out))


def _k_batched(out, x_dim, per_channel):
    """(output, out_dims) for a K call: an output that no batched argument reaches (the
    jvp of backward's gradients for a bias tangent alone) comes back without K."""
    if isinstance(out, torch.Tensor):
        return out, 0 if _has_k(out, x_dim, per_channel[0], False) else None
    return out, tuple(0 if _has_k(t, x_dim, pc, False) else None
                      for t, pc in zip(out, per_channel))


def _reduction(backend):
    """How the backend reduces over the batch (across processes for SyncBatchNorm)."""
    return getattr(backend, "reduction", reference.LOCAL)


def _composite(kernel_name, n_tangent, backend):
    """Reference math with mean/invstd recomputed (differentiably) from x."""
    kernel = getattr(reference, kernel_name)
    reduction = _reduction(backend)
    if reduction is not reference.LOCAL:
        # Its statistics would come out of collectives that autograd and vmap cannot see
        # through: silently wrong third derivatives, batching errors.
        raise NotImplementedError(
            "fastbn: third-order derivatives and nested vmap over tangents (e.g. "
            "torch.func.jacfwd(torch.func.jacrev(f)) of a vector-valued f) are not "
            "supported through a synchronised batch norm; first and second order (hessian "
            "included), jvp and one vmap over tangents are")

    def run(*args, eps, activation):
        tangents, (x, _mean, _invstd, weight, bias) = args[:n_tangent], args[n_tangent:]
        mean, _, invstd = reference.statistics(x, eps, reduction)
        return kernel(*tangents, x, mean, invstd, weight, bias, activation,
                      reduction=reduction)
    return run


_UNTRACKED_TYPES = (torch.Tensor, torch.nn.Parameter)


def _tracked(args):
    """Whether autograd or forward-mode AD can see a call with these arguments, or a
    tensor subclass could intercept it (torch.func transforms are checked before)."""
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    grad_mode = torch.is_grad_enabled()
    for t in args:
        if isinstance(t, torch.Tensor) and (type(t) not in _UNTRACKED_TYPES
                                            or (grad_mode and t.requires_grad)):
            return True
    return False


def _apply_below(interpreter, function, args, grad_mode):
    """function.apply(*args) one level below the grad or jvp transform `interpreter`,
    on the arguments unwrapped from its level, in grad mode `grad_mode` with forward
    grad on; the outputs wrapped back to its level. (No output is an argument, whose
    identity functorch keeps for mark_dirty.)"""
    level = interpreter.level()
    unwrapped = [_unwrap_for_grad(a, level) if isinstance(a, torch.Tensor) else a
                 for a in args]
    with torch.set_grad_enabled(grad_mode), \
            torch.autograd.forward_ad._set_fwd_grad_enabled(True), interpreter.lower():
        out = function.apply(*unwrapped)
    if isinstance(out, torch.Tensor):
        return _wrap_for_grad(out, level)
    return tuple(_wrap_for_grad(t, level) if isinstance(t, torch.Tensor) else t for t in out)


@functools.cache
def _single_level(cls, grad_mode):
    """cls as a Function of the innermost grad or jvp transform's level, built once:
    functorch's custom_function_call builds one per call (two classes, through
    autograd's metaclass, and pytree maps over the arguments and outputs), most of a
    small layer's call under torch.func. Its forward runs cls one level down in grad
    mode `grad_mode` (the single-level Function turns both grad modes off). Named as
    functorch names its own (the node's name shows in autograd's errors)."""
    return type(f"{cls.__name__}Generated", (torch.autograd.function._SingleLevelFunction,),
                {"forward": staticmethod(lambda *operands: _apply_below(
                    retrieve_current_functorch_interpreter(), cls, operands, grad_mode)),
                 "setup_context": staticmethod(cls.setup_context),
                 "backward": staticmethod(cls.backward), "jvp": staticmethod(cls.jvp)})


def _apply_functionalized(interpreter, cls, args):
    """cls.apply(*args) under torch.func.functionalize, which has no rule for
    autograd.Function: one level down, on the tensors the functional wrappers hold
    (synchronised first), the outputs wrapped back. The Functions here return new
    tensors; the running statistics a training forward updates are written in place
    where they are, as torch's kernel writes them under functionalize."""
    level = interpreter.level()
    unwrapped = []
    for a in args:
        if isinstance(a, torch.Tensor) and is_functionaltensor(a):
            torch._sync(a)
            a = _unwrap_functional_tensor(a, interpreter.functionalize_add_back_views())
        unwrapped.append(a)
    with interpreter.lower():
        out = cls.apply(*unwrapped)
    if isinstance(out, torch.Tensor):
        return _wrap_functional_tensor(out, level)
    return tuple(_wrap_functional_tensor(t, level) if isinstance(t, torch.Tensor) else t
                 for t in out)


def _apply_under_transform(cls, args):
    """cls.apply(*args) at the innermost torch.func level, as functorch's
    custom_function_call runs it (after its dispatch unwraps dead wrappers), without its
    per-call classes and pytree maps; for the Functions of this module only (see
    `_Function`). One difference: below a jvp level the Function runs in the caller's
    grad mode, as torch's own ops do (functorch turns grad on, so a jvp under no_grad
    returned a primal output that required grad)."""
    interpreter = retrieve_current_functorch_interpreter()
    key = interpreter.key()
    args = [unwrap_if_dead(a) if isinstance(a, torch.Tensor) else a for a in args]
    if key == TransformType.Vmap:
        level, unwrapped, in_dims = interpreter.level(), [], []
        for a in args:
            u, d = _unwrap_batched(a, level) if isinstance(a, torch.Tensor) else (a, None)
            unwrapped.append(u)
            in_dims.append(d)
        with interpreter.lower():
            if all(d is None for d in in_dims):   # nothing batched at this level
                return cls.apply(*args)
            info = VmapInfo(interpreter.batch_size(), interpreter.randomness())
            out, out_dims = cls.vmap(info, tuple(in_dims), *unwrapped)
        if isinstance(out, torch.Tensor):
            return out if out_dims is None else _add_batch_dim(out, out_dims, level)
        return tuple(_add_batch_dim(t, d, level) if isinstance(t, torch.Tensor) and d is not None
                     else t for t, d in zip(out, out_dims, strict=True))
    if key == TransformType.Functionalize:
        return _apply_functionalized(interpreter, cls, args)
    if key not in (TransformType.Grad, TransformType.Jvp):
        return custom_function_call(cls, *args)
    lift = interpreter._cptr.lift   # to this level, as functorch's grad and jvp do
    args = [lift(a) if isinstance(a, torch.Tensor) else a for a in args]
    function = _single_level(cls, key == TransformType.Grad or torch.is_grad_enabled())
    with enable_single_level_autograd_function():
        return function.apply(*args)


class _Function(torch.autograd.Function):
    """autograd.Function with a cheaper apply: it skips torch's per-call
    inspect.signature binding (every argument here is positional, so there is nothing
    to bind), and where nothing can differentiate the call (a backward without
    create_graph, a layer whose inputs need no grad) it runs the forward alone, without
    the ~10 µs of building a graph node no one reads. Under torch.func transforms
    `_apply_under_transform` applies it, which asks what every Function here does: a
    forward that returns new tensors (a tensor or a tuple; no argument returned, nothing
    marked dirty) and a vmap rule whose out_dims match its outputs one for one."""

    @classmethod
    def apply(cls, *args):
        if torch._C._are_functorch_transforms_active():
            return _apply_under_transform(cls, args)
        if not _tracked(args):
            return cls.forward(*args)
        return super(torch.autograd.Function, cls).apply(*unwrap_dead_wrappers(args))


def _tangent_apply(function, *args):
    """function.apply(*args) for the tangent a jvp rule returns. Under torch.func's jvp
    the rule runs at the jvp's level with forward grad off, where nothing tracks the
    tangent: only the levels below can. So it runs there directly, on the arguments
    unwrapped from the rule's level, and is wrapped back, without the single-level
    Function (a graph node no one reads) that apply would make at the rule's level.
    (A backward rule cannot: autograd.grad with create_graph inside a grad transform
    differentiates its result at the rule's own level.)"""
    if torch._C._are_functorch_transforms_active():
        interpreter = retrieve_current_functorch_interpreter()
        if interpreter.key() == TransformType.Jvp:
            # In the caller's grad mode, as below any jvp level: a grad transform below
            # has it on, and under no_grad nothing records the tangent (as torch's own
            # jvp rules).
            return _apply_below(interpreter, function, args, torch.is_grad_enabled())
    return function.apply(*args)


class _KernelFunction(_Function):
    """Shared vmap rule and context handling for Functions of the argument layout above."""

    kernel = None              # name of the backend function
    per_channel = ()           # one bool per tangent-like argument: (C,) rather than x-shaped
    out_per_channel = ()       # the same for each output

    @classmethod
    def n_tangent(cls):
        return len(cls.per_channel)

    @classmethod
    def apply(cls, *args):
        if torch.is_grad_enabled() and _legacy_batched(args[:-3]):
            # is_grads_batched=True with create_graph=True: under the legacy vmap autograd
            # gives a Function's outputs no graph, and higher derivatives would silently
            # lose batch norm's part. The composite's PyTorch ops keep it.
            *tensors, eps, activation, backend = args
            _runnable(backend, tensors)   # refuses a synchronised batch norm in words
            return _composite(cls.kernel, cls.n_tangent(), backend)(
                *tensors, eps=eps, activation=activation)
        return super().apply(*args)

    # The autograd.Function protocol, shared: classmethods, so each subclass's kernel and
    # argument kinds are found through cls.
    @classmethod
    def forward(cls, *args):
        *tensors, eps, activation, backend = args
        return getattr(_runnable(backend, tensors), cls.kernel)(*tensors, activation)

    @classmethod
    def setup_context(cls, ctx, inputs, output):
        *tensors, eps, activation, backend = inputs
        ctx.save_for_backward(*[t for t in tensors if t is not None])
        ctx.save_for_forward(*[t for t in tensors if t is not None])
        ctx.present = [t is not None for t in tensors]
        ctx.options = (eps, activation, backend)

    @staticmethod
    def _saved(ctx, tensors):
        it = iter(tensors)
        return [next(it) if present else None for present in ctx.present]

    @classmethod
    def vmap(cls, info, in_dims, *args):
        n = cls.n_tangent()
        tangents, primal, options = args[:n], args[n:n + _PRIMAL], args[n + _PRIMAL:]
        x_dim = primal[0].dim() - (in_dims[n] is not None)
        primal_batched = any(d is not None for d in in_dims[n:n + _PRIMAL])
        nested = any(_has_k(t, x_dim, pc, d is not None)
                     for t, pc, d in zip(tangents, cls.per_channel, in_dims))
        if not primal_batched and not nested and info.batch_size == 1:
            # One tangent (jacrev of a scalar: hessian's inner level): an unbatched call,
            # so that an outer transform sees no K dimension (it would count as nested).
            out = cls.apply(*(t if d is None else t.select(d, 0)
                              for t, d in zip(tangents, in_dims)), *primal, *options)
            return out, (None if isinstance(out, torch.Tensor) else (None,) * len(out))
        if not primal_batched and not nested:
            moved = [t if d is None else t.movedim(d, 0) for t, d in zip(tangents, in_dims)]
            return _k_batched(cls.apply(*moved, *primal, *options), x_dim,
                              cls.out_per_channel)
        if not nested:
            kinds = cls.per_channel + _PRIMAL_PER_CHANNEL
            folded = [_fold(t, d, info.batch_size, pc)
                      for t, d, pc in zip(args[:n + _PRIMAL], in_dims, kinds)]
            out = cls.apply(*folded, *options)
            return _all_batched(_unfold_all(out, info.batch_size, cls.out_per_channel,
                                            _channels(primal[0], in_dims[n])))
        eps, activation, backend = options
        composite = functools.partial(_composite(cls.kernel, n, backend),
                                      eps=eps, activation=activation)
        return _all_batched(torch.vmap(composite, in_dims=tuple(in_dims[:n + _PRIMAL]))(
            *args[:n + _PRIMAL]))

    @classmethod
    def _composite_of_saved(cls, ctx):
        """(f, inputs, positions): the composite as a function of the saved arguments that
        are present, mean and invstd excepted (a cache, not inputs)."""
        eps, activation, backend = ctx.options
        args = cls._saved(ctx, ctx.saved_tensors)
        n = cls.n_tangent()
        composite = _composite(cls.kernel, n, backend)
        positions = [i for i, t in enumerate(args) if t is not None and i not in (n + 1, n + 2)]

        def f(*inputs):
            full = list(args)
            for i, t in zip(positions, inputs):
                full[i] = t
            return composite(*full, eps=eps, activation=activation)
        return f, [args[i] for i in positions], positions

    @classmethod
    def backward(cls, ctx, *grads):
        """Reverse mode through the composite (PyTorch ops): the third order, for the
        second-order Functions; the others override it with kernel Functions."""
        f, inputs, positions = cls._composite_of_saved(ctx)
        out, vjp = torch.func.vjp(f, *inputs)
        got = vjp(tuple(torch.zeros_like(o) if g is None else g for o, g in zip(out, grads)))
        result = [None] * (cls.n_tangent() + _PRIMAL + 3)
        for i, g in zip(positions, got):
            result[i] = g
        return tuple(result)

    @classmethod
    def jvp(cls, ctx, *tangents):
        """Forward mode through the composite: the third order, for the second-order
        Functions. The transpose of the (linear) vjp, by reverse mode twice: forward mode
        cannot nest inside the forward-mode level that calls this rule."""
        f, inputs, positions = cls._composite_of_saved(ctx)
        out, vjp = torch.func.vjp(f, *inputs)
        _, transpose = torch.func.vjp(lambda *cot: vjp(cot), *(torch.zeros_like(o) for o in out))
        return transpose(tuple(torch.zeros_like(t) if tangents[i] is None else tangents[i]
                               for t, i in zip(inputs, positions)))


class TrainBackward(_KernelFunction):
    """(grad_y, x, mean, invstd, weight, bias) -> (grad_x, grad_weight, grad_bias)."""

    kernel = "backward"
    per_channel = (False,)
    out_per_channel = (False, True, True)

    @staticmethod
    def backward(ctx, gg_x, gg_weight, gg_bias):
        grad_y, x, mean, invstd, weight, bias = TrainBackward._saved(ctx, ctx.saved_tensors)
        eps, activation, backend = ctx.options
        g_grad_y, g_x, g_weight = BackwardBackward.apply(
            gg_x, gg_weight, gg_bias, grad_y, x, mean, invstd, weight, bias,
            eps, activation, backend)
        return (g_grad_y, _sum_k(g_x, x), None, None, _sum_k(g_weight, weight),
                _mask_only_grad(ctx, 5, bias, activation), None, None, None)

    @staticmethod
    def jvp(ctx, grad_y_t, x_t, _mean_t, _invstd_t, weight_t, bias_t, *_):
        grad_y, x, mean, invstd, weight, bias = TrainBackward._saved(ctx, ctx.saved_tensors)
        eps, activation, backend = ctx.options
        return _tangent_apply(BackwardJvp, grad_y_t, x_t, weight_t, bias_t, grad_y, x, mean,
                              invstd, weight, bias, eps, activation, backend)


class ForwardJvp(_KernelFunction):
    """(x_t, weight_t, bias_t, x, mean, invstd, weight, bias) -> y_t."""

    kernel = "forward_jvp"
    per_channel = (False, True, True)
    out_per_channel = (False,)

    @staticmethod
    def backward(ctx, grad_y_t):
        # y_t = J t is linear in t: its transpose is the first-order backward; the
        # dependence on the primal is the mixed second derivative, i.e. BackwardBackward
        # with the tangents in the role of the cotangents.
        x_t, weight_t, bias_t, x, mean, invstd, weight, bias = ForwardJvp._saved(
            ctx, ctx.saved_tensors)
        eps, activation, backend = ctx.options
        g_x_t, g_weight_t, g_bias_t = TrainBackward.apply(
            grad_y_t, x, mean, invstd, weight, bias, eps, activation, backend)
        _, g_x, g_weight = BackwardBackward.apply(
            x_t, weight_t, bias_t, grad_y_t, x, mean, invstd, weight, bias,
            eps, activation, backend)
        return (_sum_k(g_x_t, x_t), _sum_k(g_weight_t, weight_t), _sum_k(g_bias_t, bias_t),
                _sum_k(g_x, x), None, None, _sum_k(g_weight, weight),
                _mask_only_grad(ctx, 7, bias, activation), None, None, None)


class BackwardBackward(_KernelFunction):
    """(gg_x, gg_weight, gg_bias, grad_y, x, mean, invstd, weight, bias)
    -> (g_grad_y, g_x, g_weight): the vector-Jacobian product of TrainBackward."""

    kernel = "backward_backward"
    per_channel = (False, True, True, False)
    out_per_channel = (False, False, True)


class BackwardJvp(_KernelFunction):
    """(grad_y_t, x_t, weight_t, bias_t, grad_y, x, mean, invstd, weight, bias)
    -> tangents of (grad_x, grad_weight, grad_bias): the jvp of TrainBackward."""

    kernel = "backward_jvp"
    per_channel = (False, False, True, True, False)
    out_per_channel = (False, True, True)


def bias_to_save(ctx, bias, activation):
    """bias, where the derivatives read it (the ReLU mask), else None: as in torch, whose
    derivative does not read it, a change to it in place before the backward is fine.
    Its dtype is kept for the stand-in (`saved_bias`)."""
    ctx.bias_dtype = bias.dtype
    return bias if activation == "relu" else None


def saved_bias(ctx, bias, weight):
    """The saved bias, or a stand-in of its shape and dtype where no derivative reads its
    values (grad_bias takes that dtype: a float32 bias beside a bfloat16 weight stays
    float32): weight, detached, where the dtypes agree (new zeros took 4 µs of a (1024,
    512) backward: the kernel before had streamed the caches), else zeros."""
    if bias is not None:
        return bias
    if weight.dtype == ctx.bias_dtype:
        return weight.detach()
    return torch.zeros(weight.shape, dtype=ctx.bias_dtype, device=weight.device)


class TrainForward(_Function):
    """(x, weight, bias, running_mean, running_var) -> (y, mean, invstd), batch statistics.

    Running statistics (when given) are updated in place by the kernel; mean and invstd
    are non-differentiable outputs."""

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, momentum, eps, activation, backend):
        kernels = _runnable(backend, (x, weight, bias))
        return kernels.forward_train(x, weight, bias, eps, activation, running_mean, running_var,
                                     momentum)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, _, _, _, eps, activation, backend = inputs
        _, mean, invstd = output
        ctx.mark_non_differentiable(mean, invstd)
        # No zero tensors made for absent gradients or tangents: the rules take None, and
        # the statistics' gradients are never read (two allocations a backward).
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, mean, invstd, weight, bias_to_save(ctx, bias, activation))
        ctx.save_for_forward(x, mean, invstd, weight, bias)
        ctx.options = (eps, activation, backend)

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_invstd):
        x, mean, invstd, weight, bias = ctx.saved_tensors
        if grad_y is None:   # y's gradient is zero
            if _reduction(ctx.options[2]) is reference.LOCAL:
                return (None,) * 9   # so are all (as torch's, None)
            # A synchronised batch norm's backward is collective: every process joins.
            grad_y = torch.zeros_like(x)
        grad_x, grad_weight, grad_bias = TrainBackward.apply(
            grad_y, x, mean, invstd, weight, saved_bias(ctx, bias, weight), *ctx.options)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, *_):
        x, mean, invstd, weight, bias = ctx.saved_tensors
        y_t = _tangent_apply(ForwardJvp, x_t, weight_t, bias_t, x, mean, invstd, weight, bias,
                             *ctx.options)
        return y_t, None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, running_mean, running_var, momentum, eps,
             activation, backend):
        # A batched x or weight (vmap over data or over models): each instance has its own
        # statistics, so the batch folds into the channels. Running statistics are never
        # passed under a transform.
        batch = info.batch_size
        folded = [_fold(t, d, batch, pc)
                  for t, d, pc in zip((x, weight, bias), in_dims, (False, True, True))]
        out = TrainForward.apply(*folded, None, None, momentum, eps, activation, backend)
        return (_unfold_all(out, batch, (False, True, True), _channels(x, in_dims[0])),
                (0, 0, 0))


def _eval_parts(x, running_mean, running_var, weight, bias, eps, activation):
    """xhat, scale = weight * invstd and the pre-activation (None without ReLU), in
    PyTorch ops."""
    acc = reference.acc_dtype(x.dtype)
    invstd = torch.rsqrt(running_var.to(acc) + eps)
    xhat = reference.xhat_of(x, running_mean.to(acc), invstd)
    scale = weight.to(acc) * invstd
    pre = reference.pre_activation(xhat, weight, bias) if activation == "relu" else None
    return xhat, scale, pre


def _through_relu(t, pre):
    """t where the ReLU passes, as torch's relu backward: its derivative with respect to
    the pre-activation is zero, but it keeps weight and bias in the graph, as in torch."""
    return t if pre is None else torch.ops.aten.threshold_backward(t, pre, 0)


def eval_backward(grad_y, x, running_mean, running_var, weight, bias, eps, activation):
    """Vector-Jacobian product of batch norm with fixed statistics, in PyTorch ops."""
    xhat, scale, pre = _eval_parts(x, running_mean, running_var, weight, bias, eps, activation)
    d = x.dim()
    g = _through_relu(grad_y.to(xhat.dtype), pre)
    grad_x = as_output((g * reference.per_channel(scale, d)).to(x.dtype), x)
    grad_bias, grad_weight = reference.sums(d, g, g * xhat)
    grad_weight, grad_bias = grad_weight.to(weight.dtype), grad_bias.to(bias.dtype)
    return grad_x, grad_weight, grad_bias


class EvalForward(_Function):
    """(x, running_mean, running_var, weight, bias) -> y with fixed statistics.

    An affine map per channel: its derivatives are written in PyTorch ops, which every
    transform differentiates further."""

    @staticmethod
    def forward(x, running_mean, running_var, weight, bias, eps, activation, backend):
        kernels = _runnable(backend, (x, weight, bias))
        return kernels.forward_eval(x, running_mean, running_var, weight, bias, eps, activation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, running_mean, running_var, weight, bias, eps, activation, _ = inputs
        # Copies, not the buffers: a training call before the backward updates those in
        # place, and the derivatives are of the statistics this call used.
        running_mean, running_var = running_mean.clone(), running_var.clone()
        ctx.save_for_backward(x, running_mean, running_var, weight,
                              bias_to_save(ctx, bias, activation))
        ctx.save_for_forward(x, running_mean, running_var, weight, bias)
        ctx.options = (eps, activation)
        ctx.set_materialize_grads(False)   # as TrainForward's

    @staticmethod
    def backward(ctx, grad_y):
        if grad_y is None:   # y's gradient is zero: so are all (as torch's, None)
            return (None,) * 8
        x, running_mean, running_var, weight, bias = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = eval_backward(
            grad_y, x, running_mean, running_var, weight, saved_bias(ctx, bias, weight),
            *ctx.options)
        return grad_x, None, None, grad_weight, grad_bias, None, None, None

    @staticmethod
    def jvp(ctx, x_t, _rm_t, _rv_t, weight_t, bias_t, *_):
        x, running_mean, running_var, weight, bias = ctx.saved_tensors
        xhat, scale, pre = _eval_parts(x, running_mean, running_var, weight, bias, *ctx.options)
        d = x.dim()
        y_t = torch.zeros_like(xhat)
        if x_t is not None:
            y_t = y_t + x_t.to(xhat.dtype) * reference.per_channel(scale, d)
        if weight_t is not None:
            y_t = y_t + xhat * reference.per_channel(weight_t.to(xhat.dtype), d)
        if bias_t is not None:
            y_t = y_t + reference.per_channel(bias_t.to(xhat.dtype), d)
        return _through_relu(y_t, pre).to(x.dtype)

    @staticmethod
    def vmap(info, in_dims, x, running_mean, running_var, weight, bias, eps, activation,
             backend):
        def composite(*tensors):
            return reference.forward_eval(*tensors, eps, activation)
        out = torch.vmap(composite, in_dims=tuple(in_dims[:5]))(
            x, running_mean, running_var, weight, bias)
        return out, 0
