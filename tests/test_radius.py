"""radius_neighbors and radius_neighbors_graph of both estimators, against
scikit-learn's NearestNeighbors (exact) and against their own k-NN search."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.cluster import DBSCAN
from sklearn.exceptions import NotFittedError
from sklearn.neighbors import NearestNeighbors

from annlearn import FlatNeighbors, IVFPQNeighbors


def _clustered(n=3000, d=24, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((10, d)) * 3
    return (centres[rng.integers(0, 10, n)] + rng.standard_normal((n, d))).astype(
        np.float32
    )


def _anisotropic(n=3000, d=48, seed=1):
    rng = np.random.default_rng(seed)
    scales = np.geomspace(10, 0.01, d)
    return (rng.standard_normal((n, d)) * scales + 5).astype(np.float32)


def _reference(X, Q, radius, metric):
    """Exact (distances, ids) per query in float64, self included."""
    X64, Q64 = X.astype(np.float64), Q.astype(np.float64)
    if metric == "inner_product":
        D = -(Q64 @ X64.T)
        ids = [np.flatnonzero(row <= radius) for row in D]
        return [D[i, row] for i, row in enumerate(ids)], ids
    nn = NearestNeighbors(metric=metric, algorithm="brute").fit(X64)
    return nn.radius_neighbors(Q64, radius, sort_results=True)


def _radius_for(X, Q, metric, k=20):
    """A radius holding about k neighbours per query."""
    d, _ = FlatNeighbors(metric=metric, algorithm="brute").fit(X).kneighbors(Q, k)
    return float(np.median(d[:, -1]))


@pytest.mark.parametrize("make", [_clustered, _anisotropic])
@pytest.mark.parametrize("algorithm", ["brute", "pca_bound"])
@pytest.mark.parametrize(
    "metric", ["euclidean", "sqeuclidean", "cosine", "inner_product"]
)
def test_flat_radius_is_exact(make, algorithm, metric):
    X = make()
    Q = X[:40] + 0.05
    radius = _radius_for(X, Q, metric)
    index = FlatNeighbors(metric=metric, algorithm=algorithm, n_jobs=2).fit(X)
    dist, ind = index.radius_neighbors(Q, radius, sort_results=True)
    ref_dist, ref_ind = _reference(X, Q, radius, metric)
    assert dist.dtype == object and ind.shape == (40,)
    total = 0
    for d, i, rd, ri in zip(dist, ind, ref_dist, ref_ind, strict=True):
        # Rows at the radius itself may fall either side by float rounding.
        sure = ri[np.abs(rd - radius) > 1e-5 * (1 + abs(radius))]
        assert set(sure) <= set(i) <= set(ri) | set(i[np.abs(d - radius) <= 1e-4])
        assert np.all(np.diff(d) >= 0) and np.all(d <= radius * (1 + 1e-6) + 1e-6)
        common, a, b = np.intersect1d(i, ri, return_indices=True)
        assert_allclose(d[a], rd[b], rtol=1e-5, atol=1e-5)
        total += len(i)
    assert total > 40 * 5  # the radius finds more than the query itself


def test_radius_with_ids_unsorted_and_without_distances():
    X = _clustered()
    ids = np.arange(len(X)) * 7 + 3
    index = FlatNeighbors().fit(X, ids=ids)
    radius = _radius_for(X, X[:10], "euclidean")
    dist, ind = index.radius_neighbors(X[:10], radius)
    only = index.radius_neighbors(X[:10], radius, return_distance=False)
    _, ref = _reference(X, X[:10], radius, "euclidean")
    for i, o, r in zip(ind, only, ref, strict=True):
        assert_array_equal(np.sort(i), np.sort(ids[r]))
        assert_array_equal(i, o)
    with pytest.raises(ValueError, match="return_distance must be True"):
        index.radius_neighbors(X[:2], radius, return_distance=False, sort_results=True)
    # The estimator's radius is the default.
    default = FlatNeighbors(radius=radius).fit(X, ids=ids).radius_neighbors(X[:10])
    for a, b in zip(default[1], ind, strict=True):
        assert_array_equal(a, b)


@pytest.mark.parametrize("Estimator", [FlatNeighbors, IVFPQNeighbors])
def test_radius_of_the_indexed_vectors_excludes_each_itself(Estimator):
    X = _clustered(1200, 16)
    X[5] = X[4]  # a duplicate: at distance 0 from its twin, which stays
    params = dict(nlist=8, nprobe=8, refine_factor=2, random_state=0)
    index = Estimator(**(params if Estimator is IVFPQNeighbors else {})).fit(X)
    radius = _radius_for(X, X[:50], "euclidean")
    dist, ind = index.radius_neighbors(radius=radius, sort_results=True)
    ref_dist, ref_ind = _reference(X, X, radius, "euclidean")
    assert len(ind) == len(X)
    for q, (i, ri) in enumerate(zip(ind, ref_ind, strict=True)):
        assert q not in i
        assert set(i) == set(ri) - {q}
    assert 5 in ind[4] and dist[4][0] == 0
    graph = index.radius_neighbors_graph(radius=radius, mode="distance")
    ref = NearestNeighbors(radius=radius).fit(X).radius_neighbors_graph(mode="distance")
    assert graph.shape == ref.shape and (graph != 0).nnz == (ref != 0).nnz
    assert_allclose(graph.toarray(), ref.toarray(), atol=1e-4)


def test_radius_graph_feeds_dbscan():
    X = _clustered(1500, 8)
    eps = _radius_for(X, X[:100], "euclidean", k=10)
    graph = (
        FlatNeighbors(n_jobs=2).fit(X).radius_neighbors_graph(X, eps, mode="distance")
    )
    ours = DBSCAN(eps=eps, min_samples=5, metric="precomputed").fit(graph)
    theirs = DBSCAN(eps=eps, min_samples=5).fit(X.astype(np.float64))
    assert len(set(theirs.labels_)) > 2
    assert_array_equal(ours.labels_, theirs.labels_)


def test_radius_graph_connectivity_and_columns():
    X = _clustered(500, 8)
    ids = np.arange(500) * 2
    index = FlatNeighbors().fit(X, ids=ids)
    radius = _radius_for(X, X[:20], "euclidean")
    graph = index.radius_neighbors_graph(X[:20], radius)
    assert graph.shape == (20, 999) and set(np.unique(graph.data)) == {1.0}
    _, ind = index.radius_neighbors(X[:20], radius)
    for q in range(20):
        assert_array_equal(graph[q].indices, np.sort(ind[q]))


def test_ivfpq_radius_with_stored_vectors_is_exact_over_the_probed_cells():
    X = _clustered()
    Q = X[:30] + 0.05
    radius = _radius_for(X, Q, "euclidean")
    full = IVFPQNeighbors(
        nlist=16, nprobe=16, refine_factor=1, n_subquantizers=6, random_state=0
    ).fit(X)
    dist, ind = full.radius_neighbors(Q, radius, sort_results=True)
    ref_dist, ref_ind = _reference(X, Q, radius, "euclidean")
    for d, i, rd, ri in zip(dist, ind, ref_dist, ref_ind, strict=True):
        assert set(i) == set(ri)
        assert_allclose(d, rd, rtol=1e-4, atol=1e-4)
    # Fewer cells: a subset, and exactly the reference rows of those cells.
    few = full.set_params(nprobe=2).radius_neighbors(Q, radius)[1]
    for f, i in zip(few, ind, strict=True):
        assert set(f) <= set(i)
    assert sum(map(len, few)) < sum(map(len, ind))


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "inner_product"])
def test_ivfpq_radius_by_codes_matches_its_own_distances(metric):
    """Without stored vectors the radius applies to the code distances that
    kneighbors ranks by: the same rows, and more cells give a superset."""
    X = _clustered(2000, 16)
    Q = X[:20] + 0.05
    index = IVFPQNeighbors(
        metric=metric,
        nlist=8,
        nprobe=3,
        n_subquantizers=4,
        nbits=6,
        refine_factor=None,
        random_state=0,
    ).fit(X)
    kd, ki = index.kneighbors(Q, 15)
    radius = float(np.median(kd[:, 9]))
    dist, ind = index.radius_neighbors(Q, radius, sort_results=True)
    for q in range(20):
        within = ki[q][kd[q] <= radius - 1e-5 * (1 + abs(radius))]
        assert set(within) <= set(ind[q])
        assert np.all(dist[q] <= radius + 1e-5 * (1 + abs(radius)))
        n = min(len(ind[q]), 15)
        assert_allclose(dist[q][:n], kd[q][:n], rtol=1e-5, atol=1e-5)
    more = index.set_params(nprobe=8).radius_neighbors(Q, radius)[1]
    assert all(set(a) <= set(b) for a, b in zip(ind, more, strict=True))


@pytest.mark.parametrize("Estimator", [FlatNeighbors, IVFPQNeighbors])
def test_radius_after_add_and_remove(Estimator):
    X = _clustered(1200, 16)
    params = dict(nlist=4, nprobe=4, refine_factor=2, random_state=0)
    index = Estimator(**(params if Estimator is IVFPQNeighbors else {})).fit(X[:1000])
    index.add(X[1000:], ids=np.arange(1000, 1200))
    index.remove(np.arange(0, 1200, 3))
    radius = _radius_for(X, X[:10], "euclidean")
    _, ind = index.radius_neighbors(X[:10], radius)
    kept = np.setdiff1d(np.arange(1200), np.arange(0, 1200, 3))
    _, ref = _reference(X[kept], X[:10], radius, "euclidean")
    for i, r in zip(ind, ref, strict=True):
        assert set(i) == set(kept[r])


def test_radius_threads_and_blocks_agree():
    X = _anisotropic(5000, 40)
    radius = _radius_for(X, X[:60], "euclidean")
    one = FlatNeighbors(n_jobs=1).fit(X).radius_neighbors(X[:300], radius)
    two = FlatNeighbors(n_jobs=2).fit(X).radius_neighbors(X[:300], radius)
    for a, b in zip(one[1], two[1], strict=True):
        assert_array_equal(np.sort(a), np.sort(b))


@pytest.mark.parametrize("Estimator", [FlatNeighbors, IVFPQNeighbors])
@pytest.mark.parametrize(
    "radius, match",
    [
        (np.nan, "finite radius"),
        (np.inf, "finite radius"),
        (-0.5, "radius >= 0 for metric 'euclidean'"),
        ("1", "real number"),
        (True, "real number"),
    ],
)
def test_bad_radius(Estimator, radius, match):
    X = _clustered(600, 8)
    params = dict(nlist=4, nbits=4, random_state=0)
    index = Estimator(**(params if Estimator is IVFPQNeighbors else {})).fit(X)
    with pytest.raises(ValueError, match=match):
        index.radius_neighbors(X[:2], radius)
    with pytest.raises(ValueError, match=match):
        index.radius_neighbors_graph(X[:2], radius)


def test_radius_edge_cases():
    X = _clustered(600, 8)
    X[1] = X[0]
    index = FlatNeighbors().fit(X)
    # radius 0: the exact duplicates only.
    _, ind = index.radius_neighbors(X[:2], 0.0)
    assert set(ind[0]) == {0, 1} == set(ind[1])
    # A negative radius is an inner product threshold for "inner_product".
    ip = FlatNeighbors(metric="inner_product").fit(X)
    dist, ind = ip.radius_neighbors(X[:3], -5.0)
    assert all(np.all(d <= -5.0) for d in dist)
    # No neighbour at all: empty arrays, right dtypes.
    dist, ind = index.radius_neighbors(X[:2] + 1e4, 1.0)
    assert ind[0].dtype == np.int64 and dist[0].dtype == np.float32
    assert len(ind[0]) == len(dist[1]) == 0
    with pytest.raises(ValueError, match="features"):
        index.radius_neighbors(X[:2, :4], 1.0)
    with pytest.raises(ValueError, match="Unsupported mode"):
        index.radius_neighbors_graph(X[:2], 1.0, mode="weights")
    with pytest.raises(NotFittedError):
        FlatNeighbors().radius_neighbors(X[:2], 1.0)
    with pytest.raises(ValueError, match="radius"):
        FlatNeighbors(radius=np.nan).fit(X)


def test_equal_numbers_of_neighbours_still_give_one_array_per_query():
    X = np.repeat(np.eye(3, dtype=np.float32), 2, axis=0)  # three pairs
    dist, ind = FlatNeighbors().fit(X).radius_neighbors(X[::2], 0.5)
    assert dist.shape == ind.shape == (3,) and ind.dtype == object
    for q, i in enumerate(ind):
        assert_array_equal(np.sort(i), [2 * q, 2 * q + 1])
