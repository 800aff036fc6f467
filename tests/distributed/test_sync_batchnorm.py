"""SyncBatchNorm over gloo processes against one process on the concatenated batch."""

import gc
import weakref

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call, jvp, vmap

import fastbn
from fastbn.testing import NoGradient, run_processes

DT = torch.float64


def _problem(sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=DT)

    return {"x": randn(n, 3, 4, 5) * 2 + 1, "cot": randn(n, 3, 4, 5), "v": randn(n, 3, 4, 5),
            "x_t": randn(2, n, 3, 4, 5), "weight": randn(3), "bias": randn(3),
            "weight_t": randn(3), "gg_weight": randn(len(sizes), 3)}


def _shard(data, sizes, rank):
    start = sum(sizes[:rank])
    out = dict(data)
    for key in ("x", "cot", "v"):
        out[key] = data[key][start:start + sizes[rank]]
    out["x_t"] = data["x_t"][:, start:start + sizes[rank]]
    out["gg_weight"] = data["gg_weight"][rank:rank + 1]
    return out


def _layer(data, process_group=None):
    layer = fastbn.SyncBatchNorm(3, momentum=0.3, activation="relu",
                                 process_group=process_group).to(DT)
    with torch.no_grad():
        layer.weight.copy_(data["weight"])
        layer.bias.copy_(data["bias"])
    return layer


def _all_orders(layer, data, reduce, shards=None):
    """Forward, first and second derivatives, jvp and vmap'd jvp; parameter gradients are
    passed through `reduce` (a sum over processes when the batch is sharded). `shards`:
    the sizes of the processes' batches within x (default: x is one process's)."""
    x = data["x"].clone().requires_grad_()
    y = layer(x)
    loss = y * data["cot"]
    grad_x, grad_w, grad_b = torch.autograd.grad(loss.sum(), (x, layer.weight, layer.bias),
                                                 create_graph=True)
    # Summed over processes this is the full second-order objective: each process's
    # backward yields the derivative of the sum w.r.t. its own inputs. Each process
    # weighs its own share of grad_weight with its own vector (a per-process penalty).
    shares = [grad_w] if shards is None else [
        torch.autograd.grad(part.sum(), layer.weight, create_graph=True)[0]
        for part in loss.split(shards)]
    second = (grad_x * data["v"]).sum() + sum(
        (share * gg).sum() for share, gg in zip(shares, data["gg_weight"]))
    hess_x, hess_w = torch.autograd.grad(second, (x, layer.weight))

    def f(inp, w):
        return functional_call(layer, {"weight": w, "bias": layer.bias.detach()}, (inp,))

    primals = (data["x"], layer.weight.detach())
    y_t = jvp(f, primals, (data["x_t"][0], data["weight_t"]))[1]
    y_t_batched = vmap(lambda t: jvp(f, primals, (t, data["weight_t"]))[1])(data["x_t"])
    for _ in range(3):
        layer(data["x"])
    return {"y": y.detach(), "grad_x": grad_x.detach(), "grad_w": reduce(grad_w.detach()),
            "grad_b": reduce(grad_b.detach()), "hess_x": hess_x, "hess_w": reduce(hess_w),
            "y_t": y_t, "y_t_batched": y_t_batched,
            "running_mean": layer.running_mean, "running_var": layer.running_var,
            "num_batches_tracked": layer.num_batches_tracked}


def _all_reduce(t, group=None):
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


def _worker(rank, world, sizes, group_ranks):
    group = dist.new_group(group_ranks) if group_ranks else None
    if group_ranks and rank not in group_ranks:
        return None
    members = group_ranks or list(range(world))
    member_sizes = [sizes[r] for r in members]
    data = _shard(_problem(member_sizes), member_sizes, members.index(rank))
    return _all_orders(_layer(data, group), data, lambda t: _all_reduce(t, group))


def _single_process(sizes):
    data = _problem(sizes)
    return _all_orders(_layer(data), data, lambda t: t, sizes)


def _check(results, sizes, members):
    expected = _single_process(sizes)
    for index, rank in enumerate(members):
        got = results[rank]
        assert "value" in got, got.get("trace", got)
        start = sum(sizes[:index])
        for key, want in expected.items():
            if key in ("y", "grad_x", "hess_x", "y_t"):
                want = want[start:start + sizes[index]]
            elif key == "y_t_batched":
                want = want[:, start:start + sizes[index]]
            torch.testing.assert_close(got["value"][key], want, rtol=1e-9, atol=1e-10,
                                       msg=f"rank {rank}: {key}")


@pytest.mark.parametrize("sizes", [[4, 4], [3, 5], [2, 0, 5]], ids=["equal", "unequal", "empty"])
def test_matches_single_process(sizes):
    results = run_processes(_worker, len(sizes), sizes, None)
    _check(results, sizes, list(range(len(sizes))))


def _vmap_over_data_worker(rank, world, sizes):
    x = _problem(sizes)["x_t"]   # (2, N, 3, 4, 5): two batch norms of their own
    start = sum(sizes[:rank])
    return vmap(lambda xi: fastbn.batch_norm(xi, None, None, training=True,
                                             process_group=dist.group.WORLD))(
        x[:, start:start + sizes[rank]])


def test_vmap_over_data_with_an_empty_shard():
    """The vmap rule folds the vmapped dimension into the channels: a shard of no samples
    took a reshape with -1, ambiguous for no elements, and failed before the collective
    (the other processes then waited in it)."""
    sizes = [3, 0, 4]
    results = run_processes(_vmap_over_data_worker, len(sizes), sizes)
    x = _problem(sizes)["x_t"]
    expected = torch.stack([torch.nn.functional.batch_norm(xi, None, None, training=True)
                            for xi in x])
    for rank, size in enumerate(sizes):
        assert "value" in results[rank], results[rank].get("trace", results[rank])
        start = sum(sizes[:rank])
        torch.testing.assert_close(results[rank]["value"],
                                   expected[:, start:start + size], rtol=1e-9, atol=1e-10)


def test_subgroup():
    sizes = [3, 4, 2]
    results = run_processes(_worker, 3, sizes, [0, 2])
    assert results[1] == {"value": None}
    _check(results, [sizes[0], sizes[2]], [0, 2])


def _non_member_worker(rank, world):
    group = dist.new_group([0, 1])
    x = torch.randn(3, 2, 4, dtype=DT)
    if rank == 2:   # the functional form refuses; the layer is local there, as torch's
        layer = fastbn.SyncBatchNorm(2, process_group=group).to(DT)
        torch.testing.assert_close(layer(x), torch.nn.functional.batch_norm(
            x, None, None, training=True))
    return fastbn.batch_norm(x, None, None, training=True, process_group=group).shape


def test_the_functional_form_refuses_a_process_outside_its_group():
    results = run_processes(_non_member_worker, 3)
    assert results[0] == results[1] == {"value": torch.Size([3, 2, 4])}
    assert "not a member of process_group" in results[2]["error"]


def _failing_worker(rank, world):
    if rank == 1:
        raise ValueError("rank 1 failed on purpose")
    layer = fastbn.SyncBatchNorm(2).to(DT)
    return layer(torch.randn(3, 2, 4, dtype=DT))


def test_a_failing_rank_makes_the_others_fail_without_hanging():
    results = run_processes(_failing_worker, 2, collective_timeout=5, join_timeout=60)
    assert "rank 1 failed on purpose" in results[1]["error"]
    assert "error" in results[0] and "no result" not in results[0]["error"]


def _undefined_gradient_worker(rank, world, sizes):
    data = _shard(_problem(sizes), sizes, rank)
    x = data["x"].clone().requires_grad_()
    y = _layer(data)(x)
    if rank == 0:
        y = NoGradient.apply(y)
    loss = (y * data["cot"]).sum() + x.sum()   # x has a gradient on every rank
    return torch.autograd.grad(loss, x)[0]


def test_a_rank_whose_output_has_no_gradient_still_joins_the_backward():
    """An undefined gradient of y is zero: on a synchronised layer that rank's backward
    must still take part in the collectives (it hung the others), and every rank's
    gradient is that of one process with a zero cotangent on rank 0's samples."""
    sizes = [3, 4]
    results = run_processes(_undefined_gradient_worker, 2, sizes, collective_timeout=20,
                            join_timeout=120)
    data = _problem(sizes)
    x = data["x"].clone().requires_grad_()
    cot = data["cot"].clone()
    cot[:sizes[0]] = 0
    (want,) = torch.autograd.grad((_layer(data)(x) * cot).sum() + x.sum(), x)
    for rank, got in enumerate(results):
        assert "value" in got, got.get("trace", got)
        start = sum(sizes[:rank])
        torch.testing.assert_close(got["value"], want[start:start + sizes[rank]],
                                   rtol=1e-9, atol=1e-10)


def test_outside_a_process_group_it_is_the_local_layer():
    data = _problem([6])
    local = _all_orders(_layer(data), data, lambda t: t)
    plain = fastbn.BatchNorm2d(3, momentum=0.3, activation="relu").to(DT)
    plain.load_state_dict(_layer(data).state_dict())
    expected = _all_orders(plain, data, lambda t: t)
    for key in expected:
        torch.testing.assert_close(local[key], expected[key])


def test_convert_sync():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.SyncBatchNorm(3))
    fastbn.convert(model, sync=True, fuse_relu=True)
    assert type(model[1]) is fastbn.SyncBatchNorm and model[1].activation == "relu"
    assert type(model[3]) is fastbn.SyncBatchNorm
    state = model.state_dict()
    reference = nn.Sequential(nn.Conv2d(2, 3, 1), nn.SyncBatchNorm(3), nn.ReLU(),
                              nn.SyncBatchNorm(3))
    reference.load_state_dict(state)
    assert isinstance(model[1], nn.SyncBatchNorm)


def test_convert_sync_takes_subclasses_as_torch_does():
    """torch's convert_sync_batchnorm turns every batch norm into a SyncBatchNorm, a
    subclass's too (a batch norm left local would silently keep local statistics)."""
    class Custom(nn.BatchNorm2d):
        pass
    model = nn.Sequential(nn.Conv2d(2, 3, 1), Custom(3))
    reference = nn.SyncBatchNorm.convert_sync_batchnorm(Custom(3))
    fastbn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(reference) is nn.SyncBatchNorm and type(model[1]) is fastbn.SyncBatchNorm


def test_convert_sync_turns_fastbn_layers_into_sync_layers():
    model = fastbn.convert(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.ReLU()),
                           fuse_relu=True)
    fastbn.convert(model, sync=True)
    assert type(model[1]) is fastbn.SyncBatchNorm and model[1].activation == "relu"


def test_sync_classmethod_conversion_gives_fastbn_layers():
    """torch's classmethod, inherited, would build torch layers and drop the fused ReLU."""
    model = fastbn.convert(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.ReLU()),
                           fuse_relu=True)
    converted = fastbn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model
    assert type(model[1]) is fastbn.SyncBatchNorm and model[1].activation == "relu"
    assert model(torch.randn(5, 2)).min() >= 0


def _unsupported_worker(rank, world):
    """Each form that would need derivatives of the collectives: a clear error."""
    x = torch.randn(4, 3, dtype=DT, requires_grad=True)
    layer = fastbn.SyncBatchNorm(3).to(DT)
    errors = {}

    def third_order():
        (g1,) = torch.autograd.grad((layer(x) ** 3).sum(), x, create_graph=True)
        (g2,) = torch.autograd.grad((g1 ** 2).sum(), x, create_graph=True)
        torch.autograd.grad(g2.sum(), x)

    def nested_tangents():   # K cotangents inside K tangents
        torch.func.jacfwd(torch.func.jacrev(lambda t: layer(t) ** 3))(x.detach())

    def grads_batched():
        y = layer(x)
        torch.autograd.grad(y, x, torch.randn(2, *y.shape, dtype=DT), is_grads_batched=True)

    def traced():   # a trace would record the local op: torch.ops has no collectives
        torch.jit.trace(layer, x.detach())

    for name, call in (("third order", third_order), ("nested vmap", nested_tangents),
                       ("is_grads_batched", grads_batched), ("jit.trace", traced)):
        try:
            call()
            errors[name] = None
        except NotImplementedError as error:
            errors[name] = str(error)
    return errors


def test_derivatives_through_collectives_are_refused_clearly():
    for rank, result in enumerate(run_processes(_unsupported_worker, 2)):
        assert "value" in result, result
        for name, message in result["value"].items():
            assert message is not None and "synchronised batch norm" in message, (rank, name)


def _hessian_worker(rank, world):
    """torch.func.hessian is jacfwd(jacrev(f)): the inner jacrev of a scalar vmaps over
    one cotangent, which must not read as nested batching."""
    torch.manual_seed(rank)
    x, weight = torch.randn(4, 3, dtype=DT), torch.randn(3, dtype=DT)
    layer = fastbn.SyncBatchNorm(3).to(DT)

    def loss(x, weight):
        return (functional_call(layer, {"weight": weight}, (x,)) ** 3).sum()

    routes = [torch.func.hessian(loss, argnums=i)(x, weight) for i in (0, 1)]
    expected = [torch.func.jacfwd(torch.func.grad(loss, argnums=i), argnums=i)(x, weight)
                for i in (0, 1)]
    return [torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(routes, expected)]


def test_hessian_through_a_synchronised_layer():
    for result in run_processes(_hessian_worker, 2):
        assert result.get("value") == [True, True], result


def _mismatched_worker(rank, world):
    layer = fastbn.SyncBatchNorm(2 + rank, momentum=None)
    before = [t.clone() for t in layer.buffers()]
    try:
        layer(torch.randn(4, 2 + rank))
    except RuntimeError as error:
        unchanged = all(torch.equal(a, b) for a, b in zip(before, layer.buffers()))
        return str(error), unchanged
    return None


def test_processes_that_disagree_on_the_channel_count_all_get_an_error():
    for result in run_processes(_mismatched_worker, 2):
        assert "value" in result and result["value"] is not None, result
        message, unchanged = result["value"]
        assert "disagree on its channel count or dtype" in message
        assert "2 channels in torch.float32, 3 channels in torch.float32" in message
        assert unchanged    # running statistics and num_batches_tracked


def _empty_worker(rank, world):
    layer = fastbn.SyncBatchNorm(3, momentum=0.5)
    x = torch.empty(0, 3, 2, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    return y.shape, layer.running_mean, layer.running_var, int(layer.num_batches_tracked)


def test_no_values_on_any_process_leave_the_running_statistics():
    """As torch's batch norm on an empty batch (the statistics would be 0 / 0)."""
    for result in run_processes(_empty_worker, 2):
        assert "value" in result, result
        shape, mean, var, tracked = result["value"]
        assert shape == (0, 3, 2) and tracked == 1
        assert torch.equal(mean, torch.zeros(3)) and torch.equal(var, torch.ones(3))


def _unequal_jacobian_worker(rank, world):
    """jacfwd over the local input: as many tangents as local values, so the processes'
    K-batched reductions differ in size when their batches do."""
    layer = fastbn.SyncBatchNorm(3).to(DT)
    x = torch.randn(4 - rank, 3, dtype=DT)
    try:
        torch.func.jacfwd(layer)(x)
    except RuntimeError as error:
        return str(error)
    return None


def test_tangent_counts_that_differ_across_processes_are_an_error_everywhere():
    for result in run_processes(_unequal_jacobian_worker, 2):
        assert "value" in result and result["value"] is not None, result
        assert "disagree on the size of a derivative's reduction" in result["value"]


_OFFSET_SIZES = [3, 5]


def _offset_data():
    """float32 x = 1e4 + N(0, 1): the numerics case of the design."""
    gen = torch.Generator().manual_seed(0)
    return (1e4 + torch.randn(sum(_OFFSET_SIZES), 16, 50, generator=gen, dtype=DT)).float()


def _offset_worker(rank, world):
    start = sum(_OFFSET_SIZES[:rank])
    layer = fastbn.SyncBatchNorm(16, momentum=1.0)
    layer(_offset_data()[start:start + _OFFSET_SIZES[rank]])
    return layer.running_mean, layer.running_var


def test_statistics_merged_across_processes_lose_no_precision():
    """Each process's float32 mean rounded at 1e4 is 5e-4 off; merged as it was, the
    variance came out ~100x further from float64 than one process's."""
    x = _offset_data()
    local = fastbn.BatchNorm1d(16, momentum=1.0)
    local(x)
    mean64, var64 = x.double().mean((0, 2)), x.double().var((0, 2))
    local_error = (local.running_var - var64).abs().max()
    for result in run_processes(_offset_worker, 2):
        assert "value" in result, result
        mean, var = result["value"]
        assert mean.dtype == var.dtype == torch.float32
        assert (mean - mean64).abs().max() <= 2 * (local.running_mean - mean64).abs().max()
        assert (var - var64).abs().max() <= 2 * local_error + 1e-7


def _group_lifetime_worker(rank, world):
    group = dist.new_group([0, 1])
    layer = fastbn.SyncBatchNorm(3, process_group=group).to(DT)
    layer(torch.randn(4, 3, dtype=DT, requires_grad=True)).sum().backward()
    alive = weakref.ref(group)
    dist.destroy_process_group(group)
    del layer, group
    gc.collect()
    return alive() is None


def test_a_destroyed_group_is_not_kept_alive():
    """A group that outlives destroy_process_group is destroyed at interpreter exit,
    where gloo's threads abort the process (exit code 134 in about one run in three)."""
    for result in run_processes(_group_lifetime_worker, 2):
        assert result.get("value") is True, result
