"""IVFPQNeighbors(target_recall=...): search settings calibrated at fit.

The search of the (nprobe, refine_factor) plane is checked on synthetic
recall surfaces against brute force over the plane; the estimator on
generated data of several shapes, where the recall of new queries must
match the one calibrated (a biased calibration, such as one measured on an
index of another size, fails by 0.03 or more).
"""

import pickle
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.utils._param_validation import InvalidParameterError

import annlearn
from annlearn import IVFPQNeighbors, _calibration
from annlearn.datasets import make_embeddings


def _split(X, n_queries, seed=1):
    order = np.random.default_rng(seed).permutation(len(X))
    return X[order[n_queries:]], X[order[:n_queries]]


def _blobs(n, d, seed, anisotropic=False):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, d)) * 3
    X = centres[rng.integers(0, 20, n)] + rng.standard_normal((n, d))
    if anisotropic:
        X = X * np.geomspace(5.0, 0.05, d)
    return X.astype(np.float32)


DATA = {
    "embeddings": lambda: make_embeddings(13_000, 32, random_state=0),
    "blobs": lambda: _blobs(13_000, 24, 0),
    "anisotropic": lambda: _blobs(13_000, 48, 0, anisotropic=True),
}


# -- the search of the plane ---------------------------------------------------


def _surface(tau, limit, a, b, nlist):
    """recall(nprobe, rf): exponential in nprobe towards a limit that grows
    with rf; cost linear in both."""

    def recall(nprobe, rf):
        top = limit * (1 - 0.5 / ((rf or 0.5) + 1))
        return top * (1 - np.exp(-min(nprobe, nlist) / tau))

    def cost(nprobe, rf):
        return a * nprobe + b * (rf or 0)

    return recall, cost


@settings(max_examples=200, deadline=None)
@given(
    tau=st.floats(0.3, 200),
    limit=st.floats(0.7, 1.0),
    a=st.floats(0.01, 10),
    b=st.floats(0.01, 10),
    nlist=st.sampled_from([8, 64, 256, 1024]),
    target=st.floats(0.3, 0.99),
    with_vectors=st.booleans(),
)
def test_choose_settings_finds_the_cheapest_setting(
    tau, limit, a, b, nlist, target, with_vectors
):
    recall, cost = _surface(tau, limit, a, b, nlist)
    factors = _calibration.REFINE_FACTORS if with_vectors else (None,)
    deeper = _calibration.DEEP_REFINE_FACTORS if with_vectors else ()
    calls = []

    def measure(nprobe, rf):
        calls.append((nprobe, rf))
        return recall(nprobe, rf), 0.001

    chosen = _calibration.choose_settings(
        measure,
        cost,
        target=target,
        nlist=nlist,
        refine_factors=factors,
        n_queries=10,
        deeper=deeper,
    )
    assert len(calls) == len(set(calls)), "a setting measured twice"
    # The deeper factors count only when none of the others reaches.
    for tier in (factors, deeper):
        plane = [(p, rf) for rf in tier for p in range(1, nlist + 1)]
        reaching = [key for key in plane if recall(*key) >= target]
        if reaching:
            break
    if reaching:
        assert chosen.reached
        assert recall(chosen.nprobe, chosen.refine_factor) >= target
        best = min(cost(*key) for key in reaching)
        assert cost(chosen.nprobe, chosen.refine_factor) <= best * (1 + 1e-9)
    else:
        assert not chosen.reached
        assert chosen.recall == max(recall(*key) for key in calls)
    results = chosen.results
    assert {len(v) for v in results.values()} == {len(results["nprobe"])}
    assert (chosen.nprobe, chosen.refine_factor or 0) in zip(
        results["nprobe"], results["refine_factor"], strict=True
    )


def test_choose_settings_stops_where_recall_saturates():
    # refine_factor=None saturates at 0.8: a target of 0.95 is out of reach,
    # found without probing every one of the 4096 cells.
    recall, cost = _surface(2.0, 0.8 * 1.5, 1.0, 1.0, 4096)
    measured = []

    def measure(nprobe, rf):
        measured.append(nprobe)
        return recall(nprobe, rf), 0.001

    chosen = _calibration.choose_settings(
        measure, cost, target=0.95, nlist=4096, refine_factors=(None,), n_queries=1
    )
    assert not chosen.reached
    assert max(measured) <= 64
    assert chosen.recall == pytest.approx(0.8, abs=1e-3)


def test_saturation_rule_keeps_slow_steady_growth():
    # Large nlist: each doubling gains about the same, far from the target.
    assert not _calibration._saturated([0.30, 0.42, 0.55], 0.95)
    assert not _calibration._saturated([0.68, 0.80, 0.89], 0.95)
    # Gains shrinking fast, well short of the target.
    assert _calibration._saturated([0.91, 0.9477, 0.9537], 0.97)
    assert _calibration._saturated([0.60, 0.62, 0.62], 0.9)


def test_held_out_rows():
    rows = _calibration.held_out_rows(50_000, 256, 10, 0)
    assert len(rows) == _calibration.N_QUERIES
    assert np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(rows, _calibration.held_out_rows(50_000, 256, 10, 0))
    assert len(_calibration.held_out_rows(300, 16, 10, 0)) == 30
    with pytest.raises(ValueError, match="target_recall needs rows to hold out"):
        _calibration.held_out_rows(16, 16, 5, 0)
    with pytest.raises(ValueError, match="at least 10 samples"):
        _calibration.held_out_rows(9, 2, 1, 0)


# -- the estimator ---------------------------------------------------------------


@pytest.mark.parametrize("data", sorted(DATA))
@pytest.mark.parametrize("target", [0.8, 0.95])
def test_new_queries_get_the_calibrated_recall(data, target):
    X, Q = _split(DATA[data](), 2000)
    index = IVFPQNeighbors(
        n_neighbors=10, nlist=32, target_recall=target, random_state=0
    ).fit(X)
    assert index.calibration_recall_ >= target
    recall = index.score(Q)
    # 1,000 held-out rows and 2,000 queries: the two recalls differ by about
    # 0.008 (one standard error) by chance; a calibration biased as one on
    # the index without the held-out rows was (0.03 to 0.04) fails.
    assert abs(recall - index.calibration_recall_) < 0.025
    assert recall >= target - 0.025


@pytest.mark.parametrize("metric", ["cosine", "inner_product"])
def test_other_metrics_and_8_bit_codes(metric):
    X, Q = _split(make_embeddings(6000, 32, random_state=3), 500)
    index = IVFPQNeighbors(
        n_neighbors=5,
        nlist=16,
        nbits=8,
        n_subquantizers=8,
        metric=metric,
        target_recall=0.9,
        random_state=0,
    ).fit(X)
    assert index.calibration_recall_ >= 0.9
    assert index.score(Q) >= 0.88


def test_without_stored_vectors_only_nprobe_is_chosen():
    X, Q = _split(make_embeddings(6000, 32, random_state=4), 500)
    index = IVFPQNeighbors(
        n_neighbors=5,
        nlist=16,
        nbits=8,
        n_subquantizers=16,
        refine_factor=None,
        target_recall=0.75,
        random_state=0,
    ).fit(X)
    assert index.refine_factor_ is None
    assert set(index.calibration_results_["refine_factor"]) == {0}
    assert index.score(Q) >= 0.73


def test_searches_use_the_calibrated_settings():
    X, Q = _split(make_embeddings(6000, 32, random_state=5), 200)
    index = IVFPQNeighbors(
        n_neighbors=10, nlist=32, target_recall=0.95, random_state=0
    ).fit(X)
    assert (index.nprobe_, index.refine_factor_) != (1, 1)
    expected = index.kneighbors(Q)
    store = index._store
    direct = index._codec.search(
        store,
        Q,
        10,
        nprobe=index.nprobe_,
        refine_factor=index.refine_factor_,
        n_threads=1,
    )
    np.testing.assert_array_equal(store.ids[direct[1]], expected[1])
    # The parameters are not what searches use once calibrated.
    index.set_params(nprobe=1, refine_factor=1)
    np.testing.assert_array_equal(index.kneighbors(Q)[1], expected[1])
    # add and remove keep the settings.
    index.add(Q[:10], ids=np.arange(10**6, 10**6 + 10))
    index.remove(np.arange(10**6, 10**6 + 10))
    np.testing.assert_array_equal(index.kneighbors(Q)[1], expected[1])
    # A fit without a target forgets them: the parameters rule again.
    index.set_params(target_recall=None, nprobe=1, refine_factor=1).fit(X)
    assert not hasattr(index, "nprobe_")
    assert not hasattr(index, "calibration_results_")
    assert index.score(Q) < 0.9


def test_calibration_is_deterministic():
    X = make_embeddings(5000, 32, random_state=6)
    fits = [
        IVFPQNeighbors(nlist=32, target_recall=0.9, random_state=0).fit(X)
        for _ in range(2)
    ]
    assert fits[0].nprobe_ == fits[1].nprobe_
    assert fits[0].refine_factor_ == fits[1].refine_factor_
    assert fits[0].calibration_recall_ == fits[1].calibration_recall_
    np.testing.assert_array_equal(
        fits[0].calibration_results_["cost"], fits[1].calibration_results_["cost"]
    )


def test_unreachable_target_warns_and_keeps_the_best_setting():
    X, Q = _split(make_embeddings(5000, 32, random_state=7), 300)
    index = IVFPQNeighbors(
        n_neighbors=10,
        nlist=16,
        n_subquantizers=2,
        refine_factor=None,
        target_recall=1.0,
        random_state=0,
    )
    with pytest.warns(UserWarning, match="cannot reach target_recall=1.0"):
        index.fit(X)
    assert index.calibration_recall_ < 1.0
    assert index.calibration_recall_ == pytest.approx(
        index.calibration_results_["recall"].max()
    )
    index.kneighbors(Q)


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.01, np.nan, "high"])
def test_bad_target_is_refused_and_changes_nothing(bad):
    X = make_embeddings(2000, 16, random_state=8)
    index = IVFPQNeighbors(nlist=8, target_recall=0.9, random_state=0).fit(X)
    before = (index.nprobe_, index.refine_factor_, index.calibration_recall_)
    with pytest.raises(InvalidParameterError, match="target_recall"):
        index.set_params(target_recall=bad).fit(X[:500])
    assert (index.nprobe_, index.refine_factor_, index.calibration_recall_) == before
    assert index.n_samples_fit_ == 2000


def test_too_few_rows_to_hold_out_is_a_clear_error():
    X = make_embeddings(20, 8, random_state=9)
    index = IVFPQNeighbors(nlist=2, nbits=4, target_recall=0.9, random_state=0)
    with pytest.raises(ValueError, match="target_recall needs rows to hold out"):
        index.set_params(n_neighbors=20).fit(X)
    assert not hasattr(index, "n_samples_fit_")
    index.set_params(n_neighbors=3).fit(X)
    assert index.nprobe_ >= 1


def test_settings_survive_save_load_and_pickle(tmp_path):
    X, Q = _split(make_embeddings(5000, 32, random_state=10), 100)
    index = IVFPQNeighbors(nlist=32, target_recall=0.9, random_state=0).fit(X)
    path = tmp_path / "index.annlearn"
    annlearn.save(index, path)
    for loaded in (annlearn.load(path), pickle.loads(pickle.dumps(index))):
        assert loaded.nprobe_ == index.nprobe_
        assert loaded.refine_factor_ == index.refine_factor_
        assert loaded.calibration_recall_ == index.calibration_recall_
        for key, value in index.calibration_results_.items():
            np.testing.assert_array_equal(loaded.calibration_results_[key], value)
        np.testing.assert_array_equal(loaded.kneighbors(Q)[1], index.kneighbors(Q)[1])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("calibration_results_"), "a calibration needs"),
        (lambda s: s.update(nprobe_=0), "must be >= 1"),
        (lambda s: s.update(calibration_recall_=1.5), "not in \\[0, 1\\]"),
        (
            lambda s: s["calibration_results_"].update(recall=np.zeros(7)),
            "one length",
        ),
    ],
)
def test_corrupted_calibration_is_refused(change, message):
    X = make_embeddings(3000, 16, random_state=11)
    index = IVFPQNeighbors(nlist=8, target_recall=0.9, random_state=0).fit(X)
    state = index.__getstate__()
    state["calibration_results_"] = dict(state["calibration_results_"])
    change(state)
    with pytest.raises(ValueError, match=message):
        IVFPQNeighbors().__setstate__(state)


def test_refine_factor_without_vectors_is_refused():
    X = make_embeddings(3000, 16, random_state=12)
    index = IVFPQNeighbors(
        nlist=8, refine_factor=None, target_recall=0.1, random_state=0
    ).fit(X)
    state = index.__getstate__()
    state["refine_factor_"] = 4
    with pytest.raises(ValueError, match="no vectors are stored"):
        IVFPQNeighbors().__setstate__(state)


def test_calibration_ignores_nothing_silently():
    # Warnings other than the unreachable one would reach the user at fit.
    X = make_embeddings(4000, 32, random_state=13)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        IVFPQNeighbors(nlist=16, target_recall=0.9, random_state=0).fit(X)
