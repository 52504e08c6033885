"""``show_versions``: what a bug report needs to know about this installation."""

from __future__ import annotations

import platform
import sys
from importlib.metadata import PackageNotFoundError, version


def _dependencies() -> dict[str, str | None]:
    deps = {}
    for name in (
        "annlearn",
        "numpy",
        "scipy",
        "scikit-learn",
        "joblib",
        "threadpoolctl",
        "Cython",
    ):
        try:
            deps[name] = version(name)
        except PackageNotFoundError:
            deps[name] = None
    return deps


def show_versions() -> None:
    """Print the system, the dependencies, OpenMP and the loaded thread pools.

    Like :func:`sklearn.show_versions`: paste its output into bug reports.
    It lists every BLAS and OpenMP runtime loaded in the process (through
    threadpoolctl), which is where thread over-subscription and duplicate
    OpenMP runtimes show up.

    Examples
    --------
    >>> import annlearn
    >>> annlearn.show_versions()  # doctest: +ELLIPSIS
    <BLANKLINE>
    System:
    ...
    Python dependencies:
          annlearn: ...
    Built with OpenMP: True
    SIMD kernels: ...
    """
    from threadpoolctl import threadpool_info

    from annlearn._utils._openmp_helpers import _openmp_parallelism_enabled

    print("\nSystem:")
    print(f"    python: {sys.version.replace(chr(10), ' ')}")
    print(f"executable: {sys.executable}")
    print(f"   machine: {platform.platform()}")
    print("\nPython dependencies:")
    for name, ver in _dependencies().items():
        print(f"{name:>14}: {ver}")
    print("\nBuilt with OpenMP:", _openmp_parallelism_enabled())
    from annlearn._utils._packed_gemm import _simd_isa

    print("SIMD kernels:", _simd_isa(), "(ANNLEARN_ISA lowers it)")
    print("\nThread pools (threadpoolctl):")
    for info in threadpool_info():
        print()
        for key in (
            "user_api",
            "internal_api",
            "num_threads",
            "prefix",
            "filepath",
            "version",
            "threading_layer",
            "architecture",
        ):
            if key in info:
                print(f"{key:>16}: {info[key]}")
