"""FlatNeighbors against scikit-learn's brute force and its workflows."""

import pickle

import joblib
import numpy as np
import pytest
from sklearn.neighbors import (
    KNeighborsClassifier,
    KNeighborsRegressor,
    KNeighborsTransformer,
    NearestNeighbors,
)
from sklearn.pipeline import make_pipeline
from threadpoolctl import threadpool_limits

from annlearn import FlatNeighbors
from annlearn._testing import assert_knn_quasi_equal

SKLEARN_METRICS = ["euclidean", "sqeuclidean", "cosine"]


@pytest.fixture
def data():
    rng = np.random.default_rng(42)
    X = rng.standard_normal((400, 24))
    Q = rng.standard_normal((60, 24))
    return X, Q


def _inner_product_reference(X, Q, k):
    scores = Q.astype(np.float64) @ X.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return -np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("metric", SKLEARN_METRICS)
def test_kneighbors_matches_sklearn(data, metric):
    X, Q = data
    ours = FlatNeighbors(n_neighbors=8, metric=metric).fit(X)
    ref = NearestNeighbors(n_neighbors=8, metric=metric, algorithm="brute").fit(X)
    assert_knn_quasi_equal(*ours.kneighbors(Q), *ref.kneighbors(Q), rtol=1e-5)
    # X=None: each point without itself.
    assert_knn_quasi_equal(*ours.kneighbors(), *ref.kneighbors(), rtol=1e-5)
    dist, ind = ours.kneighbors(Q)
    assert dist.dtype == np.float32 and ind.dtype == np.int64
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_inner_product(data):
    X, Q = data
    ours = FlatNeighbors(n_neighbors=6, metric="inner_product").fit(X)
    dist, ind = ours.kneighbors(Q)
    ref_dist, ref_ind = _inner_product_reference(X, Q, 6)
    assert_knn_quasi_equal(dist, ind, ref_dist, ref_ind, rtol=1e-5, atol=1e-4)
    assert np.all(np.diff(dist, axis=1) >= 0)  # -<x, y>, increasing


def test_query_is_train_with_duplicates():
    X = np.repeat(np.arange(6, dtype=np.float64)[:, None], 3, axis=0)  # triplets
    X = np.hstack([X, np.zeros_like(X)])
    ours = FlatNeighbors(n_neighbors=2).fit(X)
    dist, ind = ours.kneighbors()
    # The two other copies of each point, at distance 0, never the point.
    assert np.all(ind != np.arange(len(X))[:, None])
    np.testing.assert_array_equal(dist, 0.0)
    assert np.all(ind // 3 == np.arange(len(X))[:, None] // 3)
    # More duplicates than neighbours: still k neighbours, self excluded.
    dist, ind = FlatNeighbors(n_neighbors=1).fit(X).kneighbors()
    assert np.all(ind != np.arange(len(X))[:, None])
    np.testing.assert_array_equal(dist, 0.0)


@pytest.mark.parametrize("mode", ["connectivity", "distance"])
@pytest.mark.parametrize("query", [True, False])
def test_kneighbors_graph_matches_sklearn(data, mode, query):
    X, Q = data
    Q = Q if query else None
    ours = FlatNeighbors(n_neighbors=5).fit(X).kneighbors_graph(Q, mode=mode)
    ref = NearestNeighbors(n_neighbors=5).fit(X).kneighbors_graph(Q, mode=mode)
    assert ours.format == "csr" and ours.shape == ref.shape
    np.testing.assert_array_equal(ours.indptr, ref.indptr)
    np.testing.assert_array_equal(ours.indices, ref.indices)
    np.testing.assert_allclose(ours.data, ref.data, rtol=1e-5)


@pytest.mark.parametrize("mode", ["connectivity", "distance"])
def test_transform_matches_kneighbors_transformer(data, mode):
    X, Q = data
    ours = FlatNeighbors(n_neighbors=5, mode=mode)
    ref = KNeighborsTransformer(n_neighbors=5, mode=mode)
    for a, b in [
        (ours.fit_transform(X), ref.fit_transform(X)),
        (ours.transform(Q), ref.transform(Q)),
    ]:
        np.testing.assert_array_equal(a.indptr, b.indptr)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_allclose(a.data, b.data, rtol=1e-5, atol=1e-6)
    # Self at distance 0 is stored explicitly, as KNeighborsTransformer does.
    if mode == "distance":
        assert ours.fit_transform(X).nnz == len(X) * 6


def test_pipeline_classifier_and_regressor_equal_brute(data):
    X, Q = data
    rng = np.random.default_rng(0)
    y_class = rng.integers(0, 3, len(X))
    y_reg = rng.standard_normal(len(X))
    k = 7
    clf = make_pipeline(
        FlatNeighbors(n_neighbors=k), KNeighborsClassifier(k, metric="precomputed")
    ).fit(X, y_class)
    ref = KNeighborsClassifier(k, algorithm="brute").fit(X, y_class)
    np.testing.assert_array_equal(clf.predict(Q), ref.predict(Q))
    np.testing.assert_allclose(clf.predict_proba(Q), ref.predict_proba(Q))
    reg = make_pipeline(
        FlatNeighbors(n_neighbors=k), KNeighborsRegressor(k, metric="precomputed")
    ).fit(X, y_reg)
    ref = KNeighborsRegressor(k, algorithm="brute").fit(X, y_reg)
    np.testing.assert_allclose(reg.predict(Q), ref.predict(Q), rtol=1e-5)


def test_data_far_from_origin(data):
    X, Q = data
    shift = 1e6
    ours = FlatNeighbors(n_neighbors=5).fit(X + shift)
    assert ours._center is not None
    dist, ind = ours.kneighbors(Q + shift)
    # float32 keeps ~0.06 absolute resolution at 1e6: compare ids with the
    # unshifted float32-rounded data's neighbours, distances loosely.
    X32 = (X + shift).astype(np.float32).astype(np.float64)
    Q32 = (Q + shift).astype(np.float32).astype(np.float64)
    ref = NearestNeighbors(n_neighbors=5).fit(X32).kneighbors(Q32)
    assert_knn_quasi_equal(dist, ind, *ref, rtol=1e-4, atol=1e-3)


def test_float32_not_copied_and_conversions(data):
    X, _ = data
    X32 = np.ascontiguousarray(X, dtype=np.float32)
    for metric in ("euclidean", "sqeuclidean", "inner_product"):
        est = FlatNeighbors(metric=metric).fit(X32)
        assert np.shares_memory(est._store.vectors, X32)
    assert FlatNeighbors().fit(X)._store.vectors.dtype == np.float32
    ints = np.arange(40).reshape(20, 2)
    est = FlatNeighbors(n_neighbors=3).fit(ints)
    assert est._store.vectors.dtype == np.float32
    ind = est.kneighbors(ints[:1], return_distance=False)
    assert ind[0, 0] == 0


def test_results_do_not_depend_on_threads(data):
    X, Q = data
    base = FlatNeighbors(n_neighbors=5, n_jobs=1).fit(X).kneighbors(Q)
    for n_jobs in (2, -1, None):
        other = FlatNeighbors(n_neighbors=5, n_jobs=n_jobs).fit(X).kneighbors(Q)
        np.testing.assert_array_equal(base[1], other[1])
        np.testing.assert_allclose(base[0], other[0], rtol=1e-6)
    with threadpool_limits(1, user_api="openmp"):
        limited = FlatNeighbors(n_neighbors=5).fit(X).kneighbors(Q)
    np.testing.assert_array_equal(base[1], limited[1])


def test_pickle_and_readonly_memmap(data, tmp_path):
    X, Q = data
    est = FlatNeighbors(n_neighbors=4).fit(X)
    expected = est.kneighbors(Q)
    restored = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(restored.kneighbors(Q)[1], expected[1])
    path = tmp_path / "flat.joblib"
    joblib.dump(est, path)
    mapped = joblib.load(path, mmap_mode="r")
    assert isinstance(mapped._store.vectors, np.memmap)
    assert not mapped._store.vectors.flags.writeable
    np.testing.assert_array_equal(mapped.kneighbors(Q)[1], expected[1])
    np.testing.assert_allclose(mapped.kneighbors(Q)[0], expected[0])


def test_zero_vectors_with_cosine():
    X = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    dist = (
        FlatNeighbors(n_neighbors=3, metric="cosine").fit(X).kneighbors([[0.0, 0.0]])[0]
    )
    np.testing.assert_allclose(dist, 1.0)
