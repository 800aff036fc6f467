"""Keeping freed memory in the process, for CPU workloads that allocate large tensors.

glibc's malloc hands tensors under 32 MiB out of its heap and gives the heap's free top
back to the operating system once it exceeds a threshold that adapts to the largest
block freed so far (twice it). A step that frees two or three outputs of a few tens of MB
(a forward and its jvp, a backward) crosses it, and the next step's outputs are fresh
pages again: the kernel zeroes and maps each 4 KiB page on first write, which costs
more than the write itself. `keep_freed_memory` raises both thresholds so freed blocks
stay in the heap for the next step. It is a process-wide setting that speeds up stock
PyTorch ops as much as fastbn's, which is why fastbn never applies it by itself; the
benchmark runner's --keep-freed-memory times both under it.
"""

import ctypes
import ctypes.util
import functools
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.lru_cache(maxsize=None)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None   # glibc only (not musl)
    except OSError:
        return None


def keep_freed_memory(max_bytes=1 << 30):
    """Let malloc keep up to `max_bytes` of freed memory and serve blocks of up to that
    size from its heap instead of fresh mappings (a glibc that caps that threshold at
    32 MiB gets 32 MiB). Returns whether the setting applied: False where the C library
    is not glibc."""
    if not isinstance(max_bytes, int) or not 0 < max_bytes < 2 ** 31:
        raise ValueError(f"max_bytes must be an int in (0, 2**31), got {max_bytes!r}")
    libc = _libc()
    if libc is None or not libc.mallopt(_M_TRIM_THRESHOLD, max_bytes):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, max_bytes)
                or libc.mallopt(_M_MMAP_THRESHOLD, min(max_bytes, 32 << 20)))
