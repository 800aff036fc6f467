"""The `fastbn` command: info | demo | bench | reproduce | probe."""

import argparse
import os
import platform
import sys
import time

import torch

import fastbn
from fastbn import _arguments, backends


def info(_args=None):
    print(f"fastbn {fastbn.__version__}")
    print(f"torch {torch.__version__} (threads: {torch.get_num_threads()})")
    print(f"python {platform.python_version()} on {platform.machine()}")
    print(f"selected backend: {_selected_backend()}")
    for name in ("reference", "cpu", "triton"):
        ok, why = backends.availability(name)
        print(f"  {name:<10} {'available' if ok else 'unavailable'}: {why}")
    cpu = backends.load("cpu")
    if cpu is not None:
        print(f"cpu build: {cpu.build_info()}")
    print(f"cuda: {torch.cuda.is_available()}")
    return 0


def _selected_backend():
    """What runs a batch norm here: "auto -> cpu" for CPU tensors (and CUDA ones where
    there is CUDA), or the set backend and whether it is available."""
    try:
        name = backends.get_backend()
    except ValueError as error:     # a bad FASTBN_BACKEND: say so, list the rest anyway
        return f"none ({error})"
    if name != "auto":
        ok, why = backends.availability(name)
        return name if ok else f"{name}, unavailable ({why}): every batch norm will raise"
    devices = ["cpu"] + (["cuda"] * torch.cuda.is_available())
    return "auto -> " + ", ".join(
        f"{backends.select(torch.empty(0, device=d)).name} on {d}" for d in devices)


def demo(args):
    """Train a small CNN with torch's batch norm and, side by side, its fastbn copy."""
    import copy

    from torch import nn

    torch.manual_seed(args.seed)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    fast = fastbn.convert(copy.deepcopy(model), fuse_relu=True)
    # A learnable synthetic task: labels from a fixed random linear map of the images.
    images = torch.randn(4, 64, 1, 16, 16)
    readout = torch.randn(16 * 16, 10)
    labels = (images.flatten(2) @ readout).argmax(-1)
    batches = [(images[i % 4], labels[i % 4]) for i in range(args.steps)]
    print(f"training {args.steps} SGD steps, torch BatchNorm2d vs fastbn "
          f"(backend: {backends.select(images).name})")
    seconds = {}
    for name, net in (("torch", model), ("fastbn", fast)):
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        start = time.perf_counter()
        losses = []
        for x, t in batches:
            loss = nn.functional.cross_entropy(net(x), t)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        seconds[name] = time.perf_counter() - start
        print(f"  {name:<7} loss {losses[0]:.3f} -> {losses[-1]:.3f}  ({seconds[name]:.2f} s)")
    return 0


def _bench(argv):
    from fastbn import bench
    bench.main(argv)   # returns the report, for callers in Python
    return 0


def _reproduce(argv):
    from fastbn.experiments.cli import reproduce_main
    return reproduce_main(argv)


def _probe(argv):
    from fastbn.experiments.probe import probe_main
    return probe_main(argv)


PASSTHROUGH = {"bench": _bench, "reproduce": _reproduce, "probe": _probe}


def main(argv=None):
    try:
        return _run(sys.argv[1:] if argv is None else list(argv))
    except BrokenPipeError:
        # The reader went away (`fastbn info | head -1`): no traceback, and no second
        # error when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _run(argv):
    if argv and argv[0] in PASSTHROUGH:
        return PASSTHROUGH[argv[0]](argv[1:]) or 0
    parser = argparse.ArgumentParser(prog="fastbn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, backends and why any is unavailable")
    p = sub.add_parser("demo", help="train a small CNN with torch and fastbn batch norm")
    p.add_argument("--steps", type=_arguments.positive_int, default=30)
    p.add_argument("--seed", type=_arguments.torch_seed, default=0)
    sub.add_parser("bench", help="benchmark fastbn against stock torch (see --help)")
    sub.add_parser("reproduce", help="re-run the with/without batch-norm comparison")
    sub.add_parser("probe", help="Hessian spectrum and smoothness of the reproduction's "
                                 "networks, with and without BN (see --help)")
    args = parser.parse_args(argv)
    return {"info": info, "demo": demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
