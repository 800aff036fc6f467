"""benchmarks/bench_dtypes.py end to end on small shapes: a row per (shape, op, dtype),
float32 the unit. No timing assertions."""

import json
import math

import pytest

pytest.importorskip("fastbn._C")

from benchmarks import bench_dtypes  # noqa: E402


def test_reports_every_op_and_dtype_against_float32(tmp_path, capsys):
    out = tmp_path / "dtypes.json"
    bench_dtypes.main(["--shapes", "4x3x5x5", "4x3x5x5:cl", "6x7", "--rounds", "1",
                       "--json", str(out)])
    rows = json.loads(out.read_text())
    keys = {(r["shape"], r["op"], r["dtype"]) for r in rows}
    assert keys == {(s, op, d) for s in ("4x3x5x5", "4x3x5x5:cl", "6x7")
                    for op in bench_dtypes.OPS for d in ("float32", "float16", "bfloat16")}
    assert all(math.isfinite(r["ms"]) and r["ms"] > 0 for r in rows)
    assert all(r["vs_float32"] == 1.0 for r in rows if r["dtype"] == "float32")
    table = capsys.readouterr().out
    assert table.count("\n| ") == 2 + 3 + 1   # header and rule, the shapes, the geomean


def test_bad_round_count_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        bench_dtypes.main(["--rounds", "0"])
    assert exit_info.value.code == 2
