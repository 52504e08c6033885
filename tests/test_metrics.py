"""recall_at_k with tie-fair counting, the estimators' score against exact
search, and the cache of exact answers."""

import gc

import numpy as np
import pytest

from annlearn import FlatNeighbors, _exact
from annlearn._exact import exact_answers
from annlearn.metrics import (
    make_qps_scorer,
    make_recall_scorer,
    qps_scorer,
    recall_at_k,
    recall_scorer,
)


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
def test_score_is_recall(data, small_ivfpq):
    X, Q = data[:2000], data[2000:]
    assert FlatNeighbors(n_neighbors=5).fit(X).score(Q) == 1.0
    low = small_ivfpq(nprobe=1).fit(X).score(Q)
    high = small_ivfpq(nprobe=8, refine_factor=20).fit(X).score(Q)
    assert 0 < low < high
    assert high > 0.95
    # The scorers agree with score; another k through make_recall_scorer.
    est = small_ivfpq(nprobe=2).fit(X)
    assert recall_scorer(est, Q) == est.score(Q)
    assert 0 < make_recall_scorer(n_neighbors=1)(est, Q) <= 1
    assert qps_scorer(est, Q) > 0
    assert make_qps_scorer(repeats=2)(est, Q) > 0
    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        make_qps_scorer(repeats=0)


def test_score_matches_brute_force_recall(data, small_ivfpq):
    from sklearn.neighbors import NearestNeighbors

    X, Q = data[:2000], data[2000:]
    est = small_ivfpq(nprobe=2).fit(X)
    truth = NearestNeighbors(n_neighbors=5, algorithm="brute").fit(X)
    true_ids = truth.kneighbors(Q, return_distance=False)
    pred = est.kneighbors(Q, return_distance=False)
    # Random continuous data has no ties: the two rules agree.
    assert est.score(Q) == pytest.approx(recall_at_k(true_ids, pred))


def test_score_uses_the_indexed_vectors_and_ids(data, small_ivfpq):
    X, Q = data[:2000], data[2000:]
    ids = np.arange(2000) * 3 + 7
    est = small_ivfpq(nprobe=8, refine_factor=50).fit(X, ids=ids)
    assert est.score(Q) > 0.95
    # After remove, exact search runs over what is left (stored vectors).
    est.remove(ids[:1000])
    assert est.score(Q) > 0.95


def test_score_without_stored_vectors_needs_the_fit_array(data, small_ivfpq):
    X, Q = data[:2000].copy(), data[2000:]
    est = small_ivfpq().fit(X)
    assert 0 < est.score(Q) <= 1
    est.add(Q[:10])
    with pytest.raises(ValueError, match="needs the indexed vectors"):
        est.score(Q)
    est = small_ivfpq().fit(X)
    del X
    gc.collect()
    with pytest.raises(ValueError, match="array given to fit is gone"):
        est.score(Q)


@pytest.mark.slow
def test_score_after_fitting_a_temporary_view(data, small_ivfpq):
    """fit(X[a:b]) makes a view that dies at once: score rebuilds it from X,
    without the index keeping a copy; once X is gone the error is clear."""
    X, Q = data[:2000].copy(), data[2000:]
    est = small_ivfpq().fit(X[100:1900])
    middle, even = X[100:1900].copy(), X[::2].copy()
    assert est.score(Q) == small_ivfpq().fit(middle).score(Q)
    strided = small_ivfpq().fit(X[::2])
    assert strided.score(Q) == small_ivfpq().fit(even).score(Q)
    # (A scored index caches its exact reference, which holds the vectors.)
    Y = data[:2000].copy()
    unscored = small_ivfpq().fit(Y[100:1900])
    del Y
    gc.collect()
    with pytest.raises(ValueError, match="array given to fit is gone"):
        unscored.score(Q)


def test_exact_answers_are_computed_once_per_split(data, monkeypatch, small_ivfpq):
    X, Q = data[:2000], data[2000:]
    calls = []
    original = FlatNeighbors._search

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    _exact._cache.clear()
    monkeypatch.setattr(FlatNeighbors, "_search", counting)
    for nprobe in (1, 2, 4):
        # by_residual=True: "auto" searches exactly for held-out rows at fit.
        small_ivfpq(nprobe=nprobe, by_residual=True).fit(X).score(Q)
    assert len(calls) == 1
