import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.cluster._kmeans import _tolerance as sklearn_tolerance
from sklearn.datasets import make_blobs

from annlearn import _clustering
from annlearn._clustering import _initial_centers, _tolerance, train_kmeans
from annlearn._kmeans import centre_sums


def _blobs(n_samples=2000, n_features=8, centers=10, cluster_std=1.0, seed=0):
    X, _ = make_blobs(
        n_samples,
        n_features=n_features,
        centers=centers,
        cluster_std=cluster_std,
        random_state=seed,
    )
    return X.astype(np.float32)


def _sklearn_from_same_start(X, n_clusters, seed, **params):
    """scikit-learn's Lloyd from the initial rows train_kmeans draws."""
    init = _initial_centers(X, n_clusters, np.random.RandomState(seed))
    return KMeans(n_clusters, init=init, n_init=1, algorithm="lloyd", **params).fit(X)


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_centre_sums_matches_numpy(n_threads):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 7)).astype(np.float32)
    labels = rng.integers(0, 11, size=500).astype(np.int64)
    sums, counts = centre_sums(X, labels, 11, n_threads)
    for c in range(11):
        np.testing.assert_allclose(sums[c], X[labels == c].sum(axis=0), rtol=1e-5)
        assert counts[c] == np.sum(labels == c)


def test_centre_sums_rejects_bad_labels():
    X = np.zeros((3, 2), dtype=np.float32)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        centre_sums(X, np.array([0, 1, 2], dtype=np.int64), 2, 1)


@pytest.mark.parametrize("tol", [0.0, 1e-4, 1e-2])
@pytest.mark.parametrize(
    "X",
    [
        _blobs(n_features=50),
        # A large offset: the variance must be taken around the mean.
        np.random.default_rng(0).standard_normal((9000, 5)).astype(np.float32) + 1e3,
        # More rows than one block of the variance computation.
        np.random.default_rng(1).random((10_000, 3), dtype=np.float32),
    ],
    ids=["blobs-50d", "offset", "several-blocks"],
)
def test_tolerance_is_sklearn_rule(X, tol):
    # The mean of the per-feature variances times tol; the sum (the old rule)
    # is n_features times larger.
    expected = sklearn_tolerance(X.astype(np.float64), tol)
    np.testing.assert_allclose(_tolerance(X, tol), expected, rtol=1e-5)


@pytest.mark.parametrize("cluster_std, seed", [(3.0, 0), (3.0, 1), (5.0, 0), (5.0, 1)])
def test_stops_at_the_same_iteration_as_sklearn(cluster_std, seed):
    # Overlapping 40-d blobs converge slowly; with a tolerance summed over
    # features (40 times looser) training stopped 1 to 4 iterations earlier.
    X = _blobs(3000, n_features=40, centers=15, cluster_std=cluster_std, seed=seed)
    _, inertia, n_iter = train_kmeans(X, 15, max_iter=300, tol=1e-4, random_state=seed)
    ref = _sklearn_from_same_start(X, 15, seed, max_iter=300, tol=1e-4)
    assert 1 < n_iter < 300
    assert n_iter == ref.n_iter_
    np.testing.assert_allclose(inertia, ref.inertia_, rtol=1e-4)


def test_train_kmeans_matches_sklearn_lloyd():
    X = _blobs()
    centers, inertia, _ = train_kmeans(X, 10, random_state=0, max_iter=100, tol=0)
    ref = _sklearn_from_same_start(X, 10, 0, max_iter=100, tol=0)
    np.testing.assert_allclose(inertia, ref.inertia_, rtol=1e-4)
    np.testing.assert_allclose(
        np.sort(centers, axis=0), np.sort(ref.cluster_centers_, axis=0), atol=1e-3
    )


def test_inertia_close_to_sklearn_with_empty_clusters():
    # Many repeated rows: some initial centres coincide, their clusters are
    # left empty, and each is given a point worst served by its centre.
    rng = np.random.default_rng(0)
    repeated = rng.standard_normal((20, 6))[rng.integers(0, 20, size=1500)]
    X = np.vstack([repeated, rng.standard_normal((500, 6)) * 3]).astype(np.float32)
    centers, _, _ = train_kmeans(X, 64, random_state=0, max_iter=50)
    ref = _sklearn_from_same_start(X, 64, 0, max_iter=50)
    inertia = np.sum(np.min(((X[:, None] - centers[None]) ** 2).sum(-1), axis=1))
    np.testing.assert_allclose(inertia, ref.inertia_, rtol=1e-3)


def test_every_centre_keeps_points_when_there_are_enough_distinct_rows():
    rng = np.random.default_rng(0)
    X = np.vstack([np.zeros((300, 4)), rng.standard_normal((30, 4)) * 10])
    X = X.astype(np.float32)
    centers, _, _ = train_kmeans(X, 20, random_state=0, max_iter=30)
    assert np.all(np.isfinite(centers))
    labels = np.argmin(((X[:, None] - centers[None]) ** 2).sum(-1), axis=1)
    assert len(np.unique(labels)) == 20


def test_only_duplicates_left_does_not_loop():
    # Fewer distinct rows than centres: the spare centres stay empty and
    # training still converges.
    X = np.repeat(np.eye(3, dtype=np.float32), 10, axis=0)
    centers, inertia, n_iter = train_kmeans(X, 5, random_state=0, max_iter=50)
    assert np.all(np.isfinite(centers))
    assert n_iter < 50
    assert inertia == 0


def test_train_kmeans_too_many_clusters():
    X = np.zeros((5, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="n_clusters = 6, n_samples = 5"):
        train_kmeans(X, 6)


def test_train_kmeans_verbose(capsys):
    X = _blobs(300, n_features=4, centers=3)
    train_kmeans(X, 3, random_state=0, verbose=1, name="coarse")
    assert "[coarse] iteration 1: inertia" in capsys.readouterr().out


def _low_rank(n, n_features=64, rank=6, seed=0):
    """Clustered rows whose variance sits in ``rank`` directions, plus a
    little isotropic noise: the spectrum the principal-component bound
    prunes well on."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((n_features, rank)))[0]
    centres = rng.standard_normal((40, rank)) * 10
    coords = centres[rng.integers(0, 40, n)] + rng.standard_normal((n, rank))
    noise = rng.standard_normal((n, n_features)) * 0.1
    return (coords @ basis.T + noise + 3.0).astype(np.float32)


def _assert_nearest(X, centers, distances, labels, rtol):
    """``labels`` are nearest centres in float64 (ties within ``rtol`` of
    the squared norms, the flat kernel's float32 rounding), ``distances``
    their squared distances."""
    X64, C64 = X.astype(np.float64), centers.astype(np.float64)
    x_sq, c_sq = (X64**2).sum(1), (C64**2).sum(1)
    exact = x_sq[:, None] - 2.0 * X64 @ C64.T + c_sq[None, :]
    scale = x_sq + c_sq.max()
    got = exact[np.arange(len(X)), labels]
    assert np.all(got - exact.min(axis=1) <= rtol * scale)
    np.testing.assert_allclose(distances, got, rtol=1e-4, atol=rtol * scale.max())


@pytest.mark.parametrize("n_threads", [1, 2])
def test_assignments_through_the_bound_are_nearest_centres(n_threads):
    # Forced on, every assignment is to a nearest centre (by float64
    # distances: the bound's survivors are scored exactly, brute force ranks
    # by the GEMM's ||x||^2 - 2<x, c> + ||c||^2, which rounds near ties), and
    # a training ends as close to brute force's as two Lloyd runs can.
    X = _low_rank(3000)
    centers = _initial_centers(X, 50, np.random.RandomState(1))
    nearest = _clustering._NearestCentre(X, 20, n_threads, True)
    for _ in range(4):
        distances, labels = nearest(centers)
        assert nearest.bound is not None
        _assert_nearest(X, centers, distances, labels, 1e-6)
        sums, counts = centre_sums(X, labels, 50, 1)
        centers = np.where(
            counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centers
        )
        centers = centers.astype(np.float32)
    kw = dict(max_iter=30, random_state=1, n_threads=n_threads)
    _, inertia0, _ = train_kmeans(X, 50, pca_bound=False, **kw)
    _, inertia1, _ = train_kmeans(X, 50, pca_bound=True, **kw)
    np.testing.assert_allclose(inertia1, inertia0, rtol=1e-3)


def test_bound_chosen_by_cost_from_the_second_assignment():
    # Low-rank rows: kept from the second assignment on; isotropic rows
    # (a flat spectrum): never; too few rows: never tried. 256 features: on
    # a few dozen, each pair's own cost leaves the bound little to save; 256
    # centres, as many as the coarse quantizer has by default.
    rng = np.random.default_rng(0)
    n = _clustering._MIN_BOUND_ROWS
    cases = [
        (_low_rank(n, 256), True),
        (rng.standard_normal((n, 256)).astype(np.float32), False),
        (_low_rank(n - 1, 256), False),
    ]
    for X, kept in cases:
        init = _initial_centers(X, 256, np.random.RandomState(0))
        nearest = _clustering._NearestCentre(X, 10, 1, None)
        labels = nearest(init)[1]
        assert nearest.bound is None
        sums, counts = centre_sums(X, labels, 256, 1)
        means = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        distances, labels = nearest(means)
        assert (nearest.bound is not None) == kept
        _assert_nearest(X[::8], means, distances[::8], labels[::8], 1e-6)
