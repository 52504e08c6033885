"""The "pca_bound" exact search returns exactly what brute force returns."""

import numpy as np
import pytest

from annlearn import FlatNeighbors, load, save
from annlearn._persistence import FORMAT_VERSION
from annlearn._testing import (
    assert_knn_quasi_equal,
    float32_knn_tolerance,
    float64_distances,
)

METRICS = ["euclidean", "sqeuclidean", "cosine", "inner_product"]


def low_rank(n, d=96, rank=8, noise=0.05, seed=0, offset=0.0):
    """Data whose variance sits in ``rank`` directions (like images)."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((rank, d))
    X = rng.standard_normal((n, rank)) * np.linspace(3, 1, rank) @ basis
    X += noise * rng.standard_normal((n, d)) + offset
    return X.astype(np.float32)


def _exact(X, Q, ind, metric):
    """float64 distances of the pairs (Q[i], X[ind[i, j]])."""
    X, Q = X.astype(np.float64), Q.astype(np.float64)
    if metric == "cosine":
        X = X / np.linalg.norm(X, axis=1, keepdims=True)
        Q = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    Y = X[ind]
    if metric in ("inner_product", "cosine"):
        dots = np.einsum("qd,qkd->qk", Q, Y)
        return -dots if metric == "inner_product" else 1 - dots
    sq = ((Y - Q[:, None, :]) ** 2).sum(-1)
    return np.sqrt(sq) if metric == "euclidean" else sq


def _reference(X, Q, metric, k):
    """float64 brute force: distances and positions of the k nearest rows,
    sorted by distance then position."""
    D = float64_distances(X, Q, metric)
    ind = np.argpartition(D, k - 1, axis=1)[:, :k]
    ind = np.take_along_axis(ind, np.lexsort((ind, np.take_along_axis(D, ind, 1))), 1)
    return np.take_along_axis(D, ind, axis=1), ind


def assert_same(a, b, X, Q, metric="euclidean", ids=None):
    """Equally good answers: ``a`` (the bound) and ``b`` (brute force) have
    the neighbours of float64 brute force, and ``a`` those of ``b``, every id
    at its exact distance. Ids may differ only where distances tie within
    float32 rounding (``float32_knn_tolerance``) with the k-th: the bound
    scores its survivors with a dot product, brute force with GEMM.

    ``ids``: the id of each row of X, if not its position."""
    ids = np.arange(len(X)) if ids is None else np.asarray(ids)
    order = np.argsort(ids)

    def exact(ind):
        rows = order[np.searchsorted(ids[order], ind).clip(0, len(ids) - 1)]
        np.testing.assert_array_equal(ids[rows], ind, err_msg="unknown ids")
        return _exact(X, Q, rows, metric)

    ref_dist, ref_rows = _reference(X, Q, metric, a[0].shape[1])
    tol = float32_knn_tolerance(X, Q, metric, ref_dist)
    for dist, ind in (a, b):
        assert_knn_quasi_equal(
            dist, ind, ref_dist, ids[ref_rows], rtol=0, atol=tol, exact_dist=exact(ind)
        )
    tol = float32_knn_tolerance(X, Q, metric, b[0], n_float32=2)
    assert_knn_quasi_equal(*a, *b, rtol=0, atol=tol, exact_dist=exact(a[1]))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_same_neighbours_as_brute_force(metric, offset):
    X = low_rank(5000, offset=offset)
    Q = np.vstack([low_rank(300, seed=1, offset=offset), 10 * low_rank(20, seed=2)])
    brute = FlatNeighbors(n_neighbors=10, metric=metric, algorithm="brute").fit(X)
    auto = FlatNeighbors(n_neighbors=10, metric=metric, algorithm="pca_bound").fit(X)
    assert brute.n_bound_components_ == 0
    d1 = auto.n_bound_components_
    assert d1 in (8, 16, 24)  # at most d / 4 = 24 for 96 features
    assert f"search: pca_bound on {d1} principal components" in auto.summary()
    assert_same(auto.kneighbors(Q), brute.kneighbors(Q), X, Q, metric)
    # Few queries (split over database blocks) and large k.
    assert_same(auto.kneighbors(Q[:3]), brute.kneighbors(Q[:3]), X, Q[:3], metric)
    assert_same(
        auto.kneighbors(Q[:50], 700), brute.kneighbors(Q[:50], 700), X, Q[:50], metric
    )
    # The training set itself (each point without itself): the same
    # neighbours as brute force, at their float64 distances.
    got, want = auto.kneighbors(n_neighbors=5), brute.kneighbors(n_neighbors=5)
    assert not np.any(got[1] == np.arange(len(X))[:, None])
    assert_knn_quasi_equal(
        *got,
        *want,
        rtol=0,
        atol=float32_knn_tolerance(X, X, metric, want[0], n_float32=2),
        exact_dist=_exact(X, X, got[1], metric),
    )


def test_auto_keeps_brute_force_where_the_bound_would_not_pay():
    rng = np.random.default_rng(0)
    isotropic = rng.standard_normal((5000, 64)).astype(np.float32)
    assert FlatNeighbors().fit(isotropic).n_bound_components_ == 0
    assert FlatNeighbors().fit(low_rank(1000)).n_bound_components_ == 0  # small
    forced = FlatNeighbors(algorithm="pca_bound").fit(isotropic)
    assert forced.n_bound_components_ in (8, 16)  # at most d / 4
    brute = FlatNeighbors(algorithm="brute").fit(isotropic)
    Q = isotropic[:100]
    assert_same(forced.kneighbors(Q), brute.kneighbors(Q), isotropic, Q)


def power_law(n, d, alpha, seed=0):
    """Rows whose i-th principal variance is ``i ** -alpha``, in a random basis."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    scale = np.sqrt(np.arange(1, d + 1) ** -float(alpha))
    return ((rng.standard_normal((n, d)) * scale) @ basis).astype(np.float32)


def test_auto_chooses_by_cost():
    """``"auto"`` keeps the bound where the survivors it leaves cost less
    than brute force, whatever the share of variance its axes hold."""
    from annlearn import _pca_bound

    # 85% of the variance in 8 axes, but too few rows to prune enough.
    assert FlatNeighbors().fit(low_rank(5000)).n_bound_components_ == 0
    X = low_rank(12000, d=256)
    assert 0 < FlatNeighbors().fit(X).n_bound_components_ <= 64
    # The estimate itself: a flat spectrum costs many times brute force, a
    # steep one far less, and more rows cost less (a tighter k-th best).
    dims = [8, 16, 32]

    def costs(X):
        mean = X.mean(axis=0, dtype=np.float64)
        axes = np.linalg.eigh(np.cov(X.T))[1][:, ::-1][:, :32]
        return _pca_bound.bound_costs(axes, mean, X[128:], X[:128], dims, len(X), True)

    assert min(costs(power_law(3000, 128, alpha=0.0))) > 2
    assert min(costs(X)) < 0.6
    assert min(costs(X)) < min(costs(X[:5000]))


def test_duplicates_and_ties():
    X = np.repeat(low_rank(1000), 5, axis=0)
    index = FlatNeighbors(n_neighbors=12, algorithm="pca_bound").fit(X)
    brute = FlatNeighbors(n_neighbors=12, algorithm="brute").fit(X)
    assert_same(index.kneighbors(X[:200]), brute.kneighbors(X[:200]), X, X[:200])


def test_add_and_remove_keep_the_bound_exact():
    X = low_rank(6000)
    index = FlatNeighbors(n_neighbors=8, algorithm="pca_bound").fit(X[:5000])
    brute = FlatNeighbors(n_neighbors=8, algorithm="brute").fit(X[:5000])
    # Added vectors far from the fitted axes: the bound stays valid.
    far = 3 * low_rank(1000, seed=5)
    for est in (index, brute):
        est.add(np.vstack([X[5000:5500], far[:500]]))
        est.remove(np.arange(0, 5000, 3))
    assert index.n_bound_components_ > 0
    Q = np.vstack([X[5500:], far[500:600]])
    # Ids are rows of X[:5500] + far[:500], less those removed.
    kept = np.setdiff1d(np.arange(6000), np.arange(0, 5000, 3))
    vectors = np.vstack([X[:5500], far[:500]])[kept]
    assert_same(index.kneighbors(Q), brute.kneighbors(Q), vectors, Q, ids=kept)


@pytest.mark.parametrize("mmap_mode", [None, "r"])
def test_persistence_keeps_the_bound(tmp_path, mmap_mode):
    X = low_rank(5000)
    index = FlatNeighbors(n_neighbors=5, algorithm="pca_bound").fit(X)
    path = tmp_path / "flat.joblib"
    save(index, path)
    loaded = load(path, mmap_mode=mmap_mode)
    assert loaded.n_bound_components_ == index.n_bound_components_ > 0
    got, want = loaded.kneighbors(X[:50]), index.kneighbors(X[:50])
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_state_without_bound_loads_as_brute_force():
    """Files written before the bound existed (data layout 1) search by brute
    force; a state of layout 2 or later without it is corrupted."""
    index = FlatNeighbors(n_neighbors=3, algorithm="pca_bound").fit(low_rank(5000))
    state = index.__getstate__()
    assert state["_annlearn_format"] == FORMAT_VERSION
    store = state["_store"]
    state["_store"] = {k: store[k] for k in ("vectors", "sqnorms", "ids")}
    state.pop("n_bound_components_")
    with pytest.raises(ValueError, match="Corrupted FlatNeighbors state"):
        FlatNeighbors.__new__(FlatNeighbors).__setstate__(dict(state))
    state["_annlearn_format"] = 1
    old = FlatNeighbors.__new__(FlatNeighbors)
    old.__setstate__(state)
    assert old.n_bound_components_ == 0
    Q = low_rank(10, seed=3)
    assert_same(index.kneighbors(Q), old.kneighbors(Q), low_rank(5000), Q)


def test_corrupted_bound_is_rejected():
    index = FlatNeighbors(algorithm="pca_bound").fit(low_rank(5000))
    state = index.__getstate__()
    bound = dict(state["_store"]["bound"])
    bound["vectors"] = bound["vectors"][:, :-1]
    state["_store"] = {**state["_store"], "bound": bound}
    with pytest.raises(
        ValueError, match="Corrupted FlatNeighbors state: bound vectors"
    ):
        FlatNeighbors.__new__(FlatNeighbors).__setstate__(state)


@pytest.mark.parametrize("bad", ["not a dict", {"mean": None}])
def test_malformed_bound_is_rejected(bad):
    state = FlatNeighbors(algorithm="pca_bound").fit(low_rank(5000)).__getstate__()
    state["_store"] = {**state["_store"], "bound": bad}
    with pytest.raises(ValueError, match="Corrupted FlatNeighbors state: bound"):
        FlatNeighbors.__new__(FlatNeighbors).__setstate__(state)


def test_bound_in_tiny_row_blocks_is_the_same(monkeypatch):
    """The projections are computed ``_BLOCK_ROWS`` rows at a time: in blocks
    of 7 rows (fit, add and queries) they equal those of one block to float32
    rounding, and the search still returns brute force's neighbours."""
    from annlearn import _pca_bound

    X, Q = low_rank(6000), low_rank(200, seed=1)
    monkeypatch.setattr(_pca_bound, "_CANDIDATE_DIMS", (24,))

    def fitted():
        index = FlatNeighbors(n_neighbors=10, algorithm="pca_bound").fit(X[:5000])
        return index.add(X[5000:])

    whole = fitted()
    monkeypatch.setattr(_pca_bound, "_BLOCK_ROWS", 7)
    blocked = fitted()
    a, b = whole._store.bound, blocked._store.bound
    np.testing.assert_allclose(
        b["sqnorms"], a["sqnorms"], rtol=1e-5, atol=1e-5 * a["sqnorms"].max()
    )
    head_a, head_b = a["vectors"][:, :-1], b["vectors"][:, :-1]
    np.testing.assert_allclose(
        head_b, head_a, rtol=1e-5, atol=1e-5 * np.abs(head_a).max()
    )
    # The last column, the rest's norm, is the root of a difference of float32
    # squared norms, which BLAS kernels of different block shapes round
    # differently: its square agrees to the slack the code adds (1e-6 of the
    # squared norms), not its root.
    np.testing.assert_allclose(
        b["vectors"][:, -1] ** 2,
        a["vectors"][:, -1] ** 2,
        rtol=0,
        atol=1e-6 * a["sqnorms"].max(),
    )
    got = _pca_bound.query_bounds(b, Q, True)
    monkeypatch.setattr(_pca_bound, "_BLOCK_ROWS", 16384)
    want = _pca_bound.query_bounds(b, Q, True)
    for j in (0, 3):
        np.testing.assert_allclose(
            got[j], want[j], rtol=1e-5, atol=1e-5 * np.abs(want[j]).max()
        )
    monkeypatch.setattr(_pca_bound, "_BLOCK_ROWS", 7)
    brute = FlatNeighbors(n_neighbors=10, algorithm="brute").fit(X)
    assert_same(blocked.kneighbors(Q), brute.kneighbors(Q), X, Q)


def test_bound_temporaries_take_one_row_block(monkeypatch):
    """Projecting n rows allocates the outputs plus the temporaries of one
    block of ``_BLOCK_ROWS`` rows, never n x d1 (numpy's allocations, which
    tracemalloc traces)."""
    import tracemalloc

    from annlearn import _pca_bound

    X = low_rank(20000)
    sq = np.einsum("ij,ij->i", X, X, dtype=np.float64).astype(np.float32)
    bound = _pca_bound.fit_bound(X[:5000], sq[:5000], force=True)
    d1 = bound["rotation"].shape[1]
    monkeypatch.setattr(_pca_bound, "_BLOCK_ROWS", 1000, raising=False)
    temporaries = 1000 * d1 * (4 + 8) + 256 * 1024
    tracemalloc.start()
    try:
        for project in (
            lambda: _pca_bound.database_bounds(bound, X, sq),
            lambda: _pca_bound.extend(bound, X, sq),
            lambda: _pca_bound.query_bounds(bound, X, True),
        ):
            start = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            out = project()
            peak = tracemalloc.get_traced_memory()[1] - start
            arrays = out.values() if isinstance(out, dict) else out
            new = [a for a in arrays if isinstance(a, np.ndarray)]
            new = [a for a in new if not any(a is b for b in bound.values())]
            assert peak < sum(a.nbytes for a in new) + temporaries
            del out, arrays, new
    finally:
        tracemalloc.stop()
