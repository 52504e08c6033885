"""IVFPQCodec: the scan scores reconstructions, re-ranking by stored vectors."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from annlearn._invlists import InvertedLists
from annlearn._ivfpq_codec import IVFPQCodec


@pytest.fixture
def X(eight_blobs):
    return eight_blobs


# -- IVFPQCodec ---------------------------------------------------------------
@pytest.mark.parametrize("metric", ["sqeuclidean", "inner_product"])
@pytest.mark.parametrize("by_residual", [True, False])
def test_codec_scan_scores_the_reconstructions(X, metric, by_residual):
    """With every cell probed, the ADC distance of a code is the exact
    distance of the query to the code's reconstruction."""
    codec = IVFPQCodec.train(
        X,
        nlist=8,
        M=4,
        nbits=5,
        metric=metric,
        by_residual=by_residual,
        n_train=3000,
        random_state=0,
        n_threads=2,
    )
    cells, codes = codec.encode(X, n_threads=2)
    lists = InvertedLists.from_cells(8, cells, codes, np.arange(3000))
    Q = X[:20] + 0.1
    dist, pos = codec.search(lists, Q, 5, nprobe=8, refine_factor=None, n_threads=2)
    recon = codec.decode(lists.cells_of(pos.ravel()), lists.codes[pos.ravel()])
    recon = recon.reshape(20, 5, -1).astype(np.float64)
    if metric == "inner_product":
        expected = -np.einsum("qd,qkd->qk", Q, recon)
    else:
        expected = ((Q[:, None, :] - recon) ** 2).sum(-1)
    assert_allclose(dist, expected, rtol=1e-4, atol=1e-3)
    # and no other reconstruction is better than the k-th
    everything = codec.decode(lists.cells(), lists.codes).astype(np.float64)
    if metric == "inner_product":
        all_d = -(Q.astype(np.float64) @ everything.T)
    else:
        all_d = ((Q[:, None, :] - everything[None]) ** 2).sum(-1)
    kth = np.sort(all_d, axis=1)[:, 4]
    assert np.all(dist[:, 4] <= kth + 1e-3 * np.maximum(1, np.abs(kth)))


def test_codec_refines_with_stored_vectors(X):
    codec = IVFPQCodec.train(
        X,
        nlist=8,
        M=4,
        nbits=4,
        metric="euclidean",
        by_residual=True,
        n_train=2000,
        random_state=0,
        n_threads=2,
    )
    cells, codes = codec.encode(X, 2)
    lists = InvertedLists.from_cells(8, cells, codes, np.arange(3000), X)
    d, pos = codec.search(lists, X[:30], 3, nprobe=8, refine_factor=20, n_threads=2)
    exact = np.sqrt(((X[:30, None, :] - lists.vectors[pos]) ** 2).sum(-1))
    assert_allclose(d, exact, rtol=1e-4, atol=1e-4)
    assert_array_equal(lists.ids[pos[:, 0]], np.arange(30))  # itself first
