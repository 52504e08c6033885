"""Reuse of large numpy buffers in tasks that run again and again.

``pooled()`` makes numpy allocate through ``_pool.h``'s allocator for the
code it wraps: arrays of at least 128 KiB freed later (wherever that
happens) are kept and handed out again to the next allocation of their size
class instead of being mapped and page-faulted afresh. Used by the tasks of
``annlearn.dask``, whose workers run with glibc's mmap threshold frozen.
"""

from contextlib import contextmanager

from cpython.pycapsule cimport PyCapsule_New
from libc.string cimport strncpy

cimport numpy as cnp

cnp.import_array()


cdef extern from "_pool.h":
    void *pool_malloc(void *ctx, size_t size) noexcept nogil
    void *pool_calloc(void *ctx, size_t nelem, size_t elsize) noexcept nogil
    void *pool_realloc(void *ctx, void *ptr, size_t new_size) noexcept nogil
    void pool_free(void *ctx, void *ptr, size_t size) noexcept nogil
    void pool_new_epoch() noexcept nogil
    void pool_clear() noexcept nogil
    void *pool_lock
    size_t pool_cached
    size_t pool_cap
    size_t POOL_MIN_BYTES
    size_t POOL_KEEP_EPOCHS

cdef extern from "pythread.h":
    void *PyThread_allocate_lock()


cdef cnp.PyDataMem_Handler _handler
strncpy(_handler.name, b"annlearn_pool", 127)
_handler.version = 1
_handler.allocator.ctx = NULL
_handler.allocator.malloc = pool_malloc
_handler.allocator.calloc = pool_calloc
_handler.allocator.realloc = pool_realloc
_handler.allocator.free = pool_free

pool_lock = PyThread_allocate_lock()
if pool_lock == NULL:
    raise MemoryError("annlearn._utils._pool: cannot allocate a lock")

_capsule = PyCapsule_New(&_handler, "mem_handler", NULL)

MIN_BYTES = POOL_MIN_BYTES
KEEP_EPOCHS = POOL_KEEP_EPOCHS


@contextmanager
def pooled():
    """Allocate numpy arrays from the pool in this context (this thread or
    coroutine only: numpy keeps the handler in a context variable); one
    epoch of the pool per entry."""
    pool_new_epoch()
    previous = cnp.PyDataMem_SetHandler(_capsule)
    try:
        yield
    finally:
        cnp.PyDataMem_SetHandler(previous)


def cached_bytes():
    """Bytes the pool holds for reuse."""
    return pool_cached


def capacity():
    """The most bytes the pool holds."""
    return pool_cap


def clear():
    """Give every cached block back to the system."""
    pool_clear()
