# A shim so that kernels compile with and without OpenMP.
#
# Cython's ``IF`` is deprecated: the decision is taken by the C preprocessor,
# from whether the compiler was given ``-fopenmp`` (``_OPENMP`` defined).
cdef extern from *:
    """
    #ifdef _OPENMP
        #include <omp.h>
        #define ANNLEARN_OPENMP_PARALLELISM_ENABLED 1
    #else
        #define ANNLEARN_OPENMP_PARALLELISM_ENABLED 0
        #define omp_lock_t int
        #define omp_init_lock(l) (void)0
        #define omp_destroy_lock(l) (void)0
        #define omp_set_lock(l) (void)0
        #define omp_unset_lock(l) (void)0
        #define omp_get_thread_num() 0
        #define omp_get_max_threads() 1
    #endif

    /* Wait for every thread of the enclosing parallel region (an orphaned
       directive: valid in a function called from the region). Cython
       compiles each prange of a parallel block with "nowait", so a loop that
       reads what the previous loop of the block wrote must wait here first. */
    static inline void annlearn_omp_barrier(void) {
    #ifdef _OPENMP
        #pragma omp barrier
    #endif
    }
    """
    bint ANNLEARN_OPENMP_PARALLELISM_ENABLED

    ctypedef struct omp_lock_t:
        pass

    void omp_init_lock(omp_lock_t*) noexcept nogil
    void omp_destroy_lock(omp_lock_t*) noexcept nogil
    void omp_set_lock(omp_lock_t*) noexcept nogil
    void omp_unset_lock(omp_lock_t*) noexcept nogil
    int omp_get_thread_num() noexcept nogil
    int omp_get_max_threads() noexcept nogil
    void annlearn_omp_barrier() noexcept nogil
