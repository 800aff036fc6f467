"""Helpers for testing and benchmarking fastbn.

`run_processes` runs a function on several processes of this machine (a gloo process
group per call, or NCCL with one GPU per process) and collects what each returns: the
harness of the distributed tests and benchmarks. `NoGradient` is the identity whose
backward gives its input no gradient (None), as some downstream functions do.
"""

import datetime
import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world, init_file, timeout_s, backend, fn, args, out_dir):
    result = {}
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        if backend == "gloo":
            # gloo may return from init on one process while a peer is still connecting;
            # a process whose work needs no collective would then leave and break the
            # peer's connection. Everyone past this barrier is connected. (NCCL connects at
            # its first collective.)
            dist.barrier()
        torch.set_num_threads(1)
        result = {"value": fn(rank, world, *args)}
    except Exception as err:  # noqa: BLE001 - reported to the parent
        result = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a peer may be gone already
                pass


def run_processes(fn, world, *args, collective_timeout=60, join_timeout=180, backend="gloo"):
    """fn(rank, world, *args) on `world` processes; returns the list of per-rank results
    ({"value": ...} or {"error": ..., "trace": ...}). Never hangs past join_timeout.
    With backend="nccl", process r uses GPU r."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_entry, args=(r, world, init_file, collective_timeout,
                                                   backend, fn, args, tmp))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(join_timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = []
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.pt")
            results.append(torch.load(path, weights_only=False) if os.path.exists(path)
                           else {"error": "no result (killed or hung)"})
        return results


class NoGradient(torch.autograd.Function):
    """The identity, whose backward gives its input no gradient (None: zero)."""

    @staticmethod
    def forward(t):
        return t.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return None
