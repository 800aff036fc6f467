"""Building the C++ extension: for other instruction sets than this machine's best, over
an earlier build, and without a working compiler.

A local build tunes for the building CPU (-march=native: AVX-512 with BF16 here), so the
code paths for other ISAs — the SSE2 baseline that FASTBN_PORTABLE=1 builds (wheels, mixed
clusters), AVX2, and AVX-512 without BF16 conversions (which rounds bfloat16 in integer
operations) — would otherwise never run. Each case compiles a copy of the extension
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
        "avx2": ("-march=haswell", "avx2", "AVX2"),
        "avx512": ("-march=skylake-avx512", "avx512bw", "AVX-512")}


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line for line in cpuinfo if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []


def _copy_sources(tmp_path):
    for source in SOURCES:
        src, dst = ROOT / source, tmp_path / source
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(
                "_C*.so", "_C.build-error.txt", "__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)


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
    _copy_sources(tmp_path)
    env = {**os.environ, "FASTBN_PORTABLE": "1", "CXXFLAGS": flags,
           "PYTHONPATH": str(tmp_path)}
    build = _run([sys.executable, "setup.py", "build_ext", "--inplace"], tmp_path, env)
    # setup.py never fails on a compiler error (the reference backend then serves): look.
    assert list((tmp_path / "fastbn").glob("_C*.so")), f"no extension was built:\n{build[-6000:]}"
    info = _run([sys.executable, "-c", "import fastbn._C as c; print(c.__file__, c.build_info())"],
                tmp_path, env)
    assert info.startswith(str(tmp_path)) and f", {name}," in info, info
    _run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
          "tests/backends/test_cpu_kernels.py"], tmp_path, env)


def test_a_failed_compile_is_reported_by_fastbn_info(tmp_path):
    """No working compiler: the build still succeeds, and `fastbn info` gives the
    compiler's failure rather than a bare ImportError."""
    pytest.importorskip("pybind11", reason="building needs pybind11 (the dev extra has it)")
    _copy_sources(tmp_path)
    env = {**os.environ, "CC": "false", "CXX": "false", "LDSHARED": "false",
           "PYTHONPATH": str(tmp_path)}
    build = _run([sys.executable, "setup.py", "build_ext", "--inplace"], tmp_path, env)
    assert "WARNING: fastbn._C was not built" in build
    assert not list((tmp_path / "fastbn").glob("_C*.so"))
    # An editable install of this checkout would lend the copy its extension.
    info = _run([sys.executable, "-c", "import sys; sys.meta_path[:] = [f for f in "
                 "sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]; "
                 "import fastbn.cli; fastbn.cli.main(['info'])"], tmp_path, env)
    assert "compiling it failed when fastbn was installed" in info, info
    assert "pip install -v" in info and "reference" in info


FAKE_COMPILER = """#!/bin/sh
# Logs its call and writes the output file it is asked for (an object or the library).
echo "$@" >> "$FAKE_COMPILER_LOG"
while [ $# -gt 0 ]; do
    if [ "$1" = "-o" ]; then : > "$2"; fi
    shift
done
"""


def test_a_change_of_compiler_flags_rebuilds(tmp_path):
    """setuptools rebuilds on timestamps alone: a build with other flags (FASTBN_PORTABLE,
    CXXFLAGS) over an earlier one would otherwise keep the earlier objects and library.
    A fake compiler records what compiles, in seconds."""
    pytest.importorskip("pybind11", reason="building needs pybind11 (the dev extra has it)")
    _copy_sources(tmp_path)
    compiler, log = tmp_path / "fake-cc", tmp_path / "compiles.log"
    compiler.write_text(FAKE_COMPILER)
    compiler.chmod(0o755)
    base = {**os.environ, "CC": str(compiler), "CXX": str(compiler),
            "LDSHARED": f"{compiler} -shared", "FAKE_COMPILER_LOG": str(log)}
    for name in ("FASTBN_PORTABLE", "CXXFLAGS", "CFLAGS"):
        base.pop(name, None)

    def compiles(**changes):
        log.write_text("")
        _run([sys.executable, "setup.py", "build_ext", "--inplace"], tmp_path,
             {**base, **changes})
        return sum(" -c " in f" {line} " for line in log.read_text().splitlines())

    sources = len(list((ROOT / "csrc").rglob("*.cpp")))
    assert compiles() == sources
    assert compiles() == 0                                   # up to date
    assert compiles(FASTBN_PORTABLE="1") == sources          # other extension flags
    assert compiles(FASTBN_PORTABLE="1", CXXFLAGS="-mavx2") == sources   # other CXXFLAGS
    assert compiles(FASTBN_PORTABLE="1", CXXFLAGS="-mavx2") == 0
