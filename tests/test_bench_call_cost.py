"""benchmarks/bench_call_cost.py end to end on a few calls: every row present, positive
and finite, the thread count restored. No timing assertions."""

import json
import math

import pytest
import torch

bench_call_cost = pytest.importorskip("benchmarks.bench_call_cost")


@pytest.mark.parametrize("mode", ["eval", "train", "backward"])
def test_reports_both_layers_for_every_shape_and_grad_mode(tmp_path, capsys, mode):
    threads = torch.get_num_threads()
    out = tmp_path / "calls.json"
    bench_call_cost.main(["--mode", mode, "--calls", "3", "--json", str(out)])
    assert torch.get_num_threads() == threads
    rows = json.loads(out.read_text())
    keys = {(tuple(r["shape"]), r["mode"], r["grad"], r["layer"]) for r in rows}
    grads = (True,) if mode == "backward" else (False, True)
    assert keys == {(s, mode, g, layer) for s in bench_call_cost.SHAPES
                    for g in grads for layer in ("stock", "fastbn")}
    assert all(math.isfinite(r[k]) and r[k] > 0 for r in rows for k in ("cold_us", "warm_us"))
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0] == f"{mode} mode, median µs per call"
    rows = sum(line.startswith("| ") for line in lines)
    assert rows == len(grads) * len(bench_call_cost.SHAPES) + 2


def test_bad_call_count_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info:
        bench_call_cost.main(["--calls", "0"])
    assert exit_info.value.code == 2
