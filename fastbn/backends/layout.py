"""Where every backend's element outputs go: torch's batch-norm output layout."""

import torch
from torch._prims_common import suggest_memory_format


def output_format(x):
    """torch's batch-norm output layout for input x (x's suggested memory format:
    channels-last where x is, else contiguous). The common layouts are answered without
    torch's stride analysis."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return suggest_memory_format(x)


def empty_output(x, dtype=None, device=None):
    """An element output for input x, laid out as torch's batch norm lays out its outputs
    and gradients."""
    return torch.empty_like(x, dtype=dtype, device=device, memory_format=output_format(x))


def as_output(t, x):
    """t (x's shape, computed in PyTorch ops, which take their operands' layout) in the
    layout of an element output for input x; no copy when it already is. A torch.func
    wrapper is left as it is: vmap cannot change a batched tensor's memory format; so is
    a tensor under torch.compile (Dynamo cannot trace the storage check; the compiled
    graph's ops choose its layout)."""
    if torch.compiler.is_compiling() or not torch._C._has_storage(t):
        return t
    return t.contiguous(memory_format=output_format(x))
