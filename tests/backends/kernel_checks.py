"""What every backend's kernel tests share: calling an op of the kernel interface on one
problem dict, and comparing with the reference backend (half precision by the upcast
rule of DESIGN.md: error vs the float64 reference at most twice the reference backend's
own error at that dtype, plus a small tolerance)."""

import torch

from fastbn.backends import reference

HALF = (torch.bfloat16, torch.float16)
OPS = ("forward_train", "forward_eval", "backward", "forward_jvp", "backward_backward",
       "backward_jvp")
K_OPS = OPS[2:]   # the ops whose tangent-like arguments may carry a leading K


class NoFallback:
    """Stands in for `reference` inside a backend module: kernel calls must not fall back."""

    def __init__(self, backend):
        self.backend = backend

    def __getattr__(self, attr):
        if attr in ("acc_dtype", "update_running_stats"):
            return getattr(reference, attr)
        raise AssertionError(f"{self.backend} backend fell back to reference.{attr}")


def call(backend, op, p, act):
    """Run `op` of `backend` on the problem dict p (see the test files' _problem)."""
    if op == "forward_train":
        return backend.forward_train(p["x"], p["weight"], p["bias"], 1e-5, act)
    if op == "forward_eval":
        return backend.forward_eval(p["x"], p["mean"], p["running_var"], p["weight"],
                                    p["bias"], 1e-5, act)
    args = (p["x"], p["mean"], p["invstd"], p["weight"], p["bias"], act)
    if op == "backward":
        return backend.backward(p["grad_y"], *args)
    if op == "forward_jvp":
        return backend.forward_jvp(p["x_t"], p["weight_t"], p["bias_t"], *args)
    if op == "backward_backward":
        return backend.backward_backward(p["gg_x"], p["weight_t"], p["bias_t"], p["grad_y"],
                                         *args)
    if op == "backward_jvp":
        return backend.backward_jvp(p["grad_y_t"], p["x_t"], p["weight_t"], p["bias_t"],
                                    p["grad_y"], *args)
    raise ValueError(op)


def upcast(p):
    return {key: None if v is None else v.double() for key, v in p.items()}


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def check(out, ref, ref64, dtype, half_atol):
    """out against the reference's ref (same dtype) and ref64 (float64 inputs);
    half_atol: {dtype: tolerance relative to the output's scale} for bf16/fp16."""
    for o, r, r64 in zip(as_tuple(out), as_tuple(ref), as_tuple(ref64)):
        assert o.shape == r.shape and o.dtype == r.dtype and o.device == r.device
        o, r, r64 = o.cpu(), r.cpu(), r64.cpu()
        scale = max(r64.abs().max().item(), 1.0) if r64.numel() else 1.0
        if dtype == torch.float64:
            torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10 * scale)
        elif dtype == torch.float32:
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5 * scale)
        else:
            err = (o.double() - r64).abs().max().item()
            stock = (r.double() - r64).abs().max().item()
            assert err <= 2 * stock + half_atol[dtype] * scale, (err, stock, scale)
