"""Peak memory of a call, for sizing matmat chunks to a budget."""

import contextlib
import os
import sys

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


def can_measure(device):
    """Whether `peak_bytes` can run now. On CPU it needs a profiler session of its own,
    and torch runs one at a time: starting one inside a user's session ends theirs."""
    return torch.device(device).type == "cuda" or not torch._C._autograd._profiler_enabled()


@contextlib.contextmanager
def _file_descriptor_2_silenced():
    """File descriptor 2 goes to os.devnull inside the block: kineto's C++ code writes a
    line there at every profiler start and stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(fn, device):
    """Bytes allocated at the peak of `fn()` above what was allocated when it started.

    CUDA: the caching allocator's peak counter. CPU: the profiler's allocation events
    (allocations minus frees in time order), which see every tensor, unlike tracemalloc;
    only where `can_measure`.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _file_descriptor_2_silenced():
        prof.__enter__()
    try:
        fn()
    finally:
        with _file_descriptor_2_silenced():
            prof.__exit__(None, None, None)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak
