"""fastbn modules against torch's, convert(), state_dict and a short training run."""

import copy
import inspect

import numpy as np
import pytest
import torch
from torch import nn

import fastbn

CASES = [(nn.BatchNorm1d, fastbn.BatchNorm1d, (6, 5)),
         (nn.BatchNorm1d, fastbn.BatchNorm1d, (4, 5, 7)),
         (nn.BatchNorm2d, fastbn.BatchNorm2d, (3, 5, 4, 6)),
         (nn.BatchNorm3d, fastbn.BatchNorm3d, (2, 5, 3, 2, 4))]
OPTIONS = [dict(), dict(affine=False), dict(momentum=None), dict(track_running_stats=False),
           dict(eps=1e-3, momentum=0.5), dict(bias=False)]


def _pair(torch_cls, fast_cls, options):
    ref = torch_cls(5, **options)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(-1, 2)
    fast = fast_cls(5, **options)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("torch_cls, fast_cls, shape", CASES)
@pytest.mark.parametrize("options", OPTIONS)
def test_module_matches_torch_over_steps(backend, torch_cls, fast_cls, shape, options):
    ref, fast = _pair(torch_cls, fast_cls, options)
    for mode in ("train", "train", "train", "eval"):
        ref.train(mode == "train")
        fast.train(mode == "train")
        x = torch.randn(shape) * 2 + 0.5
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [m(xi) for m, xi in zip((ref, fast), xs)]
        gy = torch.randn_like(ys[0])
        for m, xi, y in zip((ref, fast), xs, ys):
            y.backward(gy)
        torch.testing.assert_close(ys[1], ys[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-4, atol=1e-5)
        for p, q in zip(ref.parameters(), fast.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5)
        for (name, b), (_, c) in zip(ref.named_buffers(), fast.named_buffers()):
            torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("torch_cls, fast_cls", [
    (nn.BatchNorm1d, fastbn.BatchNorm1d), (nn.BatchNorm2d, fastbn.BatchNorm2d),
    (nn.BatchNorm3d, fastbn.BatchNorm3d), (nn.SyncBatchNorm, fastbn.SyncBatchNorm),
    (nn.LazyBatchNorm1d, fastbn.LazyBatchNorm1d), (nn.LazyBatchNorm2d, fastbn.LazyBatchNorm2d),
    (nn.LazyBatchNorm3d, fastbn.LazyBatchNorm3d)])
def test_signature_is_torchs_plus_activation(torch_cls, fast_cls):
    """Every argument of torch's constructor, same kind and default; `activation` added."""
    ours = dict(inspect.signature(fast_cls).parameters)
    assert ours.pop("activation").default is None
    theirs = inspect.signature(torch_cls).parameters
    assert {n: (p.kind, p.default) for n, p in ours.items()} == \
        {n: (p.kind, p.default) for n, p in theirs.items()}


def test_state_dict_round_trip_and_isinstance():
    ref = nn.BatchNorm2d(4)
    ref(torch.randn(3, 4, 2, 2))
    fast = fastbn.BatchNorm2d(4, activation="relu")
    fast.load_state_dict(ref.state_dict())
    assert fast.state_dict().keys() == ref.state_dict().keys()
    back = nn.BatchNorm2d(4)
    back.load_state_dict(fast.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    assert isinstance(fast, nn.modules.batchnorm._BatchNorm)
    assert "activation='relu'" in repr(fast)


def test_fused_relu_module_equals_bn_then_relu(backend):
    ref, fast = _pair(nn.BatchNorm2d, lambda c, **kw: fastbn.BatchNorm2d(c, activation="relu"),
                      {})
    x = torch.randn(4, 5, 3, 3)
    torch.testing.assert_close(fast(x), torch.relu(ref(x)))


def test_invalid_input_leaves_state_unchanged(backend):
    layer = fastbn.BatchNorm2d(3)
    layer(torch.randn(4, 3, 2, 2))
    before = copy.deepcopy(layer.state_dict())
    for bad, error, message in [(torch.randn(4, 3, 2), ValueError, "expected 4D input"),
                                (torch.randn(4, 2, 2, 2), RuntimeError, "should contain 2 elements not 3"),
                                (torch.randn(1, 3, 1, 1), ValueError, "more than 1 value")]:
        with pytest.raises(error, match=message):
            layer(bad)
    for k, v in before.items():
        assert torch.equal(layer.state_dict()[k], v), k
    with pytest.raises(ValueError, match="unknown activation"):
        fastbn.BatchNorm1d(3, activation="tanh")


@pytest.mark.parametrize("flag", (1, 0, np.bool_(True), np.bool_(False)), ids=repr)
def test_a_training_flag_set_to_a_truthy_value_works_as_torchs(backend, flag):
    """Module.train() takes only bools, but the attribute can be set directly: torch's
    layer reads its truth value."""
    ref, fast = _pair(nn.BatchNorm1d, fastbn.BatchNorm1d, {})
    ref.training = fast.training = flag
    x = torch.randn(6, 5) + 3
    torch.testing.assert_close(fast(x), ref(x))
    torch.testing.assert_close(fast.state_dict(), ref.state_dict())


def _error_and_unchanged(layer, error):
    """(the message of the error a call raises, whether the running statistics and
    num_batches_tracked stayed as made)."""
    with pytest.raises(error) as info:
        layer(torch.randn(4, 3) + 5)
    unchanged = (int(layer.num_batches_tracked) == 0
                 and torch.equal(layer.running_mean, torch.zeros(3)))
    return str(info.value), unchanged


@pytest.mark.parametrize("momentum", ("0.1", [0.1], torch.tensor([0.1, 0.2, 0.3])), ids=str)
@pytest.mark.parametrize("training", (True, False))
def test_a_momentum_that_is_not_a_number_is_torchs_type_error(momentum, training):
    def layer(cls):
        made = cls(3).train(training)
        made.momentum = momentum
        return made
    message, unchanged = _error_and_unchanged(layer(fastbn.BatchNorm1d), TypeError)
    torch_message, _ = _error_and_unchanged(layer(nn.BatchNorm1d), TypeError)
    assert message == torch_message and unchanged   # torch counts the batch


@pytest.mark.parametrize("momentum", (0.1, None))
@pytest.mark.parametrize("fuse_relu", (False, True))
def test_non_reentrant_checkpoint_counts_batches_as_torch(backend, momentum, fuse_relu):
    """The checkpoint's recomputation stops inside the last layer of a segment, once the
    running statistics moved: the batch must count there, or momentum=None's cumulative
    average weighs the batches wrongly. Three segments: the first ends at the batch norm,
    fused or not."""
    from torch.utils.checkpoint import checkpoint_sequential

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, momentum=momentum), nn.ReLU(),
                        nn.Linear(3, 3), nn.BatchNorm1d(3, momentum=momentum), nn.ReLU())
    fast = fastbn.convert(copy.deepcopy(ref), fuse_relu=fuse_relu)
    x = torch.randn(8, 4, requires_grad=True)
    for model in (ref, fast):
        for _ in range(2):
            checkpoint_sequential(model, 3, x, use_reentrant=False).sum().backward()
    for (name, b), (_, c) in zip(ref.named_buffers(), fast.named_buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=name)


def test_a_call_that_raises_after_the_statistics_moved_counts_the_batch(backend):
    """A saved-tensor hook that raises once the kernel ran: the running statistics moved,
    so the batch counts; an error before they move counts nothing (see above)."""
    def fails(_):
        raise KeyError("pack")

    layer = fastbn.BatchNorm1d(3)
    with torch.autograd.graph.saved_tensors_hooks(fails, lambda t: t):
        with pytest.raises(KeyError, match="pack"):
            layer(torch.randn(4, 3, requires_grad=True) + 5)
    assert not torch.equal(layer.running_mean, torch.zeros(3))
    assert int(layer.num_batches_tracked) == 1


def test_a_layer_made_and_trained_in_inference_mode(backend):
    """Its buffers are inference tensors, which keep no version counter."""
    x = torch.randn(4, 3)
    with torch.inference_mode():
        fast, ref = fastbn.BatchNorm1d(3), nn.BatchNorm1d(3)
        y, y_ref = fast(x), ref(x)
    torch.testing.assert_close(y, y_ref)
    for (name, b), (_, c) in zip(ref.named_buffers(), fast.named_buffers()):
        torch.testing.assert_close(c, b, msg=name)


def test_an_eval_output_keeps_the_gradient_of_the_statistics_it_used(backend):
    """A training call between an eval call and its backward updates the running
    statistics in place: the eval output's gradient is still that of the statistics it
    was computed with (torch's native op returns the gradient of the new ones)."""
    layer = fastbn.BatchNorm1d(3).double().eval()
    with torch.no_grad():
        layer.running_var.uniform_(0.5, 2.0)
        layer.weight.uniform_(0.5, 2.0)
    used = layer.running_mean.clone(), layer.running_var.clone()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(4, 3, dtype=torch.float64)
    y = layer(x)
    layer.train()(torch.randn(4, 3, dtype=torch.float64) + 5)
    assert not torch.equal(layer.running_var, used[1])
    y.backward(gy)
    expected = gy * layer.weight.detach() / torch.sqrt(used[1] + layer.eps)
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=0)
    xhat = (x.detach() - used[0]) / torch.sqrt(used[1] + layer.eps)
    torch.testing.assert_close(layer.weight.grad, (gy * xhat).sum(0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_running_statistics_are_rounded_once_a_step(backend, dtype):
    """running = 0.9 * running + 0.1 * batch, in float32 and rounded once to the buffers'
    dtype, as torch does (rounded at each of three operations they drifted). Integer
    values make the batch means exact in float32."""
    layer = fastbn.BatchNorm1d(256).to(dtype)
    reference_layer = nn.BatchNorm1d(256).to(dtype)
    for _ in range(5):
        before = layer.running_mean.clone()
        x = torch.randint(-8, 9, (8, 256)).to(dtype)
        layer(x)
        reference_layer(x)
        expected = (before.float() * 0.9 + x.float().mean(0) * 0.1).to(dtype)
        assert torch.equal(layer.running_mean, expected)
        if dtype == torch.float16:
            assert torch.equal(layer.running_mean, reference_layer.running_mean)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_an_inference_mode_layer_trained_outside_it_fails_before_any_update(requires_grad):
    def layer(cls):
        with torch.inference_mode():
            made = cls(3)
        return made if requires_grad else made.requires_grad_(False)   # made, they require it
    message, unchanged = _error_and_unchanged(layer(fastbn.BatchNorm1d), RuntimeError)
    torch_message, _ = _error_and_unchanged(layer(nn.BatchNorm1d), RuntimeError)
    assert message == torch_message and unchanged   # torch's count moves


def _cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 10))


def test_convert_keeps_parameters_buffers_and_flags():
    model = _cnn().double().eval()
    params = [id(p) for p in model.parameters()]
    converted = fastbn.convert(model, fuse_relu=True)
    assert converted is model and [id(p) for p in model.parameters()] == params
    kinds = [type(m) for m in model]
    assert kinds.count(fastbn.BatchNorm2d) == 2 and kinds.count(fastbn.BatchNorm1d) == 1
    assert model[1].activation == "relu" and isinstance(model[2], nn.Identity)
    assert all(not m.training for m in model.modules())
    assert model[1].running_mean.dtype == torch.float64
    single = fastbn.convert(nn.BatchNorm3d(2))
    assert type(single) is fastbn.BatchNorm3d
    assert fastbn.convert(model) is model   # idempotent


@pytest.mark.parametrize("hooked", ["bn", "relu"])
@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward", "global"])
def test_convert_does_not_fuse_a_hooked_pair(hooked, kind):
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU())
    module = model[1 if hooked == "bn" else 2]
    hook = {"forward": lambda: module.register_forward_hook(lambda m, i, o: None),
            "forward_pre": lambda: module.register_forward_pre_hook(lambda m, i: None),
            "full_backward": lambda: module.register_full_backward_hook(lambda m, gi, go: None),
            "global": lambda: nn.modules.module.register_module_forward_hook(
                lambda m, i, o: None)}[kind]()
    try:
        fastbn.convert(model, fuse_relu=True)
    finally:
        hook.remove()
    assert model[1].activation is None and type(model[2]) is nn.ReLU


def test_hook_handles_of_a_fused_batch_norm_still_remove_its_hooks():
    bn = nn.BatchNorm2d(3)
    calls = []
    handles = [bn.register_state_dict_post_hook(lambda *args: calls.append("state_dict")),
               bn.register_load_state_dict_post_hook(lambda *args: calls.append("load"))]
    model = fastbn.convert(nn.Sequential(bn, nn.ReLU()), fuse_relu=True)
    assert model[0].activation == "relu"
    model.load_state_dict(model.state_dict())
    assert calls == ["state_dict", "load"]
    for handle in handles:
        handle.remove()
    model.load_state_dict(model.state_dict())
    assert calls == ["state_dict", "load"]


def test_convert_does_not_fuse_a_shared_batch_norm():
    """A batch norm held at two places stays one layer (a fused copy would part from it
    under .to() or .eval()); one inside a Sequential held at two places is fused, as
    that Sequential is still one module."""
    bn = fastbn.BatchNorm2d(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), bn, nn.ReLU(), bn)
    x = torch.randn(4, 2, 5, 5)
    expected = model(x)
    fastbn.convert(model, fuse_relu=True)
    assert model[1] is bn is model[3] and bn.activation is None and type(model[2]) is nn.ReLU
    torch.testing.assert_close(model(x), expected)
    model.double()
    assert model[3].running_mean.dtype == torch.float64

    block = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU())
    twice = nn.Sequential(block, block)
    fastbn.convert(twice, fuse_relu=True)
    assert twice[0] is twice[1] and twice[0][1].activation == "relu"

    inner = nn.BatchNorm1d(4)
    held = nn.ModuleDict({"seq": nn.Sequential(inner, nn.ReLU()), "alias": inner})
    fastbn.convert(held, fuse_relu=True)
    assert held["seq"][0] is held["alias"] and held["alias"].activation is None


def test_convert_keeps_hook_handles_and_shared_layers():
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(bn, nn.ReLU(), bn)
    holder = nn.ModuleDict({"model": model, "alias": bn})
    calls = []
    handle = bn.register_forward_hook(lambda m, i, o: calls.append(1))
    fastbn.convert(holder)
    assert type(model[0]) is fastbn.BatchNorm2d and model[0] is model[2] is holder["alias"]
    model(torch.randn(2, 3, 4, 4))
    assert len(calls) == 2
    handle.remove()
    model(torch.randn(2, 3, 4, 4))
    assert len(calls) == 2


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_jit_trace_records_the_batch_norm(backend, training, grad):
    torch.manual_seed(0)
    model = fastbn.convert(_cnn()).train(training)
    eager = copy.deepcopy(model)
    x, x2 = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(model, x, check_trace=False)
        eager(x)
        torch.testing.assert_close(traced(x2), eager(x2))
    for got, want in zip(model.buffers(), eager.buffers()):
        torch.testing.assert_close(got, want)


def test_fx_symbolic_trace_of_a_layer_alone_is_torchs_trace_error():
    for layer in (nn.BatchNorm2d(3), fastbn.BatchNorm2d(3)):
        with pytest.raises(torch.fx.proxy.TraceError):
            torch.fx.symbolic_trace(layer)


@pytest.mark.parametrize("training", [False, True])
def test_fx_symbolic_trace_records_each_layer_once(training):
    # Hooks run once, as in eager mode; the graph runs each batch norm's own forward.
    torch.manual_seed(0)
    model = fastbn.convert(_cnn(), fuse_relu=True).train(training)
    model[1].register_forward_pre_hook(lambda _m, args: (args[0] + 1,))
    model[1].register_forward_hook(lambda _m, _args, out: out * 2)
    graph_module = torch.fx.symbolic_trace(model)
    layers = [n.args[0].target for n in graph_module.graph.nodes if n.op == "call_function"
              and n.target.__name__ == "_layer_forward"]
    assert layers == [name for name, m in model.named_children()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    eager = copy.deepcopy(model)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(graph_module(x), eager(x))
    for got, want in zip(model.buffers(), eager.buffers()):
        torch.testing.assert_close(got, want)
    graph_module.train(not training)   # the graph follows the layers' flags as they are
    eager.train(not training)
    torch.testing.assert_close(graph_module(x), eager(x))


def test_sync_batch_norm_without_channels_is_torchs_error():
    layer = fastbn.SyncBatchNorm(0)
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        layer(torch.randn(4, 0))
    assert layer.num_batches_tracked.item() == 0


@pytest.mark.parametrize("fuse_relu", [False, True])
def test_training_run_matches_torch(backend, fuse_relu):
    torch.manual_seed(3)
    ref = _cnn()
    fast = fastbn.convert(copy.deepcopy(ref), fuse_relu=fuse_relu)
    # Four fixed batches, five epochs: 20 steps whose loss must go down.
    data = torch.randn(4, 16, 1, 8, 8).repeat(5, 1, 1, 1, 1)
    labels = torch.randint(0, 10, (4, 16)).repeat(5, 1)
    losses = {}
    for name, model in (("torch", ref), ("fastbn", fast)):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses[name] = []
        for x, t in zip(data, labels):
            loss = nn.functional.cross_entropy(model(x), t)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["torch"][-1] < losses["torch"][0]
    torch.testing.assert_close(torch.tensor(losses["fastbn"]), torch.tensor(losses["torch"]),
                               rtol=1e-3, atol=1e-4)
    ref.eval()
    fast.eval()
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-3, atol=1e-4)


def test_channels_last_model(backend):
    ref = _cnn()
    fast = fastbn.convert(copy.deepcopy(ref))
    x = torch.randn(8, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    ref, fast = ref.to(memory_format=torch.channels_last), fast.to(
        memory_format=torch.channels_last)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-4, atol=1e-5)


def test_parametrized_weight_is_honoured(backend):
    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    ref, fast = nn.BatchNorm2d(3), fastbn.BatchNorm2d(3)
    fast.load_state_dict(ref.state_dict())
    for layer in (ref, fast):
        torch.nn.utils.parametrize.register_parametrization(layer, "weight", Double())
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(fast(x), ref(x))
    torch.testing.assert_close(fast.running_mean, ref.running_mean)


@pytest.mark.parametrize("torch_cls, fast_cls, shape", [
    (nn.LazyBatchNorm1d, fastbn.LazyBatchNorm1d, (6, 5)),
    (nn.LazyBatchNorm2d, fastbn.LazyBatchNorm2d, (3, 5, 4, 6)),
    (nn.LazyBatchNorm3d, fastbn.LazyBatchNorm3d, (2, 5, 3, 2, 4))])
@pytest.mark.parametrize("options", [dict(), dict(affine=False), dict(bias=False)])
def test_lazy_layers_become_fastbn_layers(torch_cls, fast_cls, shape, options):
    ref, fast = torch_cls(**options), fast_cls(**options)
    assert isinstance(fast, torch_cls)   # before it runs, as after (as its cls_to_become)
    # ... and, as torch's, not its batch norm before it runs: an initialisation loop over
    # isinstance(m, nn.BatchNorm2d) would meet uninitialised parameters.
    assert not isinstance(fast, torch_cls.cls_to_become)
    assert not isinstance(fast, fast_cls.cls_to_become)
    x = torch.randn(shape)
    torch.testing.assert_close(fast(x), ref(x))
    assert type(fast) is fast_cls.cls_to_become and type(ref) is torch_cls.cls_to_become
    assert isinstance(fast, torch_cls.cls_to_become)
    assert fast.num_features == 5 and fast.state_dict().keys() == ref.state_dict().keys()
    for (name, b), (_, c) in zip(ref.named_buffers(), fast.named_buffers()):
        torch.testing.assert_close(c, b, msg=name)


def test_convert_makes_an_unrun_lazy_layer_fastbn_and_keeps_its_hooks():
    def unrun():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d(momentum=0.3), nn.ReLU())
    model, reference = unrun(), unrun()   # (an unrun lazy module cannot be deep-copied)
    seen = []
    handle = model[1].register_forward_hook(lambda m, i, o: seen.append(type(m)))
    fastbn.convert(model, fuse_relu=True)
    assert type(model[1]) is fastbn.LazyBatchNorm2d and model[1].momentum == 0.3
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), reference(x))
    assert type(model[1]) is fastbn.BatchNorm2d and seen == [fastbn.BatchNorm2d]
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)
    handle.remove()
    model(x)
    assert len(seen) == 1
    with pytest.raises(ValueError, match="run one forward first"):
        fastbn.convert(nn.Sequential(nn.LazyBatchNorm1d()), sync=True)


@pytest.mark.parametrize("sync", [False, True])
def test_convert_refuses_parametrized_batch_norms_before_changing_anything(sync):
    class Positive(nn.Module):
        def forward(self, w):
            return w.abs() + 0.5

    for layer in (nn.BatchNorm2d(3), fastbn.BatchNorm2d(3)):
        model = nn.Sequential(nn.BatchNorm2d(3), layer)
        torch.nn.utils.parametrize.register_parametrization(model[1], "weight", Positive())
        before = [type(m) for m in model]
        if isinstance(layer, fastbn.BatchNorm2d) and not sync:
            fastbn.convert(model)   # nothing to replace in a fastbn layer
            continue
        with pytest.raises(ValueError, match="parametrizations"):
            fastbn.convert(model, sync=sync)
        assert [type(m) for m in model] == before


def test_convert_refuses_a_compiled_batch_norm_and_does_not_fuse_one():
    """Module.compile() makes a layer run a compiled call bound to that object: a
    converted layer taking over its dicts would go on running torch's forward, and a
    fused copy would run unfused with its ReLU gone."""
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU())
    model[1].compile(backend="eager")
    before = [type(m) for m in model]
    with pytest.raises(ValueError, match="Module.compile"):
        fastbn.convert(model)
    assert [type(m) for m in model] == before

    model = fastbn.convert(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU()))
    model[1].compile(backend="eager")
    fastbn.convert(model, fuse_relu=True)
    assert model[1].activation is None and type(model[2]) is nn.ReLU
    assert (model.eval()(torch.randn(2, 3, 4, 4)) >= 0).all()


def test_torchscript_is_refused_in_words():
    with pytest.raises(RuntimeError, match="no TorchScript form"):
        torch.jit.script(nn.Sequential(nn.Conv2d(1, 2, 3), fastbn.BatchNorm2d(2)))
