"""Backend selection."""

import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

import fastbn
from fastbn import backends


def test_selection_api():
    assert fastbn.get_backend() == "auto"
    with fastbn.use_backend("reference"):
        assert fastbn.get_backend() == "reference"
        assert backends.select(torch.zeros(1)).name == "reference"
    assert fastbn.get_backend() == "auto"
    with pytest.raises(ValueError, match="unknown fastbn backend"):
        fastbn.set_backend("fast")


def test_use_backend_restores_when_entered_again_or_used_as_a_decorator():
    selection = fastbn.use_backend("reference")
    with selection:
        with selection:
            assert fastbn.get_backend() == "reference"
        assert fastbn.get_backend() == "reference"
    assert fastbn.get_backend() == "auto"

    @fastbn.use_backend("reference")
    def selected():
        return fastbn.get_backend()
    assert selected() == "reference" and fastbn.get_backend() == "auto"
    with pytest.raises(ValueError, match="unknown fastbn backend"):
        with fastbn.use_backend("fast"):
            pass
    assert fastbn.get_backend() == "auto"


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(backends._loaded, "triton", None)
    monkeypatch.setitem(backends._import_errors, "triton", "ImportError: no triton")
    with pytest.raises(RuntimeError, match="'triton' is not available: ImportError"):
        fastbn.set_backend("triton")


def test_auto_prefers_compiled_kernels_on_cpu():
    expected = "cpu" if backends.availability("cpu")[0] else "reference"
    assert backends.select(torch.zeros(1)).name == expected


def test_compiled_kernels_are_built_where_a_compiler_is():
    # An install never fails on a compiler error (the reference serves instead), so a
    # broken build would leave every cpu test uncollected and the suite green.
    compiler = shutil.which((sysconfig.get_config_var("CXX") or "c++").split()[0])
    if compiler is None:
        pytest.skip("no C++ compiler: the reference backend serves CPU tensors")
    ok, why = backends.availability("cpu")
    assert ok, f"fastbn._C is not built though {compiler} is here: {why}"


def test_environment_variable():
    code = "import fastbn, torch; print(fastbn.backends.select(torch.zeros(1)).name)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"FASTBN_BACKEND": "reference", "PATH": ""}, check=True)
    assert out.stdout.strip() == "reference"
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"FASTBN_BACKEND": "nope", "PATH": ""})
    assert bad.returncode != 0 and "unknown fastbn backend" in bad.stderr
