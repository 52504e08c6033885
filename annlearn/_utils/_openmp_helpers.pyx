"""Whether annlearn was built with OpenMP, and how many threads a kernel gets."""

import os

from joblib import cpu_count

from annlearn._utils._openmp_helpers cimport (
    ANNLEARN_OPENMP_PARALLELISM_ENABLED,
    omp_get_max_threads,
)


def _openmp_parallelism_enabled():
    """Return True if annlearn's extensions were compiled with OpenMP."""
    return bool(ANNLEARN_OPENMP_PARALLELISM_ENABLED)


_cpu_counts = {}


def _cpu_count(bint only_physical_cores):
    # joblib's cpu_count reads cgroup files (tens of microseconds); the quota
    # of a running process does not change, so it is read once.
    try:
        return _cpu_counts[only_physical_cores]
    except KeyError:
        count = _cpu_counts[only_physical_cores] = cpu_count(only_physical_cores)
        return count


cpdef int _openmp_effective_n_threads(n_threads=None, only_physical_cores=False):
    """Number of OpenMP threads a kernel should use.

    Parameters
    ----------
    n_threads : int or None, default=None
        ``None``: as many threads as OpenMP would start by default
        (``omp_get_max_threads``, which honours ``OMP_NUM_THREADS`` and the
        ``openmp`` limit of threadpoolctl) but no more than the CPUs this
        process may use (joblib's ``cpu_count``, which honours cgroup quotas
        and affinity). A positive value is taken as is; a negative value
        counts from the number of CPUs: ``-1`` means all of them, ``-2`` all
        but one.
    only_physical_cores : bool, default=False
        Count physical cores only when resolving ``None`` and negative values.

    Returns
    -------
    n_threads : int
        At least 1; 1 when annlearn was built without OpenMP.
    """
    if n_threads == 0:
        raise ValueError("n_threads = 0 is invalid: use None, a positive or a negative int.")
    if not ANNLEARN_OPENMP_PARALLELISM_ENABLED:
        return 1
    if os.getenv("OMP_NUM_THREADS"):
        max_n_threads = omp_get_max_threads()
    else:
        max_n_threads = min(omp_get_max_threads(), _cpu_count(only_physical_cores))
    if n_threads is None:
        return max(1, max_n_threads)
    if n_threads < 0:
        return max(1, _cpu_count(only_physical_cores) + n_threads + 1)
    return n_threads
