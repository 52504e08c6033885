"""The parts of an IVF-PQ index on their own: quantizers, inverted lists, codec."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from annlearn._invlists import InvertedLists
from annlearn._ivfpq_codec import IVFPQCodec
from annlearn._quantizers import CoarseQuantizer, ProductQuantizer


@pytest.fixture
def X():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((8, 16)).astype(np.float32) * 4
    labels = rng.integers(0, 8, 3000)
    return (centres[labels] + rng.standard_normal((3000, 16))).astype(np.float32)


# -- CoarseQuantizer -----------------------------------------------------------
def test_coarse_quantizer_search_is_exact_over_centres(X):
    q = CoarseQuantizer.train(X, 8, max_iter=10, random_state=0, n_threads=2)
    assert q.nlist == 8 and q.centers.dtype == np.float32
    dist, cells = q.search(X[:50], 3, n_threads=2)
    ref = ((X[:50, None, :].astype(np.float64) - q.centers[None]) ** 2).sum(-1)
    assert_array_equal(cells, np.argsort(ref, axis=1, kind="stable")[:, :3])
    assert_allclose(dist, np.take_along_axis(ref, cells, 1), rtol=1e-5)
    assert_array_equal(q.assign(X[:50], 1), cells[:, 0])


def test_coarse_quantizer_inner_product():
    centers = np.array([[1, 0], [0, 3], [-1, -1]], dtype=np.float32)
    q = CoarseQuantizer(centers, "inner_product")
    dist, cells = q.search(np.array([[1.0, 0.5]], dtype=np.float32), 3, 1)
    assert_array_equal(cells, [[1, 0, 2]])  # <x, c> = 1.5, 1.0, -1.5
    assert_allclose(dist, [[-1.5, -1.0, 1.5]])
    with pytest.raises(ValueError, match="metric must be"):
        CoarseQuantizer(centers, "cosine")


def _lifted(X, centers, extra, max_sqnorm):
    """The lift of rows X and of the centres, in float64 (module docstring of
    annlearn/_quantizers/_coarse.py)."""
    X = X.astype(np.float64)
    e = np.sqrt(np.maximum(max_sqnorm - (X**2).sum(1), 0))
    return np.column_stack([X, e]), np.column_stack([centers, extra])


def test_coarse_quantizer_inner_product_cells_are_lifted_l2_cells():
    rng = np.random.default_rng(3)
    # Clustered rows of very different norms: the case the lift is for.
    X = (
        rng.standard_normal((8, 12))[rng.integers(0, 8, 2000)] * 3
        + rng.standard_normal((2000, 12))
    ) * rng.lognormal(0, 0.5, (2000, 1))
    X = X.astype(np.float32)
    q = CoarseQuantizer.train(
        X, 16, metric="inner_product", max_iter=10, random_state=0, n_threads=2
    )
    extra, max_sqnorm = q.lift["extra"], q.lift["max_sqnorm"]
    assert q.metric == "inner_product" and extra.shape == (16,)
    assert_allclose(max_sqnorm, (X.astype(np.float64) ** 2).sum(1).max(), rtol=1e-6)
    assert np.all(extra >= 0) and np.all(np.bincount(q.assign(X, 2), minlength=16))
    # Rows go to the nearest lifted centre (a row of larger norm than any
    # training row is lifted by 0).
    rows = np.vstack([X[:300], 3 * X[:5]])
    lifted_rows, lifted_centers = _lifted(rows, q.centers, extra, max_sqnorm)
    d = ((lifted_rows[:, None] - lifted_centers[None]) ** 2).sum(-1)
    assert_array_equal(q.assign(rows, 2), d.argmin(1))
    # Queries, lifted by 0, probe cells in lifted-distance order, and the
    # term 1 of each is -<q, c>.
    Q = rng.standard_normal((40, 12)).astype(np.float32) * 2
    terms, cells = q.search(Q, 5, n_threads=2)
    dq = (np.column_stack([Q, np.zeros(40)])[:, None] - lifted_centers[None]) ** 2
    assert_array_equal(cells, np.argsort(dq.sum(-1), axis=1, kind="stable")[:, :5])
    ip = Q.astype(np.float64) @ q.centers.T.astype(np.float64)
    assert_allclose(terms, -np.take_along_axis(ip, cells, 1), rtol=1e-4, atol=1e-3)


# -- ProductQuantizer -------------------------------------------------------------
def test_product_quantizer_round_trip(X):
    pq = ProductQuantizer.train(X, 4, 6, max_iter=15, random_state=0, n_threads=2)
    assert (pq.M, pq.ksub, pq.dsub, pq.nbits) == (4, 64, 4, 6)
    codes = pq.encode(X, n_threads=2)
    assert codes.dtype == np.uint8 and codes.shape == (3000, 4) and codes.max() < 64
    decoded = pq.decode(codes)
    # Each sub-vector is coded by its nearest codeword.
    for m in range(4):
        sub = X[:, 4 * m : 4 * m + 4].astype(np.float64)
        d = ((sub[:, None, :] - pq.codebooks[m][None]) ** 2).sum(-1)
        assert_array_equal(codes[:, m], d.argmin(axis=1))
    error = np.mean(np.sum((decoded - X) ** 2, axis=1)) / np.mean(np.sum(X**2, 1))
    assert error < 0.05


def test_product_quantizer_term2_tables(X):
    pq = ProductQuantizer.train(X, 2, 4, max_iter=5, random_state=0, n_threads=1)
    centers = X[:3]
    t2 = pq.term2_tables(centers)
    assert t2.shape == (3, 2, 16)
    # ||c + r||^2 = ||c||^2 + sum_m (||r_m||^2 + 2 <c_m, r_m>)
    r = np.concatenate([pq.codebooks[0][5], pq.codebooks[1][9]])
    lhs = np.sum((centers[1] + r).astype(np.float64) ** 2)
    assert_allclose(lhs, np.sum(centers[1] ** 2) + t2[1, 0, 5] + t2[1, 1, 9], rtol=1e-5)
    assert_allclose(pq.term2_tables(None)[0, 1, 9], np.sum(pq.codebooks[1][9] ** 2))


# -- InvertedLists -----------------------------------------------------------------
def _lists(vectors=True):
    rng = np.random.default_rng(1)
    cells = rng.integers(0, 5, 40)
    codes = rng.integers(0, 256, (40, 3)).astype(np.uint8)
    ids = rng.permutation(1000)[:40].astype(np.int64)
    vecs = rng.standard_normal((40, 6)).astype(np.float32) if vectors else None
    return cells, codes, ids, vecs, InvertedLists.from_cells(5, cells, codes, ids, vecs)


def test_inverted_lists_layout():
    cells, codes, ids, vecs, lists = _lists()
    assert len(lists) == 40 and lists.nlist == 5
    assert_array_equal(lists.sizes(), np.bincount(cells, minlength=5))
    for c in range(5):
        rows = slice(lists.offsets[c], lists.offsets[c + 1])
        mine = np.flatnonzero(cells == c)  # order kept within a cell
        assert_array_equal(lists.ids[rows], ids[mine])
        assert_array_equal(lists.codes[rows], codes[mine])
        assert_array_equal(lists.vectors[rows], vecs[mine])
    assert_array_equal(lists.cells(), np.sort(cells, kind="stable"))
    assert_array_equal(lists.cells_of(np.arange(40)), lists.cells())


def test_inverted_lists_add_remove_are_new_objects():
    cells, codes, ids, vecs, lists = _lists()
    more = lists.add(cells[:3], codes[:3], ids[:3] + 5000, vecs[:3])
    assert more is not lists and len(lists) == 40 and len(more) == 43
    assert set(more.ids) == set(ids) | set(ids[:3] + 5000)
    fewer = more.remove(np.isin(more.ids, ids[:10]))
    assert len(fewer) == 33 and not np.isin(ids[:10], fewer.ids).any()
    assert fewer.offsets[-1] == 33 and np.all(np.diff(fewer.offsets) >= 0)
    for row in range(len(fewer)):  # every row still in its own cell
        original = np.flatnonzero(more.ids == fewer.ids[row])[0]
        assert more.cells()[original] == fewer.cells()[row]
    with pytest.raises(ValueError, match="if and only if"):
        lists.add(cells[:1], codes[:1], ids[:1] + 9000)


def test_inverted_lists_state_round_trip_and_checks():
    *_, lists = _lists(vectors=False)
    state = lists.to_state()
    back = InvertedLists.from_state(state)
    assert back.vectors is None and back.ids is lists.ids
    check = dict(owner="X", n=40, nlist=5, code_size=3, ksub=256, d=6)
    InvertedLists.check_state(state=state, **check)
    bad = dict(state, list_offsets=state["list_offsets"][::-1].copy())
    with pytest.raises(ValueError, match="list_offsets must increase"):
        InvertedLists.check_state(state=bad, **check)
    with pytest.raises(ValueError, match="codes must be < 2\\*\\*nbits = 16"):
        InvertedLists.check_state(state=state, **{**check, "ksub": 16})
    dup = dict(state, ids=np.zeros(40, dtype=np.int64))
    with pytest.raises(ValueError, match="distinct"):
        InvertedLists.check_state(state=dup, **check)


def test_imbalance_factor():
    even = InvertedLists.from_cells(
        4,
        np.repeat(np.arange(4), 5),
        np.zeros((20, 1), np.uint8),
        np.arange(20, dtype=np.int64),
    )
    assert even.imbalance_factor() == 1.0
    one = InvertedLists.from_cells(
        4, np.zeros(20, int), np.zeros((20, 1), np.uint8), np.arange(20)
    )
    assert one.imbalance_factor() == 4.0


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
