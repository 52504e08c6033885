import numpy as np
import pytest
from scipy.spatial.distance import cdist

from annlearn._testing import (
    assert_knn_quasi_equal,
    float32_knn_tolerance,
    float64_distances,
)

METRICS = ["euclidean", "sqeuclidean", "cosine", "inner_product"]


def _knn(D, k):
    ind = np.argsort(D, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, ind, axis=1), ind


def test_quasi_equal_accepts_tie_swaps():
    d = np.array([[0.0, 1.0, 1.0, 2.0]])
    assert_knn_quasi_equal(d, [[5, 7, 3, 9]], d, [[5, 3, 7, 9]])
    # A near-tie at the k-th rank may be cut differently.
    assert_knn_quasi_equal(d, [[5, 7, 3, 9]], d + [[0, 0, 0, 1e-7]], [[5, 7, 3, 4]])
    # So may a tie with the k-th distance at an earlier rank.
    d = np.array([[0.0, 2.0, 2.0]])
    assert_knn_quasi_equal(d, [[5, 7, 8]], d, [[5, 3, 7]], exact_dist=d)


def test_quasi_equal_rejects_real_differences():
    d = np.array([[0.0, 1.0, 2.0, 3.0]])
    with pytest.raises(AssertionError, match="not tied"):
        assert_knn_quasi_equal(d, [[5, 7, 3, 9]], d, [[5, 3, 7, 9]])
    with pytest.raises(AssertionError, match="distance of rank 0"):
        assert_knn_quasi_equal(d + 0.5, [[5, 7, 3, 9]], d, [[5, 7, 3, 9]])


def test_quasi_equal_rejects_a_wrong_id_outside_ties():
    d = np.array([[0.0, 1.0, 2.0, 3.0]])
    # Id 8 instead of 7, at 7's distance: 8 is not tied with the k-th.
    with pytest.raises(AssertionError, match="id 8 .* not in the reference"):
        assert_knn_quasi_equal(d, [[5, 8, 3, 9]], d, [[5, 7, 3, 9]])
    # Shifted by one rank (the nearest id missing), with the distances of
    # the ids returned or with the expected ones.
    with pytest.raises(AssertionError, match="distance of rank 0 is 1.0"):
        assert_knn_quasi_equal(d + 1, [[7, 3, 9, 4]], d, [[5, 7, 3, 9]])
    with pytest.raises(AssertionError, match="id 7 is at distance 0.0"):
        assert_knn_quasi_equal(d, [[7, 3, 9, 4]], d, [[5, 7, 3, 9]])
    # Id 8 in place of the k-th, claiming the k-th distance: accepted on its
    # word, rejected once its exact distance is known.
    assert_knn_quasi_equal(d, [[5, 7, 3, 8]], d, [[5, 7, 3, 9]])
    exact = d + [[0, 0, 0, 1]]
    with pytest.raises(AssertionError, match="id 8 .* exact distance is 4"):
        assert_knn_quasi_equal(d, [[5, 7, 3, 8]], d, [[5, 7, 3, 9]], exact_dist=exact)
    # Loose tolerances on the first ranks hide a missing id from the
    # rank-by-rank check, not from the id sets.
    d, loose = np.array([[0.0, 1.0, 2.0]]), np.array([[1.5, 1.5, 0.1]])
    with pytest.raises(AssertionError, match="id 5 .* is missing"):
        assert_knn_quasi_equal(
            [[1.0, 2.0, 2.0]], [[7, 3, 8]], d, [[5, 7, 3]], rtol=0, atol=loose
        )


def test_quasi_equal_rejects_malformed_results():
    d = np.array([[0.0, 1.0, 2.0]])
    with pytest.raises(AssertionError, match="not distinct"):
        assert_knn_quasi_equal(d, [[5, 5, 3]], d, [[5, 7, 3]])
    with pytest.raises(AssertionError, match="not sorted"):
        assert_knn_quasi_equal(d[:, ::-1], [[3, 7, 5]], d, [[5, 7, 3]])
    with pytest.raises(AssertionError, match="Shapes differ"):
        assert_knn_quasi_equal(d[:, :2], [[5, 7]], d, [[5, 7, 3]])


def test_tolerance_rejects_a_cosine_distance_off_by_a_tenth():
    # The case of the "Trust" issue: |x| <= 100, 20 features. The former
    # property test allowed 1e-5 * d * max|x|^2 = 2.0 on a distance in [0, 2].
    rng = np.random.default_rng(0)
    X = rng.uniform(-100, 100, (60, 20)).astype(np.float32)
    Q = rng.uniform(-100, 100, (5, 20)).astype(np.float32)
    ref_dist, ref_ind = _knn(float64_distances(X, Q, "cosine"), 10)
    tol = float32_knn_tolerance(X, Q, "cosine", ref_dist)
    assert np.all(tol < 1e-5)
    wrong = ref_dist + 0.1
    assert_knn_quasi_equal(wrong, ref_ind, ref_dist, ref_ind, rtol=1e-4, atol=2.0)
    with pytest.raises(AssertionError, match="distance of rank 0"):
        assert_knn_quasi_equal(wrong, ref_ind, ref_dist, ref_ind, rtol=0, atol=tol)


@pytest.mark.parametrize("metric", METRICS)
def test_tolerance_covers_float32_rounding(metric):
    """Scores computed in float32 the way the index ranks by stay within half
    the tolerance (one score's error) of their float64 values."""
    rng = np.random.default_rng(1)
    X = (rng.standard_normal((300, 50)) + 20).astype(np.float32)
    Q = np.vstack([X[:5], (3 * rng.standard_normal((5, 50))).astype(np.float32)])
    D = float64_distances(X, Q, metric)
    tol = float32_knn_tolerance(X, Q, metric, D)
    if metric == "cosine":
        X = X / np.linalg.norm(X.astype(np.float64), axis=1, keepdims=True)
        Q = Q / np.linalg.norm(Q.astype(np.float64), axis=1, keepdims=True)
        X, Q = X.astype(np.float32), Q.astype(np.float32)
    dots = Q @ X.T  # float32
    if metric in ("cosine", "inner_product"):
        got = np.float32(1) - dots if metric == "cosine" else -dots
    else:
        sq = (np.einsum("ij,ij->i", X, X) - 2 * dots) + np.einsum("ij,ij->i", Q, Q)[
            :, None
        ]
        got = np.sqrt(np.maximum(sq, 0)) if metric == "euclidean" else sq
    err = np.abs(got.astype(np.float64) - D)
    assert np.all(err <= tol / 2)
    # ... and it is not vacuous: the largest error reaches 5-25% of it here.
    assert np.max(err / (tol / 2)) > 0.02


def test_tolerance_of_euclidean_near_zero():
    """A vector equal to the query may come out at sqrt(T), not 0."""
    X = np.array([[3.0, 4.0], [6.0, 8.0]], dtype=np.float32)
    ref = np.array([[0.0, 5.0]])
    sq = float32_knn_tolerance(X, X[:1], "sqeuclidean", ref**2)
    eu = float32_knn_tolerance(X, X[:1], "euclidean", ref)
    assert eu[0, 0] == pytest.approx(np.sqrt(sq[0, 0]))
    assert eu[0, 1] == pytest.approx(5 - np.sqrt(25 - sq[0, 1]))
    # Two float32 results compared with each other: the errors add up.
    both = float32_knn_tolerance(X, X[:1], "sqeuclidean", ref**2, n_float32=2)
    np.testing.assert_allclose(both, 2 * sq)


@pytest.mark.parametrize("metric", METRICS)
def test_float64_distances_match_scipy(metric):
    rng = np.random.default_rng(2)
    X = rng.standard_normal((30, 7)).astype(np.float32)
    Q = np.vstack([X[:3], rng.standard_normal((4, 7))]).astype(np.float32)
    got = float64_distances(X, Q, metric)
    if metric == "inner_product":
        want = -(Q.astype(np.float64) @ X.astype(np.float64).T)
    else:
        want = cdist(Q.astype(np.float64), X.astype(np.float64), metric)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-6)
    # A zero row is at cosine distance 1, as in FlatNeighbors.
    X[0] = 0
    np.testing.assert_array_equal(float64_distances(X, Q, "cosine")[:, 0], 1.0)
