"""IVFPQCodec: the scan scores reconstructions, re-ranking by stored vectors."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from annlearn import _fastscan, _ivf
from annlearn._invlists import InvertedLists
from annlearn._ivfpq_codec import IVFPQCodec


@pytest.fixture
def X(eight_blobs):
    return eight_blobs


def _coded(X, *, nlist=8, vectors=False, **params):
    """A codec trained on X with ``params`` and X's lists."""
    params = {"by_residual": True, "n_train": len(X), "random_state": 0, **params}
    (codec,) = IVFPQCodec.train(X, nlist=nlist, n_threads=2, **params)
    cells, codes = codec.encode(X, n_threads=2)
    stored = X if vectors else None
    return codec, InvertedLists.from_cells(
        nlist, cells, codes, np.arange(len(X)), stored
    )


# -- IVFPQCodec ---------------------------------------------------------------
@pytest.mark.parametrize("metric", ["sqeuclidean", "inner_product"])
@pytest.mark.parametrize("by_residual", [True, False])
def test_codec_scan_scores_the_reconstructions(X, metric, by_residual):
    """With every cell probed, the ADC distance of a code is the exact
    distance of the query to the code's reconstruction."""
    codec, lists = _coded(X, M=4, nbits=5, metric=metric, by_residual=by_residual)
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
    codec, lists = _coded(
        X, M=4, nbits=4, metric="euclidean", n_train=2000, vectors=True
    )
    d, pos = codec.search(lists, X[:30], 3, nprobe=8, refine_factor=20, n_threads=2)
    exact = np.sqrt(((X[:30, None, :] - lists.vectors[pos]) ** 2).sum(-1))
    assert_allclose(d, exact, rtol=1e-4, atol=1e-4)
    assert_array_equal(lists.ids[pos[:, 0]], np.arange(30))  # itself first


@pytest.mark.parametrize("metric", ["sqeuclidean", "inner_product"])
def test_4bit_codes_take_the_fast_scan(X, metric):
    """nbits=4 scans with quantized tables: the same distances as the float
    tables up to the quantization bound, nearly the same candidates, and the
    same answer as tables built for all queries first and scanned after."""
    codec, lists = _coded(X, M=8, nbits=4, metric=metric)
    Q = X[:200] + 0.1
    fast_d, fast_p = codec._scan(lists, Q, 4, 20, 2)
    float_d, float_p = _ivf.ivfpq_scan(
        *codec._scan_inputs(lists, Q, 4, 2), 20, codec.inner_product, 2
    )
    overlap = [len(set(a) & set(b)) for a, b in zip(fast_p, float_p, strict=True)]
    assert np.mean(overlap) / 20 > 0.9
    # The quantized distance of each returned code is its ADC distance (the
    # distance to its reconstruction) within M/2 quantization steps.
    inputs = codec._scan_inputs(lists, Q, 4, 2)
    _, cells, base, codebooks_t, term2 = inputs[:5]
    scale = _fastscan.ivf_tables(
        Q, codebooks_t, term2, cells, base, codec.inner_product, 2
    )[1]
    recon = codec.decode(lists.cells_of(fast_p.ravel()), lists.codes[fast_p.ravel()])
    recon = recon.reshape(200, 20, -1).astype(np.float64)
    if metric == "inner_product":
        adc = -np.einsum("qd,qkd->qk", Q, recon)
    else:
        adc = ((Q[:, None, :] - recon) ** 2).sum(-1)
    # In quantization steps of the probe each code was found by.
    probe = (cells[:, None, :] == lists.cells_of(fast_p)[:, :, None]).argmax(2)
    error = np.abs(fast_d - adc) * np.take_along_axis(scale, probe, 1)
    assert error.max() <= 8 / 2 + 0.01
    assert error.mean() > 0.01  # the tables really are quantized
    tables = _fastscan.ivf_tables(
        Q, codebooks_t, term2, cells, base, codec.inner_product, 2
    )
    packed, block_offsets = lists.packed_codes()
    apart = _fastscan.ivf_fastscan(
        *tables, cells, packed, block_offsets, lists.offsets, 20, 2
    )
    assert_array_equal(apart[1], fast_p)
    assert_array_equal(apart[0], fast_d)
    # The packed codes are built once per lists object.
    assert lists.packed_codes() is lists.packed_codes()
