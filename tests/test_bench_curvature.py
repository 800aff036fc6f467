"""benchmarks/bench_curvature.py --quick end to end: every measure present and sane, the
eigenvalue estimates agreeing, the budgeted matmat within its budget. No timing
assertions: this machine's timings mean nothing here."""

import math
import re

import pytest
import torch

bench_curvature = pytest.importorskip("benchmarks.bench_curvature")


@pytest.mark.slow
def test_quick_run_reports_every_measure():
    torch.manual_seed(0)
    rows = {row["measure"]: row for row in bench_curvature.run(quick=True)}
    for measure, row in rows.items():
        assert isinstance(row["value"], (int, float)) and math.isfinite(row["value"]), measure
        assert row["value"] > 0, measure
    k = bench_curvature.K
    for measure in ("gradient", "HVP forward-over-reverse", f"matmat K={k}, per vector",
                    *(f"matmat K={k} in chunks of {c}, per vector" for c in (2, 4, 8)),
                    "top eigenvalue, Lanczos (fastbn)", "top eigenvalue, PyHessian-style power",
                    "top eigenvalue, Lanczos to the power loop's λ"):
        assert measure in rows and rows[measure]["unit"] == "s", measure
    lanczos, power = (float(re.search(r"λ=([-\d.e]+)", rows[m]["note"]).group(1))
                      for m in ("top eigenvalue, Lanczos (fastbn)",
                                "top eigenvalue, PyHessian-style power"))
    assert math.isclose(lanczos, power, rel_tol=5e-3)
    within = float(rows[f"matmat K={k} peak beyond its result"]["note"].split()[0])
    assert within <= 1.0
    chunk = int(rows["matmat working-memory budget"]["note"].removeprefix("chunk_size="))
    assert 1 <= chunk <= 4     # the budget is about four tangents' worth


@pytest.mark.parametrize("module, argv", [("bench_curvature", ["--threads", "0"]),
                                          ("bench_distributed", ["--ranks", "0"])])
def test_counts_below_one_are_usage_errors(module, argv, capsys):
    """Refused before any work (--threads 0 was ignored, --ranks 0 an IndexError)."""
    script = pytest.importorskip(f"benchmarks.{module}")
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    assert "must be at least 1, got 0" in capsys.readouterr().err
