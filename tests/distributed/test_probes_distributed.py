"""Data-parallel probes refuse, on every process concerned, what would hang or go local."""

import torch
import torch.distributed as dist
from torch import nn

from fastbn.probes import SmoothnessProbe, gradient_step_probe, top_hessian_eigenvalue
from fastbn.testing import run_processes

DT = torch.float64


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(),
                          nn.Linear(5, 3)).to(DT)
    generator = torch.Generator().manual_seed(1)
    return (model, torch.randn(6, 4, generator=generator, dtype=DT),
            torch.randint(0, 3, (6,), generator=generator))


def _refusal(probe):
    try:
        probe()
    except ValueError as error:
        return str(error)
    return None


def _empty_shard_worker(rank, world):
    model, inputs, targets = _setup()
    criterion, group = nn.CrossEntropyLoss(), dist.group.WORLD
    shard = (inputs[:0], targets[:0]) if rank == 0 else (inputs, targets)
    messages = [
        _refusal(lambda: gradient_step_probe(model, criterion, shard, 0.1,
                                             process_group=group)),
        _refusal(lambda: SmoothnessProbe(model, criterion, 0.1, every=1, sharpness=True,
                                         process_group=group)(0, shard)),
    ]
    # The group is still in step: a probe of non-empty shards runs.
    loss = gradient_step_probe(model, criterion, (inputs, targets), 0.1, multipliers=(1.0,),
                               process_group=group)["loss"]
    return messages, loss


def test_an_empty_shard_is_an_error_on_every_process():
    """Not a wait in the first collective on the processes whose shard passed."""
    results = run_processes(_empty_shard_worker, 2, collective_timeout=15, join_timeout=120)
    assert all("value" in result for result in results), results
    (empty, _), (full, _) = (result["value"] for result in results)
    assert all(message and "empty batch" in message for message in empty), empty
    assert all(message and "process 0 of the group refused its batch" in message
               for message in full), full
    assert results[0]["value"][1] == results[1]["value"][1]


def _non_member_worker(rank, world):
    first_only = dist.new_group([0])
    model, inputs, targets = _setup()
    criterion, batch = nn.CrossEntropyLoss(), (inputs, targets)
    if rank == 0:   # a member: the probe of its group of one
        return gradient_step_probe(model, criterion, batch, 0.1, multipliers=(1.0,),
                                   process_group=first_only)["loss"]
    return [
        _refusal(lambda: gradient_step_probe(model, criterion, batch, 0.1,
                                             process_group=first_only)),
        _refusal(lambda: top_hessian_eigenvalue(model, criterion, batch, max_iter=5,
                                                process_group=first_only)),
        _refusal(lambda: SmoothnessProbe(model, criterion, 0.1, process_group=first_only)),
    ]


def test_a_process_outside_the_group_is_refused():
    results = run_processes(_non_member_worker, 2, collective_timeout=15, join_timeout=120)
    assert all("value" in result for result in results), results
    assert isinstance(results[0]["value"], float)
    for caller, message in zip(("gradient_step_probe", "top_hessian_eigenvalue",
                                "SmoothnessProbe"), results[1]["value"]):
        assert message == f"{caller}: this process is not a member of process_group"
