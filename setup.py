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


class OptionalBuildExt(build_ext):
    """Never fail the install because the extension did not compile."""

    def run(self):
        try:
            super().run()
        except Exception as err:  # noqa: BLE001 - any compiler failure
            self._warn(err)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as err:  # noqa: BLE001
            self._warn(err)

    @staticmethod
    def _warn(err):
        sys.stderr.write(f"WARNING: fastbn._C was not built ({err}); "
                         "the reference backend will be used on CPU.\n")


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
        extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math",
                            "-fopenmp-simd"]  # honours `omp simd` loops, no OpenMP runtime
        # Tune for the building CPU only on a local source build with gcc/clang on Linux;
        # FASTBN_PORTABLE=1 (wheels, clusters with mixed CPUs) keeps the baseline ISA.
        + (["-march=native"] if sys.platform.startswith("linux")
           and os.uname().machine in ("x86_64", "aarch64")
           and not os.environ.get("FASTBN_PORTABLE") else []),
    )]


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
