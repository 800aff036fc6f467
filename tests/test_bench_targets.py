"""benchmarks/targets.py on made-up runner JSON: the geometric means per group, the
rows below stock and the half dtypes' time over float32's."""

import json
import math

import pytest

from benchmarks import targets


def _row(op, shape, channels_last, speedup, ms, dtype="float32"):
    label = "x".join(map(str, shape)) + (":cl" if channels_last else "")
    return {"op": op, "shape": list(shape), "channels_last": channels_last, "label": label,
            "dtype": dtype, "stock": {"ms": ms * speedup, "x_copy": 2.0 * speedup},
            "fastbn": {"cpu": {"ms": ms, "x_copy": 2.0, "speedup": speedup}}}


def _write(tmp_path, name, dtype, rows):
    path = tmp_path / name
    path.write_text(json.dumps({"dtype": dtype, "results": rows}))
    return str(path)


def test_tables_from_runner_json(tmp_path, capsys):
    rows = [_row("backward", (8, 4, 3, 3), False, 4.0, 1.0),
            _row("backward", (8, 4, 5, 5), False, 1.0, 1.0),
            _row("backward", (8, 4, 3, 3), True, 0.5, 2.0),
            _row("backward", (8, 4), False, 2.0, 1.0)]
    half = [dict(_row(r["op"], r["shape"], r["channels_last"], 1.0, 0.5 * r["fastbn"]["cpu"]
                      ["ms"], "float16")) for r in rows[:3]]
    half[0]["fastbn"]["cpu"]["ms"] = 2.0   # twice float32's time on that row
    targets.main([_write(tmp_path, "f32.json", "float32", rows),
                  "--half", _write(tmp_path, "f16.json", "float16", half)])
    out = capsys.readouterr().out
    assert f"| backward | {math.sqrt(2):.2f} | 2.00 | 0.50 | 2.00 | 2.00 |" in out
    assert "| 0.50–4.00 |" in out
    assert "rows below stock: backward 8x4x3x3:cl 0.50" in out
    # float16 / float32 time: 2.0, 0.5, 0.5 -> geomean 0.63, worst 2.00
    assert f"| backward | 1.00 | {(2.0 * 0.5 * 0.5) ** (1 / 3):.2f} (2.00) |" in out


def test_a_run_of_another_dtype_is_refused(tmp_path):
    path = _write(tmp_path, "f16.json", "float16", [_row("jvp", (4, 2), False, 1.0, 1.0)])
    with pytest.raises(SystemExit):
        targets.main([path])


def test_a_missing_or_unreadable_file_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{")
    for path in (tmp_path / "missing.json", tmp_path / "bad.json"):
        with pytest.raises(SystemExit):
            targets.main([str(path)])
        assert "not a runner's JSON file" in capsys.readouterr().err
