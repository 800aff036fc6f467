"""Where every backend's element outputs go: torch's batch-norm output layout."""

import torch
from torch._prims_common import suggest_memory_format


def empty_output(x, dtype=None, device=None):
    """An element output for input x, laid out as torch's batch norm lays out its outputs
    and gradients (x's suggested memory format: channels-last where x is, else
    contiguous). The common layouts are answered without torch's stride analysis."""
    if x.is_contiguous():
        layout = torch.contiguous_format
    elif x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        layout = torch.channels_last
    elif x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        layout = torch.channels_last_3d
    else:
        layout = suggest_memory_format(x)
    return torch.empty_like(x, dtype=dtype, device=device, memory_format=layout)
