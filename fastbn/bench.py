"""Benchmark runner: fastbn against stock torch batch norm, with a same-run roofline.

    python -m benchmarks [--backend auto reference cpu] [--ops ...] [--shapes ...]
                         [--dtype float32|bfloat16|float16] [--quick] [--json PATH]
                         [--threads 1 --clock cpu] [--suite batchnorm curvature]
    fastbn bench ...     (same arguments)

On a machine shared with other jobs use `--threads 1 --clock cpu` (see CLOCKS).

Methodology: everything runs in one process and is measured as ratios, because the
machines we have are shared and noisy. For each (op, shape) the candidates (stock torch,
each fastbn backend, and a copy of x's bytes, `torch.mul(x, 1.0, out=buf)`) are called
once untimed, then timed in rounds of one call each, in an order shuffled every round,
until a per-measurement time budget is spent; each candidate's median is reported, as
milliseconds and as a multiple of the copy's median. Effective GB/s for fastbn uses the
op's minimum memory traffic, counted in passes over x's bytes (OPS below).

Every fastbn candidate's first outputs are compared with stock torch's (max error relative
to the largest stock value, `max_rel_err` in the JSON), so a fast number is never a wrong
one unnoticed; outputs holding inf or NaN are flagged (stock's float16 double backward
overflows on large channels). A candidate that raises (stock torch under a transform, a
backend that fails) is recorded as n/a with its error, never a crash.
"""

import argparse
import contextlib
import datetime
import gc
import importlib
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import fastbn
from fastbn import backends, memory
from fastbn._arguments import positive_float, positive_int, writable

MOMENTUM, EPS = 0.1, 1e-5
VMAP_K = 8

# The benchmark shapes, (shape, channels_last); channels_last only applies to 4-d inputs.
_SHAPES_2D = [(32, 64, 56, 56), (32, 256, 14, 14), (64, 128, 28, 28), (128, 512, 7, 7),
              (128, 64, 32, 32)]
FULL_SHAPES = ([(s, False) for s in _SHAPES_2D] + [(s, True) for s in _SHAPES_2D]
               + [((1024, 512), False), ((64, 256, 100), False), ((4, 32, 16, 32, 32), False)])
QUICK_SHAPES = [((8, 16, 12, 12), False), ((8, 16, 12, 12), True), ((64, 32), False),
                ((2, 8, 4, 8, 8), False)]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Timing:
    """Per-measurement timing policy, after one untimed warm-up call per candidate."""
    budget_s: float     # time-boxed rounds ...
    min_runs: int       # ... but at least this many calls per candidate ...
    max_runs: int       # ... and at most this many


# Sized so the full fp32 run stays under 10 minutes on 2 cores: the slow cases (vmap_jvp,
# double_backward at 6-8M elements, ~1 s a call) get min_runs, the fast ones many more.
FULL_TIMING = Timing(budget_s=1.5, min_runs=3, max_runs=200)
QUICK_TIMING = Timing(budget_s=0.05, min_runs=3, max_runs=20)


def shape_label(shape, channels_last):
    return "x".join(map(str, shape)) + (":cl" if channels_last else "")


def parse_shape(text):
    """'32x64x56x56' or '32x64x56x56:cl' (channels_last, 4-d only) -> (shape, channels_last)."""
    dims, _, layout = text.partition(":")
    if layout not in ("", "cl"):
        raise argparse.ArgumentTypeError(f"bad layout {layout!r} in {text!r}; use ':cl'")
    try:
        shape = tuple(int(d) for d in dims.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}; expected e.g. 32x64x56x56")
    if min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r}: every size must be at least 1")
    if not 2 <= len(shape) <= 5 or (layout and len(shape) != 4):
        raise argparse.ArgumentTypeError(f"shape {text!r}: 2 to 5 dims, ':cl' only with 4")
    return shape, layout == "cl"


# --- the inputs and the ops -------------------------------------------------------------

def make_inputs(shape, channels_last, dtype, seed=0):
    """Everything any op needs for one shape, shared by every candidate."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def element(gen, *batch):
        t = torch.randn(*batch, *shape, generator=gen).to(dtype)
        # The layout applies per instance: a K-batched tangent is K channels_last tensors.
        return torch.stack([e.contiguous(memory_format=fmt) for e in t]) if batch \
            else t.contiguous(memory_format=fmt)

    def channel(gen, *batch, offset=0.0):
        return (torch.randn(*batch, shape[1], generator=gen) * 0.5 + offset).to(dtype)

    def batched_tangents(k):
        """K tangents of (x, weight, bias); the same ones on every call."""
        gen = torch.Generator().manual_seed(seed + 1)
        return element(gen, k), channel(gen, k), channel(gen, k)

    gen = torch.Generator().manual_seed(seed)
    return SimpleNamespace(x=element(gen), dy=element(gen), ggx=element(gen),
                           x_t=element(gen), weight=channel(gen, offset=1.0),
                           bias=channel(gen), weight_t=channel(gen), bias_t=channel(gen),
                           ggw=channel(gen), ggb=channel(gen),
                           running_mean=torch.zeros(shape[1], dtype=dtype),
                           running_var=torch.ones(shape[1], dtype=dtype),
                           batched_tangents=batched_tangents)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


# Each op: setup(bn, inputs) -> zero-argument callable returning a tuple of tensors.
# `bn` has F.batch_norm's positional signature (x, running_mean, running_var, weight,
# bias, training), so one definition serves stock torch and fastbn. Derivative ops pass
# running statistics as None: torch.func refuses their in-place update.

def _forward_train(bn, t):
    # Running statistics are updated in place on every call, as in training.
    return lambda: (bn(t.x, t.running_mean, t.running_var, t.weight, t.bias, True),)


def _forward_eval(bn, t):
    return lambda: (bn(t.x, t.running_mean, t.running_var, t.weight, t.bias, False),)


def _backward(bn, t):
    # Only the backward is timed: the graph is built once and replayed.
    x, w, b = _leaves(t.x, t.weight, t.bias)
    y = bn(x, None, None, w, b, True)
    return lambda: torch.autograd.grad(y, (x, w, b), t.dy, retain_graph=True)


def _double_backward(bn, t):
    # The whole second-order step, as an HVP would run it: forward, first grad with
    # create_graph, then the vjp of that grad w.r.t. (x, weight, dy).
    x, w, b, dy = _leaves(t.x, t.weight, t.bias, t.dy)

    def run():
        y = bn(x, None, None, w, b, True)
        grads = torch.autograd.grad(y, (x, w, b), dy, create_graph=True)
        return torch.autograd.grad(grads, (x, w, dy), (t.ggx, t.ggw, t.ggb))
    return run


def _jvp(bn, t):
    def f(x, w, b):
        return bn(x, None, None, w, b, True)
    return lambda: torch.func.jvp(f, (t.x, t.weight, t.bias), (t.x_t, t.weight_t, t.bias_t))


def _hvp_step(bn, t):
    # Forward-over-reverse through one layer, as an HVP runs it: the jvp of the vjp
    # w.r.t. (x, weight, bias, dy), the last standing for the cotangent that depends on
    # the parameters downstream.
    def vjp(x, w, b, dy):
        return torch.func.vjp(lambda x, w, b: bn(x, None, None, w, b, True), x, w, b)[1](dy)

    def run():
        grads, tangents = torch.func.jvp(vjp, (t.x, t.weight, t.bias, t.dy),
                                         (t.x_t, t.weight_t, t.bias_t, t.ggx))
        return (*grads, *tangents)
    return run


def _vmap_jvp(bn, t):
    # K tangents of (x, weight, bias) at one primal: the batched-HVP primitive.
    def f(x, w, b):
        return bn(x, None, None, w, b, True)

    def tangent(x_t, w_t, b_t):
        return torch.func.jvp(f, (t.x, t.weight, t.bias), (x_t, w_t, b_t))[1]
    x_ts, w_ts, b_ts = t.batched_tangents(VMAP_K)
    batched = torch.func.vmap(tangent)
    return lambda: (batched(x_ts, w_ts, b_ts),)


@dataclass(frozen=True)
class Op:
    setup: object
    reads: int      # minimum traffic, in passes over x's bytes
    writes: int
    note: str


OPS = {
    "forward_train": Op(_forward_train, 2, 1, "batch stats + running-stat update"),
    "forward_eval": Op(_forward_eval, 1, 1, "running stats"),
    "backward": Op(_backward, 2, 1, "autograd.grad of a saved graph wrt (x, w, b)"),
    "double_backward": Op(_double_backward, 3, 2,
                          "forward + grad(create_graph) + grad wrt (x, w, dy); "
                          "traffic counts the second-order kernel only"),
    "jvp": Op(_jvp, 2, 2, "torch.func.jvp, tangents on (x, w, b): y and its tangent"),
    "hvp_step": Op(_hvp_step, 4, 1, "torch.func.jvp of the vjp wrt (x, w, b, dy) "
                   "(forward-over-reverse); traffic counts the jvp-of-backward kernel only"),
    "vmap_jvp": Op(_vmap_jvp, 1 + VMAP_K, VMAP_K,
                   f"torch.func.vmap over jvp, K={VMAP_K} tangents"),
}


def stock_bn(x, running_mean, running_var, weight, bias, training):
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS)


def fastbn_bn(x, running_mean, running_var, weight, bias, training):
    return fastbn.batch_norm(x, running_mean, running_var, weight, bias, training,
                             MOMENTUM, EPS)


# --- the timing harness -----------------------------------------------------------------

@dataclass
class Candidate:
    name: str           # "stock", "copy" or a fastbn backend name
    bn: object          # batch_norm with F.batch_norm's signature; None for the copy
    context: object     # zero-arg factory of the context every call runs in


def candidate(name):
    """"stock", "copy" (the roofline) or a fastbn backend name."""
    if name == "stock":
        return Candidate(name, stock_bn, contextlib.nullcontext)
    if name == "copy":
        return Candidate(name, None, contextlib.nullcontext)
    return Candidate(name, fastbn_bn, lambda: fastbn.use_backend(name))


def prepare(cand, op, inputs):
    """(callable, its first outputs) for Candidate `cand`; raises what the op raises.

    The callable runs the op alone; call it inside `cand.context()`. time_interleaved
    enters that context outside the timed region: a fastbn backend's `use_backend` costs
    microseconds a call that a user's call on the backend it has does not pay. The first
    call is the warm-up (it also faults in the output buffers' pages)."""
    if cand.bn is None:
        buf = torch.empty_like(inputs.x)

        def call():
            return (torch.mul(inputs.x, 1.0, out=buf),)
        return call, call()
    with cand.context():
        call = op.setup(cand.bn, inputs)
        return call, call()


def _max_rel_error(outputs, reference):
    """Largest |out - ref| over max |ref| across the outputs; inf where they differ in
    number or shape, or where one is NaN or infinite and the other is not."""
    if len(outputs) != len(reference):
        return math.inf
    worst = 0.0
    for out, ref in zip(outputs, reference):
        if out.shape != ref.shape:
            return math.inf
        if out.numel() == 0:
            continue
        out, ref = out.detach().double(), ref.detach().double()
        agree = (out == ref) | (out.isnan() & ref.isnan())   # inf == inf counts
        diff = torch.where(agree, 0.0, (out - ref).abs()).nan_to_num(nan=math.inf)
        scale = torch.where(ref.isfinite(), ref.abs(), 0.0).max().clamp_min(1e-30)
        worst = max(worst, (diff.max() / scale).item())
    return worst


def _error_text(err):
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


# Wall clock by default. "cpu" reads this thread's CPU time, which does not count time
# spent descheduled: with one torch thread all work runs on the calling thread, so on a
# machine oversubscribed by other jobs it measures the work rather than the queue.
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def time_interleaved(calls, timing, clock, errors, seed=0):
    """{name: sorted per-call seconds} for `calls`, {name: (context factory, callable)}:
    rounds of one call each, in an order shuffled every round (seeded), each inside its
    context (entered and left outside the timed region). A fixed order favours a slot: a
    call right after another op's ran 1-7% faster or slower than the same call in the
    slot before it. A call that raises drops its candidate from the rounds: its error
    goes to the dict `errors`, its times from the result."""
    calls = dict(calls)
    times = {name: [] for name in calls}
    order = random.Random(seed)
    gc_was_enabled = gc.isenabled()
    gc.disable()   # a collection inside one candidate's call would bias it
    try:
        start = time.perf_counter()
        rounds = 0
        while rounds < timing.min_runs or (rounds < timing.max_runs
                                           and time.perf_counter() - start < timing.budget_s):
            names = list(calls)
            order.shuffle(names)
            for name in names:
                context, call = calls[name]
                try:
                    with context():
                        t0 = clock()
                        call()
                        elapsed = clock() - t0
                except Exception as err:
                    errors[name] = _error_text(err)
                    del calls[name], times[name]
                    continue
                times[name].append(elapsed)
            rounds += 1
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: sorted(ts) for name, ts in times.items()}


def measure(op_name, shape, channels_last, dtype, backend_names, timing,
            clock=time.perf_counter):
    """One result row: copy, stock and every backend for one (op, shape)."""
    op = OPS[op_name]
    inputs = make_inputs(shape, channels_last, dtype)
    calls, errors, outputs = {}, {}, {}
    for cand in map(candidate, ["stock", *backend_names, "copy"]):
        try:
            call, outputs[cand.name] = prepare(cand, op, inputs)
            calls[cand.name] = (cand.context, call)
        except Exception as err:   # recorded as n/a: one failing candidate must not end the run
            errors[cand.name] = _error_text(err)
    times = time_interleaved(calls, timing, clock, errors)
    copy_s = statistics.median(times["copy"])
    x_bytes = inputs.x.numel() * inputs.x.element_size()
    traffic = (op.reads + op.writes) * x_bytes

    def entry(name):
        if name not in times:
            return {"ms": None, "error": errors.get(name, "not run")}
        median = statistics.median(times[name])
        ts = times[name]
        return {"ms": median * 1e3, "x_copy": median / copy_s, "runs": len(ts),
                "min_ms": ts[0] * 1e3, "iqr_ms": (ts[3 * len(ts) // 4] - ts[len(ts) // 4]) * 1e3}

    stock = entry("stock")
    fast = {}
    for name in backend_names:
        e = entry(name)
        if e["ms"] is not None:
            e["gbps"] = traffic / (e["ms"] * 1e-3) / 1e9
            if stock["ms"] is not None:
                e["speedup"] = stock["ms"] / e["ms"]
                e["max_rel_err"] = _max_rel_error(outputs[name], outputs["stock"])
        fast[name] = e
    # Timed all the same, but a speedup over outputs that overflowed is flagged.
    non_finite = [name for name in ["stock", *backend_names] if name in outputs
                  and not all(bool(t.isfinite().all()) for t in outputs[name])]
    return {"op": op_name, "shape": list(shape), "channels_last": channels_last,
            "label": shape_label(shape, channels_last), "dtype": str(dtype).removeprefix("torch."),
            "x_bytes": x_bytes, "traffic_bytes": traffic, "copy_ms": copy_s * 1e3,
            "copy_runs": len(times["copy"]), "stock": stock, "fastbn": fast,
            "non_finite": non_finite}


# --- reporting --------------------------------------------------------------------------

def geomean(values):
    values = [v for v in values if v is not None]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summarize(rows, backend_names):
    """{op: {"stock_x_copy": g, "shapes": n, "rows": m, backend: {"speedup": g,
    "x_copy": g, "shapes": n}}}: geometric means over the n of the op's m rows where every
    candidate ran, so that the columns compare like with like; a candidate that failed on every row
    is left out of that condition (its entries are None, its shapes 0)."""
    def entries(r):
        return {"stock": r["stock"], **r["fastbn"]}

    summary = {}
    for op_name in dict.fromkeys(r["op"] for r in rows):
        op_rows = [r for r in rows if r["op"] == op_name]
        ran = [n for n in ["stock", *backend_names]
               if any(entries(r)[n]["ms"] is not None for r in op_rows)]
        common = [r for r in op_rows if all(entries(r)[n]["ms"] is not None for n in ran)]
        s = {"stock_x_copy": geomean([r["stock"].get("x_copy") for r in common]),
             "shapes": len(common), "rows": len(op_rows)}
        for name in backend_names:
            s[name] = {"speedup": geomean([r["fastbn"][name].get("speedup") for r in common]),
                       "x_copy": geomean([r["fastbn"][name].get("x_copy") for r in common]),
                       "shapes": len(common) if name in ran else 0}
        summary[op_name] = s
    return summary


def markdown_table(header, rows):
    return "\n".join("| " + " | ".join(cells) + " |"
                     for cells in [header, ["---"] * len(header), *rows])


def _fmt(value, spec, suffix=""):
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _ms_cell(e):
    if e["ms"] is None:
        return "n/a"
    return f"{e['ms']:.3g} ({e['x_copy']:.2f}×)"


def format_op_table(op_name, rows, backend_names, summary):
    """Markdown table for one op: ms (multiple of copy), speedup, GB/s, per shape."""
    op = OPS[op_name]
    header = ["shape", "copy ms", "stock ms (×copy)"]
    for name in backend_names:
        header += [f"{name} ms (×copy)", f"{name} speedup", f"{name} GB/s"]
    table = []
    for r in rows:
        cells = [r["label"], f"{r['copy_ms']:.3g}", _ms_cell(r["stock"])]
        for name in backend_names:
            e = r["fastbn"][name]
            cells += [_ms_cell(e), _fmt(e.get("speedup"), ".2f"), _fmt(e.get("gbps"), ".1f")]
        table.append(cells)
    s = summary[op_name]
    cells = ["**geomean**", "", f"({_fmt(s['stock_x_copy'], '.2f', '×')})"]
    for name in backend_names:
        cells += [f"({_fmt(s[name]['x_copy'], '.2f', '×')})",
                  f"**{_fmt(s[name]['speedup'], '.2f')}**", ""]
    table.append(cells)
    lines = [f"### {op_name}: {op.note}; min traffic {op.reads}R+{op.writes}W of x", "",
             markdown_table(header, table)]
    errs = [f"{name} {max(e['max_rel_err'] for e in es):.1e}" for name in backend_names
            if (es := [r["fastbn"][name] for r in rows if "max_rel_err" in r["fastbn"][name]])]
    if errs:
        lines.append(f"- max error vs stock (relative to max |stock|): {', '.join(errs)}")
    for name in ["stock", *backend_names]:
        labels = [r["label"] for r in rows if name in r.get("non_finite", ())]
        if labels:
            lines.append(f"- {name}'s outputs hold inf or NaN on {len(labels)} of {len(rows)} "
                         f"shapes ({', '.join(labels)}): its times there are of a result "
                         "that overflowed")
    failures = sorted({f"{name}: {e['error']}" for r in rows
                       for name, e in [("stock", r["stock"]), *r["fastbn"].items()]
                       if e["ms"] is None})
    lines += [f"- n/a {f}" for f in failures]
    return "\n".join(lines)


def format_summary(summary, backend_names):
    header = ["op", "stock ×copy"]
    for name in backend_names:
        header += [f"{name} ×copy", f"{name} speedup (stock/{name})"]
    table = []
    for op_name, s in summary.items():
        cells = [op_name, _fmt(s["stock_x_copy"], ".2f")]
        for name in backend_names:
            cells += [_fmt(s[name]["x_copy"], ".2f"), _fmt(s[name]["speedup"], ".2f")]
        table.append(cells)
    partial = [f"{op_name} over {s['shapes']} of {s['rows']}" for op_name, s in summary.items()
               if s["shapes"] < s["rows"]]
    note = f"\n- only the shapes where every candidate ran: {', '.join(partial)}" if partial \
        else ""
    return "### geometric means over shapes\n\n" + markdown_table(header, table) + note


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _source_commit():
    """The git commit of fastbn's source tree (an editable install's checkout), with
    "+changes" where its working tree differs; None outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastbn.__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def machine_info():
    cpu = backends.load("cpu")
    return {"cpu_model": _cpu_model(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "fastbn_version": fastbn.__version__, "fastbn_commit": _source_commit(),
            "cpu_build": cpu.build_info() if cpu is not None else None,
            "python": platform.python_version(), "platform": platform.platform(),
            # Other jobs on the machine: how far to trust wall-clock numbers.
            "load_average": [round(v, 2) for v in os.getloadavg()],
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def backend_info(requested):
    """What each requested name resolves to on a CPU tensor ("auto" -> concrete backend)."""
    if requested != "auto":
        ok, why = backends.availability(requested)
        return {"requested": requested, "available": ok, "reason": why,
                "selected": requested if ok else None}
    with fastbn.use_backend("auto"):
        selected = backends.select(torch.empty(0)).name
    return {"requested": "auto", "available": True, "reason": f"auto -> {selected}",
            "selected": selected}


def curvature_suite():
    """The optional curvature suite, benchmarks/bench_curvature.py: it ships with the
    source tree, importable from its root (the working directory of `python -m
    benchmarks`; for `fastbn bench`, the tree an editable install runs from)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastbn.__file__)))
    if (os.path.isfile(os.path.join(root, "benchmarks", "bench_curvature.py"))
            and root not in sys.path):
        sys.path.append(root)
    return importlib.import_module("benchmarks.bench_curvature")


def format_rows(rows):
    """Markdown table of a list of dicts (columns: every key, in first-seen order)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else "n/a" if v is None else str(v)
    return markdown_table(keys, [[cell(r.get(k, "")) for k in keys] for r in rows])


# --- command line -----------------------------------------------------------------------

def build_parser(prog="fastbn bench"):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", nargs="+", default=["auto"],
                   help="fastbn backends to time against stock torch (names or a "
                        "comma-separated list; default auto)")
    p.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS), metavar="OP",
                   help=f"default: all of {', '.join(OPS)}")
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=None,
                   help="e.g. 32x64x56x56 32x64x56x56:cl 1024x512 (default: the "
                        f"{len(FULL_SHAPES)} benchmark shapes)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--quick", action="store_true",
                   help="small shapes, short budget: a smoke run for CI")
    p.add_argument("--budget", type=positive_float, default=None,
                   help="seconds of round-robin timing per (op, shape) (default 1.5, "
                        "--quick 0.05), in 3 to 200 rounds (20 with --quick)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch.set_num_threads (default: torch's choice); use 1 on a "
                        "machine shared with other jobs")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall time, or this thread's CPU time (requires --threads 1)")
    p.add_argument("--suite", nargs="+", choices=["batchnorm", "curvature"],
                   default=["batchnorm"],
                   help="curvature: benchmarks/bench_curvature.py (float32, wall clock, "
                        "the auto backend; --quick gives it batch 16)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="fastbn.memory.keep_freed_memory() for the whole run (stock and "
                        "fastbn alike): freed outputs are reused instead of faulted in anew")
    p.add_argument("--json", metavar="PATH", help="write every number and the machine info")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv=None, prog="fastbn bench"):
    """Run the benchmarks; returns the report (the JSON's content). torch's thread count
    is restored on return."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return _run(parser, args, prog, argv)
    finally:
        torch.set_num_threads(threads)


def _run(parser, args, prog, argv):
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        parser.error("--clock cpu only sees the calling thread: add --threads 1")
    if args.json and not writable(args.json):
        parser.error(f"--json {args.json}: not a file this process can write (checked "
                     "before any timing)")
    if args.keep_freed_memory and not memory.keep_freed_memory():
        parser.error("--keep-freed-memory needs glibc's malloc")
    names = list(dict.fromkeys(n for arg in args.backend for n in arg.split(",") if n))
    for name in names:
        if name not in backends.NAMES:
            parser.error(f"unknown backend {name!r}; expected one of {backends.NAMES}")
    infos = [backend_info(n) for n in names]
    runnable = [i["requested"] for i in infos if i["available"]]
    if "batchnorm" in args.suite and not runnable:
        parser.error("no requested backend is available here: " +
                     "; ".join(f"{i['requested']}: {i['reason']}" for i in infos))
    if "curvature" in args.suite:
        try:
            curvature = curvature_suite()
        except ModuleNotFoundError as err:
            if err.name not in ("benchmarks", "benchmarks.bench_curvature"):
                raise   # the suite's own import failed
            parser.error(f"the curvature suite cannot run ({err}): it ships with fastbn's "
                         "source tree; run `python -m benchmarks --suite curvature` from "
                         "the tree's root")
    dtype = DTYPES[args.dtype]
    shapes = args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    timing = QUICK_TIMING if args.quick else FULL_TIMING
    if args.budget is not None:
        timing = Timing(args.budget, timing.min_runs, timing.max_runs)

    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    machine = machine_info()
    print(f"machine: {machine['cpu_model']}, {machine['cores']} cores, "
          f"{machine['torch_threads']} torch threads, torch {machine['torch_version']}, "
          f"{machine['date']}; {args.clock} clock, load average {machine['load_average']}"
          + ("; freed memory kept" if args.keep_freed_memory else ""))
    if args.clock == "wall" and machine["load_average"][0] >= (machine["cores"] or 1):
        # Threads of a multi-threaded call wait for cores other jobs hold: a call can stall
        # for whole scheduler slices, stock's and fastbn's alike.
        print(f"warning: load average {machine['load_average'][0]} on {machine['cores']} "
              "cores before the run: wall-clock times of multi-threaded calls can stall; "
              "compare on a quiet machine, or use --threads 1 --clock cpu", file=sys.stderr)
    for i in infos:
        state = f"selected {i['selected']}" if i["available"] else f"unavailable ({i['reason']})"
        print(f"backend {i['requested']}: {state}")

    command = " ".join([prog, *(sys.argv[1:] if argv is None else argv)])
    report = {"machine": machine, "command": command,
              "dtype": args.dtype, "quick": args.quick, "backends": infos,
              "timing": vars(timing), "clock": args.clock,
              "keep_freed_memory": args.keep_freed_memory, "results": [], "summary": {}}
    if "batchnorm" in args.suite:
        started = time.perf_counter()
        for op_name in args.ops:
            op_rows = []
            for shape, cl in shapes:
                log(f"  {op_name} {shape_label(shape, cl)} ...")
                op_rows.append(measure(op_name, shape, cl, dtype, runnable, timing,
                                       CLOCKS[args.clock]))
            report["results"] += op_rows
            report["summary"] = summarize(report["results"], runnable)
            print("\n" + format_op_table(op_name, op_rows, runnable, report["summary"]) + "\n",
                  flush=True)
        print(format_summary(report["summary"], runnable))
        log(f"batchnorm suite: {time.perf_counter() - started:.0f} s")
    if "curvature" in args.suite:
        report["curvature"] = curvature.run(quick=args.quick)
        print("\n### curvature\n\n" + format_rows(report["curvature"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
