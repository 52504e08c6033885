# Argument checks of the kernels' Python entry points, as typed loops: a
# numpy reduction costs microseconds of call overhead, which a single query's
# scan (tens of microseconds) would pay on every call.
from libc.math cimport isfinite

from annlearn._utils._typedefs cimport float32_t, id_t, intp_t


cdef inline bint ids_within(const id_t[:, ::1] a, id_t low, id_t high) noexcept nogil:
    """Every entry of ``a`` in [low, high)."""
    cdef intp_t i, j
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            if a[i, j] < low or a[i, j] >= high:
                return False
    return True


cdef inline bint all_finite(const float32_t[:, ::1] a) noexcept nogil:
    cdef intp_t i, j
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            if not isfinite(a[i, j]):
                return False
    return True


cdef inline bint positive_finite(const float32_t[:, ::1] a) noexcept nogil:
    cdef intp_t i, j
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            if not (a[i, j] > 0 and isfinite(a[i, j])):
                return False
    return True
