"""Data-parallel probes, training and `fastbn reproduce`: 2 processes equal one on the
concatenated batch."""

import copy
import json
import math
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fastbn
from fastbn.probes import SmoothnessProbe, gradient_step_probe
from fastbn.testing import run_processes

DT = torch.float64
WORLD = 2
BATCH = 8


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3),
                          nn.BatchNorm1d(3)).to(DT).train()
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(BATCH, 4, generator=gen, dtype=DT)
    targets = torch.randint(0, 3, (BATCH,), generator=gen)
    return model, inputs, targets


def _shard(tensor, rank):
    return tensor.chunk(WORLD)[rank]


def _probe(model, batch, group=None):
    probe = SmoothnessProbe(model, nn.functional.cross_entropy, 0.1, every=1, sharpness=True,
                            sharpness_max_iter=5, process_group=group)
    return {"gradient_step": gradient_step_probe(model, nn.functional.cross_entropy, batch,
                                                 0.1, multipliers=(0.5, 2.0),
                                                 process_group=group),
            "callback": probe(0, batch)}


def _train_step(model, batch, group=None):
    from fastbn.experiments.training import train
    result = train(model, nn.functional.cross_entropy, [batch], 1, lr=0.1,
                   classification=True, progress=False, process_group=group)
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "curves": result["curves"]}


def _worker(rank, world, task):
    model, inputs, targets = _setup()
    batch = (_shard(inputs, rank), _shard(targets, rank))
    group = dist.group.WORLD
    if task == "probe":
        return _probe(model, batch, group)
    return _train_step(fastbn.convert(model, sync=True, process_group=group), batch, group)


def _assert_close(got, want, where, exact=False):
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for key in want:
            _assert_close(got[key], want[key], f"{where}.{key}", exact)
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{where}[{i}]", exact)
    else:
        torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(want),
                                   rtol=0 if exact else 1e-7, atol=0 if exact else 1e-9,
                                   msg=where)


@pytest.mark.parametrize("task", ["probe", "train"])
def test_two_processes_equal_one_on_the_concatenated_batch(task):
    results = run_processes(_worker, WORLD, task)
    model, inputs, targets = _setup()
    if task == "probe":
        expected = _probe(model, (inputs, targets))
    else:
        expected = _train_step(fastbn.convert(copy.deepcopy(model)), (inputs, targets))
    for rank, result in enumerate(results):
        assert "value" in result, result.get("trace", result)
        _assert_close(result["value"], expected, f"rank {rank}")
    # the same numbers (parameters, running statistics) on every process, bit for bit
    _assert_close(results[1]["value"], results[0]["value"], "rank 1 vs 0", exact=True)


def _reproduce_worker(rank, world, out_root):
    from fastbn.experiments import config
    from fastbn.experiments.cli import reproduce_main
    from tests.experiments.test_reproduce import TINY, TINY_PRESET
    config.QUICK = TINY_PRESET  # spawned processes do not see the parent's monkeypatch
    out = os.path.join(out_root, f"rank{rank}")
    return reproduce_main(TINY + ["--experiment", "vgg", "--out", out],
                          process_group=dist.group.WORLD)


def test_reproduce_on_two_processes_writes_once(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    results = run_processes(_reproduce_worker, WORLD, str(tmp_path))
    for result in results:
        assert result.get("value") == 0, result.get("trace", result)
    assert not (tmp_path / "rank1").exists()  # only rank 0 writes
    written = json.loads((tmp_path / "rank0" / "results.json").read_text())
    assert written["environment"]["world_size"] == WORLD
    for model in ("plain", "bn"):
        run = written["experiments"]["vgg"][model]
        assert len(run["curves"]["loss"]) == 6 and run["diverged_at_step"] is None
        for field in ("loss", "grad_norm", "loss_max", "beta_eff", "sharpness"):
            values = run["probes"][field]   # non-finite: null (NaN) or "inf" in strict JSON
            assert len(values) == 6 and all(isinstance(v, float) and math.isfinite(v)
                                            for v in values), field
        assert all(math.isfinite(v) for v in run["curves"]["loss"] + run["curves"]["accuracy"])
