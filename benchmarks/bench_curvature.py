"""Curvature benchmark: fastbn.curvature on a VGG-style CNN with batch norm (CPU, fp32).

Measures one gradient, one HVP per method, the per-vector cost of matmat with K=16
tangents against a single HVP, the top eigenvalue by Lanczos against a PyHessian-style
power iteration (double-backward HVPs through stock nn.BatchNorm2d in train mode, same
relative tolerance; and Lanczos stopped at the power loop's accuracy), and the peak
memory of a budgeted matmat against its budget.

    python benchmarks/bench_curvature.py [--quick]

Full size: batch 128 of 32×32 images; --quick: batch 16. Times are medians of a few
repetitions after a warm-up, on whatever the machine's load is: compare rows of one run.
"""

import argparse
import copy
import statistics
import time
import warnings

import torch
from torch import nn

import fastbn
from fastbn._arguments import positive_int
from fastbn.curvature import HessianOperator, eigenvalues
from fastbn.curvature._memory import peak_bytes

WIDTHS = (32, "M", 64, "M", 128, 128, "M", 256, 256, "M")   # VGG-style, narrowed for a CPU
TOL = 1e-3
MAX_ITER = 100
K = 16


def vgg_bn(widths=WIDTHS, classes=10, batch_norm=True):
    """Conv3×3 → BatchNorm2d → ReLU blocks with max pooling, global pool, linear head
    (BN after each conv, before ReLU, as in the paper's VGG); batch_norm=False drops the
    BN layers."""
    layers, channels = [], 3
    for width in widths:
        if width == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False),
                       *([nn.BatchNorm2d(width)] if batch_norm else []), nn.ReLU()]
            channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
    return nn.Sequential(*layers)


def seconds(fn, repeats):
    fn()   # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class CountingOperator:
    """Forwards to a HessianOperator and counts Hessian-vector products."""

    def __init__(self, op):
        self.op, self.products = op, 0
        self.shape, self.dtype, self.device, self.progress = op.shape, op.dtype, op.device, False

    def matvec(self, v):
        self.products += 1
        return self.op.matvec(v)


def pyhessian_top_eigenvalue(model, criterion, inputs, targets, tol, max_iter, seed):
    """PyHessian's loop: one create_graph backward, then power iteration of
    torch.autograd.grad HVPs on that graph, stopping on relative eigenvalue change."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = criterion(model(inputs), targets)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    generator = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=generator) for p in params]
    norm = torch.sqrt(sum((x * x).sum() for x in v))
    v = [x / norm for x in v]
    value, products = None, 0
    for _ in range(max_iter):
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        products += 1
        previous, value = value, float(sum((h * x).sum() for h, x in zip(hv, v)))
        norm = torch.sqrt(sum((h * h).sum() for h in hv))
        v = [h / norm for h in hv]
        if previous is not None and abs(value - previous) / (abs(previous) + 1e-6) < tol:
            break
    return value, products


def lanczos_to_match(op, target, most):
    """Fewest Lanczos steps (at most `most`) whose top Ritz value reaches `target` to 1e-6
    relative, and their time; (None, None) if none does.

    Both the Ritz value and the power loop's Rayleigh quotient are lower bounds of λ_max,
    and the Ritz value grows with every step, so the first step at or above the power
    loop's λ is Lanczos at that loop's accuracy (whose stopping rule, a small relative
    change, is looser than Lanczos's residual test). Same seed, so the first steps of
    every run are the same; each run is timed from scratch, gradient graph included."""
    for steps in range(1, most + 1):
        op.clear_cache()
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # stopped before tol: wanted
            values, _ = eigenvalues(op, k=1, tol=TOL, max_iter=steps, seed=0)
        elapsed = time.perf_counter() - start
        if float(values[0]) >= target - 1e-6 * abs(target):
            return steps, elapsed
    return None, None


def double_backward_hvp(model, criterion, inputs, targets, v):
    """One HVP the stock way: create_graph backward, then a backward of grad · v."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(criterion(model(inputs), targets), params, create_graph=True)
    return torch.autograd.grad(grads, params, grad_outputs=v)


def batch_norm_overhead(model, criterion, inputs, targets, repeats):
    """HVP time with batch norm over HVP time without, for fastbn and for stock torch."""
    plain = vgg_bn(batch_norm=False)
    data = (inputs, targets)
    rows = []
    for method in ("forward-over-reverse", "reverse-over-reverse"):
        times = []
        for net in (model, plain):
            op = HessianOperator(net, criterion, data, method=method)
            v = torch.randn(op.shape[0])
            times.append(seconds(lambda: (op.clear_cache(), op.matvec(v)), repeats))
        rows.append((f"HVP with BN / without BN, fastbn {method}", times[0] / times[1],
                     f"{times[0]:.3g} s vs {times[1]:.3g} s"))
    times = []
    for net in (copy.deepcopy(model), plain):     # stock nn.BatchNorm2d in train mode
        v = [torch.randn_like(p) for p in net.parameters()]
        times.append(seconds(lambda: double_backward_hvp(net, criterion, inputs, targets, v),
                             repeats))
    rows.append(("HVP with BN / without BN, stock double backward", times[0] / times[1],
                 f"{times[0]:.3g} s vs {times[1]:.3g} s"))
    return rows


def run(quick: bool) -> list[dict]:
    torch.manual_seed(0)
    batch = 16 if quick else 128
    repeats = 1 if quick else 3
    model = vgg_bn()
    model.train()
    criterion = nn.CrossEntropyLoss()
    inputs = torch.randn(batch, 3, 32, 32)
    targets = torch.randint(0, 10, (batch,))
    data = (inputs, targets)
    rows = []

    def row(measure, value, unit, note=""):
        rows.append({"measure": measure, "value": value, "unit": unit, "note": note,
                     "batch": batch, "threads": torch.get_num_threads()})

    for measure, ratio, note in batch_norm_overhead(model, criterion, inputs, targets, repeats):
        row(measure, ratio, "x", note)

    # chunk_size=K: its matmat is the one-pass K-tangent form (no budget probes).
    forward = HessianOperator(model, criterion, data, method="forward-over-reverse",
                              chunk_size=K)
    reverse = HessianOperator(model, criterion, data, method="reverse-over-reverse")
    size = forward.shape[0]
    v = torch.randn(size)
    row("parameters", size, "count")
    row("gradient", seconds(forward.grad, repeats), "s")
    hvp_time = seconds(lambda: forward.matvec(v), repeats)
    row("HVP forward-over-reverse", hvp_time, "s")
    row("HVP reverse-over-reverse, functional", seconds(
        lambda: (reverse.clear_cache(), reverse.matvec(v)), repeats), "s",
        "forward + backward + double backward")
    row("HVP reverse-over-reverse, retained graph", seconds(lambda: reverse.matvec(v), repeats),
        "s", "matvec on one batch: one more backward per product")

    V = torch.randn(size, K)
    matmat_time = seconds(lambda: forward.matmat(V), 1)
    row(f"matmat K={K}, per vector", matmat_time / K, "s",
        f"{(matmat_time / K) / hvp_time:.2f}x the time of one forward-over-reverse HVP")

    for chunk in (2, 4, 8):   # the fastest chunk is a property of the machine and model
        chunked = HessianOperator(model, criterion, data, method="forward-over-reverse",
                                  chunk_size=chunk)
        chunked_time = seconds(lambda: chunked.matmat(V), 1)
        row(f"matmat K={K} in chunks of {chunk}, per vector", chunked_time / K, "s",
            f"{(chunked_time / K) / hvp_time:.2f}x the time of one forward-over-reverse HVP")

    counting = CountingOperator(reverse)    # keeps the gradient graph between products
    reverse.clear_cache()       # its build is part of the time, as in the power loop
    start = time.perf_counter()
    values, _ = eigenvalues(counting, k=1, tol=TOL, max_iter=MAX_ITER, seed=0)
    lanczos_time = time.perf_counter() - start
    row("top eigenvalue, Lanczos (fastbn)", lanczos_time, "s",
        f"λ={float(values[0]):.5g}, {counting.products} HVPs, residual ≤ {TOL}·|λ|")
    stock = copy.deepcopy(model)          # stock nn.BatchNorm2d; train mode updates its stats
    start = time.perf_counter()
    value, products = pyhessian_top_eigenvalue(stock, criterion, inputs, targets, TOL,
                                               MAX_ITER, seed=0)
    power_time = time.perf_counter() - start
    row("top eigenvalue, PyHessian-style power", power_time, "s",
        f"λ={value:.5g}, {products} HVPs, relative change < {TOL}")
    steps, matched_time = lanczos_to_match(reverse, value, MAX_ITER)
    if steps is None:
        row("top eigenvalue, Lanczos to the power loop's λ", None, "s",
            f"not reached in {MAX_ITER} steps")
    else:
        row("top eigenvalue, Lanczos to the power loop's λ", matched_time, "s",
            f"{steps} HVPs: the first Ritz value ≥ the power loop's λ "
            f"(the power loop takes {power_time / matched_time:.2f}x its time)")

    # A budget of about four tangents: matmat then runs K in chunks that must fit it.
    probe = HessianOperator(model, criterion, data, method="forward-over-reverse",
                            max_memory=1)
    probe.matmat(V[:, :1])
    one, two = probe.probe_peaks
    budget = one + 3 * max(two - one, 1)
    budgeted = HessianOperator(model, criterion, data, method="forward-over-reverse",
                               max_memory=budget)
    budgeted.matmat(V[:, :1])      # sizes the chunks
    result_bytes = V.numel() * V.element_size()     # the (P, K) result, outside the budget
    peak = peak_bytes(lambda: budgeted.matmat(V), budgeted.device) - result_bytes
    row("matmat working-memory budget", budget / 2**20, "MiB",
        f"chunk_size={budgeted.chunk_size}")
    row(f"matmat K={K} peak beyond its result", peak / 2**20, "MiB",
        f"{peak / budget:.2f} of the budget")
    unchunked = peak_bytes(lambda: forward.matmat(V), forward.device) - result_bytes
    row(f"matmat K={K} unchunked, beyond its result", unchunked / 2**20, "MiB")
    return rows


def print_table(rows):
    print(f"{'measure':42} {'value':>12} {'unit':>6}  note")
    for r in rows:
        value = f"{r['value']:.4g}" if isinstance(r["value"], float) else \
            "n/a" if r["value"] is None else str(r["value"])
        print(f"{r['measure']:42} {value:>12} {r['unit']:>6}  {r['note']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 16 instead of 128")
    parser.add_argument("--threads", type=positive_int,
                        help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = run(args.quick)
    print(f"fastbn {fastbn.__version__}, torch {torch.__version__}, backend "
          f"{fastbn.get_backend()}, batch {rows[0]['batch']}, {rows[0]['threads']} threads")
    print_table(rows)


if __name__ == "__main__":
    main()
