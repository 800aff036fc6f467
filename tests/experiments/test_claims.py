import json
import math

import pytest

from fastbn.experiments import claims
from fastbn.probes.callback import json_safe


def run(scale, steps=10, beta=1.0):
    """A fake probed run whose landscape spreads `scale` times more than the reference."""
    probe_steps = list(range(steps))
    return {"probes": {"step": probe_steps, "loss_min": [1.0] * steps,
                       "loss_max": [1.0 + scale] * steps,
                       "grad_change_min": [0.0] * steps,
                       "grad_change_max": [scale] * steps,
                       "beta_eff": [beta * scale] * steps}}


def by_id(found):
    return {c["id"]: c for c in found}


def test_verdicts_follow_the_measured_ratios():
    smooth = by_id(claims.landscape_claims({"plain": run(100.0), "bn": run(1.0)}, 100, "x", "X"))
    assert smooth["x_loss_range"]["value"] == pytest.approx(math.log(101) / math.log(2))
    assert smooth["x_loss_range"]["also"]["absolute_median_ratio_early"] == 100.0
    assert all(c["verdict"] == "reproduced" for c in smooth.values())
    rough = by_id(claims.landscape_claims({"plain": run(1.0), "bn": run(3.0)}, 100, "x", "X"))
    assert all(c["verdict"] == "not reproduced" for c in rough.values())
    mild = by_id(claims.landscape_claims({"plain": run(3.0), "bn": run(1.0)}, 100, "x", "X"))
    assert mild["x_gradient_predictiveness"]["verdict"] == "partly"  # 3× < one order


def test_early_window_claims_need_enough_probe_steps():
    few = by_id(claims.landscape_claims({"plain": run(100.0, steps=claims.MIN_EARLY_PROBES - 1),
                                         "bn": run(1.0, steps=claims.MIN_EARLY_PROBES - 1)},
                                        100, "x", "X"))
    assert few["x_loss_range"]["verdict"] == few["x_gradient_predictiveness"]["verdict"] \
        == few["x_effective_beta"]["verdict"] == "inconclusive"
    assert few["x_gradient_predictiveness"]["value"] == 100.0   # the number is still reported


def test_claims_count_only_the_steps_both_runs_reached():
    """A plain run probed once before it diverged and stopped judges nothing, however far
    its one step lies from the BN run's thirty."""
    found = by_id(claims.landscape_claims({"plain": run(100.0, steps=1),
                                           "bn": run(1.0, steps=30)}, 100, "x", "X"))
    assert all(c["verdict"] == "inconclusive" for c in found.values())
    assert found["x_loss_range"]["also"]["paired_probe_steps_early"] == 1
    assert found["x_effective_beta"]["also"]["paired_probe_steps"] == 1


def test_blown_up_plain_probes_count_as_wider_and_missing_ones_as_no_data():
    plain = run(1.0)
    plain["probes"]["loss_max"] = [math.inf] * 10  # a step length inside the grid blew up
    found = by_id(claims.landscape_claims({"plain": plain, "bn": run(1.0)}, 100, "x", "X"))
    assert found["x_loss_range"]["value"] == math.inf
    assert found["x_loss_range"]["verdict"] == "reproduced"
    plain["probes"]["loss_max"] = [None] * 10
    found = by_id(claims.landscape_claims({"plain": plain, "bn": run(1.0)}, 100, "x", "X"))
    assert found["x_loss_range"]["verdict"] == "no data"


def test_claims_recomputed_from_the_written_json_are_the_claims_written():
    """A blown-up probe (inf) counts against its side and a missing one (NaN) is no data:
    written both as null, the JSON gave another effective β (0.405 for 0.432 in a run
    whose plain net diverged)."""
    plain, bn = run(100.0), run(1.0)
    for field in ("loss_max", "grad_change_max", "beta_eff"):
        bn["probes"][field][:4] = [math.inf] * 4     # blown up with BN: against BN
        plain["probes"][field][4:6] = [math.nan] * 2  # not measured: no data
    runs = {"plain": plain, "bn": bn}
    read = json.loads(json.dumps(json_safe(runs), allow_nan=False))
    assert read["bn"]["probes"]["beta_eff"][:5] == ["inf"] * 4 + [1.0]
    assert read["plain"]["probes"]["beta_eff"][4] is None
    written = claims.landscape_claims(runs, 100, "x", "X")
    assert by_id(written)["x_effective_beta"]["value"] == 0.5   # 4 of 8 paired steps
    assert (json_safe(claims.landscape_claims(read, 100, "x", "X")) == json_safe(written))


def test_learning_rate_claim():
    def rows(trains):
        return [{"lr": lr, "trains": t, "diverged_at_step": None if t else 3}
                for lr, t in zip((0.1, 1.0), trains)]

    assert claims.learning_rate_claim({"plain": rows([True, False]),
                                       "bn": rows([True, True])})["verdict"] == "reproduced"
    # The plain net trains at the largest swept lr: the sweep does not find its limit.
    assert claims.learning_rate_claim({"plain": rows([True, True]),
                                       "bn": rows([True, True])})["verdict"] == "inconclusive"
    assert claims.learning_rate_claim({"plain": rows([True, False]),
                                       "bn": rows([True, False])})["verdict"] == "not reproduced"
    assert claims.learning_rate_claim({"plain": rows([False, False]),
                                       "bn": rows([True, False])})["verdict"] == "inconclusive"
    # Neither variant trains: no baseline, so no verdict either way.
    assert claims.learning_rate_claim({"plain": rows([False, False]),
                                       "bn": rows([False, False])})["verdict"] == "inconclusive"


def test_blown_up_bn_probes_count_against_batch_norm():
    bn = run(1.0)
    for field in ("loss_max", "grad_change_max", "beta_eff"):
        bn["probes"][field] = [math.inf] * 5 + bn["probes"][field][5:]
    found = by_id(claims.landscape_claims({"plain": run(100.0), "bn": bn}, 100, "x", "X"))
    # Half the steps favour BN by 100×, half blew up with BN: no verdict for BN.
    assert found["x_effective_beta"]["value"] == 0.5
    assert found["x_effective_beta"]["verdict"] == "not reproduced"
    bn["probes"]["loss_max"] = [math.inf] * 10
    found = by_id(claims.landscape_claims({"plain": run(100.0), "bn": bn}, 100, "x", "X"))
    assert found["x_loss_range"]["value"] == 0.0
    assert found["x_loss_range"]["verdict"] == "not reproduced"


def test_a_probe_blown_up_at_every_step_length_has_an_infinite_range():
    plain = run(1.0)
    plain["probes"]["loss_min"] = [math.nan] * 10     # no finite loss at any step length
    plain["probes"]["loss_max"] = [math.inf] * 10
    found = by_id(claims.landscape_claims({"plain": plain, "bn": run(1.0)}, 100, "x", "X"))
    assert found["x_loss_range"]["value"] == math.inf
    both = by_id(claims.landscape_claims({"plain": plain, "bn": plain}, 100, "x", "X"))
    assert both["x_loss_range"]["value"] == 1.0     # both blew up: a tie



def test_the_early_window_holds_enough_probe_steps():
    # Probes every 10 steps of 300: the first 10% holds 3, the window takes 5.
    plain, bn = run(1.0, steps=30), run(1.0, steps=30)
    for r in (plain, bn):
        r["probes"]["step"] = [10 * i for i in range(30)]
    plain["probes"]["grad_change_max"] = [0.1] * 2 + [100.0] * 28   # a plateau at first
    found = by_id(claims.landscape_claims({"plain": plain, "bn": bn}, 300, "x", "X"))
    assert claims.MIN_EARLY_PROBES == 5
    assert found["x_gradient_predictiveness"]["value"] == 100.0


def test_accuracy_claim_needs_more_than_the_test_sets_noise():
    def runs(plain, bn, n=1000):
        return {name: {"evaluations": [{"test_accuracy": a, "test_samples": n}]}
                for name, a in (("plain", plain), ("bn", bn))}

    assert claims.accuracy_claim(runs(0.80, 0.83, n=10000))["verdict"] == "reproduced"
    # 0.4 points either way, with 2 standard errors of 1.5 points: no evidence either way.
    assert claims.accuracy_claim(runs(0.970, 0.974))["verdict"] == "inconclusive"
    assert claims.accuracy_claim(runs(0.974, 0.970))["verdict"] == "inconclusive"
    assert claims.accuracy_claim(runs(0.83, 0.80, n=10000))["verdict"] == "not reproduced"
    # No test set size: no standard error, so no verdict beyond "inconclusive".
    for n in (math.nan, 0):
        assert claims.accuracy_claim(runs(0.80, 0.83, n=n))["verdict"] == "inconclusive"


def test_the_loss_range_is_judged_on_the_papers_log_axis():
    """A BN net whose loss is 100× lower has a 100× narrower absolute range along the same
    relative landscape: on the log axis the two bands are equally wide."""
    plain, bn = run(1.0), run(1.0)
    bn["probes"]["loss_min"] = [0.01] * 10
    bn["probes"]["loss_max"] = [0.02] * 10
    found = by_id(claims.landscape_claims({"plain": plain, "bn": bn}, 100, "x", "X"))
    assert found["x_loss_range"]["value"] == pytest.approx(1.0)
    assert found["x_loss_range"]["verdict"] == "not reproduced"
    assert found["x_loss_range"]["also"]["absolute_median_ratio_early"] == pytest.approx(100.0)
    bn["probes"]["loss_min"] = [0.0] * 10       # a zero minimum below a positive maximum
    found = by_id(claims.landscape_claims({"plain": plain, "bn": bn}, 100, "x", "X"))
    assert found["x_loss_range"]["value"] == 0.0


def test_early_quartiles_and_near_ties_are_reported():
    plain, bn = run(1.0), run(1.0)
    plain["probes"]["grad_change_max"] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    plain["probes"]["beta_eff"] = [1.01] * 4 + [2.0] * 6
    found = by_id(claims.landscape_claims({"plain": plain, "bn": bn}, 100, "x", "X"))
    assert found["x_gradient_predictiveness"]["also"]["early_quartiles"] == [3.0, 7.0]
    assert found["x_effective_beta"]["value"] == 1.0
    assert found["x_effective_beta"]["also"]["near_ties"] == 0.4


def _channel(lhs, rhs_same_point):
    return {"held": True, "preconditions": True, "inner_gz_yhat": 1.0, "lhs": lhs,
            "rhs_same_point": rhs_same_point, "held_same_point": True}


def test_theory_claims_report_what_the_verdicts_rest_on():
    layer = {"theorem_4_1": {"per_channel": {"held": [True, False], "rhs": [1.0, -2.0]},
                             "identity_rel_error": 1e-6},
             "theorem_4_2": {"channels": [_channel(2.0, 2.0 + 1e-5), _channel(1.0, 1.0)]}}
    found = by_id(claims.theory_claims({"net": {"init": {"bn": layer}}}))
    assert found["theorem_4_1"]["value"] == 0.5
    assert found["theorem_4_1"]["also"]["negative_rhs_fraction"] == 0.5
    same_point = found["theorem_4_2_proof_setting"]
    assert same_point["also"]["max_relative_difference"] == pytest.approx(5e-6, rel=1e-4)
    assert same_point["verdict"] == "held everywhere"


def test_the_proof_setting_counts_every_checked_channel():
    """An identity, whatever the sign of ⟨∇_z L̂, ŷ⟩: a channel where it failed counts."""
    failed = dict(_channel(1.0, 1.1), held_same_point=False, inner_gz_yhat=-1.0)
    layer = {"theorem_4_1": {"per_channel": {"held": [True], "rhs": [1.0]},
                             "identity_rel_error": 1e-6},
             "theorem_4_2": {"channels": [_channel(1.0, 1.0), failed]}}
    same_point = by_id(claims.theory_claims({"net": {"init": {"bn": layer}}}))[
        "theorem_4_2_proof_setting"]
    assert same_point["value"] == 0.5 and same_point["also"]["channels"] == 2
    assert same_point["verdict"] == "violated in places"


def test_theorems_not_checked_anywhere_have_no_data():
    found = by_id(claims.theory_claims({"net": {"init": {}, "final": {}}}))
    assert {found[i]["verdict"] for i in ("theorem_4_1", "theorem_4_2",
                                          "theorem_4_2_proof_setting")} == {"no data"}
