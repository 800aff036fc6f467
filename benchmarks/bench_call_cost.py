"""Per-call cost of a batch-norm layer on a cold and a warm cache, fastbn against stock.

    python -m benchmarks.bench_call_cost [--mode eval|train|backward] [--calls 1500]
                                         [--json PATH]

For small layers the time of a call is its Python and dispatch work, not its kernel. In
a network that work runs on a cold cache (a convolution between two batch norms evicts
the interpreter's working set), where it costs several times what a tight loop shows.
"cold": the median of calls made right after an 8 MB copy; "warm": of calls made right
after the same call; stock's and fastbn's calls interleaved. One thread, layers in eval
(default) or training mode, under no_grad and with parameters that require grad; or
"backward": a training layer's forward and the gradients of its input, weight and bias
(`torch.autograd.grad`).
"""

import argparse
import functools
import json
import random
import statistics
import time

import torch
from torch import nn

import fastbn

SHAPES = ((8, 16, 4, 4), (32, 64, 8, 8), (64, 256))


def _median_us(layers, evict, calls):
    """{name: (cold µs, warm µs)} of each zero-argument callable, interleaved: a cold and
    a warm call of each in turn, in an order shuffled every round."""
    cold, warm = ({name: [] for name in layers} for _ in range(2))
    order = random.Random(0)
    for _ in range(calls):
        names = list(layers)
        order.shuffle(names)
        for name in names:
            evict()
            start = time.perf_counter()
            layers[name]()
            cold[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            layers[name]()
            warm[name].append(time.perf_counter() - start)
    return {name: (statistics.median(cold[name]) * 1e6, statistics.median(warm[name]) * 1e6)
            for name in layers}


def _call(layer, x, grad_y, mode):
    """A call of the layer, with no arguments: its forward, or in mode "backward" its
    forward and the gradients of (x, weight, bias) for output gradient grad_y."""
    if mode != "backward":
        return functools.partial(layer, x)
    inputs = (x, layer.weight, layer.bias)
    return lambda: torch.autograd.grad(layer(x), inputs, grad_y)


def run(calls=1500, mode="eval"):
    """Rows of {shape, mode, grad, layer, cold_us, warm_us} for stock and fastbn layers
    in `mode` ("eval", "train" or "backward": grad True only)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    big = torch.randn(1 << 20)
    buf = torch.empty_like(big)
    rows = []
    try:
        for shape in SHAPES:
            x = torch.randn(shape, requires_grad=mode == "backward")
            grad_y = torch.randn(shape)
            pair = ((nn.BatchNorm1d, fastbn.BatchNorm1d) if len(shape) < 4
                    else (nn.BatchNorm2d, fastbn.BatchNorm2d))
            for grad in (True,) if mode == "backward" else (False, True):
                layers = {name: _call(cls(shape[1]).train(mode != "eval"), x, grad_y, mode)
                          for name, cls in zip(("stock", "fastbn"), pair)}
                with torch.set_grad_enabled(grad):
                    times = _median_us(layers, lambda: torch.mul(big, 1.0, out=buf), calls)
                rows += [{"shape": list(shape), "mode": mode, "grad": grad, "layer": name,
                          "cold_us": cold, "warm_us": warm}
                         for name, (cold, warm) in times.items()]
    finally:
        torch.set_num_threads(threads)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("eval", "train", "backward"), default="eval",
                        help="the layers' mode (train: each call updates running "
                        "statistics; backward: a training call and its gradients)")
    parser.add_argument("--calls", type=int, default=1500)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    rows = run(args.calls, args.mode)
    print(f"{args.mode} mode, median µs per call")
    print("| shape | grad | stock cold µs | fastbn cold µs | stock warm µs | fastbn warm µs |")
    print("| --- | --- | --- | --- | --- | --- |")
    for stock, ours in zip(rows[::2], rows[1::2]):
        print(f"| {'x'.join(map(str, stock['shape']))} | {stock['grad']} | "
              f"{stock['cold_us']:.1f} | {ours['cold_us']:.1f} | {stock['warm_us']:.1f} | "
              f"{ours['warm_us']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
