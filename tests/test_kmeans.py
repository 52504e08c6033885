import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from annlearn._clustering import train_kmeans
from annlearn._kmeans import centre_sums


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


def test_train_kmeans_matches_sklearn_lloyd():
    X, _ = make_blobs(2000, n_features=8, centers=10, random_state=0)
    X = X.astype(np.float32)
    centers, inertia, _ = train_kmeans(X, 10, random_state=0, max_iter=100, tol=0)
    # Same initial centres as train_kmeans draws (sorted distinct rows).
    init = X[np.sort(np.random.RandomState(0).choice(2000, 10, replace=False))]
    ref = KMeans(10, init=init, n_init=1, max_iter=100, tol=0).fit(X)
    np.testing.assert_allclose(inertia, ref.inertia_, rtol=1e-4)
    np.testing.assert_allclose(
        np.sort(centers, axis=0), np.sort(ref.cluster_centers_, axis=0), atol=1e-3
    )


def test_train_kmeans_splits_empty_clusters():
    # Many identical points and a few distinct ones: naive Lloyd would leave
    # clusters empty; every centre must end up with points.
    rng = np.random.default_rng(0)
    X = np.vstack([np.zeros((300, 4)), rng.standard_normal((30, 4)) * 10])
    X = X.astype(np.float32)
    centers, _, _ = train_kmeans(X, 20, random_state=0, max_iter=30)
    assert np.all(np.isfinite(centers))
    assert len(np.unique(centers.round(6), axis=0)) > 10


def test_train_kmeans_too_many_clusters():
    X = np.zeros((5, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="n_clusters = 6, n_samples = 5"):
        train_kmeans(X, 6)


def test_train_kmeans_verbose(capsys):
    X, _ = make_blobs(300, n_features=4, centers=3, random_state=0)
    train_kmeans(X.astype(np.float32), 3, random_state=0, verbose=1, name="coarse")
    assert "[coarse] iteration 1: inertia" in capsys.readouterr().out
