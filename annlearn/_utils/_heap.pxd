# The bounded top-k selection shared by every annlearn kernel.
#
# A max-heap of the k best (smallest) candidates seen so far, kept as two
# parallel arrays (structure of arrays, as scikit-learn's ``_heap``): the
# values and the ids. Its root is the current k-th best, so a candidate is
# tested against ``values[0]`` and most candidates are rejected by that one
# comparison. A candidate that wins replaces the root and sifts down.
#
# Ties are broken on the id (as FAISS's ``cmp2``): of two equal values the
# smaller id ranks first. Results are then deterministic whatever the order in
# which candidates arrive (chunking, thread count, strategy), and merging the
# heaps of several threads gives the same answer as one thread would.
#
# Empty slots hold (+inf, INT64_MAX). The sentinel is the largest id, so any
# real candidate, even at +inf, beats an empty slot.
#
# Values are float32, the precision every annlearn kernel scores in.
#
# The functions are inline so that the scan loops of the kernels, which call
# heap_push once per candidate that beats the root, pay no call overhead.
from libc.math cimport INFINITY
from libc.stdint cimport INT64_MAX

from annlearn._utils._typedefs cimport float32_t, id_t, intp_t

cdef inline bint heap_greater(
    float32_t a_value, id_t a_id, float32_t b_value, id_t b_id
) noexcept nogil:
    """True if (a_value, a_id) ranks after (b_value, b_id)."""
    return a_value > b_value or (a_value == b_value and a_id > b_id)


cdef inline void heap_init(float32_t* values, id_t* ids, intp_t size) noexcept nogil:
    """Fill a heap of ``size`` slots with empty entries."""
    cdef intp_t i
    for i in range(size):
        values[i] = INFINITY
        ids[i] = INT64_MAX


cdef inline void heap_sift_down(
    float32_t* values, id_t* ids, intp_t size, intp_t start,
    float32_t value, id_t value_id,
) noexcept nogil:
    """Place (value, value_id) at ``start`` and sift it down to its position."""
    cdef intp_t current = start, left, right, child
    while True:
        left = 2 * current + 1
        if left >= size:
            break
        right = left + 1
        child = left
        if right < size and heap_greater(values[right], ids[right], values[left], ids[left]):
            child = right
        if not heap_greater(values[child], ids[child], value, value_id):
            break
        values[current] = values[child]
        ids[current] = ids[child]
        current = child
    values[current] = value
    ids[current] = value_id


cdef inline int heap_push(
    float32_t* values, id_t* ids, intp_t size, float32_t value, id_t value_id
) noexcept nogil:
    """Offer a candidate to the heap; return 1 if it was kept.

    The candidate replaces the root (the current worst of the k best) when it
    ranks before it, then sifts down.
    """
    if not heap_greater(values[0], ids[0], value, value_id):
        return 0
    heap_sift_down(values, ids, size, 0, value, value_id)
    return 1


cdef inline void heap_sort(float32_t* values, id_t* ids, intp_t size) noexcept nogil:
    """Sort a heap in place into ascending order (best first)."""
    cdef intp_t end
    cdef float32_t value
    cdef id_t value_id
    for end in range(size - 1, 0, -1):
        value = values[end]
        value_id = ids[end]
        values[end] = values[0]
        ids[end] = ids[0]
        heap_sift_down(values, ids, end, 0, value, value_id)
