"""The Cython kernels directly: invariance to blocks, strategies, GEMMs."""

import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from annlearn import _flat_search, _pca_bound
from annlearn._threads import blas_single_thread, effective_n_threads
from annlearn._utils._blas import _gemm_abt_wrapper
from annlearn._utils._heap import _heap_topk_wrapper
from annlearn._utils._packed_gemm import _simd_isa

GEMMS = ["blas"] + (["packed"] if _flat_search.PACKED_GEMM_AVAILABLE else [])


def _reference(X, Y, k):
    d = ((X[:, None, :].astype(np.float64) - Y[None]) ** 2).sum(-1)
    ind = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, ind, axis=1), ind


@pytest.fixture
def problem():
    rng = np.random.default_rng(7)
    Y = rng.standard_normal((531, 37)).astype(np.float32)
    X = rng.standard_normal((97, 37)).astype(np.float32)
    return X, Y, _flat_search.row_sqnorms(Y, 1)


def _search(problem, k, n_threads, chunks, strategy, gemm, allowed=None):
    """flat_kneighbors on ``problem`` (squared L2), BLAS at one thread."""
    X, Y, sq = problem
    with blas_single_thread():
        return _flat_search.flat_kneighbors(
            X,
            Y,
            sq,
            k,
            _flat_search.METRIC_SQEUCLIDEAN,
            n_threads,
            chunks[0],
            chunks[1],
            strategy,
            gemm,
            allowed=allowed,
        )


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("strategy", ["parallel_on_X", "parallel_on_Y"])
@pytest.mark.parametrize("chunks", [(1, 1), (3, 7), (12, 32), (50, 200), (None, None)])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_flat_kernel_invariance(problem, gemm, strategy, chunks, n_threads):
    X, Y, sq = problem
    ref_d, ref_i = _reference(X, Y, 9)
    d, i = _search(problem, 9, n_threads, chunks, strategy, gemm)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(d, ref_d, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("strategy", ["parallel_on_X", "parallel_on_Y"])
@pytest.mark.parametrize("chunks", [(3, 7), (50, 64), (None, None)])
@pytest.mark.parametrize("shared", [True, False])
def test_flat_kernel_filter_invariance(problem, gemm, strategy, chunks, shared):
    """A filter bitmap (one for all queries, or one per query) gives the
    unfiltered kernel's answer over the allowed rows, whatever the blocks,
    strategy, GEMM and threads; and the direct kernel gives it too."""
    from annlearn._filter import FilterBlock

    X, Y, sq = problem
    rng = np.random.default_rng(8)
    mask = rng.random((1 if shared else len(X), len(Y))) < 0.3
    mask[:, :9] = True
    block = FilterBlock(mask, mask.sum(1))
    d64 = ((X[:, None, :].astype(np.float64) - Y[None]) ** 2).sum(-1)
    d64[~np.broadcast_to(mask, d64.shape)] = np.inf
    ref_i = np.argsort(d64, axis=1, kind="stable")[:, :9]
    ref_d = np.take_along_axis(d64, ref_i, axis=1)
    for n_threads in (1, 3):
        d, i = _search(problem, 9, n_threads, chunks, strategy, gemm, block.bitmap())
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_allclose(d, ref_d, rtol=1e-5, atol=1e-5)
    indptr, rows = block.rows(np.arange(len(X)))
    d, i = _flat_search.rows_kneighbors(
        X, Y, indptr, rows, 9, _flat_search.METRIC_SQEUCLIDEAN, 2
    )
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(d, ref_d, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Expected allowed of dtype uint64"):
        _flat_search.flat_kneighbors(X, Y, sq, 9, 0, 1, allowed=block.bitmap()[:, 1:])


def _low_rank(n, d, seed):
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((4, d))
    X = rng.standard_normal((n, 4)) @ basis + 0.05 * rng.standard_normal((n, d))
    return X.astype(np.float32)


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("x_chunk", [1, 5, 64, None])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_parallel_on_Y_query_blocks_with_bound(gemm, x_chunk, n_threads):
    # parallel_on_Y takes the queries one block of x_chunk at a time; with a
    # bound, query xs + i of a block must still read its own shift and rows.
    Y, X = _low_rank(700, 40, 0), _low_rank(130, 40, 1)
    sq = _flat_search.row_sqnorms(Y, 1)
    bound = _pca_bound.fit_bound(Y, sq, force=True)
    ref_d, ref_i = _reference(X, Y, 12)
    args = (X, Y, sq, 12, _flat_search.METRIC_SQEUCLIDEAN, n_threads, x_chunk, 32)
    projected = _pca_bound.query_bounds(bound, X, True)
    with blas_single_thread():
        results = [
            _flat_search.flat_kneighbors(*args, "parallel_on_Y", gemm, bound=b)
            for b in (None, projected)
        ]
    for d, i in results:
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_allclose(d, ref_d, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(results[0][0], results[1][0])


@pytest.mark.parametrize("n_threads", [2, 3])
def test_parallel_on_Y_heaps_hold_one_query_block(problem, n_threads):
    # The per-thread heaps of the few-query strategy hold one block of
    # x_chunk queries, not every query: numpy's allocations during the call
    # (which tracemalloc traces) are the output plus n_threads * x_chunk * k
    # heap entries, however many queries there are.
    import tracemalloc

    X, Y, sq = problem
    X = np.repeat(X, 4, axis=0)  # 388 queries, 49 blocks of 8
    k, x_chunk = 50, 8
    ref = _flat_search.flat_kneighbors(X, Y, sq, k, 0, 1, None, None, "parallel_on_X")
    tracemalloc.start()
    try:
        with blas_single_thread():
            start = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            d, i = _flat_search.flat_kneighbors(
                X, Y, sq, k, 0, n_threads, x_chunk, 64, "parallel_on_Y"
            )
            peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    heaps = n_threads * x_chunk * k * (4 + 8)
    assert peak < d.nbytes + i.nbytes + heaps + 64 * 1024
    np.testing.assert_array_equal(i, ref[1])
    np.testing.assert_array_equal(d, ref[0])


@pytest.mark.parametrize("gemm", GEMMS)
def test_k_equals_n_database_and_ties(gemm):
    Y = np.zeros((40, 5), dtype=np.float32)  # all tied
    X = np.zeros((60, 5), dtype=np.float32)
    sq = _flat_search.row_sqnorms(Y, 1)
    d, i = _flat_search.flat_kneighbors(X, Y, sq, 40, 0, 2, None, None, "auto", gemm)
    np.testing.assert_array_equal(i, np.tile(np.arange(40), (60, 1)))
    np.testing.assert_array_equal(d, 0.0)


@pytest.mark.parametrize("d", [1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 100])
@pytest.mark.parametrize(
    "metric", ["sqeuclidean", "euclidean", "inner_product", "cosine"]
)
def test_returned_distances_are_float64_sums_rounded(d, metric):
    """The k winners' distances are recomputed in float64 (every SIMD tail
    of the kernels): within an ulp or so of float32 of numpy's float64."""
    rng = np.random.default_rng(d)
    Y = (rng.standard_normal((300, d)) * 40 + 100).astype(np.float32)
    X = (rng.standard_normal((60, d)) * 40 + 100).astype(np.float32)
    code = getattr(_flat_search, f"METRIC_{metric.upper()}")
    if metric == "cosine":
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        Y /= np.linalg.norm(Y, axis=1, keepdims=True)
    with blas_single_thread():
        dist, ind = _flat_search.flat_kneighbors(
            X, Y, _flat_search.row_sqnorms(Y, 1), 7, code, 2
        )
    x, y = X.astype(np.float64)[:, None], Y.astype(np.float64)[ind]
    want = {
        "sqeuclidean": ((x - y) ** 2).sum(-1),
        "euclidean": np.sqrt(((x - y) ** 2).sum(-1)),
        "inner_product": -(x * y).sum(-1),
        "cosine": np.clip(1 - (x * y).sum(-1), 0, 2),
    }[metric]
    if metric in ("sqeuclidean", "euclidean"):
        np.testing.assert_allclose(dist, want, rtol=2e-7, atol=0)
    else:  # the inner products are the GEMM's (float32)
        np.testing.assert_allclose(dist, want, rtol=1e-4, atol=1e-4)


def test_kernel_argument_errors(problem):
    X, Y, sq = problem
    with pytest.raises(ValueError, match="Expected 1 <= k <= 531"):
        _flat_search.flat_kneighbors(X, Y, sq, 532, 0, 1)
    with pytest.raises(ValueError, match="Unknown strategy"):
        _flat_search.flat_kneighbors(X, Y, sq, 3, 0, 1, strategy="other")
    with pytest.raises(ValueError, match="Unknown gemm"):
        _flat_search.flat_kneighbors(X, Y, sq, 3, 0, 1, gemm="other")


def test_heap_topk_wrapper():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 5, 200).astype(np.float32)  # many ties
    ids = rng.permutation(200).astype(np.int64)
    out_v, out_i = _heap_topk_wrapper(values, ids, 17)
    order = np.lexsort((ids, values))[:17]
    np.testing.assert_array_equal(out_v, values[order])
    np.testing.assert_array_equal(out_i, ids[order])
    # Fewer candidates than k: padded with (inf, -1).
    out_v, out_i = _heap_topk_wrapper(values[:3], ids[:3], 5)
    np.testing.assert_array_equal(out_i[3:], -1)
    assert np.all(np.isinf(out_v[3:]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 9, 3), (64, 17, 130)])
def test_gemm_wrapper(dtype, shape):
    m, n, k = shape
    rng = np.random.default_rng(0)
    A = rng.standard_normal((m, k)).astype(dtype)
    B = rng.standard_normal((n, k)).astype(dtype)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(
        _gemm_abt_wrapper(A, B, -2.0), -2 * A @ B.T, rtol=rtol, atol=rtol
    )


needs_simd = pytest.mark.skipif(
    _simd_isa() == "none", reason="neither AVX-512F nor AVX2+FMA on this CPU"
)


@needs_simd
@pytest.mark.parametrize(
    "shape", [(1, 1, 1), (13, 33, 17), (6, 16, 8), (100, 70, 784), (25, 47, 9)]
)
def test_packed_gemm_wrapper(shape):
    from annlearn._utils._packed_gemm import _packed_gemm_abt_wrapper

    m, n, k = shape
    rng = np.random.default_rng(0)
    A = rng.standard_normal((m, k)).astype(np.float32)
    B = rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    np.testing.assert_allclose(
        _packed_gemm_abt_wrapper(A, B, 0.5), 0.5 * A @ B.T, rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        _packed_gemm_abt_wrapper(A, B, -2.0, bias),
        -2.0 * A @ B.T + bias,
        rtol=1e-4,
        atol=1e-4,
    )


@needs_simd
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 9, 17), (5, 70, 784), (2, 4, 8)])
def test_dot_rows_wrapper(shape):
    from annlearn._utils._packed_gemm import _dot_rows_wrapper

    m, n, k = shape
    rng = np.random.default_rng(1)
    A = rng.standard_normal((m, k)).astype(np.float32)
    B = rng.standard_normal((n, k)).astype(np.float32)
    np.testing.assert_allclose(
        _dot_rows_wrapper(A, B, -1.0), -A @ B.T, rtol=1e-4, atol=1e-4
    )


@pytest.mark.skipif(_simd_isa() != "avx512", reason="the CPU runs AVX2 already")
def test_avx2_kernels_on_an_avx512_cpu():
    # The AVX2 kernels are what runs on AVX2-only CPUs; on an AVX-512 machine
    # ANNLEARN_ISA=avx2 selects them (read once per process, hence the
    # subprocess).
    import os
    import subprocess
    import sys

    env = dict(os.environ, ANNLEARN_ISA="avx2")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            __file__,
            "-k",
            "wrapper or invariance or ties or float64_sums",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "passed" in result.stdout


def test_effective_n_threads():
    assert effective_n_threads(1) == 1
    assert effective_n_threads(None) >= 1
    assert effective_n_threads(-1) >= 1
    with pytest.raises(ValueError, match="n_threads = 0 is invalid"):
        effective_n_threads(0)


def _blas_threads():
    # The BLAS libraries loaded when annlearn first capped BLAS, which include
    # the one SciPy's cython_blas (hence the kernels) calls.
    from annlearn._threads import _blas_controller

    capped = {lib.filepath for lib in _blas_controller().lib_controllers}
    return [p["num_threads"] for p in threadpool_info() if p["filepath"] in capped]


def test_blas_single_thread_caps_and_restores():
    before = _blas_threads()
    with blas_single_thread():
        assert all(n == 1 for n in _blas_threads())
        with blas_single_thread():  # re-entrant
            assert all(n == 1 for n in _blas_threads())
        assert all(n == 1 for n in _blas_threads())
    assert _blas_threads() == before


def test_blas_single_thread_is_counted_across_threads():
    # Overlapping searches from several Python threads share one cap: the
    # last one out restores the original setting, whatever the order.
    import annlearn._threads as threads_module

    before = _blas_threads()
    barrier = threading.Barrier(4)
    depths = []

    def worker():
        with blas_single_thread():
            barrier.wait()
            depths.append(threads_module._depth)
            barrier.wait()

    workers = [threading.Thread(target=worker) for _ in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert depths == [4, 4, 4, 4]
    assert threads_module._depth == 0 and threads_module._limiter is None
    assert _blas_threads() == before
