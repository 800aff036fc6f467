"""The four experiments. Each model run is one resumable part, checkpointed to the out dir.

A part's checkpoint (`checkpoints/<part>.pt`) holds its JSON-ready result, the model's
initial and final state dicts, the configuration fields it depends on and the code that
computed it (`code_version`); `--resume` reuses a checkpoint only when all of those
match.

With a process group (data-parallel, e.g. under torchrun) the VGG runs and the
learning-rate sweep train with the batch split across the processes (`train` with
`process_group`). The full-batch DLN and the theorem checks are not sharded: every
process runs them identically, without collectives. Only rank 0 writes checkpoints;
with `--resume` rank 0 reads them and broadcasts each part, so that every process skips
(or trains) the same parts.
"""

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import pathlib
import sys

import torch
import torch.distributed as dist
from torch import nn

import fastbn
from fastbn import backends
from fastbn.curvature import NonFiniteLossError
from fastbn.experiments import data as datasets
from fastbn.experiments import models
from fastbn.experiments.config import Config
from fastbn.experiments.training import evaluate_classifier, train
from fastbn.probes import theory_checks

VARIANTS = (("plain", False), ("bn", True))


CHECKPOINTS = "checkpoints"   # the out dir's folder of parts


def part_path(out_dir, part):
    """Where a run into `out_dir` stores its part `part`."""
    return os.path.join(out_dir, CHECKPOINTS, f"{part}.pt")


def part_settings(saved):
    """The settings in a stored part's resume key (the code's version among them)."""
    return json.JSONDecoder().raw_decode(saved["key"])[0]   # a VGG key has a suffix


def part_config(saved, **overrides):
    """The Config a stored part was computed with: its resume key's settings (every other
    field at its default) with `overrides` replaced (None: keep)."""
    settings = part_settings(saved)
    names = {field.name for field in dataclasses.fields(Config)}
    values = {k: tuple(v) if isinstance(v, list) else v   # JSON wrote the grids as lists
              for k, v in settings.items() if k in names}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Config(**values)


class PartStore:
    """Completed parts of this run, in memory and on disk; reads old ones with `resume`.

    With `process_group`, only its rank 0 touches the disk (see the module docstring).
    """

    def __init__(self, out_dir, *, resume, process_group=None):
        self.out_dir = out_dir
        self.group = process_group
        self.writes = process_group is None or dist.get_rank(process_group) == 0
        if self.writes:
            os.makedirs(os.path.join(out_dir, CHECKPOINTS), exist_ok=True)
        self.resume = resume
        self.done = {}

    def _load(self, part):
        path = part_path(self.out_dir, part)
        if self.writes and os.path.exists(path):
            try:
                saved = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as error:   # unpickling fails with any of a dozen types
                print(f"[fastbn reproduce] {path} is unreadable ({type(error).__name__}: "
                      f"{error}): computing the part again", file=sys.stderr)
                return None
            return saved if isinstance(saved, dict) and "key" in saved else None
        return None

    def get(self, part, key):
        if part in self.done:
            return self.done[part]
        if not self.resume:
            return None
        saved = [self._load(part)]
        if self.group is not None:
            dist.broadcast_object_list(saved, group_src=0, group=self.group)
        if saved[0] is not None and saved[0]["key"] == key:
            self.done[part] = saved[0]
            return saved[0]
        return None

    def put(self, part, key, result, states):
        saved = {"key": key, "result": result, "states": states}
        if self.writes:
            # Written aside, then renamed: a killed run never leaves a half-written part.
            tmp = part_path(self.out_dir, part) + ".tmp"
            torch.save(saved, tmp)
            os.replace(tmp, part_path(self.out_dir, part))
        self.done[part] = saved
        return saved


@functools.cache
def code_version():
    """fastbn's version and a digest of its installed Python sources and compiled
    kernels: a part that other code computed is not reused."""
    root = pathlib.Path(fastbn.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix in (".py", ".so", ".pyd") and path.is_file():
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return f"{fastbn.__version__}+{digest.hexdigest()[:16]}"


def _key(config, *fields, process_group=None):
    """A part's identity for --resume: its settings, the code, and what else changes its
    bits (torch's version, the thread count, the backend, the number of processes its
    batches are split over: those of `process_group`, one without)."""
    settings = {f: getattr(config, f) for f in ("seed", "dataset", "data_dir", "device") + fields}
    world_size = 1 if process_group is None else dist.get_world_size(process_group)
    backend = backends.select(torch.empty(0, device=config.device)).name   # "auto" resolved
    return json.dumps({**settings, "code": code_version(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "backend": backend,
                       "world_size": world_size}, sort_keys=True, default=str)


def _state(model):
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _every(steps, probes):
    """Probe every ceil(steps / probes) steps: at most `probes` probes (steps // probes
    could give nearly twice as many)."""
    return -(-steps // probes) if probes else 0


VGG_FIELDS = ("vgg_width", "vgg_hidden", "batch_size")


def build_vgg(config, dataset, batch_norm):
    return models.vgg(dataset.image_shape, dataset.num_classes, batch_norm=batch_norm,
                      width=config.vgg_width, hidden=config.vgg_hidden,
                      seed=config.seed).to(config.device)


def _shard(indices, process_group):
    """This process's contiguous, equal share of a batch's indices (all without a group)."""
    if process_group is None:
        return indices
    return indices.chunk(dist.get_world_size(process_group))[dist.get_rank(process_group)]


def _vgg_run(config, dataset, batch_norm, *, lr, steps, probes, part, store, progress,
             process_group=None):
    """Train one VGG variant (cached by `part`), data-parallel over `process_group` if
    given; returns the stored part."""
    # The probes' settings only where it probes (the learning-rate sweep does not).
    probe_fields = ("vgg_multipliers", "sharpness") if probes else ()
    key = (_key(config, *VGG_FIELDS, "eval_every", *probe_fields, process_group=process_group)
           + json.dumps([lr, steps, probes]))
    saved = store.get(part, key)
    if saved is not None:
        return saved
    model = build_vgg(config, dataset, batch_norm)
    initial = _state(model)
    if process_group is not None:
        model = fastbn.convert(model, sync=True, process_group=process_group)
    criterion = nn.CrossEntropyLoss()
    # Same seed, same batch order for both variants.
    order = datasets.batch_order(len(dataset.train_y), config.batch_size, steps, config.seed)
    shards = (_shard(i, process_group).to(config.device) for i in order)
    batches = ((dataset.train_x[i], dataset.train_y[i]) for i in shards)

    def evaluate(m):
        loss, accuracy = evaluate_classifier(m, criterion, dataset.test_x, dataset.test_y)
        return {"test_loss": loss, "test_accuracy": accuracy,
                "test_samples": len(dataset.test_y)}

    result = train(model, criterion, batches, steps, lr=lr, probe_every=_every(steps, probes),
                   multipliers=config.vgg_multipliers, sharpness=config.sharpness,
                   seed=config.seed, evaluate=evaluate,
                   eval_every=config.eval_every, classification=True, progress=progress,
                   desc=part, process_group=process_group)
    result["batch_norm"] = batch_norm
    return store.put(part, key, result, {"init": initial, "final": _state(model)})


def run_vgg(config, dataset, store, progress, process_group=None):
    """Figure 4: VGG with and without BN, probed along the trajectory."""
    return {name: _vgg_run(config, dataset, bn, lr=config.vgg_lr, steps=config.vgg_steps,
                           probes=config.vgg_probes, part=f"vgg_{name}", store=store,
                           progress=progress, process_group=process_group)["result"]
            for name, bn in VARIANTS}


# The DLN runs in float64: its probes' smallest steps, 0.01 × lr × g with lr = 1e-6, are
# below float32's resolution of its weights (rounded, the step taken late in training was
# 0.76 of η‖g‖, and the gradient change there half its float64 value). Its 25 layers of
# 10 × 10 cost about the same either way.
DLN_DTYPE = torch.float64


def dln_problem(config):
    """The DLN's whole batch (inputs, targets), in DLN_DTYPE on the config's device."""
    return tuple(t.to(config.device, DLN_DTYPE) for t in datasets.deep_linear_problem(
        dim=config.dln_dim, samples=config.dln_samples, seed=config.seed))


def build_dln(config, batch_norm):
    return models.deep_linear_net(config.dln_dim, config.dln_depth, batch_norm=batch_norm,
                                  seed=config.seed).to(config.device, DLN_DTYPE)


DLN_CRITERION = nn.MSELoss(reduction="sum")  # ‖W1…W25 x − A x‖² summed over the samples


def _dln_run(config, batch_norm, part, store, progress):
    key = _key(config, "dln_dim", "dln_depth", "dln_samples", "dln_lr", "dln_steps",
               "dln_probes", "dln_multipliers", "sharpness")
    saved = store.get(part, key)
    if saved is not None:
        return saved
    inputs, targets = dln_problem(config)
    model = build_dln(config, batch_norm)
    initial = _state(model)
    # Full-batch gradient descent: the same batch every step.
    steps = config.dln_steps
    result = train(model, DLN_CRITERION, itertools.repeat((inputs, targets), steps), steps,
                   lr=config.dln_lr, probe_every=_every(steps, config.dln_probes),
                   multipliers=config.dln_multipliers, sharpness=config.sharpness,
                   seed=config.seed, progress=progress, desc=part)
    result["batch_norm"] = batch_norm
    return store.put(part, key, result, {"init": initial, "final": _state(model)})


def run_dln(config, store, progress):
    """The deep linear network, full-batch GD, with and without BN."""
    return {name: _dln_run(config, bn, f"dln_{name}", store, progress)["result"]
            for name, bn in VARIANTS}


def _summary_of_sweep_run(result, num_classes):
    losses = result["curves"]["loss"]
    tail = losses[-max(1, len(losses) // 10):]
    final_eval = result["evaluations"][-1]
    diverged = result["diverged_at_step"] is not None
    final_loss = float("nan") if diverged else sum(tail) / len(tail)
    return {"lr": result["lr"], "diverged_at_step": result["diverged_at_step"],
            "initial_loss": losses[0], "final_train_loss": final_loss,
            "test_accuracy": final_eval["test_accuracy"],
            # "Trains" (a stated choice): no divergence and a final loss below half a
            # uniform guess's, ln(classes) / 2: one bar for both variants, whatever their
            # first losses.
            "trains": (not diverged) and final_loss < 0.5 * math.log(num_classes)}


def run_lr_sweep(config, dataset, store, progress, process_group=None):
    """Figure 1/11: which learning rates each VGG variant trains at, and where it diverges."""
    results = {}
    for name, bn in VARIANTS:
        results[name] = [
            _summary_of_sweep_run(_vgg_run(
                config, dataset, bn, lr=lr, steps=config.sweep_steps, probes=0,
                part=f"lr_{name}_{lr!r}", store=store, progress=progress,
                process_group=process_group)["result"], dataset.num_classes)
            for lr in config.sweep_lrs]
    return results


def _theory_for(model, states, criterion, batch, config):
    """The theorem checks at each moment; none (an empty dict) at a moment whose loss,
    with or without one of the BN layers, is not finite (a run that diverged)."""
    out = {}
    for moment in ("init", "final"):
        model.load_state_dict(states[moment])
        try:
            out[moment] = theory_checks(model, criterion, batch,
                                        channels=config.theory_channels,
                                        layers=config.theory_layers,
                                        lanczos_iterations=config.theory_lanczos,
                                        seed=config.seed)
        except NonFiniteLossError:
            out[moment] = {}
    return out


def run_theory(config, dataset, store, progress, process_group=None):
    """Theorems 4.1/4.2 per BN layer at initialisation and at the end of training.

    With `process_group` only the VGG training it needs is data-parallel; the checks run
    on every process alike."""
    key = _key(config, *VGG_FIELDS, "vgg_lr", "vgg_steps", "theory_batch", "theory_channels",
               "theory_layers", "theory_lanczos", "dln_dim", "dln_depth", "dln_samples",
               "dln_lr", "dln_steps", process_group=process_group)
    saved = store.get("theory", key)
    if saved is not None:
        return saved["result"]
    vgg_part = _vgg_run(config, dataset, True, lr=config.vgg_lr, steps=config.vgg_steps,
                        probes=config.vgg_probes, part="vgg_bn", store=store,
                        progress=progress, process_group=process_group)
    order = datasets.batch_order(len(dataset.train_y), config.theory_batch, 1, config.seed,
                                 stream="theory batch")[0]
    image_batch = (dataset.train_x[order.to(config.device)],
                   dataset.train_y[order.to(config.device)])
    dln_part = _dln_run(config, True, "dln_bn", store, progress)
    dln_batch = dln_problem(config)
    result = {
        "vgg_bn": _theory_for(build_vgg(config, dataset, True), vgg_part["states"],
                              nn.CrossEntropyLoss(), image_batch, config),
        "dln_bn": _theory_for(build_dln(config, True), dln_part["states"], DLN_CRITERION,
                              dln_batch, config),
    }
    return store.put("theory", key, result, {})["result"]


EXPERIMENTS = ("vgg", "dln", "lr", "theory")
