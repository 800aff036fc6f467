"""Kernels whose per-channel reductions span every process of a torch.distributed group.

`SyncKernels(group)` has the kernel interface of `reference.py`; it runs the reference math
with a `GroupReduction`, so the op layer's Functions give SyncBatchNorm every order of
autodiff (double backward, jvp, vmap over tangents) with no math of its own.

Communication: the forward statistics travel in one all_gather of the packed count,
per-channel means and M2 (2C + 1 values per process, in float64), merged with the
parallel Welford formula, so unequal batch sizes are exact and a rank with no samples
contributes nothing. Each later reduction (the backward's sums of grad and grad * xhat,
...) is one packed all_reduce. Gradients of weight and bias stay the local batch's share,
as in torch.nn.SyncBatchNorm. Counts stay on the device: no host-device synchronisation.

One SyncKernels object serves one forward call and every derivative taken from it: it
keeps the global count that the forward's collective produced.
"""

import weakref

import torch
import torch.distributed as dist

from fastbn.backends import reference


# group -> the message shapes every process of the group has agreed on. Weakly keyed: a
# process group that outlives destroy_process_group is destroyed at interpreter exit,
# where gloo's threads abort the process.
_AGREED = weakref.WeakKeyDictionary()
_ACC_DTYPES = (torch.float32, torch.float64)


def all_reduce_packed(tensors, group):
    """Each of `tensors` (one dtype and device) summed over the group in one all_reduce:
    new tensors of their shapes."""
    packed = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(packed, group=group)
    return [chunk.view(t.shape) for chunk, t in
            zip(packed.split([t.numel() for t in tensors]), tensors)]


def _gather_ints(values, group, device):
    """Every process's `values` (ints, as many on every process), by rank: one small
    all_gather (on `device`: NCCL gathers CUDA tensors only)."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    return [theirs.tolist() for theirs in everyone]


def refuse_on_every_process(refusal, group, device, caller, what, value=0):
    """Every process's `value` (an int), by rank, from one all_gather that also tells each
    process whether another refused its `what`: this process's `refusal` (an exception,
    or None) is raised here, another's as a ValueError that names its rank, so that no
    process is left waiting in a collective the refusing one never enters."""
    gathered = _gather_ints([int(refusal is not None), value], group, device)
    if refusal is not None:
        raise refusal
    refused = [rank for rank, (flag, _) in enumerate(gathered) if flag]
    if refused:
        raise ValueError(f"{caller}: process {refused[0]} of the group refused its {what} "
                         "(its error says why)")
    return [theirs for _, theirs in gathered]


def _check_agreement(group, values, device, what, describe):
    """Raise on every process if the group's processes describe a collective's message
    differently (`values`: ints, as many on every process): their messages would differ
    in size, which gloo answers by aborting a process and NCCL by hanging, while the
    others read garbage. One small collective the first time this process meets each
    (group, values): programs whose collectives match across processes meet them in the
    same order. Where processes disagree and one has met its values before, it skips
    the check that the others enter: that disagreement is not caught (checking every
    call would double the layer's collectives). The error names `what` they disagree on
    and `describe(values)` for each rank."""
    agreed = _AGREED.setdefault(group, set())
    if values in agreed:
        return
    everyone = _gather_ints(values, group, device)
    if any(theirs != list(values) for theirs in everyone):
        described = ", ".join(describe(*theirs) for theirs in everyone)
        raise RuntimeError("fastbn: the processes of a synchronised batch norm disagree on "
                           f"{what} (by rank: {described})")
    agreed.add(values)


class GroupReduction:
    """Per-channel reductions over the batches of all processes in `group`."""

    def __init__(self, group):
        self.group = group
        self.global_count = None   # a 0-dim tensor once `moments` has run

    def count(self, x):
        if self.global_count is None:
            local = torch.tensor(float(reference.LOCAL.count(x)), dtype=torch.float64,
                                 device=x.device)
            dist.all_reduce(local, group=self.group)
            self.global_count = local
        return self.global_count.to(reference.acc_dtype(x.dtype))

    def total(self, *sums):
        # Sizes differ where the tangents do (a jacobian over unequal local batches).
        _check_agreement(self.group, (sum(t.numel() for t in sums),), sums[0].device,
                         "the size of a derivative's reduction (channels × tangents)",
                         lambda size: f"{size} values")
        return all_reduce_packed(sums, self.group)

    def moments(self, x):
        n = reference.LOCAL.count(x)
        acc = reference.acc_dtype(x.dtype)
        channels = x.shape[1]
        _check_agreement(self.group, (channels, _ACC_DTYPES.index(acc)), x.device,
                         "its channel count or dtype",
                         lambda c, d: f"{c} channels in {_ACC_DTYPES[d]}")
        # Sent and merged in float64: a float32 mean rounded at 1e4 is off by 5e-4, which
        # the merge's (means - mean)^2 turned into 100x the local variance's error. Each
        # process's mean comes from a float64 sum; its M2 from the accumulation dtype
        # (relative rounding only, as x - mean is small).
        if n:
            var = reference.LOCAL.moments(x)[1].double()
            mean = x.sum(reference.reduce_dims(x.dim()), dtype=torch.float64) / n
        else:
            mean = var = torch.zeros(channels, dtype=torch.float64, device=x.device)
        # One message of 2C + 1 values: count, per-channel mean, per-channel M2.
        packed = torch.cat([torch.full((1,), float(n), dtype=torch.float64, device=x.device),
                            mean, var * n])
        gathered = torch.empty(dist.get_world_size(self.group), packed.numel(),
                               dtype=torch.float64, device=x.device)
        dist.all_gather(list(gathered.unbind(0)), packed, group=self.group)
        counts = gathered[:, :1]
        means, m2s = gathered[:, 1:].split(channels, dim=1)   # each (world, C)
        total = counts.sum(0)
        mean = (counts * means).sum(0) / total
        m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
        self.global_count = total[0]
        return mean.to(acc), (m2 / total).to(acc)


class SyncKernels:
    """The kernel interface, with reductions across the processes of `group`."""

    name = "distributed"
    runs_pytorch_ops = True

    def __init__(self, group):
        self.reduction = GroupReduction(group)

    def forward_train(self, x, weight, bias, eps, activation=None, running_mean=None,
                      running_var=None, momentum=0.0):
        return reference.forward_train(x, weight, bias, eps, activation, running_mean,
                                       running_var, momentum, reduction=self.reduction)

    def forward_eval(self, *args):
        return reference.forward_eval(*args)

    def backward(self, *args):
        return reference.backward(*args, reduction=self.reduction)

    def forward_jvp(self, *args):
        return reference.forward_jvp(*args, reduction=self.reduction)

    def backward_backward(self, *args):
        return reference.backward_backward(*args, reduction=self.reduction)

    def backward_jvp(self, *args):
        return reference.backward_jvp(*args, reduction=self.reduction)
