"""Cython primitives shared by annlearn's kernels.

- ``_typedefs.pxd``: the C types every kernel uses (one place).
- ``_openmp_helpers``: the ``#ifdef _OPENMP`` shim and the thread-count rule.
- ``_heap``: the bounded top-k max-heap (structure of arrays, ties broken on id).
- ``_blas``: row-major float32/float64 GEMM over SciPy's BLAS, no extra link step.
- ``_packed_gemm``: annlearn's own float32 GEMM on packed operands (AVX-512 or
  AVX2+FMA micro-kernels in ``_packed_gemm.h``) and the instruction set chosen
  at run time.
"""
