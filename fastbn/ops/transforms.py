"""What the functorch interpreter stack says about the current call."""

import torch
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters


def active_transforms():
    """The torch.func transforms (grad, vjp, jvp, vmap, ...) wrapping the current call."""
    return [interpreter.key() for interpreter in retrieve_all_functorch_interpreters()]


def under_transform():
    """Under a torch.func transform that refuses writes to tensors from outside it: any
    but functionalize, which records them (torch's batch norm updates its running
    statistics there)."""
    # The C flag first: it costs a tenth of walking the interpreter stack.
    if not torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        return False
    return any(key != TransformType.Functionalize for key in active_transforms())


def nested_forward_mode():
    """Two or more forward-mode levels: custom `jvp` rules give wrong tangents there."""
    if not torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        return False
    return sum(key == TransformType.Jvp for key in active_transforms()) >= 2
