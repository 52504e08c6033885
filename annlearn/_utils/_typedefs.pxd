# The C types of annlearn's kernels, declared in one place.
#
# float32_t : stored vectors, distances, centroids (annlearn computes in float32)
# float64_t : accumulators where float32 would lose too much
# intp_t    : loop indices and sizes (signed: MSVC's OpenMP 2.0 needs signed loops)
# int64_t   : user ids and list offsets (fixed width: they are persisted)
# code_t    : one product-quantization code (nbits <= 8)
from libc.stdint cimport int64_t, uint8_t

ctypedef float float32_t
ctypedef double float64_t
ctypedef Py_ssize_t intp_t
ctypedef uint8_t code_t
ctypedef int64_t id_t
