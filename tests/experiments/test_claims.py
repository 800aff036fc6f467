import math

from fastbn.experiments import claims


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
    assert smooth["x_loss_range"]["value"] == 100.0
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
        == "inconclusive"
    assert few["x_loss_range"]["value"] == 100.0   # the number is still reported


def test_blown_up_plain_probes_count_as_wider_and_missing_ones_as_no_data():
    plain = run(1.0)
    plain["probes"]["loss_max"] = [math.inf] * 10  # a step length inside the grid blew up
    found = by_id(claims.landscape_claims({"plain": plain, "bn": run(1.0)}, 100, "x", "X"))
    assert found["x_loss_range"]["value"] == math.inf
    assert found["x_loss_range"]["verdict"] == "reproduced"
    plain["probes"]["loss_max"] = [None] * 10
    found = by_id(claims.landscape_claims({"plain": plain, "bn": run(1.0)}, 100, "x", "X"))
    assert found["x_loss_range"]["verdict"] == "no data"


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
    assert claims.accuracy_claim(runs(0.970, 0.974))["verdict"] == "partly"   # 0.4 of 1.5 pt
    assert claims.accuracy_claim(runs(0.83, 0.80))["verdict"] == "not reproduced"
