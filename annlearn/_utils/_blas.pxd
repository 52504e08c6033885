# Row-major GEMM over SciPy's BLAS (``scipy.linalg.cython_blas``).
#
# No link step: cimporting cython_blas reads SciPy's .pxd at build time and a
# table of function pointers at import time, so annlearn uses whichever BLAS
# SciPy ships.
#
# Every kernel wants C = alpha * A . B^T + beta * C with A (m x k) and
# B (n x k) row-major (queries against database rows, points against
# centroids). BLAS is column-major: it reads a row-major buffer as its
# transpose. Computing the column-major C^T = B . A^T, i.e. calling gemm with
# transa='T' on B (lda = row stride of B), transb='N' on A, and M=n, N=m,
# leaves C in row-major order with row stride ldc. The Fortran ABI takes every
# argument by address, and its sizes are 32-bit ints: callers keep each block
# below 2**31 by chunking. SciPy's prototypes are not const, hence the casts
# (scipy issue 14262).
from cython cimport floating
from scipy.linalg.cython_blas cimport dgemm, sgemm

from annlearn._utils._typedefs cimport intp_t


cdef inline void gemm_abt(
    intp_t m, intp_t n, intp_t k,
    floating alpha, const floating* A, intp_t lda,
    const floating* B, intp_t ldb,
    floating beta, floating* C, intp_t ldc,
) noexcept nogil:
    """Row-major ``C[:m, :n] = alpha * A[:m, :k] @ B[:n, :k].T + beta * C``."""
    cdef char transa = b"T"
    cdef char transb = b"N"
    cdef int M = <int>n
    cdef int N = <int>m
    cdef int K = <int>k
    cdef int LDA = <int>ldb
    cdef int LDB = <int>lda
    cdef int LDC = <int>ldc
    if floating is float:
        sgemm(&transa, &transb, &M, &N, &K, &alpha, <float*>B, &LDA,
              <float*>A, &LDB, &beta, C, &LDC)
    else:
        dgemm(&transa, &transb, &M, &N, &K, &alpha, <double*>B, &LDA,
              <double*>A, &LDB, &beta, C, &LDC)
