"""The buffer pool: numpy arrays allocated in ``pooled()`` reuse freed blocks."""

import threading

import numpy as np
import pytest

from annlearn._utils import _pool

LARGE = 1 << 20  # bytes, above the pool's minimum


@pytest.fixture(autouse=True)
def empty_pool():
    _pool.clear()
    yield
    _pool.clear()


def test_freed_large_blocks_are_reused_and_contents_are_right():
    with _pool.pooled():
        a = np.full(LARGE // 8, 3.0)
    assert _pool.cached_bytes() == 0
    del a
    # The block is kept (its class holds the request and the header).
    kept = _pool.cached_bytes()
    assert LARGE < kept <= LARGE * 9 // 8 + 64
    with _pool.pooled():
        b = np.empty(LARGE // 8)
        # Reused, and zeroed when asked for zeros although the block was not.
        c = np.zeros(LARGE // 8)
    assert _pool.cached_bytes() == 0  # b took the block, c is new
    assert not c.any()
    b[:] = 1.0
    del b, c
    assert _pool.cached_bytes() == 2 * kept
    with _pool.pooled():
        z = np.zeros(LARGE // 8)
    assert not z.any()
    assert _pool.cached_bytes() == kept
    with _pool.pooled():
        small = np.arange(10)  # below the minimum: never cached
    del small
    assert _pool.cached_bytes() == kept


def test_arrays_freed_outside_the_context_and_resized_arrays():
    with _pool.pooled():
        a = np.arange(LARGE // 8, dtype=np.float64)
        tiny = np.arange(5, dtype=np.float64)
    # Grown in place across the minimum and shrunk (realloc keeps the data).
    tiny.resize(LARGE // 8, refcheck=False)
    np.testing.assert_array_equal(tiny[:5], np.arange(5))
    a.resize(100, refcheck=False)
    np.testing.assert_array_equal(a, np.arange(100))
    a.resize(3 * LARGE // 8, refcheck=False)
    np.testing.assert_array_equal(a[:100], np.arange(100))
    del a, tiny
    assert _pool.cached_bytes() > 0


def test_cap_and_epochs_bound_what_is_kept():
    big = _pool.capacity() // 5
    with _pool.pooled():
        arrays = [np.ones(big // 8 + n * 100_000) for n in range(8)]
    del arrays
    assert 0 < _pool.cached_bytes() <= _pool.capacity()
    # A block not taken again within KEEP_EPOCHS entries goes back.
    for _ in range(_pool.KEEP_EPOCHS + 1):
        with _pool.pooled():
            pass
    assert _pool.cached_bytes() == 0
    # Larger than half the cap: never kept.
    with _pool.pooled():
        huge = np.ones(_pool.capacity() // 2 // 8 + 1)
    del huge
    assert _pool.cached_bytes() == 0


def test_threads_share_the_pool_safely():
    errors = []

    def work(seed):
        rng = np.random.default_rng(seed)
        try:
            with _pool.pooled():
                for _ in range(200):
                    n = int(rng.integers(LARGE // 16, LARGE // 4))
                    a = np.full(n, seed, dtype=np.int64)
                    b = np.zeros(n, dtype=np.int64)
                    if (a != seed).any() or b.any():
                        errors.append(seed)
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert _pool.cached_bytes() <= _pool.capacity()
