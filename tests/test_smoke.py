import numpy as np
from sklearn.neighbors import NearestNeighbors

from annlearn import FlatNeighbors


def test_flat_matches_sklearn_brute():
    rng = np.random.default_rng(0)
    X = rng.random((300, 16))
    Q = rng.random((40, 16))
    ours = FlatNeighbors(n_neighbors=7).fit(X)
    ref = NearestNeighbors(n_neighbors=7, algorithm="brute").fit(X)
    d, i = ours.kneighbors(Q)
    d_ref, i_ref = ref.kneighbors(Q)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_allclose(d, d_ref, rtol=1e-5)
