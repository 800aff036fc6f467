"""One seed, independent random streams: each use of randomness (initial weights, the
DLN task, the batch order, the theory batch) draws from a generator of its own, seeded
from (seed, stream name). Seeding two uses with the seed itself would hand them the same
numbers: the DLN target A was a function of the uniforms behind the first layer's
Xavier weights, for every seed."""

import hashlib

import torch


def generator(seed, stream):
    """A torch.Generator for `stream` (a name) under `seed`: the same pair, the same
    numbers on every machine; different names, unrelated numbers."""
    digest = hashlib.sha256(f"{stream}:{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
