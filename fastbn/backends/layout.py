"""Where every backend's element outputs go (torch's batch-norm output layout, and in a K
call K outermost), and how the kernels see element tensors: as (K, N, C, L) with the
spatial dims flattened to one stride."""

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


def flat_strides(shape, stride, batched=False, swap=False):
    """(sK, sN, sC, sL) of a tensor of `shape` and `stride` seen as (K, N, C, L) (K: its
    leading dim where `batched`, else sK = 0), or None if its spatial dims do not flatten
    to a single stride. `swap`: no spatial dims, so N runs as the L axis (sN = 0)."""
    lead = 1 if batched else 0
    s_l, expected = None, None
    for size, st in zip(reversed(shape[lead + 2:]), reversed(stride[lead + 2:])):
        if size == 1:
            continue
        if s_l is not None and st != expected:
            return None
        s_l = st if s_l is None else s_l
        expected = st * size
    s_n, s_l = stride[lead], 1 if s_l is None else s_l
    if swap:
        s_n, s_l = 0, s_n
    return (stride[0] if batched else 0, s_n, stride[lead + 1], s_l)


def k_output_order(stride):
    """The dims' order (torch.empty_permuted's) of a K call's element output for an x of
    these strides: the leading K outermost, the rest in x's memory format."""
    order = sorted(range(len(stride)), key=lambda d: (-stride[d], d))
    return (0, *(d + 1 for d in order))
