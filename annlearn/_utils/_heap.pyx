"""Test twins of the inline heap in ``_heap.pxd``.

The kernels use the ``cdef inline`` functions directly; these ``def`` wrappers
exist so that the heap can be unit-tested from Python.
"""

import numpy as np

from annlearn._utils._heap cimport heap_init, heap_push, heap_sort
from annlearn._utils._typedefs cimport float32_t, id_t, intp_t


def _heap_topk_wrapper(const float32_t[::1] values, const id_t[::1] ids, intp_t k):
    """Push every (value, id) into a k-heap; return the sorted heap contents.

    Empty slots (fewer than k candidates) come back as (+inf, -1).
    """
    cdef float32_t[::1] heap_values = np.empty(k, dtype=np.float32)
    cdef id_t[::1] heap_ids = np.empty(k, dtype=np.int64)
    cdef intp_t i
    with nogil:
        heap_init(&heap_values[0], &heap_ids[0], k)
        for i in range(values.shape[0]):
            heap_push(&heap_values[0], &heap_ids[0], k, values[i], ids[i])
        heap_sort(&heap_values[0], &heap_ids[0], k)
    out_ids = np.asarray(heap_ids)
    out_ids[out_ids == np.iinfo(np.int64).max] = -1
    return np.asarray(heap_values), out_ids
