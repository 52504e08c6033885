"""Every bad input gets a precise error."""

import sys
import warnings

import numpy as np
import pytest
from scipy import sparse
from sklearn.base import clone
from sklearn.exceptions import DataConversionWarning, NotFittedError
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.utils._param_validation import InvalidParameterError

from annlearn import FlatNeighbors, IVFPQNeighbors


@pytest.fixture
def fitted():
    X = np.random.default_rng(0).standard_normal((20, 3))
    return FlatNeighbors(n_neighbors=3).fit(X)


def test_sparse_rejected():
    with pytest.raises(TypeError, match="Sparse data was passed"):
        FlatNeighbors().fit(sparse.random(10, 3, format="csr"))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_rejected_at_fit_and_query(fitted, bad):
    X = np.ones((10, 3))
    X[2, 1] = bad
    word = "NaN" if np.isnan(bad) else "infinity"
    with pytest.raises(ValueError, match=f"Input X contains {word}"):
        FlatNeighbors().fit(X)
    with pytest.raises(ValueError, match=f"Input X contains {word}"):
        fitted.kneighbors(X)
    with pytest.raises(ValueError, match=f"Input X contains {word}"):
        fitted.transform(X)


def test_wrong_number_of_features(fitted):
    msg = "X has 4 features, but FlatNeighbors is expecting 3 features as input"
    with pytest.raises(ValueError, match=msg):
        fitted.kneighbors(np.ones((2, 4)))
    with pytest.raises(ValueError, match=msg):
        fitted.transform(np.ones((2, 4)))


def test_n_neighbors_larger_than_index(fitted):
    with pytest.raises(
        ValueError,
        match="Expected n_neighbors <= n_samples_fit, but n_neighbors = 21, "
        "n_samples_fit = 20",
    ):
        fitted.kneighbors(np.ones((1, 3)), n_neighbors=21)
    with pytest.raises(
        ValueError, match="Expected n_neighbors < n_samples_fit when querying"
    ):
        fitted.kneighbors(n_neighbors=20)
    fitted.kneighbors(n_neighbors=19)  # the largest that fits
    with pytest.raises(ValueError, match="n_neighbors = 21, n_samples_fit = 20"):
        FlatNeighbors(n_neighbors=20).fit(np.ones((20, 3))).transform(np.ones((1, 3)))


@pytest.mark.parametrize("bad", [0, -1, 2.5, "3", True])
def test_bad_n_neighbors_in_kneighbors(fitted, bad):
    with pytest.raises(ValueError, match="Expected n_neighbors > 0, an integer"):
        fitted.kneighbors(np.ones((1, 3)), n_neighbors=bad)


def test_empty_arrays():
    with pytest.raises(ValueError, match="0 sample"):
        FlatNeighbors().fit(np.empty((0, 3)))
    with pytest.raises(ValueError, match="0 feature"):
        FlatNeighbors().fit(np.empty((3, 0)))


def test_unfitted():
    with pytest.raises(NotFittedError):
        FlatNeighbors().kneighbors(np.ones((1, 3)))
    with pytest.raises(NotFittedError):
        FlatNeighbors().kneighbors_graph()
    with pytest.raises(NotFittedError):
        FlatNeighbors().transform(np.ones((1, 3)))


@pytest.mark.parametrize(
    "params, match",
    [
        ({"metric": "manhattan"}, "'metric' parameter"),
        ({"mode": "weights"}, "'mode' parameter"),
        ({"n_neighbors": 0}, "'n_neighbors' parameter"),
        ({"n_jobs": "two"}, "'n_jobs' parameter"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(InvalidParameterError, match=match):
        FlatNeighbors(**params).fit(np.ones((5, 2)))


def test_bad_graph_mode(fitted):
    with pytest.raises(ValueError, match="Unsupported mode, must be one of"):
        fitted.kneighbors_graph(mode="weights")


@pytest.mark.parametrize(
    "ids, match",
    [
        ([0, 1, 2], r"Expected ids of shape \(4,\), one per vector"),
        ([[0, 1], [2, 3]], "Expected a 1-d array of ids"),
        ([0.5, 1, 2, 3], "Expected integer ids, got dtype float64"),
        ([0, -1, 2, 3], r"Expected ids >= 0, got negative ids \[-1\]"),
        ([0, 1, 1, 3], r"Duplicate ids in the input: \[1\]"),
    ],
)
def test_bad_ids(ids, match):
    with pytest.raises(ValueError, match=match):
        FlatNeighbors().fit(np.ones((4, 2)), ids=ids)


def test_user_ids_are_returned_and_graph_is_indexed_by_id():
    X = np.array([[0.0], [1.0], [10.0]])
    est = FlatNeighbors(n_neighbors=1).fit(X, ids=[7, 3, 5])
    assert est.kneighbors([[0.9]], return_distance=False)[0, 0] == 3
    graph = est.kneighbors_graph([[0.9]])
    assert graph.shape == (1, 8) and graph[0, 3] == 1
    with pytest.raises(ValueError, match=r"not in the index: \[4\]"):
        est.remove([3, 4])
    assert est.n_samples_fit_ == 3
    with pytest.raises(ValueError, match="Expected integer ids"):
        est.remove(["a"])


def _conversion_warnings(record):
    return [w for w in record if issubclass(w.category, DataConversionWarning)]


@pytest.mark.parametrize(
    "make",
    [
        lambda: FlatNeighbors(n_neighbors=3),
        lambda: IVFPQNeighbors(
            n_neighbors=3,
            nlist=4,
            nprobe=2,
            n_subquantizers=2,
            nbits=4,
            random_state=0,
        ),
    ],
    ids=["flat", "ivfpq"],
)
def test_float64_conversion_warns_once_per_estimator(make):
    X = np.random.default_rng(0).standard_normal((700, 4))
    est = make()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        est.fit(X)  # the line the warning must name
        line = sys._getframe().f_lineno - 1
        est.kneighbors(X[:5])
        est.transform(X[:5])
        est.score(X[:20])
    found = _conversion_warnings(record)
    assert len(found) == 1, [str(w.message) for w in found]
    message = str(found[0].message)
    assert message.startswith(f"{type(est).__name__} works in float32")
    assert "once per estimator" in message
    assert found[0].filename == __file__ and found[0].lineno == line

    # A first float64 query warns too; float32 and integer input never do.
    fresh = make().fit(X.astype(np.float32))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make().fit(X.astype(np.float32))
        make().fit((100 * X).astype(np.int64))
        fresh.kneighbors(X[:5].astype(np.float32))
        assert not _conversion_warnings(record)
        fresh.kneighbors(X[:5])
        fresh.kneighbors(X[:5])
    assert len(_conversion_warnings(record)) == 1
    # A clone is a new estimator: it warns again.
    with pytest.warns(DataConversionWarning, match="works in float32"):
        clone(est).fit(X)


def test_float64_warning_names_the_user_line_through_a_pipeline():
    X = np.random.default_rng(0).standard_normal((200, 4))
    y = np.arange(200) % 2
    pipe = make_pipeline(
        FlatNeighbors(n_neighbors=3), KNeighborsClassifier(3, metric="precomputed")
    )
    with pytest.warns(DataConversionWarning, match="FlatNeighbors works") as record:
        pipe.fit(X, y)
    assert _conversion_warnings(record)[0].filename == __file__
