"""Command-line arguments shared by the `fastbn` subcommands: argparse types and checks
that refuse a bad value in words before any work."""

import argparse
import math
import os

import torch

from fastbn import _checks, backends


def positive_int(text):
    """argparse type: an int of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text):
    """argparse type: a positive finite number."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def fraction(text):
    """argparse type: a number in (0, 1)."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def seed(text):
    """argparse type: a seed, an int in numpy's range (the data splits draw from numpy)."""
    value = int(text)
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {value}")
    return value


def torch_seed(text):
    """argparse type: a seed torch.manual_seed takes."""
    value = int(text)
    low, high = _checks.SEED_RANGE
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be in [-2**63, 2**64 - 1], got {value}")
    return value


def writable(path):
    """Whether `path` can be written as a file: not a folder, in a writable folder."""
    folder = os.path.dirname(os.path.abspath(path))
    return (not os.path.isdir(path) and os.path.isdir(folder)
            and os.access(path if os.path.exists(path) else folder, os.W_OK))


def device(parser, name):
    """The device `--device name` asks for (default: cuda when available, else cpu);
    the parser's error where torch cannot use it."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.empty(0, device=name).device.type
    except (RuntimeError, AssertionError) as error:   # torch's words for an unusable device
        parser.error(f"--device {name}: {str(error).splitlines()[0]}")
    if kind == "meta":
        parser.error(f"--device {name}: meta tensors hold no values to train or measure")
    return name


def backend(parser):
    """The parser's error where the batch-norm backend FASTBN_BACKEND names is unknown or
    unavailable here (every batch norm of the run would raise, after its first work)."""
    try:
        name = backends.get_backend()
    except ValueError as error:
        parser.error(str(error))
    if name != "auto":
        available, why = backends.availability(name)
        if not available:
            parser.error(f"the {name} backend (FASTBN_BACKEND) is unavailable here: {why}")
