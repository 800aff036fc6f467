"""The Hessian of a model's loss as a linear operator on flat parameter vectors."""

import functools
import itertools
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten
from tqdm.auto import tqdm

from fastbn._checks import check_count, is_positive_number
from fastbn.backends.distributed import all_reduce_packed, refuse_on_every_process
from fastbn.curvature import _memory
from fastbn.curvature._functional import (FunctionalModel, check_membership,
                                          forked_random_state, is_single_batch,
                                          outside_inference_mode, plain_attributes, savable,
                                          same_batch, seed_from_callers_generator,
                                          split_batch, tensor_attributes, to_device)
from fastbn.curvature.lanczos import bar_disabled

METHODS = ("auto", "forward-over-reverse", "reverse-over-reverse")
# The products "auto" chooses a method for, each on its own: a single-batch matvec by
# reverse-over-reverse reuses a kept graph, so it can be the faster there and not in matmat.
PATHS = ("matvec", "matmat")
_NO_BATCH = object()   # a stream's end, in _batches
_STREAMS_APART = ("HessianOperator: the processes' data ran out at different batches; each "
                 "needs its shard of every batch")
# What torch 2.13 raises for jvp of grad through mse_loss (its forward-mode rule of
# mse_loss's backward writes to a ZeroTensor).
TORCH_ZERO_TENSOR_ERROR = "ZeroTensors are immutable"
# How torch.func.vmap refuses an op with no batching rule ("vmap: we do not yet support
# aten::rrelu", nn.RReLU's random op in training mode, say).
TORCH_NO_BATCHING_RULE_ERROR = "vmap: we do not yet support"


def scalar_loss(value):
    """The criterion's value as a 0-dim tensor, or a clear error."""
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ValueError("criterion must return a scalar tensor, got "
                         + (f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                            else type(value).__name__))
    return value.reshape(())


class NonFiniteLossError(RuntimeError):
    """The loss of a batch is NaN or infinite: there is no curvature to measure there."""


def check_finite_loss(loss, where):
    if not bool(torch.isfinite(loss).all()):
        raise NonFiniteLossError(f"non-finite loss ({float(loss.detach())}) on {where}; "
                                 "refusing to differentiate it")


def _dot(a, b):
    return sum((a[name] * b[name]).sum() for name in a)


def _same_values(a, b):
    return a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def _fixed_at_construction(name, doc=None, view=lambda value: value):
    """A read-only HessianOperator attribute, kept as `_name` and read as view(_name)."""
    def get(self):
        return view(getattr(self, "_" + name))

    def refuse(self, value):
        raise AttributeError(f"HessianOperator.{name} is fixed at construction and cannot "
                             "be set; make a new HessianOperator instead")
    return property(get, refuse, doc=doc or f"The {name} the operator was made with.")


@dataclass
class _KeptGraph:
    """The single batch's first-order graph and what it was built from: `leaves`, the
    copies of θ it differentiates; `others`, copies of every other tensor it read;
    `settings`, the criterion and the plain attributes of the model's modules and of the
    criterion's (see `_graph_inputs`)."""

    leaves: dict
    grads: tuple
    others: list
    settings: list


class HessianOperator:
    """H = ∇²_θ L for L the sample-weighted mean loss of `model` over `data`.

    model: an nn.Module. torch's BatchNorm layers are fine, and so are subclasses of
        them that keep torch's forward (one with its own forward is refused where, in
        training mode, it would update running statistics): a private structural copy
        with fastbn layers runs instead. At every call the copy is fed the model's
        current parameters and buffers and given its modules' current tensor attributes
        (cloned) and attributes holding numbers, strings or None; a submodule replaced,
        or a hook added or removed, after construction is not seen (build a new
        operator). Where the model is an nn.Sequential, a batch norm directly followed by
        nn.ReLU in it or in Sequentials nested in it runs as one fused layer in the copy,
        unless either has hooks. The model itself is only read: its parameters, buffers
        and training flags are bitwise the same after every call, also when a call
        raises. Dropout layers (nn.Dropout, Dropout1d/2d/3d, AlphaDropout,
        FeatureAlphaDropout) run in eval mode in the copy whatever the model's flag: the
        loss of a randomly masked model has no Hessian.
        Other random operations (F.dropout with training=True, nn.RReLU in training mode,
        torch.rand* in a forward) draw from torch's global generator (and the operator's
        CUDA device's), which every evaluation of batch b's loss seeds with
        `random_seed + b` and gives back as it was: H is the Hessian of that one draw
        per batch, the same at every call (so symmetric, and fit for Lanczos), and the
        caller's generators are left untouched. `random_seed` comes from the caller's
        generator when the operator is made, without moving it (the same state makes
        the same operator). The global generators are process-wide: operators used from
        several threads at once draw from each other's seeds. matmat's vmapped passes
        share the draw among their tangents (vmap's randomness="same"); an operation vmap
        cannot batch (nn.RReLU's, in torch 2.13) makes matmat raise: use matvec there.
    criterion: (outputs, targets) -> scalar mean loss over the batch.
    data: one `(inputs, targets)` batch (inputs a tensor or a dict of tensors; wrap a
        batch with tuple inputs as [batch]) or an iterable of batches (re-iterated on every
        call, so it must yield the same batches each time: a pass whose first batch
        differs from the one checked at construction, as a shuffling DataLoader's does,
        raises; a one-shot iterator is stored as a list). The loss is
        Σ_b n_b L_b / Σ_b n_b with n_b the batch's sample count (the leading dimension of
        its inputs' tensors; where they differ, as with a tensor shared by all samples,
        the one the targets have); for a criterion that weighs samples unequally
        (cross_entropy with ignore_index or class weights) that differs from its mean
        over the batches joined. With bn_mode="train" each batch normalises with its own
        batch statistics, as in training, so the loss is not the loss of the
        concatenated batch. Inputs go to the model as its single argument.
    params: the parameters θ: tensors of the model, their names, or (name, tensor)
        pairs as model.named_parameters() yields (one alone too); default every
        parameter with requires_grad. Others are held fixed. Flat vectors concatenate
        them in model.named_parameters() order (see `param_names`).
    bn_mode: "train" (batch statistics; running statistics untouched) or "eval"
        (running statistics). Every other module follows the model's own training flag.
    method: "forward-over-reverse" (jvp of grad), "reverse-over-reverse" (grad of
        grad·v; for matvec on a single batch it keeps the gradient graph between calls,
        see `matvec`), or "auto": matvec and matmat each choose for themselves at their
        first product, timing one run of what they would run with each method after a
        warm-up run of each, on the first batch: matvec one product (on a single batch
        without a process group, reverse-over-reverse's through the kept graph), matmat
        one vmapped pass (warmed up on one tangent; a one-tangent pass on the largest
        batch where max_memory sizes the chunks). `methods_used` maps "matvec" and
        "matmat" to the method each runs (a path is absent until its first product
        under "auto") and `timings` holds each path's times in seconds; a method that
        raises a RuntimeError there is skipped. The two methods agree to rounding, not
        bitwise, and a timed choice can differ between runs: name a method for the same
        bits from the same seed.
    max_memory: byte budget for the working memory of each matmat pass (beyond the
        (P, K) result): the chunk size (tangents per vmapped pass) comes from the peak
        memory of 1- and 2-tangent probe passes on the batch with the most samples
        (`probe_peaks`, None until measured), measured with the CUDA allocator's
        counters or the CPU profiler, rounded down to a power of two, and at most the
        power of two at or above P (where the passes' memory does not measurably grow
        with K, as on a small model, the budget alone would allow any width). At least
        one tangent per pass, even if that exceeds the budget. Passes of different widths
        agree to rounding, not bitwise: for the same bits from the same seed on any
        machine, set chunk_size.
        None: a quarter of the memory available when the first matmat of more than two
        tangents runs (CUDA: the device's free memory; CPU: the system's available
        memory), so a large K (say Hutch++'s) is chunked rather than run out of memory.
        On CPU the measurement needs the torch profiler, which runs one session at a
        time: inside a user's profiler session nothing is measured and matmat warns and
        runs one tangent per pass (the least memory), until a matmat outside the session
        sizes the chunks.
    chunk_size: explicit tangents per pass (overrides max_memory).
    progress: tqdm bars over batches and chunks: True shows them, False hides them,
        None (the default) shows them where stderr is a terminal; also the default of
        `progress` in eigenvalues, trace and spectral_density.
    process_group: data-parallel curvature over torch.distributed. Each process holds its
        shard of the data (the same number of batches on each); batch norms synchronise
        their statistics over the group (batch b of every process forms one global
        batch), and gradients and HVPs are summed over the group, so every process gets
        the operator of the whole data, bit for bit the same on each (the shards of a
        batch weighted by their sample counts, as batches are: see `data`). Call every
        method on every process in the same order. Data refused on one process (an empty
        batch, say) or unequal numbers of batches raise on every process, at
        construction (streams that cannot tell their length, in the first pass where
        they end apart: the passes then agree on each next batch, one small all_reduce
        a batch); a loss that is not finite on one raises on every process.
    """

    def __init__(self, model, criterion, data, *, params=None, bn_mode="train", method="auto",
                 max_memory=None, chunk_size=None, progress=None, process_group=None):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
        check_membership(process_group, "HessianOperator")
        self._group = process_group
        self._model = FunctionalModel(model, bn_mode, process_group, fuse_relu=True)
        self.criterion = criterion
        self._bn_mode = bn_mode
        self._method = method
        self.methods_used = {} if method == "auto" else dict.fromkeys(PATHS, method)
        self.timings = {}
        self.chunk_size = chunk_size
        self._derived_chunk = None   # the chunk_size matmat derived from max_memory
        self.probe_peaks = None      # the budget's probe passes' peaks, once measured
        self.max_memory = max_memory
        self.progress = progress
        self._param_names = self._select_params(model, params)
        selected = dict(model.named_parameters())
        tensors = [selected[name] for name in self._param_names]
        self._shapes = [t.shape for t in tensors]
        self._numels = [t.numel() for t in tensors]
        if len({t.dtype for t in tensors}) > 1 or len({t.device for t in tensors}) > 1:
            raise ValueError("all selected parameters must share one dtype and device")
        self._dtype = tensors[0].dtype
        self._device = tensors[0].device
        size = sum(self._numels)
        self._shape = (size, size)
        self.random_seed = seed_from_callers_generator()
        try:
            (self._data, self._first_batch), refusal = self._store_data(data), None
        except ValueError as error:
            refusal = error
        # whether every process of the group is known to hold as many batches (else the
        # passes agree on each next one)
        self._batches_agreed = True
        if process_group is not None:
            self._agree_on_data(refusal)
        elif refusal is not None:
            raise refusal
        self._single_batch = isinstance(self._data, list) and len(self._data) == 1
        self._graph = None

    # Read at construction only: reassigning one would be silently ignored, so it raises.
    bn_mode = _fixed_at_construction("bn_mode")
    method = _fixed_at_construction("method", "the method asked for; see `methods_used`")
    shape = _fixed_at_construction("shape", "(P, P), P the selected parameters' total size")
    dtype = _fixed_at_construction("dtype", "the dtype of the operator's vectors")
    device = _fixed_at_construction("device", "the device of the operator's vectors")
    param_names = _fixed_at_construction(
        "param_names", "the selected parameters' names, in the order flat vectors "
        "concatenate them (a new list at each read)", view=list)

    # ---- construction helpers ------------------------------------------------------

    @staticmethod
    def _select_params(model, params):
        named = list(model.named_parameters())
        if params is None:
            names = [name for name, p in named if p.requires_grad]
        else:
            by_id = {id(p): name for name, p in named}
            # A parameter held at several places goes by its first name; any name finds it.
            known = {name: by_id[id(p)]
                     for name, p in model.named_parameters(remove_duplicate=False)}
            wanted = set()
            if isinstance(params, (str, torch.Tensor)):
                params = [params]
            for p in params:
                if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str):
                    p = p[0]   # a (name, tensor) pair, as model.named_parameters() yields
                if isinstance(p, str):
                    if p not in known:
                        raise ValueError(f"model has no parameter named {p!r}")
                    wanted.add(known[p])
                elif id(p) in by_id:
                    wanted.add(by_id[id(p)])
                elif isinstance(p, torch.Tensor):
                    raise ValueError("params contains a tensor that is not a parameter of "
                                     "the model")
                else:
                    raise ValueError("params must hold the model's parameters or their "
                                     f"names, got {type(p).__name__}")
            names = [name for name, _ in named if name in wanted]
        if not names:
            raise ValueError("no parameters to differentiate: the model has none with "
                             "requires_grad, or params is empty")
        return names

    @staticmethod
    def _store_data(data):
        """(batches, first): the batches as a list, or the caller's re-iterable; `first`,
        for a re-iterable, the batch it yielded first here, which every pass must yield
        first again (None for a list)."""
        if is_single_batch(data):
            split_batch(data)
            return [data], None
        if isinstance(data, (tuple, list)) and data \
                and isinstance(data[0], (torch.Tensor, Mapping)):
            # Not batches (each a pair) but the parts of one.
            raise ValueError("data must be an (inputs, targets) batch or an iterable of "
                             f"batches, got a {type(data).__name__} of {len(data)} items "
                             f"starting with a {type(data[0]).__name__}")
        try:
            iterator = iter(data)
        except TypeError:
            raise ValueError("data must be an (inputs, targets) batch or an iterable of "
                             f"batches, got {type(data).__name__}") from None
        stored = iterator is data or isinstance(data, (list, tuple))
        if stored:
            batches = list(iterator)    # a one-shot iterator, or a list the caller may edit
            for index, batch in enumerate(batches):
                try:
                    split_batch(batch)
                except ValueError as error:
                    if isinstance(data, (tuple, list)) and len(data) == 2 \
                            and isinstance(data[1], torch.Tensor):
                        error.add_note("data is read as a list of batches; one batch whose "
                                       "inputs are a tuple is passed as [(inputs, targets)]")
                    error.add_note(f"(batch {index} of data)")
                    raise
            data, iterator = batches, iter(batches)
        try:
            first = next(iterator)
        except StopIteration:
            raise ValueError("data yields no batches") from None
        split_batch(first)
        return data, None if stored else first

    def _agree_on_data(self, refusal):
        """Raise on every process if one refused its data (the others would wait in the
        first collective forever) or if their numbers of batches differ. Where a process
        cannot tell its number (a stream: no len(), or one that raises, as a DataLoader
        over an IterableDataset's), the passes agree on each next batch instead."""
        count = -1
        if refusal is None:
            try:
                count = len(self._data)
            except TypeError:
                pass
        counts = refuse_on_every_process(refusal, self._group, self.device, "HessianOperator",
                                         "data", count)
        if len({c for c in counts if c >= 0}) > 1:
            raise ValueError("HessianOperator: the processes hold different numbers of "
                             f"batches ({counts}); each needs its shard of every batch")
        self._batches_agreed = min(counts) >= 0

    def _agree_on_another_batch(self, has_batch):
        """Raise on every process where some have another batch and some have not (one
        small all_reduce)."""
        holding = torch.tensor([int(has_batch)], device=self.device)
        dist.all_reduce(holding, group=self._group)
        holding = int(holding.item())
        if 0 < holding < dist.get_world_size(self._group):
            raise ValueError(_STREAMS_APART)

    # ---- flat vectors <-> parameter dicts --------------------------------------------

    def _unflatten(self, flat):
        pieces = flat.split(self._numels)
        return {name: piece.reshape(shape)
                for name, piece, shape in zip(self._param_names, pieces, self._shapes)}

    def _flatten(self, tensors):
        return torch.cat([tensors[name].reshape(-1) for name in self._param_names])

    def _as_operand(self, v, ndim, what):
        if not isinstance(v, torch.Tensor):
            v = torch.as_tensor(v)
        if v.is_complex():
            raise TypeError(f"{what} takes a real tensor (H is real: apply it to the real "
                            "and imaginary parts)")
        if v.dim() != ndim or v.shape[0] != self.shape[0]:
            expected = "(P,)" if ndim == 1 else "(P, K)"
            raise ValueError(f"{what} expects a tensor of shape {expected} with "
                             f"P={self.shape[0]}, got shape {tuple(v.shape)}")
        # H v is not differentiated with respect to v: the products are plain tensors.
        return v.detach().to(device=self.device, dtype=self.dtype)

    # ---- per-batch functions ---------------------------------------------------------

    def _batches(self):
        """(inputs, targets, n, index) for every batch, on the operator's device."""
        stream = iter(tqdm(self._data, desc="batches", disable=bar_disabled(self.progress),
                           leave=False))
        for index in itertools.count():
            batch = next(stream, _NO_BATCH)
            if not self._batches_agreed:
                self._agree_on_another_batch(batch is not _NO_BATCH)
            if batch is _NO_BATCH:
                return
            if index == 0 and self._first_batch is not None \
                    and not same_batch(batch, self._first_batch):
                raise ValueError(
                    "data yielded another first batch than before: the operator needs the "
                    "same batches on every pass (a DataLoader without shuffling or random "
                    "augmentation; a one-shot stream as an iterator or a list)")
            inputs, targets, n = split_batch(batch)
            yield to_device(inputs, self.device), to_device(targets, self.device), n, index

    def _loss_fn(self, fixed, buffers, inputs, targets, index, weight=1):
        """theta -> (weight * loss, loss): batch `index`'s term of the summed objective, so
        that synchronised batch norms couple every process's terms consistently. Its
        random draws (see `random_seed`) are the same at every evaluation."""
        cuda = [self.device.index] if self.device.type == "cuda" else []

        def loss(theta):
            with forked_random_state(cuda, self.random_seed + index):
                value = scalar_loss(
                    self.criterion(self._model({**fixed, **theta}, buffers, inputs), targets))
            return value * weight, value.detach()
        return loss

    def _split_state(self):
        params, buffers = self._model.state()
        theta = {name: params.pop(name) for name in self._param_names}
        for name, t in theta.items():
            if t.dtype != self.dtype or t.device != self.device:
                raise RuntimeError(
                    f"parameter {name!r} is now {t.dtype} on {t.device}, and this operator "
                    f"was made for {self.dtype} on {self.device} (its vectors' dtype and "
                    "device): make a new HessianOperator for the converted model")
        return theta, params, buffers

    def _hvp_fn(self, method, loss):
        """v (dict) -> (H v, loss) for one batch's loss."""
        grad = torch.func.grad(loss, has_aux=True)

        def forward_over_reverse(theta, v):
            _, hv, value = torch.func.jvp(grad, (theta,), (v,), has_aux=True)
            return hv, value

        def reverse_over_reverse(theta, v):
            def grad_dot_v(th):
                g, value = grad(th)
                return _dot(g, v), value
            return torch.func.grad(grad_dot_v, has_aux=True)(theta)

        if method == "forward-over-reverse":
            return forward_over_reverse
        return reverse_over_reverse

    # ---- public API ------------------------------------------------------------------

    @outside_inference_mode
    def grad(self):
        """The flat gradient of the loss at the model's current parameters."""
        return self._flatten(self._accumulate(None))

    @outside_inference_mode
    def matvec(self, v):
        """H v for a flat vector v of size P: a real tensor (or array) of any dtype, cast
        to the operator's dtype and device (as matmat casts V; a float64 v on a float32
        operator is rounded to float32), and not differentiated through.

        With reverse-over-reverse on a single batch without a process group the
        first-order graph (create_graph backward) is kept between calls and each product
        is one more backward through it.
        The graph is built on a copy of θ and keeps a copy of every other tensor it reads
        (the model's other parameters, buffers and tensor attributes, the batch, and the
        parameters, buffers and tensor attributes of a criterion that is an nn.Module):
        each call compares these, the criterion's identity, and the attributes holding
        numbers, strings or None (training flags, eps, reduction, label_smoothing, ...)
        of the model's modules and the criterion's with the current ones (O(P + batch)
        work) and rebuilds the graph on any change, also one made through `.data`.
        Other tensors (say, one a criterion function closes over) are not compared: the
        graph is rebuilt where autograd finds one it saved changed in place, but values
        computed from them sit in the graph, and a change to them goes unseen; so do other
        settings (the keywords of a functools.partial criterion, say); call
        `clear_cache()` after such a change.
        Memory: the graph plus those copies, until `clear_cache()` frees them.
        """
        v = self._as_operand(v, 1, "matvec")
        if self._group is None and self._single_batch:
            if "matvec" not in self.methods_used:
                return self._choose_single_batch_matvec_method(v)
            if self.methods_used["matvec"] == "reverse-over-reverse":
                return self._retained_graph_hvp(v)
        return self._flatten(self._accumulate(v))

    def clear_cache(self):
        """Free the first-order graph kept by reverse-over-reverse matvec."""
        self._graph = None

    @outside_inference_mode
    def matmat(self, V):
        """H V for V of shape (P, K): K HVPs per vmapped pass (fastbn's K-batched kernels),
        in chunks of `chunk_size` tangents (set from `max_memory` on first use). V is
        cast to the operator's dtype and device, as in `matvec`."""
        V = self._as_operand(V, 2, "matmat")
        k = V.shape[1]
        result = torch.empty_like(V)
        if k == 0:
            return result
        chunk = self._chunk_size(k)
        starts = range(0, k, chunk)
        bar = tqdm(starts, desc="matmat chunks", leave=False,
                   disable=True if len(starts) < 2 else bar_disabled(self.progress))
        for start in bar:
            result[:, start:start + chunk] = self._matmat_pass(V[:, start:start + chunk])
        return result

    def __matmul__(self, x):
        return self.matvec(x) if torch.as_tensor(x).dim() == 1 else self.matmat(x)

    def to_scipy(self):
        """A scipy.sparse.linalg.LinearOperator (float64 numpy in and out)."""
        from scipy.sparse.linalg import LinearOperator

        def apply_real(x):
            t = torch.from_numpy(np.array(x, dtype=np.float64))
            out = self.matvec(t) if t.dim() == 1 else self.matmat(t)
            return out.detach().to("cpu", torch.float64).numpy()

        def apply(x):
            # H is real: a complex operand (scipy's eigensolvers make some) goes in parts.
            if np.iscomplexobj(x):
                return apply_real(x.real) + 1j * apply_real(x.imag)
            return apply_real(x)

        return LinearOperator(self.shape, matvec=apply, rmatvec=apply, matmat=apply,
                              rmatmat=apply, dtype=np.float64)

    # ---- internals -------------------------------------------------------------------

    def _matmat_pass(self, V, batches=None):
        return self._flatten_batched(self._accumulate(V.t(), True, batches)).t()

    def _flatten_batched(self, tensors):
        return torch.cat([tensors[name].reshape(tensors[name].shape[0], -1)
                          for name in self._param_names], dim=1)

    def _apply(self, method, loss, theta, tangent, batched):
        """(H_b v, loss) for a flat v (batched=False) or (H_b Vᵀ rows, loss) for the
        (K, P) rows of V in one vmapped pass (batched=True)."""
        hvp = self._hvp_fn(method, loss)
        try:
            if not batched:
                return hvp(theta, self._unflatten(tangent))
            # "same": the tangents share the one draw every loss evaluation makes.
            return torch.func.vmap(lambda v: hvp(theta, self._unflatten(v)),
                                   out_dims=(0, None), randomness="same")(tangent)
        except RuntimeError as error:
            if batched and TORCH_NO_BATCHING_RULE_ERROR in str(error):
                raise RuntimeError(
                    "matmat runs its tangents through torch.func.vmap, and vmap has no "
                    f"batching rule for an operation of this model or criterion ({error}). "
                    "Use matvec, one product at a time, or replace the operation "
                    "(nn.RReLU in training mode: nn.LeakyReLU, say)."
                ) from error
            if method == "forward-over-reverse" and TORCH_ZERO_TENSOR_ERROR in str(error):
                raise RuntimeError(
                    'method="forward-over-reverse" hit a limitation of torch: the '
                    "forward-mode derivative of some backward formulas (mse_loss's, in "
                    f'torch 2.13) fails with "{TORCH_ZERO_TENSOR_ERROR}". Use '
                    'method="reverse-over-reverse", or "auto", which falls back to it.'
                ) from error
            raise

    def _accumulate(self, tangent, batched=False, batches=None):
        """Σ_b n_b X_b / Σ_b n_b over `batches` (default: all of data), where X_b is the
        gradient (tangent None) or the HVPs of batch b's loss (see `_apply`)."""
        theta, fixed, buffers = self._split_state()
        total, count = None, 0
        non_finite = None   # (batch index, loss) of the first batch whose loss is not finite
        for inputs, targets, n, index in batches or self._batches():
            loss = self._loss_fn(fixed, buffers, inputs, targets, index, weight=n)
            try:
                if tangent is None:
                    value, loss_value = torch.func.grad(loss, has_aux=True)(theta)
                else:
                    path = "matmat" if batched else "matvec"
                    if path in self.methods_used:
                        value, loss_value = self._apply(self.methods_used[path], loss,
                                                        theta, tangent, batched)
                    else:
                        run = {method: functools.partial(self._apply, method, loss, theta,
                                                         batched=batched)
                               for method in METHODS if method != "auto"}
                        value, loss_value = self._choose_method(
                            path, run, tangent, tangent[:1] if batched else tangent)
            except Exception as error:
                # Which batch failed (say, one of a single sample in training mode).
                if hasattr(error, "add_note"):   # Python 3.11 and later
                    error.add_note(f"(in batch {index} of the operator's data, counted "
                                   "from 0)")
                raise
            if self._group is None:
                check_finite_loss(loss_value, f"batch {index}")
            elif non_finite is None and not bool(torch.isfinite(loss_value)):
                # Raised on every process after the sum: the others would wait in their
                # next collective.
                non_finite = index, float(loss_value)
            total = value if total is None else {k: total[k] + value[k] for k in total}
            count += n
        if count == 0:
            raise ValueError("data yielded no batches")
        if self._group is not None:
            total, count = self._sum_over_group(total, count, non_finite)
        return {name: t / count for name, t in total.items()}

    def _sum_over_group(self, total, count, non_finite):
        """One all_reduce of every per-process sum, the sample count and, by rank, the
        first batch whose loss is not finite (`non_finite`: (index, loss) or None), which
        raises NonFiniteLossError on every process."""
        sums = list(total.values())
        flags = sums[0].new_zeros(dist.get_world_size(self._group))
        if non_finite is not None:   # 1 + its index, as 0 stands for none
            flags[dist.get_rank(self._group)] = 1 + non_finite[0]
        chunks = all_reduce_packed(sums + [sums[0].new_full((1,), count), flags], self._group)
        for rank, flag in enumerate(chunks[-1].tolist()):
            if flag:
                loss = f" ({non_finite[1]})" if rank == dist.get_rank(self._group) else ""
                raise NonFiniteLossError(f"non-finite loss{loss} on batch {int(flag) - 1} "
                                         f"of process {rank} of the group; refusing to "
                                         "differentiate it")
        return dict(zip(total, chunks)), chunks[-2]

    def _choose_single_batch_matvec_method(self, v):
        """methods_used["matvec"] for a single batch: forward-over-reverse's product
        against one backward through the kept graph (built in the warm-up run); the graph
        is freed where it is not the faster. Returns H v (through the kept graph, the
        timed product, or as a named forward-over-reverse would compute it)."""
        theta, fixed, buffers = self._split_state()
        inputs, targets, _, index = next(self._batches())
        loss = self._loss_fn(fixed, buffers, inputs, targets, index)
        run = {"forward-over-reverse": lambda v: self._apply("forward-over-reverse", loss,
                                                             theta, v, batched=False),
               "reverse-over-reverse": self._retained_graph_hvp}
        product = self._choose_method("matvec", run, v, v)
        if self.methods_used["matvec"] == "reverse-over-reverse":
            return product
        self.clear_cache()
        return self._flatten(self._accumulate(v))

    def _graph_inputs(self):
        """(θ, every other tensor, settings) that the single batch's loss reads, as they
        are now: the model's parameters, buffers and tensor attributes, the batch's
        tensors, a criterion module's parameters, buffers and tensor attributes; the
        criterion itself (compared by identity: one assigned to `criterion` since counts
        as a change) and the plain attributes (training flags included) of the model's
        modules and of the criterion and its submodules."""
        model = self._model.model
        params = {name: p.detach() for name, p in model.named_parameters()}
        theta = {name: params.pop(name) for name in self._param_names}
        others = [*params.values(), *model.buffers(), *tensor_attributes(model),
                  *(t for t in tree_flatten(self._data[0])[0] if isinstance(t, torch.Tensor))]
        criteria = [self.criterion]
        if isinstance(self.criterion, nn.Module):
            others += [*self.criterion.parameters(), *self.criterion.buffers(),
                       *tensor_attributes(self.criterion)]
            criteria = list(self.criterion.modules())
        settings = [[plain_attributes(m) for m in model.modules()], self.criterion,
                    [plain_attributes(c) for c in criteria]]
        return theta, [t.detach() for t in others], settings

    def _graph_is_current(self, theta, others, settings):
        graph = self._graph
        return (graph is not None and settings == graph.settings
                and len(others) == len(graph.others)
                and all(_same_values(graph.leaves[name], t) for name, t in theta.items())
                and all(map(_same_values, others, graph.others)))

    def _retained_graph_hvp(self, v):
        """H v by one backward through the kept gradient graph of the single batch,
        rebuilt first if anything it was built from has changed (see `matvec`)."""
        theta, others, settings = self._graph_inputs()
        if self._graph_is_current(theta, others, settings):
            try:
                return self._kept_graph_product(v)
            except RuntimeError as error:
                if "modified by an inplace operation" not in str(error):
                    raise
                # A tensor the graph saved changed in place where the comparison does
                # not look (one a criterion closes over, say): rebuild.
        self._graph = None          # free the old graph before building the new one
        self._graph = self._build_graph(theta, others, settings)
        return self._kept_graph_product(v)

    def _build_graph(self, theta, others, settings):
        """The gradient graph of the single batch (create_graph backward), on the
        private copy with cloned buffers, so a train-mode forward outside a transform
        updates only the clones."""
        snapshot = [t.clone() for t in others]
        _, fixed, buffers = self._split_state()
        # A batch made under inference mode cannot be saved for backward: a copy can.
        inputs, targets = savable(next(self._batches())[:2])
        leaves = {name: t.clone().requires_grad_() for name, t in theta.items()}
        with torch.enable_grad():
            loss = self._loss_fn(fixed, buffers, inputs, targets, 0)(leaves)[0]
            check_finite_loss(loss.detach(), "batch 0")
            if loss.requires_grad:
                grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True,
                                            allow_unused=True, materialize_grads=True)
            else:   # no selected parameter reaches the loss: the Hessian is zero
                grads = [torch.zeros_like(t) for t in leaves.values()]
        return _KeptGraph(leaves, grads, snapshot, settings)

    def _kept_graph_product(self, v):
        leaves, grads = self._graph.leaves, self._graph.grads
        tangent = self._unflatten(v)
        pairs = [(g, tangent[name]) for name, g in zip(leaves, grads) if g.requires_grad]
        if not pairs:
            return torch.zeros_like(v)
        with torch.enable_grad():
            products = torch.autograd.grad([g for g, _ in pairs], list(leaves.values()),
                                           grad_outputs=[t for _, t in pairs],
                                           retain_graph=True, allow_unused=True,
                                           materialize_grads=True)
        return self._flatten(dict(zip(leaves, products)))

    def _choose_method(self, path, run, operand, warm_up_operand):
        """Set methods_used[path] to the faster of `run`'s methods (method -> function of
        an operand) and return its result on `operand`: each runs once on
        `warm_up_operand`, then is timed once on `operand` (timings[path]). A method
        that raises a RuntimeError is skipped (timing inf): torch 2.13's forward-mode
        rule of mse_loss's backward fails ("ZeroTensors are immutable"), so jvp(grad) of
        an MSE loss does. A non-finite loss fails every method: raised, nothing chosen."""
        timings, results, failure = {}, {}, None
        for method, product in run.items():
            try:
                product(warm_up_operand)
            except NonFiniteLossError:
                raise
            except RuntimeError as error:
                failure = error
                timings[method] = math.inf
        usable = [method for method in run if method not in timings]
        if not usable:
            raise failure
        for method in usable:
            start = time.perf_counter()
            results[method] = run[method](operand)
            timings[method] = time.perf_counter() - start
        if self._group is not None:   # every process must pick the same method
            slowest = torch.tensor([timings[m] for m in run], dtype=torch.float64,
                                   device=self.device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=self._group)
            timings = dict(zip(run, slowest.tolist()))
            usable = [m for m in usable if math.isfinite(timings[m])]
        self.timings[path] = timings
        self.methods_used[path] = min(usable, key=timings.get)
        return results[self.methods_used[path]]

    @property
    def chunk_size(self):
        """Tangents per matmat pass (None: sized from `max_memory` at the next matmat)."""
        return self._chunk

    @chunk_size.setter
    def chunk_size(self, value):
        # checked when set after construction too: a count below 1 ran no pass and
        # returned matmat's uninitialised output
        self._chunk = None if value is None else check_count(value, "chunk_size")

    @property
    def max_memory(self):
        """The byte budget of a matmat pass (see the class docstring). Setting it makes
        the next matmat size its chunks again, where they came from the old budget."""
        return self._max_memory

    @max_memory.setter
    def max_memory(self, value):
        if value is not None and not is_positive_number(value):
            raise ValueError("max_memory must be a positive finite number of bytes, got "
                             f"{value!r}")
        self._max_memory = value
        if self.chunk_size is not None and self.chunk_size == self._derived_chunk:
            self.chunk_size = self._derived_chunk = None

    def _chunk_size(self, k):
        if self.chunk_size is not None:
            return self.chunk_size
        if self.max_memory is None and k <= 2:
            return k   # no smaller pass than the probes' to measure
        if not self._can_measure_memory():
            warnings.warn(
                "HessianOperator.matmat: a torch profiler session is active, and measuring "
                "the memory of a pass on CPU would end it, so matmat runs one tangent per "
                "pass; pass chunk_size to HessianOperator (or set op.chunk_size) to choose "
                "the chunking.", RuntimeWarning, stacklevel=3)
            return 1
        self.chunk_size = self._derived_chunk = self._chunk_from_budget()
        return self.chunk_size

    def _can_measure_memory(self):
        """`_memory.can_measure` on every process, or on none: the probe passes run
        collectives, so all processes measure or none does."""
        able = _memory.can_measure(self.device)
        if self._group is not None:
            agreed = torch.tensor([int(able)], device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self._group)
            able = bool(agreed)
        return able

    def _largest_batch(self):
        """(inputs, targets, n, index) of the batch with the most samples, whose passes
        take the most memory; with a process group, the same index on every process (the
        one where some process holds the most)."""
        sizes, largest, index = [], None, 0
        for batch in self._data:   # one pass over data, keeping the first largest batch
            n = split_batch(batch)[2]
            if largest is None or n > sizes[index]:
                largest, index = batch, len(sizes)
            sizes.append(n)
        if self._group is not None:
            if not self._batches_agreed:   # the sizes' messages must be of one length
                counts = torch.tensor([len(sizes), -len(sizes)], device=self.device)
                dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=self._group)
                if counts[0] != -counts[1]:
                    raise ValueError(_STREAMS_APART)
            agreed = torch.tensor(sizes, device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self._group)
            agreed = agreed.tolist()
            if agreed.index(max(agreed)) != index:   # another process's largest: a second pass
                index = agreed.index(max(agreed))
                largest = next(itertools.islice(self._data, index, None))
        inputs, targets, n = split_batch(largest)
        return to_device(inputs, self.device), to_device(targets, self.device), n, index

    def _chunk_from_budget(self):
        """Tangents per pass that fit `max_memory`, from the peak memory of 1- and
        2-tangent passes on the largest batch (peak ≈ base + K · per_tangent)."""
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(self.shape[0], 2, generator=generator, dtype=torch.float64)
        probe = probe.to(device=self.device, dtype=self.dtype)
        largest = [self._largest_batch()]
        self._matmat_pass(probe[:, :1], largest)      # picks the method; warms up
        self.probe_peaks = [
            _memory.peak_bytes(lambda k=k: self._matmat_pass(probe[:, :k], largest),
                               self.device)
            for k in (1, 2)]
        per_tangent = max(self.probe_peaks[1] - self.probe_peaks[0], 1)
        base = max(self.probe_peaks[0] - per_tangent, 0)
        budget = self.max_memory
        if budget is None:
            budget = _memory.available_bytes(self.device) / 4
        chunk = max(1, math.floor((budget - base) / per_tangent))
        # Rounded down to a power of two: passes of different widths differ in the last
        # bits (torch's convolutions), and runs whose available memory differs a little
        # then still pick the same width.
        chunk = min(1 << (chunk.bit_length() - 1), 1 << (self.shape[0] - 1).bit_length())
        if self._group is not None:   # the same passes (and collectives) on every process
            agreed = torch.tensor([chunk], device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self._group)
            chunk = int(agreed)
        return chunk
