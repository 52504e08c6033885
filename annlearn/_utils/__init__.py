"""Cython primitives shared by annlearn's kernels.

- ``_typedefs.pxd``: the C types every kernel uses (one place).
- ``_openmp_helpers``: the ``#ifdef _OPENMP`` shim and the thread-count rule.
- ``_heap``: the bounded top-k max-heap (structure of arrays, ties broken on id).
- ``_blas``: row-major float32/float64 GEMM over SciPy's BLAS, no extra link step.
- ``_packed_gemm``: annlearn's own float32 GEMM on packed operands (AVX-512 or
  AVX2+FMA micro-kernels in ``_packed_gemm.h``) and the instruction set chosen
  at run time.

And one Python helper, ``format_bytes``, for the ``summary()`` of the indexes.
"""


def format_bytes(n_bytes: int) -> str:
    """A byte count in the largest binary unit that keeps it >= 1."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"
