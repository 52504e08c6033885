"""FlatStore: the exact index's arrays, its search, exact distances and state."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from annlearn._flat_store import FlatStore


def _brute(Q, Y, metric):
    Q, Y = Q.astype(np.float64), Y.astype(np.float64)
    if metric == "inner_product":
        return -(Q @ Y.T)
    d = ((Q[:, None] - Y[None]) ** 2).sum(-1)
    return np.sqrt(d) if metric == "euclidean" else d


@pytest.mark.parametrize("algorithm", ["brute", "pca_bound"])
@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "inner_product"])
def test_search_is_exact_and_survives_add_and_remove(eight_blobs, algorithm, metric):
    X = eight_blobs
    ids = np.arange(len(X), dtype=np.int64) * 3
    store = FlatStore.build(X[:2000], ids[:2000], algorithm=algorithm, n_threads=2)
    assert (store.n_bound_components > 0) == (algorithm == "pca_bound")
    grown = store.add(X[2000:], ids[2000:], n_threads=2)
    assert len(store) == 2000 and len(grown) == 3000  # store itself unchanged
    shrunk = grown.remove(ids % 2 == 0)
    Q = X[:25] + 0.05
    for s, rows in ((grown, np.arange(3000)), (shrunk, np.flatnonzero(ids % 2))):
        d, pos = s.search(Q, 5, metric, n_threads=2)
        ref = _brute(Q, X[rows], metric)
        assert_array_equal(
            s.ids[pos], ids[rows][np.argsort(ref, 1, kind="stable")[:, :5]]
        )
        assert_allclose(d, np.sort(ref, 1)[:, :5], rtol=1e-4, atol=1e-3)
        exact = s.exact_distances(Q, s.ids[pos], metric)
        assert_allclose(exact, np.sort(ref, 1)[:, :5], rtol=1e-12)


def test_exact_distances_of_unknown_ids_are_infinite(eight_blobs):
    store = FlatStore.build(
        eight_blobs[:100], np.arange(100), algorithm="brute", n_threads=1
    )
    d = store.exact_distances(
        eight_blobs[:2], np.array([[0, -1], [100, 5]]), "sqeuclidean"
    )
    assert (
        d[0, 0] == 0
        and np.isinf(d[0, 1])
        and np.isinf(d[1, 0])
        and np.isfinite(d[1, 1])
    )


def test_state_round_trip_and_checks(eight_blobs):
    store = FlatStore.build(
        eight_blobs, np.arange(3000), algorithm="pca_bound", n_threads=2
    )
    d1 = store.n_bound_components
    state = store.to_state()
    FlatStore.check_state("X", state, n=3000, d=16, d1=d1)
    back = FlatStore.from_state(state)
    assert back.vectors is store.vectors and back.nbytes == store.nbytes
    with pytest.raises(ValueError, match="no index arrays"):
        FlatStore.check_state("X", {**state, "extra": 1}, n=3000, d=16, d1=d1)
    with pytest.raises(ValueError, match="without a bound"):
        FlatStore.check_state("X", {**state, "bound": None}, n=3000, d=16, d1=d1)
    with pytest.raises(ValueError, match="ids must be distinct"):
        bad = {**state, "ids": np.zeros(3000, dtype=np.int64)}
        FlatStore.check_state("X", bad, n=3000, d=16, d1=d1)
    bound = {**state["bound"], "rotation": state["bound"]["rotation"][:, :-1]}
    with pytest.raises(ValueError, match="bound rotation has shape"):
        FlatStore.check_state("X", {**state, "bound": bound}, n=3000, d=16, d1=d1)
