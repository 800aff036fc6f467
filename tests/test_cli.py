"""The `fastbn` command's info, through `python -m fastbn` as a user would run it."""

import os
import subprocess
import sys

from fastbn import backends


def test_info_names_every_backend_and_the_cpu_build():
    done = subprocess.run([sys.executable, "-m", "fastbn", "info"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for name in ("reference", "cpu", "triton"):
        available = backends.availability(name)[0]
        assert any(line.split()[:2] == [name, "available:" if available else "unavailable:"]
                   for line in lines), done.stdout
    cpu = backends.load("cpu")
    if cpu is not None:
        assert f"cpu build: {cpu.build_info()}" in lines
    auto = "cpu" if backends.availability("cpu")[0] else "reference"
    assert lines[3].startswith(f"selected backend: auto -> {auto} on cpu"), lines


def test_info_says_when_the_selected_backend_is_unavailable():
    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("Triton can run here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "fastbn", "info"], capture_output=True,
                          text=True, timeout=120, env={**env, "FASTBN_BACKEND": "triton"})
    assert done.returncode == 0, done.stderr
    assert "selected backend: triton, unavailable (" in done.stdout


def test_a_demo_of_no_steps_or_a_seed_torch_refuses_is_a_usage_error():
    for argument, message in ((["--steps", "0"], "--steps: must be at least 1"),
                              (["--seed", str(2 ** 64)], "--seed: must be in [-2**63")):
        done = subprocess.run([sys.executable, "-m", "fastbn", "demo", *argument],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr


def test_unknown_command_fails():
    done = subprocess.run([sys.executable, "-m", "fastbn", "no-such-command"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "invalid choice" in done.stderr


def test_info_reports_a_bad_backend_variable_and_lists_the_backends():
    done = subprocess.run([sys.executable, "-m", "fastbn", "info"], capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "FASTBN_BACKEND": "bogus"})
    assert done.returncode == 0, done.stderr
    assert "selected backend: none (unknown fastbn backend 'bogus'" in done.stdout
    assert any(line.split()[:1] == ["reference"] for line in done.stdout.splitlines())


def test_bench_exits_zero_and_prints_only_tables_when_quiet():
    done = subprocess.run([sys.executable, "-m", "fastbn", "bench", "--quick", "--quiet",
                           "--shapes", "4x8x3x3", "--backend", "reference", "--budget", "0.01",
                           "--ops", "forward_eval"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # The one line a quiet run may print to stderr: the machine's load warning (another
    # job beside the test run sets it off).
    noise = [line for line in done.stderr.splitlines()
             if not line.startswith("warning: load average ")]
    assert noise == [] and "forward_eval" in done.stdout


def test_output_into_a_closed_pipe_ends_without_a_traceback():
    """As `fastbn info | head -1` where head has exited."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "fastbn", "info"], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 1 and done.stderr == "", done.stderr
