"""Lloyd k-means kernels for the coarse quantizer and the PQ codebooks.

One Lloyd iteration is two passes:

1. assignment: the nearest centre of every point is a top-1 exact search,
   done by ``annlearn._flat_search.flat_kneighbors`` (blocked GEMM + heaps);
2. update: the sum and count of the points of each centre, here.

The update is parallel over *centres*, as FAISS's ``compute_centroids``: each
thread owns a contiguous range of centres, reads every label and adds only
the rows that fall in its range. There is no reduction between threads, no
lock, and the memory is one (n_clusters, n_features) float64 array whatever
the thread count (per-thread copies would cost n_threads times that, too
much for large ``n_clusters``). The row data are read once in total.

::

    labels  0 3 1 0 2 3 ...   thread 0 owns centres [0, 2): adds rows 0, 2, 3
                              thread 1 owns centres [2, 4): adds rows 1, 4, 5

The product quantizer's M small k-means (a few thousand sub-vectors of a
few features, 16 or 256 centres each) run side by side instead, one pass
over the rows per iteration for all of them: the assignment is the PQ
encoding (``annlearn._ivf.pq_encode``), the update ``subspace_sums``,
parallel over sub-quantizers.
"""

import numpy as np

cimport cython
from cython.parallel cimport prange

from libc.stdint cimport uint8_t

from annlearn._utils._typedefs cimport float32_t, float64_t, id_t, intp_t


def centre_sums(
    const float32_t[:, ::1] X,
    const id_t[::1] labels,
    intp_t n_clusters,
    int n_threads,
):
    """Sum and count the rows of X assigned to each centre.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features), float32
        Points.
    labels : ndarray of shape (n_samples,), int64
        Centre of each point, in ``[0, n_clusters)``.
    n_clusters : int
        Number of centres.
    n_threads : int
        OpenMP threads.

    Returns
    -------
    sums : ndarray of shape (n_clusters, n_features), float64
    counts : ndarray of shape (n_clusters,), int64
    """
    cdef intp_t n_samples = X.shape[0], n_features = X.shape[1]
    if labels.shape[0] != n_samples:
        raise ValueError("labels must have one entry per row of X.")
    if n_samples and (np.min(labels) < 0 or np.max(labels) >= n_clusters):
        raise ValueError(f"labels must lie in [0, {n_clusters}).")
    sums_arr = np.zeros((n_clusters, n_features), dtype=np.float64)
    counts_arr = np.zeros(n_clusters, dtype=np.int64)
    cdef float64_t[:, ::1] sums = sums_arr
    cdef id_t[::1] counts = counts_arr
    cdef int n_parts = <int>max(1, min(n_threads, n_clusters))
    cdef intp_t per_part = (n_clusters + n_parts - 1) // n_parts
    cdef intp_t part, c0, c1, i, f
    cdef id_t c
    with nogil:
        for part in prange(n_parts, num_threads=n_parts, schedule="static",
                           chunksize=1):
            c0 = part * per_part
            c1 = min(c0 + per_part, n_clusters)
            for i in range(n_samples):
                c = labels[i]
                if c < c0 or c >= c1:
                    continue
                counts[c] += 1
                for f in range(n_features):
                    sums[c, f] += X[i, f]
    return sums_arr, counts_arr


def subspace_sums(
    const float32_t[:, ::1] X,
    const uint8_t[:, ::1] labels,
    intp_t ksub,
    int n_threads,
):
    """Sum and count, per sub-quantizer, the sub-vectors of each centre.

    The update of the product quantizer's M k-means run side by side
    (``ProductQuantizer.train``): sub-vector m of row i (features
    ``m * dsub`` to ``(m + 1) * dsub``) goes to centre ``labels[i, m]`` of
    sub-quantizer m. Parallel over sub-quantizers, each thread owning its
    sums (no reduction).

    Parameters
    ----------
    X : ndarray of shape (n_samples, M * dsub), float32
        Points.
    labels : ndarray of shape (n_samples, M), uint8
        Centre of each sub-vector, in ``[0, ksub)``.
    ksub : int
        Centres per sub-quantizer.
    n_threads : int
        OpenMP threads.

    Returns
    -------
    sums : ndarray of shape (M, ksub, dsub), float64
    counts : ndarray of shape (M, ksub), int64
    """
    cdef intp_t n_samples = X.shape[0], M = labels.shape[1]
    if labels.shape[0] != n_samples or M < 1 or X.shape[1] % M:
        raise ValueError("labels must be (n_samples, M) with M dividing n_features.")
    if not 1 <= ksub <= 256:
        raise ValueError(f"Expected 1 <= ksub <= 256, got {ksub}.")
    if n_samples and np.max(labels) >= ksub:
        raise ValueError(f"labels must lie in [0, {ksub}).")
    cdef intp_t dsub = X.shape[1] // M
    sums_arr = np.zeros((M, ksub, dsub), dtype=np.float64)
    counts_arr = np.zeros((M, ksub), dtype=np.int64)
    cdef float64_t[:, :, ::1] sums = sums_arr
    cdef id_t[:, ::1] counts = counts_arr
    cdef intp_t m, i, f, c
    with nogil:
        for m in prange(M, num_threads=<int>max(1, min(n_threads, M)),
                        schedule="static"):
            for i in range(n_samples):
                c = labels[i, m]
                counts[m, c] += 1
                for f in range(dsub):
                    sums[m, c, f] += X[i, m * dsub + f]
    return sums_arr, counts_arr
