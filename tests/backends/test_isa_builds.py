"""The C++ kernels built for other instruction sets than this machine's best.

A local build tunes for the building CPU (-march=native: AVX-512 here), so the code paths
for narrower vectors — the SSE2 baseline that FASTBN_PORTABLE=1 builds (wheels, mixed
clusters) and AVX2 — would otherwise never run. Each case compiles a copy of the extension
for one ISA and runs the kernel tests against it in a fresh process.
"""

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("setup.py", "pyproject.toml", "README.md", "csrc", "fastbn", "tests/__init__.py",
           "tests/conftest.py", "tests/backends")
# ISA → (compiler flags with FASTBN_PORTABLE=1, CPU flag it needs, fastbn._C's name for it)
ISAS = {"sse2": ("", "sse2", "baseline ISA"),
        "avx2": ("-march=haswell", "avx2", "AVX2")}


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line for line in cpuinfo if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []


def _run(command, cwd, env):
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    return done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("isa", ISAS)
def test_kernels_built_for_isa(isa, tmp_path):
    flags, cpu_flag, name = ISAS[isa]
    if not (sys.platform.startswith("linux") and platform.machine() == "x86_64"):
        pytest.skip("x86-64 Linux only")
    if cpu_flag not in _cpu_flags():
        pytest.skip(f"this CPU lacks {cpu_flag}")
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler")
    pytest.importorskip("pybind11", reason="building needs pybind11 (the dev extra has it)")
    for source in SOURCES:
        src, dst = ROOT / source, tmp_path / source
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    env = {**os.environ, "FASTBN_PORTABLE": "1", "CXXFLAGS": flags,
           "PYTHONPATH": str(tmp_path)}
    build = _run([sys.executable, "setup.py", "build_ext", "--inplace"], tmp_path, env)
    # setup.py never fails on a compiler error (the reference backend then serves): look.
    assert list((tmp_path / "fastbn").glob("_C*")), f"no extension was built:\n{build[-6000:]}"
    info = _run([sys.executable, "-c", "import fastbn._C as c; print(c.__file__, c.build_info())"],
                tmp_path, env)
    assert info.startswith(str(tmp_path)) and f", {name}," in info, info
    _run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
          "tests/backends/test_cpu_kernels.py"], tmp_path, env)
