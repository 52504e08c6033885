"""Property tests on random data: FlatNeighbors equals float64 brute force."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from annlearn import FlatNeighbors
from annlearn._testing import (
    assert_knn_quasi_equal,
    float32_knn_tolerance,
    float64_distances,
)

# No subnormal numbers: their float32 products underflow, which no float32
# tolerance covers (cosine rows of them: test_cosine_of_a_row_with_a_subnormal_norm).
finite = st.floats(
    -100, 100, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32
)


def _check_against_float64(X, Q, k, metric, algorithm):
    index = FlatNeighbors(n_neighbors=k, metric=metric, algorithm=algorithm).fit(X)
    dist, ind = index.kneighbors(Q)
    assert np.all((ind >= 0) & (ind < len(X)))
    D = float64_distances(X, Q, metric)
    ref_ind = np.argsort(D, axis=1, kind="stable")[:, :k]
    ref_dist = np.take_along_axis(D, ref_ind, axis=1)
    # Ids are compared outside ties, each at its own float64 distance; the
    # tolerance is the float32 rounding bound of this metric.
    assert_knn_quasi_equal(
        dist,
        ind,
        ref_dist,
        ref_ind,
        rtol=0.0,
        atol=float32_knn_tolerance(X, Q, metric, ref_dist),
        exact_dist=np.take_along_axis(D, ind, axis=1),
    )


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
    _check_against_float64(X, Q, k, metric, algorithm)


@pytest.mark.parametrize("algorithm", ["brute", "pca_bound"])
def test_cosine_of_a_row_with_a_subnormal_norm(algorithm):
    X = np.full((2, 2), 1e-45, dtype=np.float32)
    Q = np.array([[0.0, 1e-45]], dtype=np.float32)
    _check_against_float64(X, Q, 1, "cosine", algorithm)
