"""Data-parallel curvature: every process gets the operator of the whole data."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fastbn import curvature
from fastbn.testing import run_processes

DT = torch.float64
SIZES = [3, 5]


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3),
                          nn.BatchNorm1d(3)).to(DT).train()
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(sum(SIZES), 4, generator=gen, dtype=DT)
    targets = torch.randint(0, 3, (sum(SIZES),), generator=gen)
    return model, inputs, targets


def _measure(op):
    p = op.shape[0]
    v = torch.linspace(-1, 1, p, dtype=DT)
    values, _ = curvature.eigenvalues(op, k=2, seed=3)
    return {"grad": op.grad(), "matvec": op.matvec(v),
            "matmat": op.matmat(torch.stack([v, v.flip(0)], 1)), "eigenvalues": values,
            "trace": curvature.trace(op, num_samples=p + 1, seed=4)[0]}


def _worker(rank, world, method):
    model, inputs, targets = _setup()
    start = sum(SIZES[:rank])
    shard = (inputs[start:start + SIZES[rank]], targets[start:start + SIZES[rank]])
    op = curvature.HessianOperator(model, nn.functional.cross_entropy, shard, method=method,
                                   process_group=dist.group.WORLD)
    return _measure(op)


def test_data_parallel_operator_equals_single_process():
    for method in ("forward-over-reverse", "auto"):
        results = run_processes(_worker, 2, method)
        model, inputs, targets = _setup()
        expected = _measure(curvature.HessianOperator(model, nn.functional.cross_entropy,
                                                      (inputs, targets),
                                                      method="reverse-over-reverse"))
        for rank, result in enumerate(results):
            assert "value" in result, result.get("trace", result)
            for key, want in expected.items():
                got = torch.as_tensor(result["value"][key])
                torch.testing.assert_close(got, torch.as_tensor(want), rtol=1e-8, atol=1e-10,
                                           msg=f"rank {rank}: {key}")
        for key in expected:   # the same numbers on every process
            assert torch.equal(torch.as_tensor(results[0]["value"][key]),
                               torch.as_tensor(results[1]["value"][key])), key


def _local_worker(rank, world, own_group):
    """Without a process group, or with a group of this process alone, the operator is
    local, even for a model whose batch norms are SyncBatchNorms of the whole world
    (they would synchronise over it)."""
    groups = [dist.new_group([r]) for r in range(world)]   # every process makes each
    model, inputs, targets = _setup()
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    start = sum(SIZES[:rank])
    shard = (inputs[start:start + SIZES[rank]], targets[start:start + SIZES[rank]])
    op = curvature.HessianOperator(model, nn.functional.cross_entropy, shard,
                                   method="forward-over-reverse",
                                   process_group=groups[rank] if own_group else None)
    return op.matvec(torch.linspace(-1, 1, op.shape[0], dtype=DT))


@pytest.mark.parametrize("own_group", (False, True), ids=("no group", "own group"))
def test_operator_of_one_process_is_local(own_group):
    results = run_processes(_local_worker, 2, own_group)
    model, inputs, targets = _setup()
    for rank, result in enumerate(results):
        assert "value" in result, result
        start = sum(SIZES[:rank])
        shard = (inputs[start:start + SIZES[rank]], targets[start:start + SIZES[rank]])
        op = curvature.HessianOperator(model, nn.functional.cross_entropy, shard,
                                       method="reverse-over-reverse")
        want = op.matvec(torch.linspace(-1, 1, op.shape[0], dtype=DT))
        torch.testing.assert_close(torch.as_tensor(result["value"]), want, rtol=1e-8,
                                   atol=1e-10, msg=f"rank {rank}")


def _bad_shard_worker(rank, world, kind):
    model, inputs, targets = _setup()
    shard = (inputs[:SIZES[rank]], targets[:SIZES[rank]])
    if kind == "empty" and rank == 1:
        shard = (inputs[:0], targets[:0])
    data = [shard] * (1 + rank) if kind == "batch counts" else shard
    try:
        curvature.HessianOperator(model, nn.functional.cross_entropy, data,
                                  process_group=dist.group.WORLD)
    except ValueError as error:
        return str(error)
    return None


@pytest.mark.parametrize("kind", ("empty", "batch counts"))
def test_data_one_process_refuses_is_an_error_on_every_process(kind):
    """Not a wait in the first collective on the processes whose data passed."""
    results = run_processes(_bad_shard_worker, 2, kind, collective_timeout=30)
    messages = [result.get("value") for result in results]
    assert all(messages), results
    if kind == "empty":
        assert "empty batch" in messages[1] and "process 1 of the group" in messages[0]
    else:
        assert all("different numbers of batches ([1, 2])" in m for m in messages)


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


class _Reiterable:
    """Batches read anew on every pass, with no len()."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def _stream_worker(rank, world, kind, matmat_first):
    model, inputs, targets = _setup()
    start = sum(SIZES[:rank])
    # two batches of 2 samples from each process's shard (overlapping windows)
    windows = [(inputs[i:i + 2], targets[i:i + 2]) for i in (start, start + 1)]
    if kind == "loader":   # a DataLoader over an IterableDataset: len() raises
        data = torch.utils.data.DataLoader(_Stream(windows), batch_size=None)
    else:
        data = _Reiterable(windows if kind == "stream" or rank == 0 else windows[:1])
    try:
        op = curvature.HessianOperator(model, nn.functional.cross_entropy, data,
                                       process_group=dist.group.WORLD, progress=False,
                                       max_memory=2 ** 30 if matmat_first else None)
        if matmat_first:   # sizing its chunks reads every batch's size first
            op.matmat(torch.eye(op.shape[0], 3, dtype=DT))
        return op.matvec(torch.linspace(-1, 1, op.shape[0], dtype=DT))
    except ValueError as error:
        return str(error)


@pytest.mark.parametrize("kind, matmat_first", [
    ("loader", False), ("stream", False), ("unequal stream", False),
    ("unequal stream", True)])
def test_streams_of_batches_agree_on_each_next_batch(kind, matmat_first):
    """Where a process cannot tell its number of batches, the passes agree on each next
    one: a streamed DataLoader (its len() raises TypeError, which the operator took for
    a length) works as without a group, and streams that end apart are an error on every
    process (they waited in mismatched collectives)."""
    results = run_processes(_stream_worker, 2, kind, matmat_first, collective_timeout=30)
    values = [result.get("value") for result in results]
    if kind == "unequal stream":
        assert all(isinstance(v, str) and "ran out at different batches" in v
                   for v in values), results
        return
    model, inputs, targets = _setup()
    batches = [(inputs[i:i + 2], targets[i:i + 2]) for i in (0, 1)]   # rank 0's windows
    batches = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]))     # with rank 1's
               for a, b in zip(batches, [(inputs[i:i + 2], targets[i:i + 2])
                                         for i in (SIZES[0], SIZES[0] + 1)])]
    op = curvature.HessianOperator(model, nn.functional.cross_entropy, batches,
                                   method="reverse-over-reverse", progress=False)
    want = op.matvec(torch.linspace(-1, 1, op.shape[0], dtype=DT))
    for rank, value in enumerate(values):
        assert isinstance(value, torch.Tensor), results
        torch.testing.assert_close(value, want, rtol=1e-8, atol=1e-10, msg=f"rank {rank}")


class _ScaledBatchNorm(nn.BatchNorm1d):
    """A batch norm with a forward of its own (that a SyncBatchNorm would drop)."""

    def forward(self, input):
        return 2 * super().forward(input)


def _own_forward_setup(track_running_stats):
    model, inputs, targets = _setup()
    model[1] = _ScaledBatchNorm(5, track_running_stats=track_running_stats).to(DT)
    if track_running_stats:
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    return model, inputs, targets


def _own_forward_worker(rank, world, bn_mode, track_running_stats):
    model, inputs, targets = _own_forward_setup(track_running_stats)
    start = sum(SIZES[:rank])
    shard = (inputs[start:start + SIZES[rank]], targets[start:start + SIZES[rank]])
    try:
        op = curvature.HessianOperator(model, nn.functional.cross_entropy, shard,
                                       bn_mode=bn_mode, process_group=dist.group.WORLD)
    except TypeError as error:
        return str(error)
    return op.grad(), op.matvec(torch.linspace(-1, 1, op.shape[0], dtype=DT))


def test_a_batch_norm_with_its_own_forward_runs_as_it_is_or_is_refused():
    """With running statistics (bn_mode="eval") it runs as in one process; with batch
    statistics, which it would take from its own process's batch alone, it is refused."""
    results = run_processes(_own_forward_worker, 2, "eval", True)
    model, inputs, targets = _own_forward_setup(True)
    op = curvature.HessianOperator(model, nn.functional.cross_entropy, (inputs, targets),
                                   bn_mode="eval")
    want = op.grad(), op.matvec(torch.linspace(-1, 1, op.shape[0], dtype=DT))
    for rank, result in enumerate(results):
        assert "value" in result, result
        for got, expected in zip(result["value"], want):
            torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10,
                                       msg=f"rank {rank}")
    for bn_mode in ("train", "eval"):
        for result in run_processes(_own_forward_worker, 2, bn_mode, False):
            assert "value" in result, result
            assert "'1' (_ScaledBatchNorm) overrides forward" in result["value"]
            assert "cannot be synchronised over process_group" in result["value"]


def _non_member_worker(rank, world):
    only_first = dist.new_group([0])
    model, inputs, targets = _setup()
    try:
        curvature.HessianOperator(model, nn.functional.cross_entropy, (inputs, targets),
                                  process_group=only_first)
    except ValueError as error:
        return str(error)
    return None


def test_a_process_outside_the_group_is_refused():
    """A collective skips a process outside its group: its operator would silently be
    the local one."""
    first, second = run_processes(_non_member_worker, 2)
    assert first.get("value", first) is None
    assert "HessianOperator: this process is not a member of process_group" in \
        second.get("value", "")


def _non_finite_worker(rank, world):
    model, inputs, targets = _setup()
    start = sum(SIZES[:rank])
    shard = inputs[start:start + SIZES[rank]]
    regression = torch.zeros(len(shard), 3, dtype=DT)
    if rank == 1:   # a loss that is not finite on this process only
        regression[0, 0] = float("nan")
    op = curvature.HessianOperator(model, nn.functional.mse_loss,
                                   [(shard, torch.zeros_like(regression)), (shard, regression)],
                                   process_group=dist.group.WORLD)
    try:
        op.grad()
    except curvature.NonFiniteLossError as error:
        return str(error)
    return None


def test_a_loss_not_finite_on_one_process_is_an_error_on_every_process():
    """Not a wait in the next collective on the processes whose loss was finite."""
    results = run_processes(_non_finite_worker, 2, collective_timeout=30)
    for result in results:
        assert "non-finite loss" in (result.get("value") or ""), result
        assert "on batch 1 of process 1 of the group" in result["value"]
    assert "(nan)" in results[1]["value"]
