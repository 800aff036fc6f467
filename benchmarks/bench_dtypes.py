"""Time of the cpu kernels at float16 and bfloat16 relative to float32, in one process.

    python -m benchmarks.bench_dtypes [--shapes ...] [--ops ...] [--rounds 15]
        [--keep-freed-memory] [--json PATH]

"At least as fast as fp32" compares two dtypes, and the runner times each dtype in its
own run: on a shared machine a run can be 1.5x slower than the next, stock included, which
swamps the ratio. Here every (op, dtype) of a shape is timed in turn, round after round,
and each keeps its fastest round (the one least disturbed). The `cpu` backend's functions
are called directly (no layer, no autograd), each dtype on the same values.
"""

import argparse
import json
import math
import time

import torch

import fastbn.memory
from fastbn._arguments import positive_int
from fastbn.backends import cpu
from fastbn.bench import DTYPES, FULL_SHAPES, geomean, make_inputs, parse_shape, shape_label

OPS = ("forward_train", "forward_eval", "backward", "jvp", "double_backward")
ROUND_S = 0.015  # calls of one (op, dtype) per round: this long


def _calls(shape, channels_last, dtype):
    """op -> a call of its cpu kernel on the runner's inputs in this dtype (per-channel
    ones float32, as a half layer's parameters)."""
    inputs = make_inputs(shape, channels_last, dtype)
    x, grad_y, x_t = inputs.x, inputs.dy, inputs.x_t
    w, b = inputs.weight.float(), inputs.bias.float()
    rm, rv = inputs.running_mean.float(), inputs.running_var.float()
    _, mean, invstd = cpu.forward_train(x, w, b, 1e-5)
    return {
        "forward_train": lambda: cpu.forward_train(x, w, b, 1e-5),
        "forward_eval": lambda: cpu.forward_eval(x, rm, rv, w, b, 1e-5),
        "backward": lambda: cpu.backward(grad_y, x, mean, invstd, w, b),
        "jvp": lambda: cpu.forward_jvp(x_t, w, b, x, mean, invstd, w, b),
        "double_backward": lambda: cpu.backward_backward(x_t, w, b, grad_y, x, mean, invstd,
                                                         w, b),
    }


def run(shapes, ops, dtypes, rounds):
    """Rows of {shape, op, dtype, ms, vs_float32}: each the fastest round's ms per call."""
    rows = []
    for shape, channels_last in shapes:
        calls = {}
        for name in ("float32", *dtypes):
            per_op = _calls(shape, channels_last, DTYPES[name])
            for op in ops:
                calls[op, name] = per_op[op]
        best = dict.fromkeys(calls, math.inf)
        for _ in range(rounds):
            for key, call in calls.items():
                start, n = time.perf_counter(), 0
                while time.perf_counter() - start < ROUND_S:
                    call()
                    n += 1
                best[key] = min(best[key], (time.perf_counter() - start) / n)
        for (op, name), seconds in best.items():
            rows.append({"shape": shape_label(shape, channels_last), "op": op, "dtype": name,
                         "ms": seconds * 1e3, "vs_float32": seconds / best[op, "float32"]})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=FULL_SHAPES,
                        help=f"default: the runner's {len(FULL_SHAPES)} shapes")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--dtypes", nargs="+", choices=("float16", "bfloat16"),
                        default=["float16", "bfloat16"])
    parser.add_argument("--rounds", type=positive_int, default=15)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="fastbn.memory.keep_freed_memory() first (as the runner's flag)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if not cpu.available()[0]:
        parser.error(cpu.available()[1])
    if args.keep_freed_memory:
        fastbn.memory.keep_freed_memory()
    rows = run(args.shapes, args.ops, args.dtypes, args.rounds)
    cols = [(op, name) for op in args.ops for name in args.dtypes]
    print(f"{torch.get_num_threads()} threads; time / float32 time, fastest of "
          f"{args.rounds} rounds")
    print("| shape | " + " | ".join(f"{op} {name}" for op, name in cols) + " |")
    print("| --- " * (len(cols) + 1) + "|")
    ratio = {(r["shape"], r["op"], r["dtype"]): r["vs_float32"] for r in rows}
    labels = list(dict.fromkeys(r["shape"] for r in rows))
    for label in labels:
        print(f"| {label} | " + " | ".join(f"{ratio[label, op, name]:.2f}" for op, name in cols)
              + " |")
    print("| geomean | " + " | ".join(
        f"{geomean(ratio[label, op, name] for label in labels):.2f}" for op, name in cols) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
