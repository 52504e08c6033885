"""Thread counts for annlearn's kernels, and the BLAS cap around them.

``n_jobs`` on every annlearn estimator is the number of OpenMP threads of its
kernels (not joblib processes): ``None`` honours ``OMP_NUM_THREADS``,
threadpoolctl's ``openmp`` limit and the CPUs this process may use; ``-1``
means all CPUs, ``-2`` all but one.

The kernels call single-threaded sgemm from inside their OpenMP threads, so
SciPy's BLAS is capped at one thread while a kernel runs; otherwise n OpenMP
threads would each start m BLAS threads. threadpoolctl's limits are process
wide, so concurrent searches from several Python threads share one cap,
counted: the first search in sets it, the last one out restores the user's
setting.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from threadpoolctl import ThreadpoolController

from annlearn._utils._openmp_helpers import _openmp_effective_n_threads

__all__ = ["effective_n_threads", "blas_single_thread", "flat_search_blas_guard"]


# Upper bound of a thread count passed to the kernels: more threads than a
# few per CPU only cost stacks and scheduling, and an absurd count (n_jobs =
# 2**31) would overflow a C int or fail to start the threads.
_MAX_THREADS = max(64, 4 * (os.cpu_count() or 1))


def effective_n_threads(n_jobs: int | None) -> int:
    """Resolve an estimator's ``n_jobs`` into an OpenMP thread count.

    Parameters
    ----------
    n_jobs : int or None
        ``None``: the OpenMP default, honouring ``OMP_NUM_THREADS``,
        threadpoolctl limits and cgroup quotas. ``-1``: all CPUs. A positive
        int is used as is, up to ``max(64, 4 * CPUs)``.

    Returns
    -------
    n_threads : int
        At least 1.
    """
    if n_jobs is not None and n_jobs > _MAX_THREADS:
        # The kernels take a C int; no machine has more threads than this.
        n_jobs = _MAX_THREADS
    return _openmp_effective_n_threads(n_jobs)


_lock = threading.Lock()
_depth = 0
_limiter = None
_controller: ThreadpoolController | None = None


def _blas_controller() -> ThreadpoolController:
    # Built once: inspecting the loaded libraries costs milliseconds, too much
    # for a single-query search.
    global _controller
    if _controller is None:
        _controller = ThreadpoolController().select(user_api="blas")
    return _controller


@contextmanager
def blas_single_thread() -> Iterator[None]:
    """Cap BLAS at one thread while annlearn kernels run (re-entrant, thread-safe)."""
    global _depth, _limiter
    with _lock:
        if _depth == 0:
            _limiter = _blas_controller().limit(limits=1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _limiter is not None:
                _limiter.restore_original_limits()
                _limiter = None


def flat_search_blas_guard() -> AbstractContextManager:
    """The BLAS cap the flat search kernel needs: none when it runs its own
    packed GEMM (AVX-512 or AVX2; it then calls no BLAS),
    ``blas_single_thread`` otherwise.

    Skipping the cap when it is not needed saves the few tens of
    microseconds threadpoolctl takes, which count for single queries.
    """
    from annlearn._flat_search import DEFAULT_GEMM

    return blas_single_thread() if DEFAULT_GEMM == "blas" else nullcontext()
