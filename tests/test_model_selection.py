"""Recall scoring, GridSearchCV tuning and the training cache."""

import gc
import warnings

import joblib
import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV, ShuffleSplit

from annlearn import FlatNeighbors, IVFPQNeighbors, _exact
from annlearn._exact import exact_answers
from annlearn._ivfpq_codec import IVFPQCodec
from annlearn.metrics import (
    make_qps_scorer,
    make_recall_scorer,
    qps_scorer,
    recall_at_k,
    recall_scorer,
)
from annlearn.model_selection import (
    fastest_above,
    ivfpq_param_grid,
    suggest_nlist,
    suggest_nprobe,
)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, 16)) * 4
    X = centers[rng.integers(0, 20, 2400)] + rng.standard_normal((2400, 16))
    return X.astype(np.float32)


def _ivfpq(**params):
    defaults = dict(
        n_neighbors=5, nlist=8, nprobe=2, n_subquantizers=8, nbits=6, random_state=0
    )
    return IVFPQNeighbors(**{**defaults, **params})


# -- recall_at_k -----------------------------------------------------------
def test_recall_at_k_counts_ids_and_ties():
    true = np.array([[0, 1, 2], [3, 4, 5]])
    assert recall_at_k(true, true) == 1.0
    assert recall_at_k(true, [[2, 9, 0], [9, 9, 9]]) == pytest.approx(2 / 6)
    # -1 (no neighbour) never counts; extra columns are ignored.
    assert recall_at_k(true, [[-1, 1, 2, 0], [3, 4, 5, 6]]) == pytest.approx(5 / 6)
    # Tie rule: id 9 at the k-th distance is a hit, id 8 beyond it is not.
    true_dist = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    pred = np.array([[0, 1, 9], [3, 4, 8]])
    pred_dist = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.5]])
    assert recall_at_k(true, pred) == pytest.approx(4 / 6)
    tied = recall_at_k(true, pred, true_distances=true_dist, pred_distances=pred_dist)
    assert tied == pytest.approx(5 / 6)
    # A duplicated id cannot push a row above 1.
    assert (
        recall_at_k(
            [[0, 1]], [[0, 0]], true_distances=[[0, 0]], pred_distances=[[0, 0]]
        )
        == 1.0
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(true_indices=[0, 1], pred_indices=[[0, 1]]), "must be 2-d"),
        (dict(true_indices=[[0, 1]], pred_indices=[[0]]), "at least k = 2"),
        (dict(true_indices=[[0]], pred_indices=[[0], [1]]), "has 1 rows"),
        (
            dict(true_indices=[[0]], pred_indices=[[0]], true_distances=[[0.0]]),
            "both true_distances and pred_distances",
        ),
    ],
)
def test_recall_at_k_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        recall_at_k(**kwargs)


def test_ties_on_integer_data_do_not_cost_exact_methods_recall():
    # Many equal distances: another exact method's choice among the tied
    # points must still score 1.0.
    rng = np.random.default_rng(1)
    X = rng.integers(0, 3, (500, 4)).astype(np.float32)
    Q = rng.integers(0, 3, (50, 4)).astype(np.float32)
    flat = FlatNeighbors(n_neighbors=10).fit(X)
    Xq = flat._prepare_queries(Q)
    true_dist, true_ids = exact_answers(flat, Xq, 10)
    # Reverse the id order within ties: a different, equally exact answer.
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=10, algorithm="brute").fit(X[::-1])
    other = len(X) - 1 - nn.kneighbors(Q, return_distance=False)
    assert recall_at_k(true_ids, other) < 1.0
    other_dist = flat._exact_distances(Xq, other)
    assert (
        recall_at_k(
            true_ids, other, true_distances=true_dist, pred_distances=other_dist
        )
        == 1.0
    )


# -- score and scorers -----------------------------------------------------
def test_score_is_recall(data):
    X, Q = data[:2000], data[2000:]
    assert FlatNeighbors(n_neighbors=5).fit(X).score(Q) == 1.0
    low = _ivfpq(nprobe=1).fit(X).score(Q)
    high = _ivfpq(nprobe=8, refine_factor=20).fit(X).score(Q)
    assert 0 < low < high
    assert high > 0.95
    # The scorers agree with score; another k through make_recall_scorer.
    est = _ivfpq(nprobe=2).fit(X)
    assert recall_scorer(est, Q) == est.score(Q)
    assert 0 < make_recall_scorer(n_neighbors=1)(est, Q) <= 1
    assert qps_scorer(est, Q) > 0
    assert make_qps_scorer(repeats=2)(est, Q) > 0
    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        make_qps_scorer(repeats=0)


def test_score_matches_brute_force_recall(data):
    from sklearn.neighbors import NearestNeighbors

    X, Q = data[:2000], data[2000:]
    est = _ivfpq(nprobe=2).fit(X)
    truth = NearestNeighbors(n_neighbors=5, algorithm="brute").fit(X)
    true_ids = truth.kneighbors(Q, return_distance=False)
    pred = est.kneighbors(Q, return_distance=False)
    # Random continuous data has no ties: the two rules agree.
    assert est.score(Q) == pytest.approx(recall_at_k(true_ids, pred))


def test_score_uses_the_indexed_vectors_and_ids(data):
    X, Q = data[:2000], data[2000:]
    ids = np.arange(2000) * 3 + 7
    est = _ivfpq(nprobe=8, refine_factor=50).fit(X, ids=ids)
    assert est.score(Q) > 0.95
    # After remove, exact search runs over what is left (stored vectors).
    est.remove(ids[:1000])
    assert est.score(Q) > 0.95


def test_score_without_stored_vectors_needs_the_fit_array(data):
    X, Q = data[:2000].copy(), data[2000:]
    est = _ivfpq().fit(X)
    assert 0 < est.score(Q) <= 1
    est.add(Q[:10])
    with pytest.raises(ValueError, match="needs the indexed vectors"):
        est.score(Q)
    est = _ivfpq().fit(X)
    del X
    gc.collect()
    with pytest.raises(ValueError, match="array given to fit is gone"):
        est.score(Q)


def test_score_after_fitting_a_temporary_view(data):
    """fit(X[a:b]) makes a view that dies at once: score rebuilds it from X,
    without the index keeping a copy; once X is gone the error is clear."""
    X, Q = data[:2000].copy(), data[2000:]
    est = _ivfpq().fit(X[100:1900])
    middle, even = X[100:1900].copy(), X[::2].copy()
    assert est.score(Q) == _ivfpq().fit(middle).score(Q)
    strided = _ivfpq().fit(X[::2])
    assert strided.score(Q) == _ivfpq().fit(even).score(Q)
    # (A scored index caches its exact reference, which holds the vectors.)
    Y = data[:2000].copy()
    unscored = _ivfpq().fit(Y[100:1900])
    del Y
    gc.collect()
    with pytest.raises(ValueError, match="array given to fit is gone"):
        unscored.score(Q)


def test_exact_answers_are_computed_once_per_split(data, monkeypatch):
    X, Q = data[:2000], data[2000:]
    calls = []
    original = FlatNeighbors._search

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    _exact._cache.clear()
    monkeypatch.setattr(FlatNeighbors, "_search", counting)
    for nprobe in (1, 2, 4):
        _ivfpq(nprobe=nprobe).fit(X).score(Q)
    assert len(calls) == 1


# -- GridSearchCV ----------------------------------------------------------
def test_grid_search_with_default_score(data):
    search = GridSearchCV(
        _ivfpq(),
        {"nlist": [4, 8], "nprobe": [1, 4]},
        cv=ShuffleSplit(n_splits=1, test_size=200, random_state=0),
    )
    search.fit(data)
    scores = search.cv_results_["mean_test_score"]
    assert np.all((scores > 0.3) & (scores <= 1))
    assert search.best_score_ == scores.max()
    # Probing more cells of the same index never loses recall.
    params = search.cv_results_["params"]
    for nlist in (4, 8):
        by_nprobe = {
            p["nprobe"]: s
            for p, s in zip(params, scores, strict=True)
            if p["nlist"] == nlist
        }
        assert by_nprobe[4] >= by_nprobe[1]


def test_grid_search_fastest_above(data):
    search = GridSearchCV(
        _ivfpq(refine_factor=10),
        {"nprobe": [1, 2, 8]},
        scoring={"recall": recall_scorer, "qps": qps_scorer},
        refit=fastest_above(recall=0.9),
        cv=ShuffleSplit(n_splits=1, test_size=200, random_state=0),
    )
    search.fit(data)
    res = search.cv_results_
    ok = res["mean_test_recall"] >= 0.9
    assert ok.any()
    assert ok[search.best_index_]
    assert res["mean_test_qps"][search.best_index_] == res["mean_test_qps"][ok].max()
    assert search.best_estimator_.nprobe == res["param_nprobe"][search.best_index_]


def test_fastest_above_without_a_candidate_and_errors():
    results = {"mean_test_recall": [0.5, 0.7], "mean_test_qps": [10.0, 5.0]}
    with pytest.warns(UserWarning, match="No candidate reaches recall 0.99"):
        assert fastest_above(0.99)(results) == 1
    assert fastest_above(0.6)(results) == 1
    assert fastest_above(0.4)(results) == 0
    with pytest.raises(ValueError, match="needs the scores 'recall' and 'qps'"):
        fastest_above(0.5)({"mean_test_score": [1.0]})
    with pytest.raises(ValueError, match=r"recall must be in \[0, 1\]"):
        fastest_above(1.5)


def test_suggested_grids():
    assert suggest_nlist(60000) == [256, 512, 1024]
    assert suggest_nlist(100) == [2]
    assert all(n <= 256 for n in suggest_nprobe(256))
    assert suggest_nprobe(1) == [1]
    grid = ivfpq_param_grid(10000)
    assert all(max(g["nprobe"]) <= g["nlist"][0] for g in grid)
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        suggest_nlist(0)
    with pytest.raises(ValueError, match="nlist must be a positive integer"):
        suggest_nprobe(0)


# -- training cache --------------------------------------------------------
@pytest.fixture
def trainings(monkeypatch):
    """The nlist of every IVF-PQ training (cache misses) during a test."""
    calls = []
    original = IVFPQCodec.train.__func__

    def counting(cls, X, **kwargs):
        calls.append(kwargs["nlist"])
        return original(cls, X, **kwargs)

    monkeypatch.setattr(IVFPQCodec, "train", classmethod(counting))
    return calls


def test_memory_reuses_training_across_search_time_parameters(
    data, tmp_path, trainings
):
    X = data[:2000]
    memory = joblib.Memory(tmp_path, verbose=0)
    first = _ivfpq(memory=memory, nprobe=1).fit(X)
    assert trainings == [8]
    second = _ivfpq(memory=memory, nprobe=4, refine_factor=2).fit(X)
    assert trainings == [8]  # search-time parameters only: a cache hit
    _ivfpq(memory=memory, nlist=4).fit(X)
    assert trainings == [8, 4]  # a training parameter changed: trained
    np.testing.assert_array_equal(first.cluster_centers_, second.cluster_centers_)
    # Same results as an uncached fit.
    plain = _ivfpq(nprobe=4, refine_factor=2).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(
            plain.kneighbors(X[:50])[1], second.kneighbors(X[:50])[1]
        )


def test_grid_search_with_memory_trains_once_per_nlist(data, tmp_path, trainings):
    search = GridSearchCV(
        _ivfpq(memory=str(tmp_path)),
        {"nlist": [4, 8], "nprobe": [1, 2, 4]},
        cv=ShuffleSplit(n_splits=1, test_size=200, random_state=0),
        refit=False,
    )
    search.fit(data)
    assert sorted(trainings) == [4, 8]
