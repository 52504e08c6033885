"""Test twin of the inline row-major GEMM in ``_blas.pxd``."""

import numpy as np

from cython cimport floating

from libc.stdlib cimport free, malloc

from annlearn._utils._blas cimport (
    ANNLEARN_GEMM_MR,
    ANNLEARN_GEMM_NR,
    annlearn_cpu_has_avx512f,
    annlearn_pack_rows,
    annlearn_packed_gemm_abt,
    annlearn_packed_size,
    gemm_abt,
)


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


def _cpu_has_avx512f():
    """Whether this CPU can run the AVX-512 packed GEMM."""
    return bool(annlearn_cpu_has_avx512f())


def _packed_gemm_abt_wrapper(const float[:, ::1] A, const float[:, ::1] B,
                             float alpha=1.0):
    """Return ``alpha * A @ B.T`` computed by the packed AVX-512 GEMM."""
    if not annlearn_cpu_has_avx512f():
        raise RuntimeError("This CPU has no AVX-512F.")
    cdef Py_ssize_t m = A.shape[0], n = B.shape[0], k = A.shape[1]
    cdef float[:, ::1] C = np.zeros((m, n), dtype=np.float32)
    cdef float* Ap
    cdef float* Bp
    if m == 0 or n == 0:
        return np.asarray(C)
    Ap = <float*>malloc(annlearn_packed_size(m, k, ANNLEARN_GEMM_MR) * sizeof(float))
    Bp = <float*>malloc(annlearn_packed_size(n, k, ANNLEARN_GEMM_NR) * sizeof(float))
    if Ap == NULL or Bp == NULL:
        free(Ap)
        free(Bp)
        raise MemoryError()
    with nogil:
        annlearn_pack_rows(&A[0, 0], k, m, k, ANNLEARN_GEMM_MR, Ap)
        annlearn_pack_rows(&B[0, 0], k, n, k, ANNLEARN_GEMM_NR, Bp)
        annlearn_packed_gemm_abt(m, n, k, alpha, Ap, Bp, NULL, &C[0, 0], n)
    free(Ap)
    free(Bp)
    return np.asarray(C)
