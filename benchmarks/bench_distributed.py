"""Communication and step time of fastbn.SyncBatchNorm on several processes.

    python -m benchmarks.bench_distributed [--ranks 2] [--quick] [--nccl] [--json PATH]

gloo on CPU by default; --nccl puts each process on its own GPU.

Counts collectives and bytes per training step by wrapping torch.distributed's collective
functions, and times steps (forward + backward, and a Hessian-vector product by double
backward) of a small VGG-style CNN whose batch norms are synchronised, against the same
network with local batch norm. Stock torch.nn.SyncBatchNorm refuses CPU tensors, so its
per-layer traffic is given from its algorithm (torch/nn/modules/_functions.py): one
all_gather of 2C + 1 values per process in the forward, one all_reduce of 2C values in the
backward, and no double backward.
"""

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

import fastbn
from fastbn._arguments import positive_int
from fastbn.testing import run_processes

_WRAPPED = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast",
            "reduce_scatter_tensor")


class CollectiveCounter:
    """Counts calls and payload bytes of torch.distributed collectives while active."""

    def __init__(self):
        self.calls = 0
        self.bytes = 0
        self._saved = {}

    def __enter__(self):
        for name in _WRAPPED:
            original = getattr(dist, name)
            self._saved[name] = original

            def wrapper(*args, _original=original, **kwargs):
                self.calls += 1
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                self.bytes += sum(t.numel() * t.element_size() for t in tensors[-1:])
                return _original(*args, **kwargs)
            setattr(dist, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)


def _model(width):
    layers, channels = [], 3
    for out in (width, 2 * width, 4 * width):
        layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(),
                   nn.MaxPool2d(2)]
        channels = out
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * 4 * 4, 10))


def _median_seconds(fn, repeats, device):
    fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(rank, world, batch, width, repeats, device):
    torch.manual_seed(0)
    base = _model(width)
    results = {}
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(rank)).to(device)
    target = torch.randint(0, 10, (batch,),
                           generator=torch.Generator().manual_seed(rank)).to(device)
    for name, sync in (("local", False), ("sync", True)):
        model = fastbn.convert(_model(width), sync=sync, fuse_relu=True)
        model.load_state_dict(base.state_dict())
        model.to(device)
        params = list(model.parameters())

        def step():
            loss = nn.functional.cross_entropy(model(x), target)
            torch.autograd.grad(loss, params)

        def hvp():
            loss = nn.functional.cross_entropy(model(x), target)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            torch.autograd.grad(grads, params, grad_outputs=[torch.ones_like(p) for p in params])

        for kind, fn in (("train_step", step), ("hvp", hvp)):
            fn()   # the first call also checks that the processes agree on each layer
            with CollectiveCounter() as counter:
                fn()
            results[(name, kind)] = {
                "collectives": counter.calls, "bytes": counter.bytes,
                "seconds": _median_seconds(fn, repeats, device)}
    bn_channels = [m.num_features for m in base.modules() if isinstance(m, nn.BatchNorm2d)]
    return {"results": {f"{k[0]}/{k[1]}": v for k, v in results.items()},
            "bn_channels": bn_channels}


def _nccl_worker(rank, world, batch, width, repeats):
    return _worker(rank, world, batch, width, repeats, torch.device("cuda", rank))


def _gloo_worker(rank, world, batch, width, repeats):
    return _worker(rank, world, batch, width, repeats, torch.device("cpu"))


def run(ranks=2, quick=False, nccl=False):
    batch, width, repeats = (8, 8, 3) if quick else (32, 16, 10)
    out = run_processes(_nccl_worker if nccl else _gloo_worker, ranks, batch, width, repeats,
                        backend="nccl" if nccl else "gloo")
    for r in out:
        if "error" in r:
            raise RuntimeError(r.get("trace", r["error"]))
    rank0 = out[0]["value"]
    channels = rank0["bn_channels"]
    stock = {"collectives": 2 * len(channels),
             "bytes": sum((2 * c + 1) * 4 + 2 * c * 4 for c in channels)}
    return {"ranks": ranks, "backend": "nccl" if nccl else "gloo",
            "batch_per_rank": batch, "width": width,
            "bn_layers": len(channels), "fastbn": rank0["results"],
            "stock_sync_train_step_from_algorithm": stock}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=positive_int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--nccl", action="store_true", help="one GPU per process")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    report = run(args.ranks, args.quick, args.nccl)
    print(f"{report['ranks']} {report['backend']} ranks, "
          f"batch {report['batch_per_rank']} per rank, "
          f"{report['bn_layers']} batch-norm layers")
    print(f"{'variant':<18}{'collectives':>12}{'bytes sent':>12}{'ms':>10}")
    for key, row in report["fastbn"].items():
        print(f"{key:<18}{row['collectives']:>12}{row['bytes']:>12}{row['seconds'] * 1e3:>10.1f}")
    stock = report["stock_sync_train_step_from_algorithm"]
    print(f"{'stock sync/train':<18}{stock['collectives']:>12}{stock['bytes']:>12}"
          f"{'n/a (CPU)':>10}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
