"""fastbn.batch_norm: torch.nn.functional.batch_norm plus an optional fused activation.

Argument checks happen before anything is touched, so a bad call leaves running
statistics unchanged. Running statistics are updated in place when training, as in
torch, except inside torch.func transforms (grad, vjp, jvp, vmap, ...), which forbid
mutating captured buffers: there the batch statistics are used and the running
statistics are left exactly as they were.
"""

import math
import numbers

import torch
import torch.distributed as dist
from torch.autograd import forward_ad
from torch.overrides import handle_torch_function, has_torch_function_variadic

from fastbn import backends
from fastbn.backends import reference
from fastbn.backends.distributed import SyncKernels
from fastbn.ops import transforms
from fastbn.ops.autograd import EvalForward, TrainForward

ACTIVATIONS = (None, "relu")


def check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected None or 'relu'")


# The dtypes the kernels take; torch's batch norm has no kernel for the others (float8
# included, though a floating-point type).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# torch.batch_norm's argument positions (1-based), as its argument parser names them
_POSITIONS = {"weight": 2, "bias": 3, "running_mean": 4, "running_var": 5}


def _allowed_param_dtypes(dtype):
    if dtype in (torch.float16, torch.bfloat16):
        return (dtype, torch.float32)
    return (dtype,)


def _type_name(value):
    """A type's name as torch's argument parser prints it for the values batch_norm
    meets: a class defined in Python (Tensor) or a builtin (int) bare, an extension's
    static type qualified (numpy.bool, not bool). (Extension types made from a spec,
    such as re.Pattern, come out bare where torch qualifies them.)"""
    kind = type(value)
    heap_type = kind.__flags__ & (1 << 9)   # Py_TPFLAGS_HEAPTYPE
    if heap_type or kind.__module__ == "builtins":
        return kind.__name__
    return f"{kind.__module__}.{kind.__name__}"


def check_scalars(momentum, eps):
    """torch's TypeError for a momentum or eps that is not a number."""
    if type(momentum) is float and type(eps) is float:
        return   # the usual call, without the ABC checks (microseconds on a cold cache)
    for position, name, value in ((7, "momentum", momentum), (8, "eps", eps)):
        if not (isinstance(value, numbers.Real)
                or isinstance(value, torch.Tensor) and value.numel() == 1):
            raise TypeError(f"batch_norm(): argument '{name}' (position {position}) must be "
                            f"float, not {_type_name(value)}")


def check_updatable(buffer):
    """torch's error for an in-place update of a tensor made in inference mode (a layer's
    num_batches_tracked), raised before anything is updated. (torch's kernels write
    running statistics made there from anywhere, and so does fastbn.)"""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return   # allowed in inference mode; dynamo cannot trace either check
    if buffer.is_inference():
        raise RuntimeError("Inplace update to inference tensor outside InferenceMode is not "
                           "allowed.You can make a clone to get a normal tensor before doing "
                           "inplace update.See https://github.com/pytorch/rfcs/pull/17 for "
                           "more details.")


def check_args(input, running_mean, running_var, weight, bias, training, activation, eps,
               synchronized=False):
    """Raise, with torch's wording where torch has one, if the call is invalid.

    `synchronized`: the statistics span a process group, so a local batch of one value
    per channel (or none) is fine."""
    check_activation(activation)
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm(): input must be a Tensor, not {type(input).__name__}")
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"batch_norm(): argument '{name}' (position {_POSITIONS[name]}) "
                            f"must be Tensor, not {_type_name(t)}")
    if not isinstance(training, bool):
        raise TypeError("batch_norm(): argument 'training' (position 6) must be bool, not "
                        f"{_type_name(training)}")
    if input.dim() < 2:
        raise ValueError(f"expected 2D or higher input (got {input.dim()}D input)")
    # torch checks the batch size and eps in Python, before its kernel's checks.
    if training and not synchronized:
        values = input.shape[0] * math.prod(input.shape[2:])
        if values == 1:
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got input size {input.size()}")
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if input.dtype not in KERNEL_DTYPES:
        # torch's name of the scalar type: "torch.LongTensor" -> "Long"
        name = input.type().rsplit(".", 1)[-1].removesuffix("Tensor")
        raise NotImplementedError(f'"batch_norm" not implemented for \'{name}\'')
    channels, device = input.shape[1], input.device
    allowed, set_by = _allowed_param_dtypes(input.dtype), None
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")
        if name[0] == "r" and t.dim() != 1:
            # Updated in place: a reshaped copy would take the update and drop it.
            raise RuntimeError(f"TensorAccessor expected 1 dims but tensor has {t.dim()}: "
                               f"{name} must be a vector of {channels} elements")
        if name[0] == "r" and training and channels > 1 and t.stride(0) == 0:
            # Refused before either is written, not by the second write after the first.
            raise RuntimeError("unsupported operation: more than one element of the "
                               f"written-to tensor refers to a single memory location: "
                               f"{name} is expanded; clone() it to update it in training")
        if t.device != device:
            raise RuntimeError("Expected all tensors to be on the same device, but found "
                               f"{name} on {t.device} and input on {device}")
        if t.dtype not in allowed:
            why = "" if set_by is None else f" as {set_by} has"
            raise RuntimeError(f"mixed dtype: expected {name} to have dtype "
                               f"{' or '.join(str(d) for d in allowed)}{why}, got {t.dtype}")
        if set_by is None and len(allowed) > 1:
            # A reduced-precision input takes its own dtype or float32 for the
            # per-channel tensors, the same for all of them (as torch's CPU kernels).
            allowed, set_by = (t.dtype,), name
    if torch.is_grad_enabled():
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is not None and t.requires_grad:
                raise RuntimeError(f"The function 'native_batch_norm' is not differentiable "
                                   f"with respect to argument '{name}'. This input cannot "
                                   "have requires_grad True.")
        # Not under graph capture: dynamo cannot trace is_inference(). The running
        # statistics are saved for backward too (and would be updated before failing).
        if ((input.requires_grad or weight is not None and weight.requires_grad
             or bias is not None and bias.requires_grad) and not torch.compiler.is_compiling()
                and any(t is not None and t.is_inference()
                        for t in (input, weight, bias, running_mean, running_var))):
            raise RuntimeError(
                "Inference tensors cannot be saved for backward. Please do not use Tensors "
                "created in inference mode in computation tracked by autograd. To work "
                "around this, you can make a clone to get a normal tensor and use it in "
                "autograd, or use `torch.no_grad()` instead of `torch.inference_mode()`.")
    if training and (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or "
                         "neither be None")
    if not training:
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is None:
                raise RuntimeError(f"{name} must be defined in evaluation mode")


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_HALF = (torch.float16, torch.bfloat16)
_is_compiling, _is_tracing = torch.compiler.is_compiling, torch._C._is_tracing
_transforms_active = torch._C._are_functorch_transforms_active
_has_storage = torch._C._has_storage


def direct_eval(input, running_mean, running_var, weight, bias, momentum, eps, activation):
    """An eval call of the common kind made straight to its kernel (or, where autograd
    records it, to the Function around the kernel), or None for any other call, which
    the general path checks and runs.

    The common kind: valid arguments (float momentum and eps, per-channel tensors all of
    shape (C,) on input's device, of input's dtype or all float32 for a half input) that
    nothing but autograd records (no forward AD, torch.func transform, graph capture,
    tensor subclass or function mode). A convolution between two batch norms evicts the
    interpreter's working set, where each layer and check of the general path costs a
    microsecond or more: a small layer's call took twice stock's (RESULTS.md)."""
    # Every check inline, with no generator or helper: each frame counts on a cold cache.
    plain = _PLAIN_TYPES
    if (has_torch_function_variadic(input, running_mean, running_var, weight, bias)
            or type(input) is not torch.Tensor or type(running_mean) not in plain
            or type(running_var) not in plain or type(weight) not in plain
            or type(bias) not in plain
            or type(eps) is not float or eps < 0.0 or type(momentum) is not float
            or activation not in ACTIVATIONS
            or _is_compiling() or _is_tracing() or _transforms_active()
            or forward_ad._current_level >= 0):
        return None
    shape = input.shape
    if len(shape) < 2 or input.dtype not in KERNEL_DTYPES or input.numel() == 0:
        return None
    channels, device, dtype = (shape[1],), input.device, running_mean.dtype
    if (running_mean.shape != channels or running_var.shape != channels
            or weight.shape != channels or bias.shape != channels
            or running_mean.device != device or running_var.device != device
            or weight.device != device or bias.device != device
            or running_var.dtype is not dtype or weight.dtype is not dtype
            or bias.dtype is not dtype
            or dtype is not input.dtype and (dtype is not torch.float32
                                             or input.dtype not in _HALF)):
        return None
    backend = backends.select(input)
    if torch.is_grad_enabled():
        if running_mean.requires_grad or running_var.requires_grad:
            return None   # refused in torch's words by the general path
        if input.requires_grad or weight.requires_grad or bias.requires_grad:
            if (input.is_inference() or running_mean.is_inference()
                    or running_var.is_inference() or weight.is_inference()
                    or bias.is_inference()):
                return None   # likewise: an inference tensor cannot be saved for backward
            return EvalForward.apply(input, running_mean, running_var, weight, bias, eps,
                                     activation, backend)
    if not (_has_storage(input) and _has_storage(weight) and _has_storage(bias)):
        return None   # legacy batched (is_grads_batched): the general path's reference math
    return backend.forward_eval(input, running_mean, running_var, weight, bias, eps,
                                activation)


def direct_train_backend(input, running_mean, running_var, weight, bias, momentum, eps,
                         activation):
    """The backend for a training call of the common kind, which `direct_train` runs
    straight through its Function, or None for any other call, which the general path
    (`check_args`, `checked_batch_norm`) checks and runs.

    The common kind: `direct_eval`'s (valid arguments that nothing but autograd
    records), with eps > 0, more than one value per channel, and running statistics
    both absent or both contiguous vectors (needing no grad where grad mode is on), weight
    and bias given (an affine=False layer's None takes the general path): every check of
    the general path passes for it, and its call comes to the same Function. The modules
    ask before they count the batch. A small layer's training call spent more time in the
    general path's checks and frames than in its Function (RESULTS.md)."""
    # Inline, as direct_eval's; torch functions first, so that a handler of the call sees
    # it before anything else is asked of its arguments.
    plain = _PLAIN_TYPES
    if (has_torch_function_variadic(input, running_mean, running_var, weight, bias)
            or type(input) is not torch.Tensor or type(weight) not in plain
            or type(bias) not in plain
            or type(eps) is not float or not eps > 0.0 or type(momentum) is not float
            or activation not in ACTIVATIONS
            or _is_compiling() or _is_tracing() or _transforms_active()
            or forward_ad._current_level >= 0):
        return None
    shape, tracked = input.shape, running_mean is not None
    # numel() > C: more than one value per channel (and not empty).
    if (len(shape) < 2 or input.dtype not in KERNEL_DTYPES or input.numel() <= shape[1]
            or tracked != (running_var is not None)):
        return None
    channels, device, dtype = (shape[1],), input.device, weight.dtype
    if (weight.shape != channels or bias.shape != channels
            or weight.device != device or bias.device != device or bias.dtype is not dtype
            or dtype is not input.dtype and (dtype is not torch.float32
                                             or input.dtype not in _HALF)):
        return None
    if tracked and (type(running_mean) not in plain or type(running_var) not in plain
                    or running_mean.shape != channels or running_var.shape != channels
                    or running_mean.device != device or running_var.device != device
                    or running_mean.dtype is not dtype or running_var.dtype is not dtype
                    or not running_mean.is_contiguous() or not running_var.is_contiguous()):
        return None
    if torch.is_grad_enabled():
        if tracked and (running_mean.requires_grad or running_var.requires_grad):
            return None   # refused in torch's words by the general path
        if ((input.requires_grad or weight.requires_grad or bias.requires_grad)
                and (input.is_inference() or weight.is_inference() or bias.is_inference()
                     or tracked and (running_mean.is_inference()
                                     or running_var.is_inference()))):
            return None   # likewise: an inference tensor cannot be saved for backward
    return backends.select(input)


def direct_train(input, running_mean, running_var, weight, bias, momentum, eps, activation,
                 backend):
    """A training call that `direct_train_backend` gave `backend` for: its output."""
    return TrainForward.apply(input, weight, bias, running_mean, running_var, momentum, eps,
                              activation, backend)[0]


def _param(t, channels, like, fill):
    """weight or bias as a vector (torch takes any shape of C elements), or `fill`."""
    if t is None:
        return torch.full((channels,), fill, dtype=like.dtype, device=like.device)
    return t if t.dim() == 1 else t.reshape(channels)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, activation=None, *, process_group=None):
    """Batch normalisation over dimension 1, optionally followed by a fused ReLU.

    Same semantics as torch.nn.functional.batch_norm: with `training=True` the batch
    statistics normalise and, when given, running_mean/running_var are updated in place
    with `momentum` (unbiased variance); otherwise the running statistics normalise.
    `activation="relu"` applies ReLU in the same kernel.

    With `process_group` (a torch.distributed group) and `training=True`, the batch
    statistics and every reduction of every derivative span all processes of the group;
    each process must call with the same channel count (its batch may be empty).
    """
    # First: their gates check for torch functions too.
    if training is False:
        out = direct_eval(input, running_mean, running_var, weight, bias, momentum, eps,
                          activation)
        if out is not None:
            return out
    elif training is True and process_group is None:
        backend = direct_train_backend(input, running_mean, running_var, weight, bias,
                                       momentum, eps, activation)
        if backend is not None:
            return direct_train(input, running_mean, running_var, weight, bias, momentum,
                                eps, activation, backend)
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return handle_torch_function(
            batch_norm, (input, running_mean, running_var, weight, bias), input,
            running_mean, running_var, weight, bias, training, momentum, eps, activation,
            process_group=process_group)
    check_scalars(momentum, eps)
    check_args(input, running_mean, running_var, weight, bias, training, activation, eps,
               training and process_group is not None)
    if training and process_group is not None and dist.get_rank(process_group) < 0:
        raise ValueError("batch_norm: this process is not a member of process_group")
    return checked_batch_norm(input, running_mean, running_var, weight, bias, training,
                              momentum, eps, activation, process_group)


def _in_pytorch_ops(input, running_mean, running_var, weight, bias, training, momentum, eps,
                    activation):
    if training:
        return reference.forward_train(input, weight, bias, eps, activation, running_mean,
                                       running_var, momentum)[0]
    return reference.forward_eval(input, running_mean, running_var, weight, bias, eps,
                                  activation)


def checked_batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                       eps, activation, process_group):
    """`batch_norm` once `check_args` has passed (the modules check before they touch
    num_batches_tracked)."""
    synchronized = training and process_group is not None
    if input.numel() == 0 and not synchronized:
        # As torch: an empty output that stays connected to weight and bias.
        out = input.clone()
        if weight is not None:
            out = out * weight.reshape(-1)[0]
        if bias is not None:
            out = out + bias.reshape(-1)[0]
        return out
    channels = input.shape[1]
    weight = _param(weight, channels, input, 1.0)
    bias = _param(bias, channels, input, 0.0)

    # torch.jit.is_tracing() without its is_scripting() call (fastbn is never scripted).
    capturing = torch.compiler.is_compiling() or torch._C._is_tracing()
    if synchronized and (capturing or transforms.nested_forward_mode()):
        raise NotImplementedError("fastbn: a synchronised batch norm runs eagerly (no "
                                  "torch.compile or torch.jit.trace), with at most one level "
                                  "of forward-mode AD")
    if capturing and forward_ad._current_level >= 0:
        # The custom ops that graph capture sees have no forward-mode rule (torch drops
        # the tangent of a dual input): PyTorch ops.
        return _in_pytorch_ops(input, running_mean, running_var, weight, bias, training,
                               momentum, eps, activation)
    if capturing:
        # Graph capture sees only registered ops: the custom ops, not the raw kernels.
        from fastbn.ops import library
        if training:
            y, mean, _, unbiased_var = library.forward_train(input, weight, bias, float(eps),
                                                             activation or "")
            if running_mean is not None:
                # Detached: torch.export and jit.trace drop the no_grad inside.
                reference.blend_running_stats(running_mean, running_var, mean.detach(),
                                              unbiased_var.detach(), momentum)
            return y
        return library.forward_eval(input, running_mean, running_var, weight, bias,
                                    float(eps), activation or "")

    if transforms.nested_forward_mode():
        # Custom jvp rules are wrong under nested forward mode: PyTorch ops (under a
        # transform, training leaves the running statistics as they are).
        if training:
            running_mean = running_var = None
        return _in_pytorch_ops(input, running_mean, running_var, weight, bias, training,
                               momentum, eps, activation)

    backend = SyncKernels(process_group) if synchronized else backends.select(input)
    if training and transforms.under_transform():
        running_mean = running_var = None
    function, args = ((TrainForward, (input, weight, bias, running_mean, running_var,
                                      momentum, eps, activation, backend)) if training else
                      (EvalForward, (input, running_mean, running_var, weight, bias, eps,
                                     activation, backend)))
    out = function.apply(*args)
    return out[0] if training else out
