"""Build script for annlearn's Cython + OpenMP extensions.

All compiler and platform logic lives in :class:`BuildExtOpenMP`: it picks the
OpenMP and optimisation flags for the compiler that setuptools chose, checks
that an OpenMP program actually compiles, links and runs with them, and falls
back to a serial build with a loud warning otherwise (unless
``ANNLEARN_FAIL_NO_OPENMP`` is set, which makes the build fail instead; CI sets
it).

Environment switches
--------------------
ANNLEARN_FAIL_NO_OPENMP=1
    Fail instead of building without OpenMP.
ANNLEARN_DEBUG_CYTHON=1
    Turn Cython's bounds, wrap-around and initialisation checks back on.
ANNLEARN_NATIVE=1
    Add ``-march=native`` (local benchmarks only: the result does not run on
    other CPUs).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# Extension modules: dotted name -> source; every module is compiled with the
# same flags, which BuildExtOpenMP chooses per compiler.
EXTENSIONS = [
    "annlearn._utils._openmp_helpers",
    "annlearn._utils._heap",
    "annlearn._utils._blas",
    "annlearn._utils._packed_gemm",
    "annlearn._flat_search",
    "annlearn._kmeans",
    "annlearn._ivf",
    "annlearn._fastscan",
    "annlearn._merge",
    "annlearn._utils._pool",
]

OPENMP_TEST_PROGRAM = textwrap.dedent(
    """
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        #pragma omp parallel
        printf("nthreads=%d\\n", omp_get_num_threads());
        return 0;
    }
    """
)


def _env_flag(name):
    return os.environ.get(name, "0").lower() not in ("", "0", "false", "no")


class BuildExtOpenMP(build_ext):
    """``build_ext`` that adds OpenMP and optimisation flags per compiler."""

    def _flags_for_compiler(self):
        """Return ``(compile_args, link_args, openmp_compile, openmp_link)``."""
        ctype = self.compiler.compiler_type
        if ctype == "msvc":
            return ["/O2"], [], ["/openmp"], []
        compile_args = ["-O3", "-fno-math-errno", "-Wno-unreachable-code"]
        if _env_flag("ANNLEARN_NATIVE"):
            compile_args.append("-march=native")
        if sys.platform == "darwin":
            # Apple clang: OpenMP comes from libomp (Homebrew or conda-forge),
            # enabled through the preprocessor; honour CPPFLAGS/LDFLAGS if the
            # user already set them.
            if "openmp" in os.environ.get("CPPFLAGS", ""):
                return compile_args, [], [], []
            return compile_args, [], ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
        return compile_args, [], ["-fopenmp"], ["-fopenmp"]

    def _openmp_works(self, compile_flags, link_flags):
        """Compile, link and run a small OpenMP program with the given flags."""
        tmpdir = tempfile.mkdtemp(prefix="annlearn-openmp-")
        try:
            src = os.path.join(tmpdir, "test_openmp.c")
            with open(src, "w") as f:
                f.write(OPENMP_TEST_PROGRAM)
            objects = self.compiler.compile(
                [src], output_dir=tmpdir, extra_postargs=compile_flags
            )
            exe = os.path.join(tmpdir, "test_openmp")
            self.compiler.link_executable(
                objects, "test_openmp", output_dir=tmpdir, extra_postargs=link_flags
            )
            output = subprocess.check_output([exe], timeout=60).decode()
            return output.count("nthreads=") >= 1
        except Exception as exc:  # noqa: BLE001 - any failure means "no OpenMP"
            print(f"annlearn: OpenMP test program failed: {exc!r}")
            return False
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    def build_extensions(self):
        compile_args, link_args, omp_compile, omp_link = self._flags_for_compiler()
        use_openmp = bool(omp_compile) and self._openmp_works(omp_compile, omp_link)
        if not use_openmp:
            message = (
                "annlearn is being built WITHOUT OpenMP: every kernel will run on a "
                "single thread. Install an OpenMP-capable compiler (gcc, or clang "
                "with libomp) to get parallel kernels."
            )
            if _env_flag("ANNLEARN_FAIL_NO_OPENMP"):
                raise RuntimeError(message)
            print("\n" + "*" * 78 + "\n" + message + "\n" + "*" * 78 + "\n")
            omp_compile, omp_link = [], []
        for ext in self.extensions:
            ext.extra_compile_args = list(ext.extra_compile_args) + compile_args
            ext.extra_compile_args += omp_compile
            ext.extra_link_args = list(ext.extra_link_args) + link_args + omp_link
        super().build_extensions()


def _extensions():
    directives = {
        "language_level": 3,
        "boundscheck": False,
        "wraparound": False,
        "cdivision": True,
        "initializedcheck": False,
        "nonecheck": False,
        "cpow": True,
    }
    if _env_flag("ANNLEARN_DEBUG_CYTHON"):
        directives.update(boundscheck=True, wraparound=True, initializedcheck=True)
    extensions = []
    for name in EXTENSIONS:
        source = name.replace(".", os.sep) + ".pyx"
        if not os.path.exists(source):
            continue
        extensions.append(
            Extension(
                name,
                [source],
                include_dirs=[np.get_include(), os.path.join("annlearn", "_utils")],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION")],
            )
        )
    return cythonize(
        extensions,
        compiler_directives=directives,
        include_path=["."],
        nthreads=int(os.environ.get("ANNLEARN_CYTHON_JOBS", "0")) or None,
    )


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExtOpenMP})
