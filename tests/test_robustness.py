"""No silently wrong answer: inputs and call sequences that used to return
garbage, or break a fitted index, now give the right answer or a clear error
and leave the estimator as it was."""

import pickle
import threading
import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.model_selection import GridSearchCV

from annlearn import FlatNeighbors, IVFPQNeighbors, _base, _ivfpq
from annlearn._validation import MAX_ID


def small_ivfpq(**params):
    defaults = dict(
        nlist=8,
        nprobe=8,
        n_subquantizers=4,
        nbits=4,
        refine_factor=None,
        random_state=0,
    )
    return IVFPQNeighbors(**{**defaults, **params})


ESTIMATORS = [
    FlatNeighbors(n_neighbors=3),
    FlatNeighbors(n_neighbors=3, algorithm="pca_bound"),
    small_ivfpq(n_neighbors=3),
    small_ivfpq(n_neighbors=3, refine_factor=4),
]


@pytest.fixture
def X():
    rng = np.random.default_rng(0)
    return rng.standard_normal((600, 16)).astype(np.float32)


def _state(estimator) -> bytes:
    """Everything the estimator holds, to compare before and after a call."""
    state = {
        k: v
        for k, v in estimator.__dict__.items()
        if k not in ("_fit_source", "_exact_ref")
    }
    return pickle.dumps(state)


# -- values whose float32 squares overflow ----------------------------------
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
@pytest.mark.parametrize("scale", [1e19, 1e30])
def test_overflowing_values_are_refused(estimator, X, scale):
    with pytest.raises(ValueError, match="too large for float32 distances"):
        estimator.fit(X * scale)
    est = estimator.fit(X)
    before = _state(est)
    with pytest.raises(ValueError, match="too large for float32 distances"):
        est.kneighbors(X[:2] * scale)
    with pytest.raises(ValueError, match="too large for float32 distances"):
        est.add(X[:2] * scale)
    assert _state(est) == before


def test_large_but_safe_values_are_exact(X):
    # 1e17 * sqrt(16) is below the limit: computed, and right.
    est = FlatNeighbors(n_neighbors=3).fit(X * 1e17)
    assert_array_equal(
        est.kneighbors(X[:5] * 1e17)[1],
        FlatNeighbors(n_neighbors=3).fit(X).kneighbors(X[:5])[1],
    )


# scikit-learn's finiteness check sums X first, which overflows at 3e38.
@pytest.mark.filterwarnings("ignore:invalid value encountered in reduce")
@pytest.mark.parametrize("scale", [1e30, 3e38, 1e-40])
def test_cosine_accepts_any_finite_scale(X, scale):
    # 3e38: norms above float32's maximum; 1e-40: subnormal values and norms.
    scaled = (X / np.abs(X).max() * np.float32(scale)).astype(np.float32)
    assert np.isfinite(scaled).all()
    ref = FlatNeighbors(n_neighbors=3, metric="cosine").fit(X)
    d_ref, i_ref = ref.kneighbors(X[:5])
    for est in (
        FlatNeighbors(n_neighbors=3, metric="cosine"),
        small_ivfpq(n_neighbors=3, metric="cosine", refine_factor=8),
    ):
        d, i = est.fit(scaled).kneighbors(scaled[:5])
        tol = 1e-5 if scale > 1 else 2e-2  # subnormals keep few digits
        if scale > 1:
            assert_array_equal(i[:, 0], i_ref[:, 0])
        assert_allclose(d[:, 0], d_ref[:, 0], atol=tol)


@pytest.mark.parametrize("estimator", ESTIMATORS[:1] + ESTIMATORS[2:3], ids=repr)
def test_empty_kernel_slots_are_never_ids(estimator, X, monkeypatch):
    est = estimator.fit(X)
    search = type(est)._search

    def leaky(self, store, Xq, k):
        distances, positions = search(self, store, Xq, k)
        positions[0, -1] = -1  # a slot the kernel could not fill
        return distances, positions

    monkeypatch.setattr(type(est), "_search", leaky)
    with pytest.raises(RuntimeError, match="fewer finite candidates"):
        est.kneighbors(X[:3])


# -- cosine with zero vectors ------------------------------------------------
@pytest.mark.parametrize("refine_factor", [None, 4])
def test_ivfpq_cosine_zero_vectors_agree_with_flat(X, refine_factor):
    Xz = X.copy()
    Xz[::10] = 0.0  # 10% zero rows
    ann = small_ivfpq(n_neighbors=5, metric="cosine", refine_factor=refine_factor)
    ann.fit(Xz)
    exact = FlatNeighbors(n_neighbors=5, metric="cosine").fit(Xz)
    # A zero query is at distance 1 from everything; so is a zero row.
    d_zero, _ = ann.kneighbors(np.zeros((1, 16)))
    assert_allclose(d_zero, 1.0, atol=1e-6)
    assert_allclose(exact.kneighbors(np.zeros((1, 16)))[0], 1.0, atol=1e-6)
    d, ids = ann.kneighbors(X[1:40])
    zero_rows = np.flatnonzero(~Xz.any(axis=1))
    # Zero rows are at distance 1, behind the real neighbours (cos > 0).
    assert np.isin(ids, zero_rows).mean() < 0.02
    if refine_factor is not None:
        exact_d = 1 - np.einsum(
            "qd,qkd->qk",
            X[1:40] / np.linalg.norm(X[1:40], axis=1, keepdims=True),
            np.nan_to_num(Xz[ids] / np.linalg.norm(Xz[ids], axis=2, keepdims=True)),
        )
        assert_allclose(d, exact_d, atol=1e-5)
        assert ann.score(X[1:40]) > 0.7  # 0.0 when zero rows came first


def test_ivfpq_cosine_recall_without_zero_rows(X):
    # Scanning normalised rows by inner product keeps the recall of an L2
    # scan of the same rows (the same neighbours for unit vectors).
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    cosine = small_ivfpq(n_neighbors=5, metric="cosine", nprobe=2).fit(X)
    l2 = small_ivfpq(n_neighbors=5, nprobe=2).fit(unit)
    assert cosine.score(X[:200]) >= l2.score(unit[:200]) - 0.03


# -- a failed call changes nothing --------------------------------------------
@pytest.mark.parametrize(
    "params, fit_kwargs, message",
    [
        ({}, {"ids": -np.arange(600)}, "negative ids"),
        ({"nlist": 1000}, {}, "needs at least"),
        ({"n_subquantizers": 5}, {}, "must divide n_features"),
    ],
)
def test_failed_refit_keeps_the_fitted_index(X, params, fit_kwargs, message):
    est = small_ivfpq(n_neighbors=3).fit(X)
    expected = est.kneighbors(X[:5])
    before = _state(est)
    est.set_params(**params)
    with pytest.raises(ValueError, match=message):
        # Another width, so that a half-done fit would change n_features_in_.
        est.fit(np.hstack([X, X]), **fit_kwargs)
    est.set_params(n_subquantizers=4, nlist=8)
    assert _state(est) == before
    assert_array_equal(est.kneighbors(X[:5])[1], expected[1])


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_failure_late_in_fit_add_remove_rolls_back(estimator, X, monkeypatch):
    est = estimator.fit(X)
    expected = est.kneighbors(X[:5])
    before = _state(est)

    def broken(self, *args, **kwargs):
        raise MemoryError("simulated")

    # The very last step of every mutation: the new store is built.
    monkeypatch.setattr(type(est), "_set_store", broken)
    for call in (
        lambda: est.fit(X[:300] * 2),
        lambda: est.add(X[:10]),
        lambda: est.remove([1, 2]),
    ):
        with pytest.raises(MemoryError):
            call()
        assert _state(est) == before
    monkeypatch.undo()
    assert_array_equal(est.kneighbors(X[:5])[1], expected[1])


# -- the fitted metric is the searched metric --------------------------------
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_set_params_metric_after_fit_does_not_change_search(estimator, X):
    est = estimator.set_params(metric="euclidean").fit(X)
    expected = est.kneighbors(X[:5])
    for metric in ("cosine", "inner_product", "sqeuclidean"):
        est.set_params(metric=metric)
        d, i = est.kneighbors(X[:5])
        assert_array_equal(i, expected[1])
        assert_allclose(d, expected[0])
        assert est.effective_metric_ == "euclidean"
    est.fit(X)  # a refit uses the new metric
    assert est.effective_metric_ == "sqeuclidean"
    estimator.set_params(metric="euclidean")


def test_set_params_training_parameters_after_fit(X):
    est = small_ivfpq(n_neighbors=3, refine_factor=2).fit(X)
    expected = est.kneighbors(X[:5])
    est.set_params(nlist=4, by_residual=False, nbits=8, n_subquantizers=2)
    assert_array_equal(est.kneighbors(X[:5])[1], expected[1])
    est.add(X[:3] + 1)  # encoded with the fitted quantizers
    est.remove([600, 601, 602])
    assert_array_equal(est.kneighbors(X[:5])[1], expected[1])


# -- ids near the int64 maximum ----------------------------------------------
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_ids_near_int64_max(estimator, X):
    ids = np.arange(MAX_ID - 599, MAX_ID + 1, dtype=np.int64)
    est = estimator.fit(X, ids=ids)
    graph = est.kneighbors_graph(X[:3])
    assert graph.shape == (3, MAX_ID + 1)
    assert np.all(graph.indices >= ids[0])
    assert est.transform(X[:3]).shape == (3, MAX_ID + 1)
    assert est.kneighbors_graph().shape == (600, MAX_ID + 1)
    before = _state(est)
    with pytest.raises(ValueError, match="Cannot number 1 new vectors"):
        est.add(X[:1])
    with pytest.raises(ValueError, match="Expected ids <="):
        est.add(X[:1], ids=[MAX_ID + 1])
    with pytest.raises(ValueError, match="Expected ids <="):
        est.add(X[:1], ids=np.array([2**64 - 1], dtype=np.uint64))
    assert _state(est) == before
    est.add(X[:1], ids=[0])
    assert est.kneighbors(X[:1], n_neighbors=1)[1][0, 0] in (0, ids[0])


# -- score against an overwritten fit array ----------------------------------
def test_score_detects_an_overwritten_fit_array(X):
    data = X.copy()
    est = small_ivfpq(n_neighbors=5).fit(data)
    assert est.score(X[:50]) > 0.3
    data[:] = np.random.default_rng(1).standard_normal(data.shape)
    with pytest.raises(ValueError, match="modified since"):
        est.score(X[:50])


# -- a search racing a remove ---------------------------------------------------
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_search_sees_one_snapshot(estimator, X, monkeypatch):
    est = estimator.fit(X[:20])
    expected = est.kneighbors(X[:2], n_neighbors=20)
    prepare = type(est)._prepare_queries

    def remove_meanwhile(self, Xq):
        # Another thread removes vectors after the size check.
        if self.n_samples_fit_ == 20:
            self.remove(np.arange(10))
        return prepare(self, Xq)

    monkeypatch.setattr(type(est), "_prepare_queries", remove_meanwhile)
    d, i = est.kneighbors(X[:2], n_neighbors=20)  # the snapshot before remove
    assert_array_equal(i, expected[1])
    with pytest.raises(ValueError, match="n_neighbors = 20, n_samples_fit = 10"):
        est.kneighbors(X[:2], n_neighbors=20)


@pytest.mark.parametrize("estimator", ESTIMATORS[::2], ids=repr)
def test_concurrent_remove_gives_valid_answers_or_one_clear_error(estimator, X):
    est = estimator.fit(X[:40])
    errors, done = [], threading.Event()

    def search():
        while not done.is_set():
            try:
                _, ids = est.kneighbors(X[:4], n_neighbors=16)
                assert ids.min() >= 0 and len(np.unique(ids[0])) == 16
            except ValueError as exc:
                errors.append(str(exc))

    thread = threading.Thread(target=search)
    thread.start()
    try:
        for start in range(0, 30):
            est.remove([start])
    finally:
        done.set()
        thread.join()
    assert all("Expected n_neighbors <= n_samples_fit" in e for e in errors)


# -- memory: kneighbors() without X works a block at a time ------------------
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_self_query_in_blocks(estimator, X, monkeypatch):
    est = estimator.fit(X, ids=np.arange(600)[::-1] * 3)
    expected = est.kneighbors()
    radius = float(np.median(expected[0][:, 2]))
    expected_radius = est.radius_neighbors(radius=radius, sort_results=True)
    sizes = []
    indexed = type(est)._indexed_queries

    def spy(self, store, positions):
        sizes.append(len(positions))
        return indexed(self, store, positions)

    monkeypatch.setattr(_base.NeighborsBase, "_self_query_block", 64)
    monkeypatch.setattr(type(est), "_indexed_queries", spy)
    d, i = est.kneighbors()
    assert max(sizes) == 64 and sum(sizes) == 600
    assert_array_equal(i, expected[1])
    assert_allclose(d, expected[0])
    sizes.clear()
    d, i = est.radius_neighbors(radius=radius, sort_results=True)
    assert max(sizes) == 64 and sum(sizes) == 600
    for got, want in zip(i, expected_radius[1], strict=True):
        assert_array_equal(got, want)


# -- warnings ------------------------------------------------------------------
def test_training_warning_once_across_folds(monkeypatch):
    monkeypatch.setattr(_ivfpq, "_WARNED_TRAINING", set())
    X = np.random.default_rng(0).standard_normal((1200, 8)).astype(np.float32)
    search = GridSearchCV(
        small_ivfpq(nlist=32, n_subquantizers=2), {"nprobe": [1, 2]}, cv=3
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        search.fit(X)
    trains = [w for w in record if "IVFPQNeighbors trains" in str(w.message)]
    assert len(trains) == 1, [str(w.message) for w in trains]


@pytest.mark.parametrize("cls", [FlatNeighbors, IVFPQNeighbors])
def test_docstring_has_no_run_of_spaces(cls):
    for line in cls.__doc__.splitlines():
        if not line.strip().startswith(("...", ">>>")):
            assert "      " not in line.strip(), line


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_huge_n_jobs(estimator, X):
    est = estimator.set_params(n_jobs=2**40).fit(X)
    assert est.kneighbors(X[:2])[1].shape == (2, 3)
    estimator.set_params(n_jobs=None)


def test_set_params_then_pickle_and_save(X, tmp_path):
    from annlearn import load, save

    est = small_ivfpq(n_neighbors=3).fit(X)
    expected = est.kneighbors(X[:5])[1]
    est.set_params(nlist=4, nbits=8, metric="cosine")
    for copy in (
        pickle.loads(pickle.dumps(est)),
        (save(est, tmp_path / "index"), load(tmp_path / "index"))[1],
    ):
        assert_array_equal(copy.kneighbors(X[:5])[1], expected)
