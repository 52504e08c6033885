"""IVFPQNeighbors: quality against exact search, mutations, errors, threads."""

import copy
import pickle
import warnings
from concurrent.futures import ThreadPoolExecutor

import joblib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_array_equal
from sklearn.exceptions import NotFittedError
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.utils._param_validation import InvalidParameterError

from annlearn import FlatNeighbors, IVFPQNeighbors, _ivfpq
from annlearn._ivfpq import default_n_subquantizers
from annlearn._persistence import FORMAT_VERSION
from annlearn._testing import assert_knn_quasi_equal
from annlearn.datasets import make_embeddings

METRICS = ["euclidean", "sqeuclidean", "cosine", "inner_product"]


@pytest.fixture(scope="module")
def data():
    X = make_embeddings(3000, 32, n_clusters=30, random_state=0)
    Q = make_embeddings(80, 32, n_clusters=30, random_state=1)
    return X, Q


def _recall(found, truth):
    k = truth.shape[1]
    return np.mean(
        [len(set(a) & set(b)) / k for a, b in zip(found, truth, strict=True)]
    )


def small(**params):
    defaults = dict(
        nlist=16,
        nprobe=4,
        n_subquantizers=8,
        nbits=6,
        refine_factor=None,
        random_state=0,
    )
    defaults.update(params)
    return IVFPQNeighbors(**defaults)


@pytest.mark.parametrize("metric", METRICS)
def test_full_probe_and_refine_equals_flat(data, metric):
    X, Q = data
    k = 7
    # Every list probed, every vector re-ranked: the search is exact.
    est = small(n_neighbors=k, metric=metric, nprobe=16, refine_factor=3000 // k + 1)
    dist, ind = est.fit(X).kneighbors(Q)
    ref = FlatNeighbors(n_neighbors=k, metric=metric).fit(X).kneighbors(Q)
    assert_knn_quasi_equal(dist, ind, *ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("by_residual", [True, False])
def test_recall_increases_with_nprobe(data, metric, by_residual):
    X, Q = data
    truth = (
        FlatNeighbors(n_neighbors=10, metric=metric)
        .fit(X)
        .kneighbors(Q, return_distance=False)
    )
    est = small(n_neighbors=10, metric=metric, by_residual=by_residual).fit(X)
    recalls = []
    for nprobe in (1, 4, 16):
        est.set_params(nprobe=nprobe)
        recalls.append(_recall(est.kneighbors(Q, return_distance=False), truth))
    assert recalls[0] <= recalls[1] + 0.02 <= recalls[2] + 0.04
    assert recalls[-1] > 0.3


def test_refinement_improves_recall(data):
    X, Q = data
    truth = FlatNeighbors(n_neighbors=10).fit(X).kneighbors(Q, return_distance=False)
    plain = small(n_neighbors=10, nprobe=8).fit(X)
    refined = small(n_neighbors=10, nprobe=8, refine_factor=8).fit(X)
    r_plain = _recall(plain.kneighbors(Q, return_distance=False), truth)
    r_refined = _recall(refined.kneighbors(Q, return_distance=False), truth)
    assert r_refined > max(r_plain, 0.9)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(64, 300),
    d=st.sampled_from([4, 8, 12]),
    k=st.integers(1, 8),
    metric=st.sampled_from(METRICS),
)
def test_property_exhaustive_search_is_exact(seed, n, d, k, metric):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    Q = rng.standard_normal((5, d)).astype(np.float32)
    est = IVFPQNeighbors(
        n_neighbors=k,
        nlist=4,
        nprobe=4,
        n_subquantizers=d // 4,
        nbits=4,
        metric=metric,
        refine_factor=n,
        random_state=seed,
    ).fit(X)
    ref = FlatNeighbors(n_neighbors=k, metric=metric).fit(X).kneighbors(Q)
    assert_knn_quasi_equal(*est.kneighbors(Q), *ref, rtol=1e-4, atol=1e-4)


def test_never_pads_with_minus_one(data):
    X, _ = data
    est = small(n_neighbors=50, nlist=64, nprobe=1).fit(X[:400])
    ind = est.kneighbors(X[:30], return_distance=False)
    assert np.all(ind >= 0)
    assert all(len(set(row)) == 50 for row in ind)


def test_query_is_train_excludes_self(data):
    X, _ = data
    for refine in (None, 4):
        est = small(n_neighbors=5, nprobe=16, refine_factor=refine).fit(X[:500])
        ind = est.kneighbors(return_distance=False)
        assert ind.shape == (500, 5)
        assert np.all(ind != np.arange(500)[:, None])


def test_pipeline_classifier(data):
    X, Q = data
    y = (X[:, 0] > 0).astype(int)
    pipe = make_pipeline(
        small(n_neighbors=5, nprobe=16, refine_factor=4),
        KNeighborsClassifier(5, metric="precomputed"),
    ).fit(X, y)
    exact = KNeighborsClassifier(5).fit(X, y)
    assert np.mean(pipe.predict(Q) == exact.predict(Q)) >= 0.9


def test_pipeline_regressor(data):
    from sklearn.neighbors import KNeighborsRegressor

    X, Q = data
    y = X[:, 0] + 0.5 * X[:, 1]
    pipe = make_pipeline(
        small(n_neighbors=5, nprobe=16, refine_factor=4),
        KNeighborsRegressor(5, metric="precomputed"),
    ).fit(X, y)
    exact = KNeighborsRegressor(5).fit(X, y)
    y_q = Q[:, 0] + 0.5 * Q[:, 1]
    assert pipe.score(Q, y_q) > exact.score(Q, y_q) - 0.05


def test_sparse_graph_consumers(data):
    # Isomap and DBSCAN take the precomputed neighbour graph of transform.
    from sklearn.cluster import DBSCAN
    from sklearn.datasets import make_swiss_roll
    from sklearn.manifold import Isomap

    roll = make_swiss_roll(800, random_state=0)[0]
    index = small(n_neighbors=10, nlist=8, n_subquantizers=3, nbits=4, refine_factor=4)
    graph = index.fit_transform(roll)
    exact_graph = FlatNeighbors(n_neighbors=10).fit_transform(roll)
    emb = Isomap(n_neighbors=10, metric="precomputed").fit_transform(graph)
    ref = Isomap(n_neighbors=10, metric="precomputed").fit_transform(exact_graph)
    assert emb.shape == ref.shape == (800, 2)
    # Same embedding up to sign and small perturbations.
    corr = [abs(np.corrcoef(emb[:, i], ref[:, i])[0, 1]) for i in range(2)]
    assert min(corr) > 0.9
    X = data[0][:800]
    graph = small(n_neighbors=10, nprobe=16, refine_factor=4).fit_transform(X)
    exact_graph = FlatNeighbors(n_neighbors=10).fit_transform(X)
    eps = np.median(exact_graph.data)
    labels = DBSCAN(eps=eps, min_samples=5, metric="precomputed").fit_predict(graph)
    exact = DBSCAN(eps=eps, min_samples=5, metric="precomputed").fit_predict(
        exact_graph
    )
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(exact, labels) > 0.8


def test_add_remove_and_ids(data):
    X, Q = data
    est = small(n_neighbors=5, nprobe=16, refine_factor=20)
    est.fit(X[:2000], ids=np.arange(2000) + 10_000)
    est.add(X[2000:], ids=np.arange(1000) + 50_000)
    assert est.n_samples_fit_ == 3000
    ind = est.kneighbors(Q, return_distance=False)
    ref = FlatNeighbors(n_neighbors=5).fit(X).kneighbors(Q, return_distance=False)
    mapped = np.where(ref < 2000, ref + 10_000, ref - 2000 + 50_000)
    assert _recall(ind, mapped) > 0.95
    # Removed vectors are never returned again, immediately.
    gone = np.unique(ind[:, 0])
    est.remove(gone)
    assert est.n_samples_fit_ == 3000 - len(gone)
    assert not np.isin(est.kneighbors(Q, return_distance=False), gone).any()
    # Default ids continue after the largest one.
    est.add(X[:2])
    assert {51_000, 51_001} <= set(est._store.ids)


def test_failed_mutations_leave_index_unchanged(data):
    X, Q = data
    est = small(n_neighbors=5).fit(X[:1000])
    before = est.kneighbors(Q)
    store = est._store
    with pytest.raises(ValueError, match="Ids already in the index"):
        est.add(X[1000:1010], ids=np.arange(5, 15))
    with pytest.raises(ValueError, match="Duplicate ids in the input"):
        est.add(X[1000:1002], ids=[3000, 3000])
    with pytest.raises(ValueError, match="Input X contains NaN"):
        est.add(np.full((2, 32), np.nan))
    with pytest.raises(ValueError, match="X has 3 features"):
        est.add(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"not in the index: \[5000, 6000\]"):
        est.remove([1, 5000, 6000])
    assert est._store is store
    np.testing.assert_array_equal(est.kneighbors(Q)[1], before[1])


def test_flat_add_remove(data):
    X, Q = data
    est = FlatNeighbors(n_neighbors=4).fit(X[:1000])
    est.add(X[1000:])
    ref = FlatNeighbors(n_neighbors=4).fit(X).kneighbors(Q)
    np.testing.assert_array_equal(est.kneighbors(Q)[1], ref[1])
    est.remove(ref[1][:, 0])
    assert not np.isin(est.kneighbors(Q)[1], ref[1][:, 0]).any()
    with pytest.raises(ValueError, match="not in the index"):
        est.remove([123_456])


def test_errors(data):
    X, Q = data
    with pytest.raises(ValueError, match=r"at least max\(nlist, 2\*\*nbits\) = 64"):
        IVFPQNeighbors(nlist=64, nbits=4).fit(X[:50])
    with pytest.raises(ValueError, match=r"at least max\(nlist, 2\*\*nbits\) = 256"):
        IVFPQNeighbors(nlist=4, nbits=8).fit(X[:100])
    with pytest.raises(ValueError, match=r"Valid values: \[1, 2, 4, 8, 16, 32\]"):
        small(n_subquantizers=5).fit(X)
    for nbits in (3, 9):
        with pytest.raises(InvalidParameterError, match="'nbits' parameter"):
            small(nbits=nbits).fit(X)
    est = small().fit(X)
    # nprobe above nlist scans every cell, as nprobe = nlist does.
    assert_array_equal(
        est.set_params(nprobe=17).kneighbors(Q)[1],
        est.set_params(nprobe=16).kneighbors(Q)[1],
    )
    est.set_params(nprobe=4)
    with pytest.raises(ValueError, match="Input X contains NaN"):
        est.kneighbors(np.full((1, 32), np.nan))
    with pytest.raises(ValueError, match="X has 31 features"):
        est.kneighbors(np.ones((1, 31)))
    with pytest.raises(ValueError, match="n_neighbors = 3001, n_samples_fit = 3000"):
        est.kneighbors(Q, n_neighbors=3001)
    with pytest.raises(ValueError, match="fitted with refine_factor=None"):
        est.set_params(refine_factor=2).kneighbors(Q)
    with pytest.raises(NotFittedError):
        small().kneighbors(Q)
    with pytest.raises(NotFittedError):
        small().add(Q)


def test_concurrent_searches_with_different_nprobe(data):
    X, Q = data
    base = small(n_neighbors=10).fit(X)
    params = [1, 2, 4, 8, 16] * 4
    # Shallow copies share the fitted index (the same arrays); only the
    # search-time parameter differs between them.
    views = {p: copy.copy(base).set_params(nprobe=p) for p in set(params)}
    assert all(v._store.codes is base._store.codes for v in views.values())
    expected = {p: views[p].kneighbors(Q)[1] for p in views}

    def search(p):
        return p, views[p].kneighbors(Q)[1]

    with ThreadPoolExecutor(4) as pool:
        for p, ind in pool.map(search, params):
            np.testing.assert_array_equal(ind, expected[p])
    # And many threads on the very same estimator.
    with ThreadPoolExecutor(4) as pool:
        for ind in pool.map(lambda _: base.kneighbors(Q)[1], range(8)):
            np.testing.assert_array_equal(ind, base.kneighbors(Q)[1])


def test_search_during_mutations_sees_a_consistent_index(data):
    X, Q = data
    est = small(n_neighbors=5).fit(X[:1000])
    stop = False
    errors = []

    def searcher():
        while not stop:
            try:
                ind = est.kneighbors(Q[:5], return_distance=False)
                assert ind.shape == (5, 5) and np.all(ind >= 0)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(searcher) for _ in range(2)]
        for start in range(1000, 3000, 250):
            est.add(X[start : start + 250])
            est.remove(np.arange(start - 1000, start - 900))
        stop = True
        for f in futures:
            f.result()
    assert errors == []


def test_persistence_and_memmap(data, tmp_path):
    X, Q = data
    est = small(n_neighbors=5, refine_factor=4).fit(X)
    expected = est.kneighbors(Q)
    path = tmp_path / "ivfpq.joblib"
    joblib.dump(est, path)
    loaded = joblib.load(path, mmap_mode="r")
    assert isinstance(loaded._store.codes, np.memmap)
    np.testing.assert_array_equal(loaded.kneighbors(Q)[1], expected[1])
    # Mutations after a read-only load copy what they need; the file is intact.
    loaded.add(X[:3], ids=[10_000, 10_001, 10_002]).remove([0, 1])
    assert loaded.n_samples_fit_ == 3001
    np.testing.assert_array_equal(joblib.load(path).kneighbors(Q)[1], expected[1])


def test_default_n_subquantizers():
    assert default_n_subquantizers(784) == 98
    assert default_n_subquantizers(128) == 16
    assert default_n_subquantizers(3) == 1


def test_verbose_output(data, capsys):
    X, _ = data
    small(verbose=1).fit(X)
    out = capsys.readouterr().out
    assert "coarse quantizer: 16 cells" in out and "encoded 3000 vectors" in out
    small(verbose=0).fit(X)
    assert capsys.readouterr().out == ""


def test_pickle_versions_and_corruption(data):
    X, Q = data
    est = small(n_neighbors=3).fit(X[:500])
    state = est.__getstate__()
    assert state["_annlearn_format"] == FORMAT_VERSION
    assert "_codec" not in state and isinstance(state["_store"], dict)
    restored = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(restored.kneighbors(Q)[1], est.kneighbors(Q)[1])
    # IVF-PQ's arrays are the same in layout 1.
    old = IVFPQNeighbors.__new__(IVFPQNeighbors)
    old.__setstate__(dict(state, _annlearn_format=1))
    np.testing.assert_array_equal(old.kneighbors(Q)[1], est.kneighbors(Q)[1])

    newer = dict(state, _annlearn_format=99)
    with pytest.raises(ValueError, match="data layout version 99"):
        IVFPQNeighbors().__setstate__(newer)
    tampered = dict(state)
    tampered["_store"] = dict(state["_store"], codes=state["_store"]["codes"][:-1])
    with pytest.raises(ValueError, match="Corrupted IVFPQNeighbors state: codes"):
        IVFPQNeighbors().__setstate__(tampered)
    bad_codes = dict(state)
    codes = state["_store"]["codes"].copy()
    codes[0, 0] = 200  # nbits=6: codes must be < 64
    bad_codes["_store"] = dict(state["_store"], codes=codes)
    with pytest.raises(ValueError, match="codes must be < 2\\*\\*nbits = 64"):
        IVFPQNeighbors().__setstate__(bad_codes)
    offsets = dict(state)
    offsets["_store"] = dict(
        state["_store"], list_offsets=state["_store"]["list_offsets"][::-1].copy()
    )
    with pytest.raises(ValueError, match="list_offsets must increase"):
        IVFPQNeighbors().__setstate__(offsets)

    flat = FlatNeighbors().fit(X[:50])
    fstate = flat.__getstate__()
    fstate["_store"] = dict(fstate["_store"], ids=fstate["_store"]["ids"][:10])
    with pytest.raises(ValueError, match="Corrupted FlatNeighbors state: ids"):
        FlatNeighbors().__setstate__(fstate)


def test_training_size_warnings(monkeypatch):
    # Shown once per parameter value and process: start from none shown.
    monkeypatch.setattr(_ivfpq, "_WARNED_TRAINING", set())
    rng = np.random.default_rng(0)
    X = rng.standard_normal((1000, 8)).astype(np.float32)
    with pytest.warns(
        UserWarning, match=r"nlist = 64 cells on 1000 rows, 15\.6 per"
    ) as record:
        IVFPQNeighbors(nlist=64, n_subquantizers=2, nbits=4, random_state=0).fit(X)
    assert record[0].filename == __file__  # points at the user's fit line
    with pytest.warns(UserWarning, match=r"2\*\*nbits = 64 centres .* nbits <= 4"):
        IVFPQNeighbors(nlist=8, n_subquantizers=2, nbits=6, random_state=0).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        IVFPQNeighbors(nlist=8, n_subquantizers=2, nbits=4, random_state=0).fit(X)


def test_unbalanced_cells_warning():
    rng = np.random.default_rng(0)
    X = np.vstack([np.zeros((1900, 8)), rng.standard_normal((100, 8))])
    X += 1e-3 * rng.standard_normal(X.shape)
    with pytest.warns(UserWarning, match=r"badly unbalanced: imbalance factor"):
        IVFPQNeighbors(nlist=8, n_subquantizers=2, nbits=4, random_state=0).fit(X)


def test_summary(data):
    X, _ = data
    with pytest.raises(NotFittedError):
        IVFPQNeighbors().summary()
    est = small(refine_factor=2).fit(X)
    text = est.summary()
    assert text.startswith("IVFPQNeighbors: 3,000 vectors of 32 features")
    assert "cells: 16" in text and "8 sub-vectors x 6 bits" in text
    assert "bytes per vector: 144 in the lists" in text  # 8 codes + 8 id + 128
    flat = FlatNeighbors().fit(X).summary()
    assert "bytes per vector: 140" in flat  # 128 + 4 + 8
