"""The op as torch.library custom ops: the route torch.compile traces.

Dynamo cannot trace an autograd.Function with a custom `jvp`, so under
`torch.compiler.is_compiling()` the functional layer calls these ops instead. They cover
forward (train and eval), backward and double backward; derivatives beyond the second
are not available inside a compiled graph. Autograd needs functional ops, so running
statistics are updated outside the op, from the batch mean and unbiased variance it
returns (`reference.blend_running_stats`).
"""

from typing import Optional

import torch
from torch import Tensor

from fastbn import backends
from fastbn.backends import reference
from fastbn.backends.layout import empty_output
from fastbn.ops.autograd import bias_to_save, eval_backward, saved_bias


def _activation(name):
    return name or None   # schemas carry "" for no activation


def _stats_like(x):
    return x.new_empty(x.shape[1], dtype=reference.acc_dtype(x.dtype))


# Every element output is laid out as torch's batch norm lays out x's (empty_output), as
# the fake kernels declare; a backend may return another layout (a grad_y laid out unlike
# x, say), and compiled code relies on the declared strides.
def _like_x(out, x):
    if out is None or out.stride() == empty_output(x, device="meta").stride():
        return out
    return empty_output(x).copy_(out)


@torch.library.custom_op("fastbn::forward_train", mutates_args=())
def forward_train(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                  activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, unbiased variance): the variance comes from the backend's own
    running-statistics update with momentum 1 (exact where var << eps, unlike one
    recovered from invstd)."""
    batch_mean, batch_var = _stats_like(x), _stats_like(x)
    y, mean, invstd = backends.select(x).forward_train(
        x, weight, bias, eps, _activation(activation), batch_mean.zero_(), batch_var.zero_(),
        1.0)
    return _like_x(y, x), mean, invstd, batch_var


@forward_train.register_fake
def _(x, weight, bias, eps, activation):
    return empty_output(x), _stats_like(x), _stats_like(x), _stats_like(x)


@torch.library.custom_op("fastbn::forward_eval", mutates_args=())
def forward_eval(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor,
                 bias: Tensor, eps: float, activation: str) -> Tensor:
    return _like_x(backends.select(x).forward_eval(x, running_mean, running_var, weight,
                                                   bias, eps, _activation(activation)), x)


@forward_eval.register_fake
def _(x, running_mean, running_var, weight, bias, eps, activation):
    return empty_output(x)


@torch.library.custom_op("fastbn::backward", mutates_args=())
def backward(grad_y: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor,
             bias: Tensor, activation: str) -> tuple[Tensor, Tensor, Tensor]:
    grad_x, grad_weight, grad_bias = backends.select(x).backward(
        grad_y, x, mean, invstd, weight, bias, _activation(activation))
    return _like_x(grad_x, x), grad_weight, grad_bias


@backward.register_fake
def _(grad_y, x, mean, invstd, weight, bias, activation):
    return empty_output(x), torch.empty_like(weight), torch.empty_like(bias)


@torch.library.custom_op("fastbn::backward_backward", mutates_args=())
def backward_backward(gg_x: Optional[Tensor], gg_weight: Optional[Tensor],
                      gg_bias: Optional[Tensor], grad_y: Tensor, x: Tensor, mean: Tensor,
                      invstd: Tensor, weight: Tensor, bias: Tensor,
                      activation: str) -> tuple[Tensor, Tensor, Tensor]:
    g_grad_y, g_x, g_weight = backends.select(x).backward_backward(
        gg_x, gg_weight, gg_bias, grad_y, x, mean, invstd, weight, bias,
        _activation(activation))
    return _like_x(g_grad_y, x), _like_x(g_x, x), g_weight


@backward_backward.register_fake
def _(gg_x, gg_weight, gg_bias, grad_y, x, mean, invstd, weight, bias, activation):
    return empty_output(x), empty_output(x), torch.empty_like(weight)


def _setup_forward_train(ctx, inputs, output):
    x, weight, bias, _, activation = inputs
    _, mean, invstd, _ = output
    ctx.save_for_backward(x, mean, invstd, weight, bias_to_save(ctx, bias, activation))
    ctx.activation = activation


def _backward_forward_train(ctx, grad_y, _grad_mean, _grad_invstd, _grad_var):
    x, mean, invstd, weight, bias = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = backward(grad_y, x, mean, invstd, weight,
                                              saved_bias(ctx, bias, weight), ctx.activation)
    return grad_x, grad_weight, grad_bias, None, None


def _setup_backward(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])
    ctx.activation = inputs[6]


def _backward_backward(ctx, gg_x, gg_weight, gg_bias):
    grad_y, x, mean, invstd, weight, bias = ctx.saved_tensors
    g_grad_y, g_x, g_weight = backward_backward(gg_x, gg_weight, gg_bias, grad_y, x, mean,
                                                invstd, weight, bias, ctx.activation)
    return g_grad_y, g_x, None, None, g_weight, None, None


def _setup_backward_backward(ctx, inputs, output):
    pass


def _third_order(ctx, *grads):
    raise RuntimeError("fastbn: derivatives beyond the second are not supported inside "
                       "torch.compile; differentiate the eager model instead")


def _setup_forward_eval(ctx, inputs, output):
    x, running_mean, running_var, weight, bias, _, activation = inputs
    ctx.save_for_backward(x, running_mean, running_var, weight,
                          bias_to_save(ctx, bias, activation))
    ctx.options = inputs[5:]


def _backward_forward_eval(ctx, grad_y):
    x, running_mean, running_var, weight, bias = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = eval_backward(
        grad_y, x, running_mean, running_var, weight, saved_bias(ctx, bias, weight),
        ctx.options[0], _activation(ctx.options[1]))
    return grad_x, None, None, grad_weight, grad_bias, None, None


forward_train.register_autograd(_backward_forward_train, setup_context=_setup_forward_train)
backward.register_autograd(_backward_backward, setup_context=_setup_backward)
backward_backward.register_autograd(_third_order, setup_context=_setup_backward_backward)
forward_eval.register_autograd(_backward_forward_eval, setup_context=_setup_forward_eval)
