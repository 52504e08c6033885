"""Test twin of the inline row-major GEMM in ``_blas.pxd``."""

import numpy as np

from cython cimport floating

from annlearn._utils._blas cimport gemm_abt


def _gemm_abt_wrapper(const floating[:, ::1] A, const floating[:, ::1] B,
                      floating alpha=1.0):
    """Return ``alpha * A @ B.T`` computed by ``gemm_abt``."""
    cdef Py_ssize_t m = A.shape[0], n = B.shape[0], k = A.shape[1]
    dtype = np.float32 if floating is float else np.float64
    cdef floating[:, ::1] C = np.zeros((m, n), dtype=dtype)
    if m and n:
        with nogil:
            gemm_abt(m, n, k, alpha, &A[0, 0], k, &B[0, 0], k, 0.0, &C[0, 0], n)
    return np.asarray(C)
