"""benchmarks/bench_builds.py end to end: this build against a copy of itself, which the
other runs must load instead of the checkout's. No timing assertions."""

import json
import math
import shutil

import pytest

pytest.importorskip("fastbn._C")

import fastbn._C  # noqa: E402
from benchmarks import bench_builds  # noqa: E402


def test_a_copy_of_this_build_gives_a_row_per_op_and_the_same_bits(tmp_path, capsys):
    other = tmp_path / "other" / "_C.so"
    other.parent.mkdir()
    shutil.copy(fastbn._C.__file__, other)   # its runs check that they load this file
    out = tmp_path / "builds.json"
    bench_builds.main([str(other), "--shapes", "4x3x5x5", "4x3x5x5:cl", "6x7",
                       "--ops", "forward_train", "backward", "--rounds", "1",
                       "--json", str(out)])
    rows = json.loads(out.read_text())
    assert {(r["shape"], r["op"]) for r in rows} == {
        (s, op) for s in ("4x3x5x5", "4x3x5x5:cl", "6x7") for op in ("forward_train", "backward")}
    assert all(r["same_bits"] for r in rows)
    assert all(math.isfinite(r["other_vs_this"]) and r["this_ms"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert printed.count("\n| ") == 2 + 3 + 1   # header and rule, the shapes, the geomean
    assert "the same bits in every row" in printed


def test_a_missing_build_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        bench_builds.main([str(tmp_path / "missing.so")])
    assert exit_info.value.code == 2
