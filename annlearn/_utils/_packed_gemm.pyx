"""Test twins of the packed GEMM kernels in ``_packed_gemm.pxd``, and the
instruction set they run with."""

import numpy as np

from libc.stdlib cimport free, malloc

from annlearn._utils._packed_gemm cimport (
    ANNLEARN_ISA_AVX2,
    ANNLEARN_ISA_AVX512,
    annlearn_dot_rows,
    annlearn_gemm_mr,
    annlearn_gemm_nr,
    annlearn_isa,
    annlearn_pack_panels,
    annlearn_pack_rows,
    annlearn_packed_gemm_available,
    annlearn_packed_gemm_abt,
    annlearn_packed_size,
)


def _simd_isa():
    """The instruction set of annlearn's kernels here: "avx512", "avx2" or
    "none" (BLAS and portable C); ANNLEARN_ISA=avx2/none lowers it."""
    isa = annlearn_isa()
    if isa == ANNLEARN_ISA_AVX512:
        return "avx512"
    return "avx2" if isa == ANNLEARN_ISA_AVX2 else "none"


def _packed_gemm_abt_wrapper(const float[:, ::1] A, const float[:, ::1] B,
                             float alpha=1.0, const float[::1] bias=None):
    """Return ``alpha * A @ B.T (+ bias)`` computed by the packed GEMM."""
    if not annlearn_packed_gemm_available():
        raise RuntimeError("This CPU has neither AVX-512F nor AVX2 with FMA.")
    cdef Py_ssize_t m = A.shape[0], n = B.shape[0], k = A.shape[1]
    cdef Py_ssize_t mr = annlearn_gemm_mr(), nr = annlearn_gemm_nr()
    cdef float[:, ::1] C = np.zeros((m, n), dtype=np.float32)
    cdef const float* bias_ptr = NULL
    cdef float* Ap
    cdef float* Bp
    if bias is not None:
        if bias.shape[0] != n:
            raise ValueError("bias must have one entry per row of B.")
        if n:
            bias_ptr = &bias[0]
    if m == 0 or n == 0:
        return np.asarray(C)
    Ap = <float*>malloc(annlearn_packed_size(m, k, mr) * sizeof(float))
    Bp = <float*>malloc(annlearn_packed_size(n, k, nr) * sizeof(float))
    if Ap == NULL or Bp == NULL:
        free(Ap)
        free(Bp)
        raise MemoryError()
    with nogil:
        annlearn_pack_rows(&A[0, 0], k, m, k, mr, Ap)
        annlearn_pack_panels(&B[0, 0], k, n, k, Bp)
        annlearn_packed_gemm_abt(m, n, k, alpha, Ap, Bp, bias_ptr, &C[0, 0], n)
    free(Ap)
    free(Bp)
    return np.asarray(C)


def _dot_rows_wrapper(const float[:, ::1] A, const float[:, ::1] B,
                      float alpha=1.0):
    """Return ``alpha * A @ B.T`` computed by the unpacked row-dot kernel."""
    if not annlearn_packed_gemm_available():
        raise RuntimeError("This CPU has neither AVX-512F nor AVX2 with FMA.")
    cdef Py_ssize_t m = A.shape[0], n = B.shape[0], k = A.shape[1]
    cdef float[:, ::1] C = np.zeros((m, n), dtype=np.float32)
    if m and n:
        with nogil:
            annlearn_dot_rows(m, n, k, alpha, &A[0, 0], k, &B[0, 0], k,
                              &C[0, 0], n)
    return np.asarray(C)
