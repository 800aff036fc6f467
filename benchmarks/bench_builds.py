"""This checkout's cpu kernels against another build of fastbn._C: time and bits.

    python -m benchmarks.bench_builds OTHER.so [--shapes ...] [--ops ...]
        [--dtype float32] [--threads 1] [--rounds 4] [--json PATH]

A kernel change is measured against the build before it (a copy of the earlier
fastbn/_C*.so, of the same kernel interface: this checkout's `cpu` backend calls both;
across a change of the interface, compare through the runner from two checkouts, each
with its own build in place). One process cannot hold two builds of one extension module (the second
load returns the first), so each build runs in its own process, the two in turns for
`--rounds` rounds, and each (op, shape) keeps its fastest time over every round (the one
least disturbed on a shared machine). Both builds run the same ops on the same seeded
inputs (`bench_dtypes`' calls of the `cpu` backend: no layer, no autograd) and the outputs
are compared bit for bit. Freed memory is kept (fastbn.memory.keep_freed_memory): where
malloc gives large outputs back, a process may fault them in anew on every call and
another not (a 32x64x56x56 double backward took 6 to 34 ms in runs of one build).
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# No fastbn import up here: a run of the other build loads it as fastbn._C before anything
# of fastbn's is imported (_child), and this module is that run's entry point.

SUBROUNDS = 10   # timed stretches of each (op, shape) per process
ROOT = Path(__file__).resolve().parents[1]   # where `-m benchmarks.bench_builds` runs


def _load_build(path):
    """Makes `path` the fastbn._C that fastbn imports (before anything imports it)."""
    from importlib.machinery import ExtensionFileLoader
    from importlib.util import module_from_spec, spec_from_file_location
    loader = ExtensionFileLoader("fastbn._C", path)
    module = module_from_spec(spec_from_file_location("fastbn._C", path, loader=loader))
    loader.exec_module(module)
    sys.modules["fastbn._C"] = module


def _measure(shapes, ops, dtype, outputs_path):
    """{"op shape": fastest seconds per call}; every op's outputs saved to outputs_path."""
    from benchmarks.bench_dtypes import ROUND_S, _calls
    from fastbn.bench import DTYPES, shape_label
    best, outputs = {}, {}
    for shape, channels_last in shapes:
        calls = _calls(shape, channels_last, DTYPES[dtype])
        for op in ops:
            key = f"{op} {shape_label(shape, channels_last)}"
            result = calls[op]()
            outputs[key] = [t for t in (result if isinstance(result, tuple) else (result,))
                            if isinstance(t, torch.Tensor)]
            best[key] = math.inf
            for _ in range(SUBROUNDS):
                start, n = time.perf_counter(), 0
                while time.perf_counter() - start < ROUND_S:
                    calls[op]()
                    n += 1
                best[key] = min(best[key], (time.perf_counter() - start) / n)
    torch.save(outputs, outputs_path)
    return best


def _child(argv):
    build, outputs_path, threads, dtype, ops, *shapes = argv
    if build != "-":
        _load_build(build)
    import fastbn.memory
    from fastbn.backends import cpu
    from fastbn.bench import parse_shape
    fastbn.memory.keep_freed_memory()
    if not cpu.available()[0]:
        raise SystemExit(cpu.available()[1])
    if build != "-" and Path(cpu._C.__file__) != Path(build):
        raise SystemExit(f"fastbn runs {cpu._C.__file__}, not {build}")
    torch.set_num_threads(int(threads))
    print(json.dumps(_measure([parse_shape(s) for s in shapes], ops.split(","), dtype,
                              outputs_path)))


def run(other, shapes, ops, dtype, threads, rounds):
    """Rows of {shape, op, this_ms, other_ms, other_vs_this, same_bits}."""
    from fastbn.bench import shape_label
    labels = [shape_label(*s) for s in shapes]
    best = {"this": {}, "other": {}}
    with tempfile.TemporaryDirectory() as tmp:
        saved = {name: str(Path(tmp) / f"{name}.pt") for name in best}
        for _ in range(rounds):
            for name, build in (("this", "-"), ("other", other)):
                done = subprocess.run(
                    [sys.executable, "-m", "benchmarks.bench_builds", "--child", build,
                     saved[name], str(threads), dtype, ",".join(ops), *labels],
                    cwd=ROOT, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"the {name} build's run failed:\n{done.stderr[-3000:]}")
                for key, seconds in json.loads(done.stdout).items():
                    best[name][key] = min(best[name].get(key, math.inf), seconds)
        this_out, other_out = (torch.load(saved[name]) for name in ("this", "other"))
    rows = []
    for label in labels:
        for op in ops:
            key = f"{op} {label}"
            a, b = this_out[key], other_out[key]
            rows.append({"shape": label, "op": op, "this_ms": best["this"][key] * 1e3,
                         "other_ms": best["other"][key] * 1e3,
                         "other_vs_this": best["other"][key] / best["this"][key],
                         "same_bits": len(a) == len(b) and all(map(torch.equal, a, b))})
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child(argv[1:])
    from benchmarks.bench_dtypes import OPS
    from fastbn._arguments import positive_int
    from fastbn.bench import DTYPES, FULL_SHAPES, geomean, parse_shape
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", help="the other build: a copy of a fastbn/_C*.so")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=FULL_SHAPES,
                        help=f"default: the runner's {len(FULL_SHAPES)} shapes")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--rounds", type=positive_int, default=4)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if not Path(args.other).is_file():
        parser.error(f"no such file: {args.other}")
    rows = run(str(Path(args.other).resolve()), args.shapes, args.ops, args.dtype, args.threads, args.rounds)
    print(f"{args.dtype}, {args.threads} thread(s), fastest of {args.rounds} rounds x "
          f"{SUBROUNDS}; ms per call, this build (other / this)")
    print("| shape | " + " | ".join(args.ops) + " |")
    print("| --- " * (len(args.ops) + 1) + "|")
    cell = {(r["shape"], r["op"]): r for r in rows}
    for label in dict.fromkeys(r["shape"] for r in rows):
        print(f"| {label} | " + " | ".join(
            f"{cell[label, op]['this_ms']:.3g} ({cell[label, op]['other_vs_this']:.3f})"
            for op in args.ops) + " |")
    print("| geomean | " + " | ".join(
        f"({geomean(r['other_vs_this'] for r in rows if r['op'] == op):.3f})"
        for op in args.ops) + " |")
    differing = [f"{r['op']} {r['shape']}" for r in rows if not r["same_bits"]]
    print("outputs: " + ("the same bits in every row" if not differing
                         else "different bits in " + ", ".join(differing)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
