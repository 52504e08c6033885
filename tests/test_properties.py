"""Property tests on random data: FlatNeighbors equals float64 brute force."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from annlearn import FlatNeighbors
from annlearn._testing import assert_knn_quasi_equal

finite = st.floats(-100, 100, allow_nan=False, allow_infinity=False, width=32)


def _reference(X, Q, metric, k):
    X = X.astype(np.float64)
    Q = Q.astype(np.float64)
    if metric == "inner_product":
        d = -(Q @ X.T)
    elif metric == "cosine":
        xn = np.linalg.norm(X, axis=1)
        qn = np.linalg.norm(Q, axis=1)
        xn[xn == 0] = 1
        qn[qn == 0] = 1
        d = 1 - (Q / qn[:, None]) @ (X / xn[:, None]).T
    else:
        d = ((Q[:, None, :] - X[None]) ** 2).sum(-1)
        if metric == "euclidean":
            d = np.sqrt(d)
    ind = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, ind, axis=1), ind


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    n=st.integers(2, 60),
    d=st.integers(1, 20),
    metric=st.sampled_from(["euclidean", "sqeuclidean", "cosine", "inner_product"]),
    algorithm=st.sampled_from(["brute", "pca_bound"]),
)
def test_flat_equals_brute_force(data, n, d, metric, algorithm):
    X = data.draw(arrays(np.float32, (n, d), elements=finite))
    Q = data.draw(
        arrays(np.float32, (data.draw(st.integers(1, 10)), d), elements=finite)
    )
    k = data.draw(st.integers(1, n))
    index = FlatNeighbors(n_neighbors=k, metric=metric, algorithm=algorithm).fit(X)
    dist, ind = index.kneighbors(Q)
    assert np.all(np.diff(dist, axis=1) >= 0)
    ref_dist, ref_ind = _reference(X, Q, metric, k)
    scale = max(1.0, float(np.abs(X).max()) ** 2, float(np.abs(Q).max()) ** 2) * d
    assert_knn_quasi_equal(dist, ind, ref_dist, ref_ind, rtol=1e-4, atol=1e-5 * scale)
