import json
import math
import shutil

import pytest
import torch

from fastbn import cli as fastbn_cli
from fastbn import curvature
from fastbn.experiments import config, probe, runner
from fastbn.experiments import data as datasets
from fastbn.experiments.cli import reproduce_main
from tests.curvature.helpers import exact_hessian

# The quick preset shrunk so that each network's exact Hessian takes a second: a
# 5-layer DLN of 10×10 (500 or 580 parameters) and a 3-stage VGG on 8×8 digits.
TINY_PRESET = dict(config.QUICK, vgg_hidden=8, vgg_width=0.0625, batch_size=16, dln_depth=5,
                   dln_samples=64, vgg_probes=2, dln_probes=2, vgg_steps=6, dln_steps=6)
FAST = ["--no-progress", "--trace-samples", "8", "--density-runs", "2", "--density-steps", "8"]


@pytest.fixture(autouse=True)
def _tiny_preset(monkeypatch):
    monkeypatch.setattr(config, "QUICK", TINY_PRESET)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A reproduce run's out dir with its VGG and DLN parts (six steps each)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("reproduce")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config, "QUICK", TINY_PRESET)
        for experiment in ("vgg", "dln"):
            assert reproduce_main(["--quick", "--dataset", "digits", "--seed", "2",
                                   "--no-progress", "--experiment", experiment,
                                   "--out", str(out)]) == 0
    return out


def run_probe(arguments, tmp_path):
    out = tmp_path / "probe.json"
    assert probe.probe_main(arguments + ["--out", str(out)]) == 0
    with open(out) as f:
        return json.load(f)


def as_config(settings):
    """The Config of a network's reported settings (every other field at its default)."""
    return config.Config(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in settings.items()})


def reported(expected, model):
    """The settings the probe reports for a `model` network built by Config `expected`."""
    return json.loads(json.dumps({field: getattr(expected, field)
                                  for field in probe.NETWORK_FIELDS[model]}))


def network(name, measured, state=None):
    """The model, criterion and batch the probe measured as network `name`, rebuilt here
    from its report."""
    settings = as_config({**measured["settings"], "batch_size": measured["batch_size"]})
    batch_norm = name.endswith("_bn")
    if name.startswith("dln"):
        model = runner.build_dln(settings, batch_norm)
        batch = runner.dln_problem(settings)
        criterion = runner.DLN_CRITERION
    else:
        dataset = datasets.load_dataset(settings.dataset, seed=settings.seed)
        model = runner.build_vgg(settings, dataset, batch_norm)
        batch = probe.vgg_batch(settings, dataset)
        criterion = torch.nn.CrossEntropyLoss()
    if state is not None:
        model.load_state_dict(state)
    return model, criterion, batch


def test_measures_match_the_exact_hessian(tmp_path):
    # As many density steps and trace samples as parameters: the quadrature's nodes are
    # the eigenvalues and Hutch++ is exact.
    result = run_probe(["--quick", "--model", "dln", "--top", "3", "--no-progress",
                        "--trace-samples", "600", "--density-runs", "1",
                        "--density-steps", "600", "--tol", "1e-4"], tmp_path)
    assert set(result["networks"]) == {"dln_plain", "dln_bn"}
    for name, measured in result["networks"].items():
        assert measured["settings"] == reported(config.make_config(quick=True), "dln")
        model, criterion, batch = network(name, measured)
        gradient, hessian = exact_hessian(model, criterion, [batch])
        exact = torch.linalg.eigvalsh(hessian.double())
        scale = exact.abs().max().item()
        assert measured["parameters"] == hessian.shape[0]
        assert measured["loss"] == pytest.approx(criterion(model(batch[0]), batch[1]).item(),
                                                 rel=1e-5)
        assert measured["grad_norm"] == pytest.approx(gradient.norm().item(), rel=1e-4)
        assert measured["eigenvalues"] == pytest.approx(exact.flip(0)[:3].tolist(),
                                                        abs=1e-4 * scale)
        assert measured["trace"] == pytest.approx(exact.sum().item(), abs=1e-4 * scale)
        assert measured["trace_stderr"] == 0
        assert measured["smallest_eigenvalue"] == pytest.approx(exact[0].item(),
                                                                abs=1e-4 * scale)
        density = measured["density"]
        mass = torch.trapezoid(torch.tensor(density["density"]), torch.tensor(density["grid"]))
        assert mass.item() == pytest.approx(1.0)
        assert measured["gradient_step"]["etas"] == pytest.approx(
            [m * measured["lr"] for m in config.Config.dln_multipliers])


def test_vgg_at_initialisation_is_the_reproductions_network(tmp_path):
    pytest.importorskip("sklearn")
    result = run_probe(["--quick", "--model", "vgg", "--dataset", "digits", "--seed", "4",
                        "--batch-size", "12"] + FAST, tmp_path)
    expected = config.make_config(quick=True, seed=4, dataset="digits", batch_size=12)
    for name, measured in result["networks"].items():
        assert measured["settings"] == reported(expected, "vgg")
        assert measured["batch_size"] == 12
        model, criterion, batch = network(name, measured)
        assert measured["loss"] == pytest.approx(criterion(model(batch[0]), batch[1]).item(),
                                                 rel=1e-5)
        operator = curvature.HessianOperator(model, criterion, [batch], progress=False,
                                             method="reverse-over-reverse")
        values, _ = curvature.eigenvalues(operator, k=1, seed=4)
        assert measured["eigenvalues"] == pytest.approx(values.tolist(), rel=1e-5)
        assert measured["lr"] == config.Config.vgg_lr


@pytest.mark.parametrize("at", ["init", "final"])
def test_from_a_run_probes_its_stored_weights(trained_run, tmp_path, at):
    result = run_probe(["--from", str(trained_run), "--at", at] + FAST, tmp_path)
    assert result["source"] == {"from": str(trained_run), "at": at}
    assert set(result["networks"]) == {"vgg_plain", "vgg_bn", "dln_plain", "dln_bn"}
    with open(trained_run / "results.json") as f:   # the last run's: dln
        run_config = as_config(json.load(f)["config"])
    for name, measured in result["networks"].items():
        saved = torch.load(runner.part_path(trained_run, name), weights_only=True)
        assert measured["settings"] == reported(run_config, name.split("_")[0])
        assert measured["lr"] == saved["result"]["lr"]
        if name.startswith("vgg"):
            assert measured["batch_size"] == TINY_PRESET["batch_size"]
        model, criterion, batch = network(name, measured, saved["states"][at])
        assert measured["loss"] == pytest.approx(criterion(model(batch[0]), batch[1]).item(),
                                                 rel=1e-5)
    # The probe batch's size is the probe's to choose; the network is the run's.
    again = run_probe(["--from", str(trained_run), "--model", "vgg", "--batch-size", "8"]
                      + FAST, tmp_path)
    for name, measured in again["networks"].items():
        assert measured["batch_size"] == 8
        assert measured["settings"] == result["networks"][name]["settings"]
    # Six steps moved the weights: the two moments are different networks.
    built = network("dln_plain", result["networks"]["dln_plain"])[0]
    init = torch.load(runner.part_path(trained_run, "dln_plain"), weights_only=True)
    assert all(torch.equal(built.state_dict()[k], v) for k, v in init["states"]["init"].items())
    assert not all(torch.equal(built.state_dict()[k], v)
                   for k, v in init["states"]["final"].items())


def test_a_network_that_cannot_be_probed_is_reported_and_the_rest_run(trained_run, tmp_path,
                                                                       capsys):
    broken = tmp_path / "run"
    (broken / runner.CHECKPOINTS).mkdir(parents=True)
    for name in ("dln_plain", "dln_bn"):
        saved = torch.load(runner.part_path(trained_run, name), weights_only=True)
        if name == "dln_bn":   # a diverged run's weights
            next(iter(saved["states"]["final"].values())).fill_(math.nan)
        torch.save(saved, runner.part_path(broken, name))
    result = run_probe(["--from", str(broken)] + FAST, tmp_path)
    printed = capsys.readouterr()
    assert "not in" in printed.err and "vgg_plain, vgg_bn" in printed.err
    assert "refused" in result["networks"]["dln_bn"]
    assert "dln_bn      not probed:" in printed.out
    assert math.isfinite(result["networks"]["dln_plain"]["eigenvalues"][0])


@pytest.mark.parametrize("arguments, message", [
    (["--at", "init"], "--at reads stored weights: it needs --from"),
    (["--from", "{run}", "--seed", "1"], "--seed: the run in --from set how"),
    (["--from", "{run}", "--quick", "--width", "2"], "--quick, --width: the run in --from"),
    (["--from", "{empty}"], "no stored network in"),
    (["--top", "0"], "argument --top: must be at least 1, got 0"),
    (["--tol", "nan"], "argument --tol: must be in (0, 1), got nan"),
    (["--tol", "2"], "argument --tol: must be in (0, 1), got 2"),
    (["--from", "{run}", "--seed", "0"], "--seed: the run in --from set how"),
    (["--out", "{empty}"], "--out {empty}: not a file this process can write"),
    (["--model", "vgg", "--dataset", "digits", "--batch-size", "100000"],
     "exceeds the"),
    (["--out", "{empty}/no/such/folder/x.json"], "not a file this process can write"),
    (["--device", "nonsense"], "--device nonsense: "),
    (["--from", "{run}/results.json"], "not a folder"),
    (["--from", "{run}", "--data-dir", "{empty}"], "--data-dir is read only for --dataset "
                                                   "cifar10"),
])
def test_bad_arguments_are_refused_before_any_work(trained_run, tmp_path, capsys, arguments,
                                                   message):
    arguments = [a.format(run=trained_run, empty=tmp_path) for a in arguments]
    message = message.format(empty=tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        probe.probe_main(arguments + ["--quick"] * ("--from" not in arguments) + FAST)
    assert exit_info.value.code == 2
    printed = capsys.readouterr()
    assert message in printed.err
    assert "network" not in printed.out   # no table started


def test_the_table_compares_the_variants(capsys):
    assert fastbn_cli.main(["probe", "--quick", "--model", "dln"] + FAST) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:3] == ["network", "params", "loss"]
    assert [line.split()[0] for line in printed[1:3]] == ["dln_plain", "dln_bn"]
    assert printed[3].startswith("dln without / with BN: top λ ")


@pytest.mark.parametrize("spoil", ["text", "foreign", "other shape"])
def test_a_part_that_cannot_be_rebuilt_is_refused_in_words(trained_run, tmp_path, capsys,
                                                           spoil):
    run = tmp_path / "run"
    (run / runner.CHECKPOINTS).mkdir(parents=True)
    path = runner.part_path(run, "dln_plain")
    if spoil == "text":
        with open(path, "w") as f:
            f.write("not a checkpoint")
    elif spoil == "foreign":
        torch.save({"a": 1}, path)
    else:   # weights of another network under this part's settings
        saved = torch.load(runner.part_path(trained_run, "dln_plain"), weights_only=True)
        saved["states"]["final"] = torch.load(runner.part_path(trained_run, "dln_bn"),
                                              weights_only=True)["states"]["final"]
        torch.save(saved, path)
    with pytest.raises(SystemExit):
        probe.probe_main(["--from", str(run)] + FAST)
    err = capsys.readouterr().err
    assert ("dln_plain: the stored weights do not fit" if spoil == "other shape"
            else "not a part fastbn probe can rebuild") in err


@pytest.mark.parametrize("earlier_run", [False, True], ids=["alone", "beside an earlier run"])
def test_a_seeds_run_points_to_its_seed_folders(trained_run, tmp_path, capsys, earlier_run):
    (tmp_path / "seed-0").mkdir()
    if earlier_run:   # its networks, whose results the --seeds run removed
        (tmp_path / runner.CHECKPOINTS).mkdir()
        for part in ("dln_plain", "dln_bn"):
            shutil.copy(runner.part_path(trained_run, part), runner.part_path(tmp_path, part))
    with pytest.raises(SystemExit):
        probe.probe_main(["--from", str(tmp_path)] + FAST)
    assert f"as --from {tmp_path / 'seed-0'}" in capsys.readouterr().err


def test_variants_stored_by_different_runs_are_refused(trained_run, tmp_path, capsys):
    """As after a later run into the folder replaced one of them."""
    run = tmp_path / "run"
    (run / runner.CHECKPOINTS).mkdir(parents=True)
    shutil.copy(runner.part_path(trained_run, "dln_plain"), runner.part_path(run, "dln_plain"))
    saved = torch.load(runner.part_path(trained_run, "dln_bn"), weights_only=True)
    settings = json.loads(saved["key"])
    saved["key"] = json.dumps({**settings, "dln_steps": settings["dln_steps"] + 34},
                              sort_keys=True)
    torch.save(saved, runner.part_path(run, "dln_bn"))
    with pytest.raises(SystemExit):
        probe.probe_main(["--from", str(run)] + FAST)
    steps = settings["dln_steps"]
    assert (f"dln_plain and dln_bn were stored by different runs (dln_steps {steps} and "
            f"{steps + 34})") in capsys.readouterr().err


def test_parts_of_other_code_are_named(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    (run / runner.CHECKPOINTS).mkdir(parents=True)
    saved = torch.load(runner.part_path(trained_run, "dln_plain"), weights_only=True)
    settings, suffix = json.JSONDecoder().raw_decode(saved["key"])
    saved["key"] = json.dumps({**settings, "code": "0.0+older"}) + saved["key"][suffix:]
    torch.save(saved, runner.part_path(run, "dln_plain"))
    result = run_probe(["--from", str(run)] + FAST, tmp_path)
    assert "was computed by other code (0.0+older)" in capsys.readouterr().err
    assert set(result["networks"]) == {"dln_plain"}


def test_the_report_gives_the_probe_command_for_its_networks(trained_run):
    text = (trained_run / "report.md").read_text()
    assert f"`fastbn probe --from {trained_run}`" in text
