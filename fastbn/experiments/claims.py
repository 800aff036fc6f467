"""The paper's claims as numbers computed from the results, each with a verdict.

Verdict rules (stated in the report): a ratio claim is "reproduced" when the measured
ratio passes the paper's order of magnitude (threshold below), "partly" when it only
points the same way (ratio > 1, or a majority of steps), "not reproduced" otherwise;
"no data" when every value is missing; "inconclusive" when the comparison has no
baseline (the learning-rate sweep does not bracket the plain net's limit) or too little
of it (a landscape claim judged on fewer than MIN_EARLY_PROBES steps at which both runs
were probed: in the early window, or over the whole run for β). The accuracy
claim is "reproduced" beyond twice the standard error of the difference, "not reproduced"
below minus twice, "inconclusive" between.
"""

import math

import numpy as np

EARLY_FRACTION = 0.1  # "early in training" = the first 10% of the steps ...
MIN_EARLY_PROBES = 5  # ... and at least this many probe steps
BETA_TIE = 0.05       # β_eff ratios within 5% of 1, reported as near ties


def _float(v):
    return math.nan if v is None else float(v)


def _ratio(numerator, denominator):
    """numerator / denominator of two non-negative measures (without BN / with BN), where
    inf is a blown-up probe: one side blown up gives inf or 0 (it counts against that
    side), both blown up or both zero gives 1 (a tie), a missing value NaN."""
    a, b = _float(numerator), _float(denominator)
    if math.isnan(a) or math.isnan(b) or a < 0 or b < 0:
        return math.nan
    if a == b:          # inf and inf, 0 and 0 included
        return 1.0
    if b == 0 or math.isinf(a):
        return math.inf
    return a / b


def _range(low, high):
    """loss_max − loss_min of a probe; inf where it blew up (at every step length the
    minimum is missing then: nothing finite to subtract)."""
    low, high = _float(low), _float(high)
    return math.inf if math.isinf(high) else high - low


def _log_range(low, high):
    """log(loss_max / loss_min) of a probe: the width of its band on the paper's log axis
    (a loss level 10× lower shrinks the absolute range 10×, not this); inf where it blew
    up or the minimum is 0 below a positive maximum."""
    low, high = _float(low), _float(high)
    if math.isinf(high):
        return math.inf
    if math.isnan(low) or math.isnan(high) or low < 0:
        return math.nan
    if low == high:
        return 0.0
    return math.inf if low == 0 else math.log(high / low)


def _median(values):
    values = [v for v in values if not math.isnan(v)]
    return float(np.median(values)) if values else math.nan


def _quartiles(values):
    """[lower, upper] quartile: how far a median of few probe steps is from turning."""
    values = [v for v in values if not math.isnan(v)]
    return ([float(q) for q in np.percentile(values, [25, 75], method="lower")] if values
            else [math.nan, math.nan])


def _paired(plain, bn, field, window_end=None):
    """Values of `field` at the probe steps both runs reached (optionally step < window_end)."""
    a = dict(zip(plain["probes"].get("step", []), plain["probes"].get(field, [])))
    b = dict(zip(bn["probes"].get("step", []), bn["probes"].get(field, [])))
    steps = sorted(s for s in set(a) & set(b) if window_end is None or s < window_end)
    return [a[s] for s in steps], [b[s] for s in steps]


def _early_end(run, steps):
    """End of the first 10% of training, but late enough to hold MIN_EARLY_PROBES probe
    steps (a median of two or three early points turned on the plain net's first plateau)."""
    probe_steps = run["probes"].get("step", [])
    enough = probe_steps[min(MIN_EARLY_PROBES, len(probe_steps)) - 1] + 1 if probe_steps else 1
    return max(EARLY_FRACTION * steps, enough)


def _verdict(value, strong, weak=1.0):
    if math.isnan(value):
        return "no data"
    if value >= strong:
        return "reproduced"
    if value > weak:
        return "partly"
    return "not reproduced"


def landscape_claims(runs, steps, network, paper_setting):
    """Claims 1–3 of Figure 4 (loss range, gradient predictiveness, effective β) for one net."""
    plain, bn = runs["plain"], runs["bn"]
    end = _early_end(bn, steps)
    # Every ratio compares the steps both runs were probed at; fewer than MIN_EARLY_PROBES
    # of them judge nothing (a run probed once, at step 0, or one that diverged early and
    # stopped, leaving a median of one or two steps).
    paired_early = len(_paired(plain, bn, "step", end)[0])

    def judged(value, enough, **thresholds):
        return _verdict(value, **thresholds) if enough >= MIN_EARLY_PROBES else "inconclusive"

    def ranges(width, window):
        lo_p, lo_b = _paired(plain, bn, "loss_min", window)
        hi_p, hi_b = _paired(plain, bn, "loss_max", window)
        return [_ratio(width(lp, hp), width(lb, hb))
                for lp, lb, hp, hb in zip(lo_p, lo_b, hi_p, hi_b)]

    loss_ratios = ranges(_log_range, end)
    loss_early = _median(loss_ratios)
    grad_p, grad_b = _paired(plain, bn, "grad_change_max", end)
    grad_ratios = [_ratio(p, b) for p, b in zip(grad_p, grad_b)]
    grad_early = _median(grad_ratios)
    grad_p, grad_b = _paired(plain, bn, "grad_change_max")
    grad_all = _median([_ratio(p, b) for p, b in zip(grad_p, grad_b)])
    beta_p, beta_b = _paired(plain, bn, "beta_eff")
    beta_ratios = [r for r in (_ratio(p, b) for p, b in zip(beta_p, beta_b))
                   if not math.isnan(r)]
    lower_fraction = (sum(r > 1 for r in beta_ratios) / len(beta_ratios) if beta_ratios
                      else math.nan)
    ties = (sum(abs(r - 1) <= BETA_TIE for r in beta_ratios) / len(beta_ratios)
            if beta_ratios else math.nan)
    beta_early_p, beta_early_b = _paired(plain, bn, "beta_eff", end)
    beta_early = _median([_ratio(p, b) for p, b in zip(beta_early_p, beta_early_b)])
    return [
        {"id": f"{network}_loss_range",
         "claim": f"{paper_setting}: without BN the loss varies over a much wider range along "
                  "the gradient, especially early in training (Figure 4a).",
         "measure": f"median over the probe steps both runs reached in the first 10% of "
                    f"training (at least {MIN_EARLY_PROBES}) of the band's width on the "
                    "paper's log axis, log(loss_max / loss_min), without BN / with BN "
                    "(reproduced at ≥ 2); `also`: the same over the whole run, and on absolute "
                    "ranges (loss_max − loss_min), which a lower loss level shrinks",
         "value": loss_early,
         "also": {"early_quartiles": _quartiles(loss_ratios),
                  "median_ratio_whole_run": _median(ranges(_log_range, None)),
                  "absolute_median_ratio_early": _median(ranges(_range, end)),
                  "absolute_median_ratio_whole_run": _median(ranges(_range, None)),
                  "paired_probe_steps_early": paired_early},
         "verdict": judged(loss_early, paired_early, strong=2.0)},
        {"id": f"{network}_gradient_predictiveness",
         "claim": f"{paper_setting}: gradient predictiveness — the change of the gradient along "
                  "the gradient step — differs by close to two orders of magnitude early in "
                  "training, larger without BN (Figure 4b).",
         "measure": f"median over the probe steps both runs reached in the first 10% of "
                    f"training (at least {MIN_EARLY_PROBES}) of max_η‖∇L(w−ηg)−g‖ without BN "
                    "/ with BN (reproduced at ≥ 10, "
                    "one of the paper's two orders of magnitude)",
         "value": grad_early, "also": {"early_quartiles": _quartiles(grad_ratios),
                                       "median_ratio_whole_run": grad_all,
                                       "paired_probe_steps_early": paired_early},
         "verdict": judged(grad_early, paired_early, strong=10.0)},
        {"id": f"{network}_effective_beta",
         "claim": f"{paper_setting}: the effective β-smoothness is consistently lower with BN "
                  "(Figure 4c).",
         "measure": f"fraction of the probe steps both runs reached (at least "
                    f"{MIN_EARLY_PROBES}) with β_eff(BN) < β_eff(no BN) (reproduced at ≥ 0.8, "
                    "partly above 0.5); `also`: the median ratio no-BN/BN over the first 10%, "
                    f"and the fraction of steps within {BETA_TIE:.0%} of a tie",
         "value": lower_fraction,
         "also": {"median_ratio_early": beta_early, "near_ties": ties,
                  "paired_probe_steps": len(beta_ratios)},
         "verdict": judged(lower_fraction, len(beta_ratios), strong=0.8, weak=0.5)},
    ]


def learning_rate_claim(sweep):
    def largest_trained(rows):
        trained = [r["lr"] for r in rows if r["trains"]]
        return max(trained) if trained else math.nan

    plain, bn = largest_trained(sweep["plain"]), largest_trained(sweep["bn"])
    only_bn = [r_bn["lr"] for r_p, r_bn in zip(sweep["plain"], sweep["bn"])
               if r_bn["trains"] and not r_p["trains"]]
    if math.isnan(plain) or plain == max(r["lr"] for r in sweep["plain"]):
        # The sweep does not bracket the plain net's limit (it trains at no swept lr, or
        # at the largest): nothing to compare.
        verdict = "inconclusive"
    elif math.isnan(bn):
        verdict = "not reproduced"
    else:
        verdict = "reproduced" if bn > plain else "not reproduced"
    return {"id": "lr_range",
            "claim": "BN lets the network train at larger learning rates, where the plain "
                     "network fails (Figure 1/11).",
            "measure": "largest swept lr at which each variant trains (no divergence and a "
                       "final training loss below half of ln(classes), a uniform guess's); "
                       "value = that lr with BN / without (inconclusive when the plain net "
                       "trains at no swept lr or at the largest)",
            "value": _ratio(bn, plain),
            "also": {"largest_lr_plain": plain, "largest_lr_bn": bn,
                     "lrs_only_bn_trains": only_bn,
                     "lrs_plain_diverged": [r["lr"] for r in sweep["plain"]
                                            if r["diverged_at_step"] is not None],
                     "lrs_bn_diverged": [r["lr"] for r in sweep["bn"]
                                         if r["diverged_at_step"] is not None]},
            "verdict": verdict}


def accuracy_claim(runs):
    plain_eval, bn_eval = runs["plain"]["evaluations"][-1], runs["bn"]["evaluations"][-1]
    plain, bn = _float(plain_eval["test_accuracy"]), _float(bn_eval["test_accuracy"])
    difference = bn - plain
    # The two accuracies' sampling noise on a test set of n samples, as if independent: both
    # nets see the same test set, so the paired error is smaller and this test conservative.
    n = bn_eval.get("test_samples") or math.nan
    error = math.sqrt((plain * (1 - plain) + bn * (1 - bn)) / n)
    if math.isnan(difference):
        verdict = "no data"
    elif not abs(difference) > 2 * error:
        verdict = "inconclusive"   # within the test set's noise, or no test set size
    else:
        verdict = "reproduced" if difference > 0 else "not reproduced"
    return {"id": "vgg_test_accuracy",
            "claim": "With BN the VGG network reaches a higher test accuracy (83% vs 80% on "
                     "CIFAR-10).",
            "measure": "final test accuracy with BN minus without BN (reproduced beyond twice "
                       "its standard error from the test set's size, not reproduced below "
                       "minus twice, inconclusive between)",
            "value": difference, "also": {"plain": plain, "bn": bn, "standard_error": error},
            "verdict": verdict}


def theory_claims(theory):
    rows_41, rows_42, checked_42, identity_errors, rhs_41 = [], [], [], [], []
    for moments in theory.values():
        for layers in moments.values():
            for layer in layers.values():
                rows_41 += layer["theorem_4_1"]["per_channel"]["held"]
                rhs_41 += layer["theorem_4_1"]["per_channel"]["rhs"]
                identity_errors.append(layer["theorem_4_1"]["identity_rel_error"])
                if "channels" in layer["theorem_4_2"]:
                    checked_42 += layer["theorem_4_2"]["channels"]
                    rows_42 += [c for c in layer["theorem_4_2"]["channels"] if c["preconditions"]]
    held_41 = sum(rows_41) / len(rows_41) if rows_41 else math.nan
    held_42 = (sum(c["held"] for c in rows_42) / len(rows_42)) if rows_42 else math.nan
    held_same_point = (sum(c["held_same_point"] for c in checked_42) / len(checked_42)
                       if checked_42 else math.nan)
    # In the proof's setting the two sides are equal: how far apart they came out, relative.
    residual = max((abs(c["lhs"] - c["rhs_same_point"])
                    / max(abs(c["lhs"]), abs(c["rhs_same_point"]), 1e-300)
                    for c in checked_42), default=None)
    return [
        {"id": "theorem_4_1",
         "claim": "Theorem 4.1: BN's gradient w.r.t. the pre-BN activations is bounded by "
                  "(γ²/σ²) times the plain gradient's norm² minus two projections.",
         "measure": "fraction of (network, moment, layer, channel) where the printed "
                    "inequality held, with L = the network with that BN removed; `also`: "
                    "the fraction of channels whose printed right side is negative (no "
                    "squared norm is below it: the 1/√m term), and the relative error of "
                    "the identity the bound comes from (1/m, ∇_z L̂ in place of ∇_y L)",
         "value": held_41,
         "also": {"negative_rhs_fraction": (sum(r < 0 for r in rhs_41) / len(rhs_41)
                                            if rhs_41 else None),
                  "max_identity_rel_error": max(identity_errors, default=None)},
         "verdict": _theorem_verdict(held_41)},
        {"id": "theorem_4_2",
         "claim": "Theorem 4.2: the Hessian quadratic form along the gradient is rescaled by "
                  "γ²/σ² and reduced, when H is PSD and ⟨ŷ, ĝ⟩ > 0.",
         "measure": "fraction of checked channels satisfying the preconditions where the "
                    "inequality held, with L = the network with that BN removed",
         "value": held_42, "also": {"channels_with_preconditions": len(rows_42)},
         "verdict": _theorem_verdict(held_42)},
        {"id": "theorem_4_2_proof_setting",
         "claim": "Theorem 4.2 in the setting of the paper's proof: L as a function of the "
                  "BN output z, at the BN network's z, where its two sides are equal (with "
                  "eps > 0, once the terms of order eps/σ² are kept).",
         "measure": "fraction of checked channels where the two sides of that identity "
                    "agreed to 1e-4 of its largest term, either way: a check of the "
                    "second-order autodiff, not of a smoothing; `also`: their largest "
                    "relative difference",
         "value": held_same_point,
         "also": {"channels": len(checked_42), "max_relative_difference": residual},
         "verdict": _theorem_verdict(held_same_point)},
    ]


def _theorem_verdict(held_fraction):
    if math.isnan(held_fraction):
        return "no data"
    return "held everywhere" if held_fraction == 1 else "violated in places"


def all_claims(results, config):
    experiments = results["experiments"]
    claims = []
    if "vgg" in experiments:
        claims += landscape_claims(experiments["vgg"], config["vgg_steps"], "vgg",
                                   "VGG")
        claims.append(accuracy_claim(experiments["vgg"]))
    if "dln" in experiments:
        claims += landscape_claims(experiments["dln"], config["dln_steps"], "dln",
                                   "Deep linear network")
    if "lr" in experiments:
        claims.append(learning_rate_claim(experiments["lr"]))
    if "theory" in experiments:
        claims += theory_claims(experiments["theory"])
    return claims
