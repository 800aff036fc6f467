"""The benchmark runner (fastbn.bench) in --quick mode on one tiny shape: JSON schema and
sane numbers. No timing assertions: this machine's timings mean nothing here."""

import argparse
import json
import math
import os
import sys

import pytest

from fastbn import bench

TINY = ["--quick", "--quiet", "--shapes", "4x8x3x3:cl", "--backend", "reference",
        "--budget", "0.01"]


def _positive(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


def _run(tmp_path, *extra):
    path = tmp_path / "bench.json"
    report = bench.main([*TINY, *extra, "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))
    return report


def test_quick_run_writes_schema(tmp_path):
    report = _run(tmp_path)
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["torch_threads"] >= 1
    assert machine["cpu_model"] and machine["torch_version"] and machine["date"]
    # What ran: the source tree's commit (this is a checkout) and the kernels' build.
    assert machine["fastbn_commit"] and len(machine["fastbn_commit"].split("+")[0]) == 40
    assert "cpu_build" in machine
    assert report["backends"] == [{"requested": "reference", "available": True,
                                   "reason": report["backends"][0]["reason"],
                                   "selected": "reference"}]
    assert [r["op"] for r in report["results"]] == list(bench.OPS)
    for row in report["results"]:
        assert row["label"] == "4x8x3x3:cl" and row["channels_last"]
        assert row["shape"] == [4, 8, 3, 3] and row["dtype"] == "float32"
        op = bench.OPS[row["op"]]
        assert row["traffic_bytes"] == (op.reads + op.writes) * row["x_bytes"]
        assert _positive(row["copy_ms"])
        stock, ours = row["stock"], row["fastbn"]["reference"]
        for entry in (stock, ours):
            assert _positive(entry["ms"]) and _positive(entry["x_copy"])
            assert entry["runs"] >= bench.QUICK_TIMING.min_runs
        for key in ("speedup", "gbps"):
            assert _positive(ours[key])
        assert ours["max_rel_err"] < 1e-4   # same numbers as stock torch
        assert row["non_finite"] == []
    for op_name, s in report["summary"].items():
        assert _positive(s["stock_x_copy"])
        assert _positive(s["reference"]["speedup"]) and _positive(s["reference"]["x_copy"])
        assert s["reference"]["shapes"] == 1


def test_failing_candidate_is_recorded_not_raised(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("no batching rule")
    monkeypatch.setattr(bench, "stock_bn", broken)
    report = _run(tmp_path, "--ops", "jvp")
    (row,) = report["results"]
    assert row["stock"] == {"ms": None, "error": "RuntimeError: no batching rule"}
    assert _positive(row["fastbn"]["reference"]["ms"])
    assert "speedup" not in row["fastbn"]["reference"]
    assert report["summary"]["jvp"]["reference"]["speedup"] is None


def test_candidate_failing_after_its_warm_up_is_recorded_not_raised(tmp_path, monkeypatch):
    real = bench.stock_bn
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("out of memory\nmore detail")
        return real(*args, **kwargs)
    monkeypatch.setattr(bench, "stock_bn", flaky)
    report = _run(tmp_path, "--ops", "forward_eval")
    (row,) = report["results"]
    assert row["stock"] == {"ms": None, "error": "RuntimeError: out of memory"}
    assert row["fastbn"]["reference"]["runs"] >= bench.QUICK_TIMING.min_runs


def test_every_timed_call_runs_on_its_backend(tmp_path, monkeypatch):
    """The runner selects a candidate's backend around each of its calls (outside the
    timed region), and stock's calls run with the thread's own choice."""
    from fastbn import backends
    seen = {"stock": set(), "fastbn": set()}
    real_stock, real_fastbn = bench.stock_bn, bench.fastbn_bn

    def stock(*args):
        seen["stock"].add(backends.get_backend())
        return real_stock(*args)

    def fastbn_bn(*args):
        seen["fastbn"].add(backends.get_backend())
        return real_fastbn(*args)
    monkeypatch.setattr(bench, "stock_bn", stock)
    monkeypatch.setattr(bench, "fastbn_bn", fastbn_bn)
    before = backends.get_backend()
    _run(tmp_path, "--ops", "forward_eval", "backward")
    assert seen == {"stock": {before}, "fastbn": {"reference"}}
    assert backends.get_backend() == before


def test_summary_compares_the_same_shapes(tmp_path, monkeypatch):
    """A backend that fails on one of two shapes: every geometric mean of the op is over
    the other shape alone, and the summary table says so."""
    real = bench.fastbn_bn

    def no_2d(x, *args, **kwargs):
        if x.dim() == 2:
            raise RuntimeError("no 2-D kernel")
        return real(x, *args, **kwargs)
    monkeypatch.setattr(bench, "fastbn_bn", no_2d)
    report = _run(tmp_path, "--ops", "forward_eval", "--shapes", "4x8x3x3", "16x8")
    s = report["summary"]["forward_eval"]
    assert (s["shapes"], s["rows"], s["reference"]["shapes"]) == (1, 2, 1)
    nchw = report["results"][0]
    assert s["stock_x_copy"] == pytest.approx(nchw["stock"]["x_copy"])
    assert s["reference"]["x_copy"] == pytest.approx(nchw["fastbn"]["reference"]["x_copy"])
    assert "forward_eval over 1 of 2" in bench.format_summary(report["summary"], ["reference"])


def test_thread_count_is_restored(tmp_path):
    import torch
    before = torch.get_num_threads()
    _run(tmp_path, "--ops", "forward_eval", "--threads", str(before + 1))
    assert torch.get_num_threads() == before
    with pytest.raises(SystemExit):   # an error after the change restores it too
        bench.main([*TINY, "--threads", str(before + 1), "--clock", "cpu"])
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("argv", (["--threads", "0"], ["--backend", "cpu"],
                                  ["--backend", "bogus"], ["--budget", "-1"],
                                  ["--budget", "nan"]))
def test_bad_arguments_are_usage_errors(argv, capsys, monkeypatch):
    monkeypatch.setattr(bench.backends, "availability", lambda name: (False, "not built"))
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*TINY, *argv])
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["missing/out.json", "."])
def test_a_json_path_that_cannot_be_written_is_refused_before_timing(where, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*TINY, "--json", str(tmp_path / where)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and "--json" in captured.err
    assert "forward_train" not in captured.out


def test_the_curvature_suite_is_found_from_outside_the_tree(monkeypatch, tmp_path):
    """`fastbn bench` from any folder (its console script has no tree root on sys.path)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(bench.fastbn.__file__)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path
                                      if p not in ("", ".") and os.path.abspath(p) != root])
    for name in [n for n in sys.modules if n == "benchmarks" or n.startswith("benchmarks.")]:
        monkeypatch.delitem(sys.modules, name)
    assert bench.curvature_suite().__name__ == "benchmarks.bench_curvature"


@pytest.mark.parametrize("load, warned", [(0.1, False), (64.0, True)])
def test_a_busy_machine_is_said_before_wall_clock_timing(load, warned, tmp_path, capsys,
                                                         monkeypatch):
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (load, load, load))
    _run(tmp_path, "--ops", "forward_eval")
    assert ("warning: load average" in capsys.readouterr().err) == warned


def test_a_curvature_suite_that_cannot_run_is_a_usage_error(capsys, monkeypatch):
    """Outside the source tree (an installed package) the suite is not there: say so
    before measuring anything, and exit non-zero."""
    def missing():
        raise ModuleNotFoundError("No module named 'benchmarks'", name="benchmarks")

    monkeypatch.setattr(bench, "curvature_suite", missing)
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*TINY, "--suite", "batchnorm", "curvature"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and "the curvature suite cannot run" in captured.err
    assert "forward_train" not in captured.out


def test_error_against_stock_counts_every_disagreement():
    import torch
    ref = (torch.tensor([1.0, 2.0, float("inf")]), torch.tensor([float("nan"), 1.0]))
    assert bench._max_rel_error(ref, ref) == 0.0   # NaN where stock has NaN, inf with inf
    close = (torch.tensor([1.0, 2.5, float("inf")]), ref[1])
    assert bench._max_rel_error(close, ref) == pytest.approx(0.25)
    for bad in ((torch.full((3,), float("nan")), ref[1]),
                (ref[0], torch.tensor([1.0, 1.0])),
                (ref[0][None], ref[1]),
                ref[:1]):
        assert bench._max_rel_error(bad, ref) == float("inf")


@pytest.mark.parametrize("text, expected", [("32x64x56x56", ((32, 64, 56, 56), False)),
                                            ("32x64x56x56:cl", ((32, 64, 56, 56), True)),
                                            ("1024x512", ((1024, 512), False))])
def test_parse_shape(text, expected):
    assert bench.parse_shape(text) == expected


@pytest.mark.parametrize("text", ["1024", "1024x512:cl", "4x8xa", "4x8x3x3:nhwc", "0x8",
                                  "-2x8"])
def test_parse_shape_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_shape(text)


_FAULTS = """
import resource, sys, torch
from fastbn.memory import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    sys.exit(3)
torch.set_num_threads(1)

def step():                    # two 40 MiB outputs written, then freed
    a = torch.empty(10 << 20).fill_(1); b = torch.empty(10 << 20).fill_(1)
    return float(a[0] + b[0])

for _ in range(10):            # steady state
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_keep_freed_memory_avoids_page_faults():
    """In steady state the next step's outputs reuse the freed blocks, where glibc's
    defaults map blocks over 32 MiB afresh on every allocation and fault their pages in
    (children: the setting is process-wide)."""
    import subprocess
    import sys
    faults = {}
    for mode in ("default", "keep"):
        run = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True,
                             text=True, timeout=120)
        if run.returncode == 3:
            pytest.skip("not glibc")
        assert run.returncode == 0, run.stderr
        faults[mode] = int(run.stdout)
    assert 10 * faults["keep"] < faults["default"], faults


@pytest.mark.parametrize("bad", (0, -1, 2 ** 31, 1.5))
def test_keep_freed_memory_rejects_bad_sizes(bad):
    from fastbn.memory import keep_freed_memory
    with pytest.raises(ValueError):
        keep_freed_memory(bad)


def test_every_candidate_takes_every_slot_of_a_round():
    """A fixed order biased the slot after stock by 1-7%: the order changes every round
    (reproducibly)."""
    seen = []
    calls = {name: (bench.contextlib.nullcontext, lambda name=name: seen.append(name))
             for name in ("stock", "cpu", "copy")}
    timing = bench.Timing(budget_s=math.inf, min_runs=60, max_runs=60)
    times = bench.time_interleaved(calls, timing, bench.time.perf_counter, {})
    assert all(len(ts) == 60 for ts in times.values())
    rounds = [tuple(seen[i:i + 3]) for i in range(0, len(seen), 3)]
    assert all(sorted(r) == ["copy", "cpu", "stock"] for r in rounds)
    for name in calls:
        assert {r.index(name) for r in rounds} == {0, 1, 2}
    assert {r[r.index("cpu") - 1] for r in rounds if r.index("cpu")} == {"stock", "copy"}
    seen.clear()
    bench.time_interleaved(calls, timing, bench.time.perf_counter, {})
    assert [tuple(seen[i:i + 3]) for i in range(0, len(seen), 3)] == rounds


def test_outputs_that_overflow_are_flagged(tmp_path, monkeypatch):
    def overflowing(x, *args):
        return bench.F.batch_norm(x, *args[:4], args[4], bench.MOMENTUM, bench.EPS) * math.inf
    monkeypatch.setattr(bench, "stock_bn", overflowing)
    report = bench.main([*TINY, "--ops", "forward_eval"])
    (row,) = report["results"]
    assert row["non_finite"] == ["stock"]
    table = bench.format_op_table("forward_eval", [row], ["reference"], report["summary"])
    assert "stock's outputs hold inf or NaN on 1 of 1 shapes (4x8x3x3:cl)" in table
