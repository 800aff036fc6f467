"""Where the performance targets stand, from the runner's JSON files.

    python -m benchmarks.targets FLOAT32.json [--half FLOAT16.json BFLOAT16.json]
        [--backend cpu]

Prints the tables of benchmarks/RESULTS.md's "Where the targets stand" sections: per op,
the geometric mean of fastbn's speedup over stock over all shapes and over the groups the
targets name (NCHW 2-D, channels-last, 1-D and 3-D), fastbn's and stock's time as a
multiple of a copy, the range of speedups and the rows below stock; with `--half`, each
half dtype's speedup and its time over float32's, geometric mean and worst row. The runs
of different dtypes are separate processes, whose speeds can differ by more than that
ratio: `benchmarks.bench_dtypes` times the dtypes in one process.
"""

import argparse
import json

from fastbn.bench import geomean

GROUPS = ("NCHW 2-D", "channels-last", "1-D, 3-D")


def group(row):
    if row["channels_last"]:
        return "channels-last"
    return "NCHW 2-D" if len(row["shape"]) == 4 else "1-D, 3-D"


def _ran(rows, backend):
    return [r for r in rows if r["stock"]["ms"] is not None
            and r["fastbn"][backend]["ms"] is not None]


def _by_op(rows):
    ops = {}
    for r in rows:
        ops.setdefault(r["op"], []).append(r)
    return ops


def float32_table(rows, backend):
    """Markdown rows: op, speedup over all shapes and per group, ×copy, min-max."""
    lines = ["| op | speedup all | " + " | ".join(GROUPS) + " | fastbn ×copy | stock ×copy "
             "| min–max speedup |", "| --- " * (5 + len(GROUPS)) + "|"]
    below = []
    for op, op_rows in _by_op(_ran(rows, backend)).items():
        speedups = [r["fastbn"][backend]["speedup"] for r in op_rows]
        groups = [geomean([r["fastbn"][backend]["speedup"] for r in op_rows
                           if group(r) == g]) for g in GROUPS]
        cells = [op, f"{geomean(speedups):.2f}",
                 *("n/a" if g is None else f"{g:.2f}" for g in groups),
                 f"{geomean([r['fastbn'][backend]['x_copy'] for r in op_rows]):.2f}",
                 f"{geomean([r['stock']['x_copy'] for r in op_rows]):.2f}",
                 f"{min(speedups):.2f}–{max(speedups):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
        below += [f"{op} {r['label']} {r['fastbn'][backend]['speedup']:.2f}"
                  for r in op_rows if r["fastbn"][backend]["speedup"] < 1]
    return lines, below


def half_table(float32_rows, halves, backend):
    """Markdown rows: op, each half dtype's speedup, and its time over float32's
    (geomean, worst row in brackets)."""
    base = {(r["op"], r["label"]): r["fastbn"][backend] for r in _ran(float32_rows, backend)}
    names = [rows[0]["dtype"] for rows in halves]
    lines = ["| op | " + " | ".join(f"{n} speedup" for n in names) + " | "
             + " | ".join(f"{n} / float32 time" for n in names) + " |",
             "| --- " * (1 + 2 * len(names)) + "|"]
    by_dtype = [_by_op(_ran(rows, backend)) for rows in halves]
    for op in _by_op(_ran(float32_rows, backend)):
        speed, time = [], []
        for ops in by_dtype:
            op_rows = [r for r in ops.get(op, []) if (op, r["label"]) in base]
            if not op_rows:
                speed.append("n/a")
                time.append("n/a")
                continue
            speed.append(f"{geomean([r['fastbn'][backend]['speedup'] for r in op_rows]):.2f}")
            ms = [r["fastbn"][backend]["ms"] / base[op, r["label"]]["ms"] for r in op_rows]
            time.append(f"{geomean(ms):.2f} ({max(ms):.2f})")
        lines.append("| " + " | ".join([op, *speed, *time]) + " |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("float32", help="the runner's --json file of a float32 run")
    parser.add_argument("--half", nargs="+", default=[], metavar="JSON",
                        help="the runner's --json files of float16 / bfloat16 runs")
    parser.add_argument("--backend", default="cpu")
    args = parser.parse_args(argv)
    reports = []
    for path in [args.float32, *args.half]:
        try:
            with open(path) as f:
                reports.append(json.load(f))
        except (OSError, ValueError) as err:
            parser.error(f"{path}: not a runner's JSON file ({err})")
        if not reports[-1]["results"]:
            parser.error(f"{path}: no batch-norm rows (a --suite curvature run?)")
        if args.backend not in reports[-1]["results"][0]["fastbn"]:
            parser.error(f"{path}: no backend {args.backend!r} in it")
    if reports[0]["dtype"] != "float32":
        parser.error(f"{args.float32} is a {reports[0]['dtype']} run, not float32")
    lines, below = float32_table(reports[0]["results"], args.backend)
    print("\n".join(lines))
    print("\nrows below stock: " + (", ".join(below) or "none"))
    if args.half:
        print()
        print("\n".join(half_table(reports[0]["results"],
                                   [r["results"] for r in reports[1:]], args.backend)))


if __name__ == "__main__":
    main()
