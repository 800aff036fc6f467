"""One-shot check of the Triton backend on a CUDA machine (no network needed).

    python benchmarks/gpu_check.py OUT_DIR [--dry-run] [--skip-tests] [--no-compile]
                                           [--budget SECONDS]

1. Runs the CUDA subset of tests/backends/test_triton_kernels.py (CUDA tensors, compiled
   Triton kernels; the interpreter is switched off for the child process).
2. Times, in one process and interleaved, fastbn (Triton backend, public API), stock torch
   (cuDNN / native batch norm) and torch.compile of stock batch norm for every op:
   forward train, forward eval, backward, double backward, jvp and vmap'd jvp (K=8), at
   the benchmark shapes, float32 and bfloat16, NCHW and channels_last. CUDA events,
   medians of interleaved repetitions; bandwidth is the op's compulsory traffic (each
   input read once, each output written once) over its time, reported against a same-run
   device copy of x (`torch.mul(x, 1.0, out=buf)`).
3. Prints a table with ratios and per-(op, dtype) geometric means, and writes
   OUT_DIR/gpu_check.json.

The tests stop at `--test-timeout` (default 240 s: a cold Triton cache compiles every
kernel specialisation they reach) and a wall-clock budget for the benchmarks (default
180 s) keeps the whole run near seven minutes on an H100/H200: torch.compile baselines
stop compiling after a share of it and cases left when it runs out are reported as
skipped. `--dry-run` lists the cases and writes OUT_DIR/gpu_check_plan.json without
touching a GPU.
"""

import argparse
import json
import math
import os
import pathlib
import platform
import random
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPS = ("forward_train", "forward_eval", "backward", "double_backward", "jvp", "vmap_jvp")
SHAPES = [((32, 64, 56, 56), ("nchw", "channels_last")),
          ((32, 256, 14, 14), ("nchw", "channels_last")),
          ((64, 128, 28, 28), ("nchw", "channels_last")),
          ((128, 512, 7, 7), ("nchw", "channels_last")),
          ((128, 64, 32, 32), ("nchw", "channels_last")),
          ((1024, 512), ("contiguous",)),
          ((64, 256, 100), ("contiguous",)),
          ((4, 32, 16, 32, 32), ("contiguous", "channels_last_3d"))]
DTYPES = ("float32", "bfloat16")
K_VMAP = 8
IMPLS = ("torch", "compile", "fastbn")
TEST_SUBSET = ("(float32_every_layout and (nchw or channels_last or 2d)) or other_dtypes "
               "or mixed_k or large_offset or running_stats or split_plan or availability "
               "or unsupported")


def plan_cases():
    return [dict(op=op, shape=list(shape), layout=layout, dtype=dtype)
            for dtype in DTYPES for shape, layouts in SHAPES for layout in layouts
            for op in OPS]


def numel(shape):
    return math.prod(shape)


def bytes_moved(op, shape, itemsize):
    """Compulsory traffic of an op: every element input read once, every output written."""
    tensors = {"forward_train": 2, "forward_eval": 2, "backward": 3, "double_backward": 5,
               "jvp": 3, "vmap_jvp": 1 + 2 * K_VMAP}[op]
    return tensors * numel(shape) * itemsize


def geomean(values):
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


# ----------------------------------------------------------------------------- tests

def run_tests(timeout):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",
                                                            "FASTBN_BACKEND")}
    cmd = [sys.executable, "-m", "pytest", "tests/backends/test_triton_kernels.py", "-q",
           "-p", "no:cacheprovider", "-k", TEST_SUBSET]
    start = time.time()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
        rc, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        rc, out = "timeout", (err.stdout or b"").decode(errors="replace") \
            if isinstance(err.stdout, bytes) else (err.stdout or "")
    tail = out[-3000:]
    print(tail)
    return dict(command=" ".join(cmd), returncode=rc, seconds=round(time.time() - start, 1),
                tail=tail)


# ----------------------------------------------------------------------------- timing

def _make_input(torch, shape, layout, dtype, device):
    x = torch.randn(shape, device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


def _bench_fn(torch, op, bn, x):
    """A zero-argument callable running `op` through the batch-norm function `bn`
    (signature of torch.nn.functional.batch_norm's leading arguments)."""
    c = x.shape[1]
    dev = x.device
    w = torch.rand(c, device=dev) + 0.5
    b = torch.randn(c, device=dev)
    rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)
    gy = torch.randn_like(x)
    if op == "forward_train":
        return lambda: bn(x, rm, rv, w, b, True)
    if op == "forward_eval":
        return lambda: bn(x, rm, rv, w, b, False)
    if op in ("backward", "double_backward"):
        xr, wr, br = (t.detach().requires_grad_() for t in (x, w, b))
        gyr = gy.detach().requires_grad_(op == "double_backward")
        y = bn(xr, None, None, wr, br, True)
        if op == "backward":
            return lambda: torch.autograd.grad(y, (xr, wr, br), gyr, retain_graph=True)
        grads = torch.autograd.grad(y, (xr, wr, br), gyr, create_graph=True)
        ggs = (torch.randn_like(x), torch.randn_like(w), torch.randn_like(b))
        return lambda: torch.autograd.grad(grads, (xr, wr, gyr), ggs, retain_graph=True)
    xt = torch.randn_like(x)

    def f(x):
        return bn(x, None, None, w, b, True)

    if op == "jvp":
        return lambda: torch.func.jvp(f, (x,), (xt,))
    # Each of the K tangents in x's memory format, as the vmap'd kernels receive them.
    xts = torch.stack([torch.randn_like(x) for _ in range(K_VMAP)])
    return lambda: torch.func.vmap(lambda t: torch.func.jvp(f, (x,), (t,))[1])(xts)


def _time(torch, fns, reps, inner):
    """Median milliseconds per call of each callable, interleaved repetitions (in an order
    shuffled every repetition: a fixed order favours a slot)."""
    events = {name: [] for name in fns}
    order = random.Random(0)
    for _ in range(reps):
        names = list(fns)
        order.shuffle(names)
        for name in names:
            fn = fns[name]
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: statistics.median(s.elapsed_time(e) for s, e in pairs) / inner
            for name, pairs in events.items()}


def run_benchmarks(budget, use_compile, reps=15, inner=3):
    import torch
    import torch.nn.functional as F

    import fastbn

    dev = torch.device("cuda")
    for attr in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, attr):
            setattr(torch._dynamo.config, attr, 1024)

    def stock(x, rm, rv, w, b, training):
        return F.batch_norm(x, rm, rv, w, b, training=training)

    def ours(x, rm, rv, w, b, training):
        with fastbn.use_backend("triton"):
            return fastbn.batch_norm(x, rm, rv, w, b, training=training)

    compiled = torch.compile(stock, dynamic=False)
    deadline = time.time() + budget
    compile_deadline = time.time() + 0.45 * budget
    rows = []
    for case in plan_cases():
        row = dict(case)
        rows.append(row)
        if time.time() > deadline:
            row["skipped"] = "budget"
            continue
        dtype = getattr(torch, case["dtype"])
        x = _make_input(torch, case["shape"], case["layout"], dtype, dev)
        buf = torch.empty_like(x)
        fns = {"copy": lambda: torch.mul(x, 1.0, out=buf)}
        impls = {"torch": stock, "fastbn": ours}
        if use_compile and time.time() < compile_deadline:
            impls["compile"] = compiled
        for name, bn in impls.items():
            try:
                fn = _bench_fn(torch, case["op"], bn, x)
                fn()
                fn()
                fns[name] = fn
            except Exception as err:   # e.g. compile + double backward: not supported
                row[f"{name}_error"] = f"{type(err).__name__}: {str(err)[:160]}"
        torch.cuda.synchronize()
        times = _time(torch, fns, reps, inner)
        moved = bytes_moved(case["op"], case["shape"], x.element_size())
        copy_gbs = 2 * x.numel() * x.element_size() / times["copy"] / 1e6
        row["copy_ms"] = times["copy"]
        row["copy_gbs"] = copy_gbs
        for name in IMPLS:
            if name in times:
                row[f"{name}_ms"] = times[name]
                row[f"{name}_gbs"] = moved / times[name] / 1e6
                row[f"{name}_frac_copy"] = row[f"{name}_gbs"] / copy_gbs
        if "torch_ms" in row and "fastbn_ms" in row:
            row["speedup_vs_torch"] = row["torch_ms"] / row["fastbn_ms"]
        if "compile_ms" in row and "fastbn_ms" in row:
            row["speedup_vs_compile"] = row["compile_ms"] / row["fastbn_ms"]
        del x, buf, fns
    return rows


def summarise(rows):
    summary = {}
    for op in OPS:
        for dtype in DTYPES:
            sel = [r for r in rows if r["op"] == op and r["dtype"] == dtype]
            summary[f"{op}/{dtype}"] = {
                key: geomean([r.get(key) for r in sel])
                for key in ("speedup_vs_torch", "speedup_vs_compile", "fastbn_frac_copy",
                            "torch_frac_copy")}
    return summary


def print_table(rows, summary):
    head = (f"{'op':16} {'shape':20} {'layout':16} {'dtype':9} {'torch ms':>9} "
            f"{'compile':>9} {'fastbn':>9} {'x torch':>8} {'x comp':>8} {'GB/s':>7} "
            f"{'%copy':>6}")
    print(head)
    print("-" * len(head))

    def f(v, fmt):
        return format(v, fmt) if isinstance(v, float) else "-"

    for r in rows:
        if r.get("skipped"):
            continue
        print(f"{r['op']:16} {str(tuple(r['shape'])):20} {r['layout']:16} {r['dtype']:9} "
              f"{f(r.get('torch_ms'), '9.4f'):>9} {f(r.get('compile_ms'), '9.4f'):>9} "
              f"{f(r.get('fastbn_ms'), '9.4f'):>9} {f(r.get('speedup_vs_torch'), '8.2f'):>8} "
              f"{f(r.get('speedup_vs_compile'), '8.2f'):>8} {f(r.get('fastbn_gbs'), '7.0f'):>7} "
              f"{f(100 * r['fastbn_frac_copy'] if 'fastbn_frac_copy' in r else None, '6.0f'):>6}")
    print("\ngeometric means (speedup > 1: fastbn faster)")
    for key, vals in summary.items():
        print(f"  {key:28} " + "  ".join(f"{k}={v:.3f}" for k, v in vals.items()))
    skipped = sum(1 for r in rows if r.get("skipped"))
    if skipped:
        print(f"\n{skipped} cases skipped: time budget exhausted")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--dry-run", action="store_true", help="list the cases, touch no GPU")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the torch.compile baseline")
    parser.add_argument("--budget", type=float, default=180.0,
                        help="seconds for the benchmarks (after the tests)")
    parser.add_argument("--test-timeout", type=float, default=240.0,
                        help="seconds for the tests (compiling included)")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    cases = plan_cases()
    if args.dry_run:
        print(f"would run: pytest tests/backends/test_triton_kernels.py -k {TEST_SUBSET!r}")
        print(f"would time {len(cases)} cases x {IMPLS} + a device copy:")
        for case in cases:
            print(f"  {case['op']:16} {str(tuple(case['shape'])):20} {case['layout']:16} "
                  f"{case['dtype']}")
        (args.out_dir / "gpu_check_plan.json").write_text(
            json.dumps(dict(cases=cases, test_subset=TEST_SUBSET, impls=IMPLS), indent=1))
        return 0

    import torch
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, python=platform.python_version())
    print(f"{report['device']}  torch {report['torch']}  triton {report['triton']}")
    if not args.skip_tests:
        report["tests"] = run_tests(args.test_timeout)
    start = time.time()
    rows = run_benchmarks(args.budget, not args.no_compile)
    report["bench_seconds"] = round(time.time() - start, 1)
    report["rows"] = rows
    report["summary"] = summarise(rows)
    print_table(rows, report["summary"])
    if torch.cuda.device_count() > 1:   # SyncBatchNorm over NCCL, one GPU per process
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
        import bench_distributed
        report["nccl"] = bench_distributed.run(ranks=min(torch.cuda.device_count(), 8),
                                               quick=True, nccl=True)
        print(json.dumps(report["nccl"], indent=1))
    path = args.out_dir / "gpu_check.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwrote {path}")
    tests_ok = args.skip_tests or report["tests"]["returncode"] == 0
    return 0 if tests_ok else 1


if __name__ == "__main__":
    sys.exit(main())
