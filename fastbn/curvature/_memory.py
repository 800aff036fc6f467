"""Peak memory of a call, for sizing matmat chunks to a budget."""

import os

import torch
from torch.profiler import ProfilerActivity, profile


def available_bytes(device):
    """Memory a computation on `device` can still take: CUDA's free memory, or the
    system's available memory (Linux's MemAvailable, else free pages)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def peak_bytes(fn, device):
    """Bytes allocated at the peak of `fn()` above what was allocated when it started.

    CUDA: the caching allocator's peak counter. CPU: the profiler's allocation events
    (allocations minus frees in time order), which see every tensor, unlike tracemalloc.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak
