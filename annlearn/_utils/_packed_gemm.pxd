# annlearn's own single-precision GEMM, packed operands with AVX-512 and AVX2
# micro-kernels (see _packed_gemm.h), and the instruction set chosen at run
# time. Unlike _blas.pxd it calls no library: the flat search uses it when the
# CPU has AVX2+FMA or AVX-512F, and SciPy's BLAS otherwise.
cdef extern from "_packed_gemm.h" nogil:
    const int ANNLEARN_ISA_NONE
    const int ANNLEARN_ISA_AVX2
    const int ANNLEARN_ISA_AVX512
    int annlearn_isa()
    int annlearn_packed_gemm_available()
    Py_ssize_t annlearn_gemm_mr()
    Py_ssize_t annlearn_gemm_nr()
    Py_ssize_t annlearn_packed_size(Py_ssize_t rows, Py_ssize_t k, Py_ssize_t width)
    void annlearn_pack_rows(const float* X, Py_ssize_t ldx, Py_ssize_t rows,
                            Py_ssize_t k, Py_ssize_t width, float* out)
    void annlearn_pack_panels(const float* X, Py_ssize_t ldx, Py_ssize_t rows,
                              Py_ssize_t k, float* out)
    void annlearn_packed_gemm_abt(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                                  float alpha, const float* Ap, const float* Bp,
                                  const float* bias, float* C, Py_ssize_t ldc)
    void annlearn_dot_rows(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                           float alpha, const float* X, Py_ssize_t ldx,
                           const float* Y, Py_ssize_t ldy, float* C,
                           Py_ssize_t ldc)
