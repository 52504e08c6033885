"""GridSearchCV tuning, fastest_above, the suggested grids and the training cache."""

import warnings

import joblib
import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV, ShuffleSplit

from annlearn._ivfpq_codec import IVFPQCodec
from annlearn.metrics import (
    qps_scorer,
    recall_scorer,
)
from annlearn.model_selection import (
    fastest_above,
    ivfpq_param_grid,
    suggest_nlist,
    suggest_nprobe,
)


# -- GridSearchCV ----------------------------------------------------------
@pytest.mark.slow
def test_grid_search_with_default_score(data, small_ivfpq):
    search = GridSearchCV(
        small_ivfpq(),
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


def test_grid_search_fastest_above(data, small_ivfpq):
    search = GridSearchCV(
        small_ivfpq(refine_factor=10),
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
    data, tmp_path, trainings, small_ivfpq
):
    X = data[:2000]
    memory = joblib.Memory(tmp_path, verbose=0)
    first = small_ivfpq(memory=memory, nprobe=1).fit(X)
    assert trainings == [8]
    second = small_ivfpq(memory=memory, nprobe=4, refine_factor=2).fit(X)
    assert trainings == [8]  # search-time parameters only: a cache hit
    small_ivfpq(memory=memory, nlist=4).fit(X)
    assert trainings == [8, 4]  # a training parameter changed: trained
    np.testing.assert_array_equal(first.cluster_centers_, second.cluster_centers_)
    # Same results as an uncached fit.
    plain = small_ivfpq(nprobe=4, refine_factor=2).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(
            plain.kneighbors(X[:50])[1], second.kneighbors(X[:50])[1]
        )


def test_grid_search_with_memory_trains_once_per_nlist(
    data, tmp_path, trainings, small_ivfpq
):
    search = GridSearchCV(
        small_ivfpq(memory=str(tmp_path)),
        {"nlist": [4, 8], "nprobe": [1, 2, 4]},
        cv=ShuffleSplit(n_splits=1, test_size=200, random_state=0),
        refit=False,
    )
    search.fit(data)
    assert sorted(trainings) == [4, 8]
