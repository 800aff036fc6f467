"""Builds the optional C++ extension fastbn._C from csrc/.

The extension takes raw pointers, sizes and strides and includes no torch headers, so the
isolated build needs only setuptools and pybind11. If compiling fails the package still
installs; the reference backend serves and `fastbn info` says why.
"""
import glob
import os
import sys

from setuptools import setup

try:
    from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
    # The kernel files compile in parallel, one job per core (FASTBN_BUILD_JOBS overrides).
    ParallelCompile("FASTBN_BUILD_JOBS").install()
except ImportError:  # pragma: no cover - pybind11 is a build requirement
    Pybind11Extension = None
    from setuptools.command.build_ext import build_ext

SOURCES = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
HEADERS = sorted(glob.glob("csrc/**/*.h", recursive=True))  # a change rebuilds the extension


# The kernels' flags on every machine (tests/backends/test_other_architectures.py builds
# them for AArch64 with these). -ffp-contract=off: each product rounds as written,
# wherever the compiler inlines an element loop, so the two schedules of a kernel's
# passes give the same bits. -fopenmp-simd honours `omp simd` loops, no OpenMP runtime.
COMPILE_ARGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
                "-fopenmp-simd"]


# Beside the extension when compiling it failed: `fastbn info` reads why.
BUILD_ERROR_NOTE = "_C.build-error.txt"


# The environment that chooses the compiler and its flags (besides each extension's own).
COMPILER_ENVIRONMENT = ("CC", "CXX", "CFLAGS", "CPPFLAGS", "CXXFLAGS", "LDFLAGS", "LDSHARED")


class OptionalBuildExt(build_ext):
    """Never fail the install because the extension did not compile, and rebuild when the
    compiler or its flags change (setuptools compares timestamps only: a FASTBN_PORTABLE
    build would otherwise ship an earlier -march=native one)."""

    def run(self):
        stamp = os.path.join(self.build_temp, "fastbn-compile-flags")
        flags = repr(([ext.extra_compile_args for ext in self.extensions],
                      [os.environ.get(name) for name in COMPILER_ENVIRONMENT]))
        if _read(stamp) != flags:
            self.force = True
        self._failure = None
        try:
            super().run()
        except Exception as err:  # noqa: BLE001 - any compiler failure
            if self._failure is None:   # else a consequence (no extension to copy)
                self._failed(err)
        # The note goes where the extension would: the wheel's tree, and the sources for
        # an in-place (editable) build.
        package_dirs = {os.path.join(self.build_lib, "fastbn")}
        if self.inplace:
            package_dirs.add(self.get_finalized_command("build_py").get_package_dir("fastbn"))
        for directory in package_dirs:
            note = os.path.join(directory, BUILD_ERROR_NOTE)
            if self._failure is not None:
                os.makedirs(directory, exist_ok=True)
                with open(note, "w") as file:
                    file.write(f"{self._failure}\n")
            elif os.path.exists(note):
                os.remove(note)
        if self._failure is None:
            os.makedirs(self.build_temp, exist_ok=True)
            with open(stamp, "w") as file:
                file.write(flags)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as err:  # noqa: BLE001
            self._failed(err)

    def _failed(self, err):
        self._failure = err
        sys.stderr.write(f"WARNING: fastbn._C was not built ({err}); "
                         "the reference backend will be used on CPU.\n")


def _read(path):
    try:
        with open(path) as file:
            return file.read()
    except OSError:
        return None


def extensions():
    if Pybind11Extension is None or not SOURCES or os.environ.get("FASTBN_NO_EXTENSION"):
        return []
    return [Pybind11Extension(
        "fastbn._C",
        SOURCES,
        depends=HEADERS,
        include_dirs=["csrc"],
        libraries=["dl"] if sys.platform.startswith("linux") else [],  # dlsym, glibc < 2.34
        cxx_std=17,
        extra_compile_args=COMPILE_ARGS + _native_flags(),
    )]


def _native_flags():
    """Tuning for the building CPU, only on a local source build with gcc/clang on Linux:
    FASTBN_PORTABLE=1 (wheels, clusters with mixed CPUs) keeps the baseline ISA."""
    if (not sys.platform.startswith("linux") or os.environ.get("FASTBN_PORTABLE")
            or os.uname().machine not in ("x86_64", "aarch64")):
        return []
    if (os.uname().machine == "aarch64"
            or "-mprefer-vector-width" in os.environ.get("CXXFLAGS", "")):
        return ["-march=native"]
    # gcc tunes most AVX-512 CPUs to 256-bit vectors for the loops it vectorises, beside
    # the kernels' own 512-bit intrinsics: full-width element loops made the bfloat16 and
    # float16 backward, jvp and double backward 11-16% faster here, the rest within 3%,
    # with the same bits (benchmarks/RESULTS.md). No effect without AVX-512; CXXFLAGS can
    # choose otherwise.
    return ["-march=native", "-mprefer-vector-width=512"]


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
