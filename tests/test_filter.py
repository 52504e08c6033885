"""Filtered search: kneighbors(allowed=...) of FlatNeighbors and IVFPQNeighbors.

Flat results are compared with float64 brute force over the allowed rows of
each query (up to float32 near-ties); IVF-PQ results must hold allowed ids
only and reach, against the filtered exact answer, the recall the same index
reaches unfiltered.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import sparse

from annlearn import FlatNeighbors, IVFPQNeighbors
from annlearn._filter import _pack
from annlearn._testing import (
    assert_knn_quasi_equal,
    float32_knn_tolerance,
    float64_distances,
)
from annlearn.metrics import recall_at_k

METRICS = ["euclidean", "sqeuclidean", "cosine", "inner_product"]


def _blobs(rng, n, d, n_centres=12, anisotropic=False):
    centres = rng.standard_normal((n_centres, d)) * 4
    X = centres[rng.integers(0, n_centres, n)] + rng.standard_normal((n, d))
    if anisotropic:
        X = X * np.geomspace(4.0, 0.05, d)
    return X.astype(np.float32)


@pytest.fixture(scope="module")
def clustered():
    rng = np.random.default_rng(1)
    X = _blobs(rng, 3000, 24)
    Q = _blobs(np.random.default_rng(2), 40, 24)
    return X, Q


def _exact(X, Q, masks, k, metric, ids=None):
    """float64 brute force over the allowed rows: masks (n_queries, n) over
    the rows of X; returns (distances, ids) and the full distance matrix."""
    D = float64_distances(X, Q, metric)
    D_masked = np.where(masks, D, np.inf)
    order = np.argsort(D_masked, axis=1, kind="stable")[:, :k]
    ids = np.arange(len(X)) if ids is None else ids
    return np.take_along_axis(D_masked, order, axis=1), ids[order], D


def _assert_flat_filtered(index, X, Q, masks, k, metric, allowed, ids=None):
    dist, ind = index.kneighbors(Q, k, allowed=allowed)
    ref_dist, ref_ind, D = _exact(X, Q, masks, k, metric, ids)
    row_of = {
        int(i): r for r, i in enumerate(np.arange(len(X)) if ids is None else ids)
    }
    rows = np.vectorize(row_of.__getitem__)(ind)
    assert np.take_along_axis(masks, rows, axis=1).all(), "a disallowed id"
    tol = float32_knn_tolerance(X, Q, metric, ref_dist)
    exact = np.take_along_axis(D, rows, axis=1)
    assert_knn_quasi_equal(dist, ind, ref_dist, ref_ind, atol=tol, exact_dist=exact)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("algorithm", ["brute", "pca_bound"])
@pytest.mark.parametrize("fraction", [0.6, 0.1, 0.01])
def test_flat_shared_filter_equals_exact_over_allowed(
    clustered, metric, algorithm, fraction
):
    X, Q = clustered
    rng = np.random.default_rng(3)
    keep = rng.random(len(X)) < fraction
    keep[rng.choice(len(X), 10, replace=False)] = True
    index = FlatNeighbors(metric=metric, algorithm=algorithm).fit(X)
    masks = np.broadcast_to(keep, (len(Q), len(X)))
    # The id array, the boolean mask, and both with one query (the masked
    # scan rather than the gathered rows, by cost).
    for allowed in (np.flatnonzero(keep), keep):
        _assert_flat_filtered(index, X, Q, masks, 7, metric, allowed)
        _assert_flat_filtered(index, X, Q[:1], masks[:1], 7, metric, allowed)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("fraction", [0.5, 0.02])
def test_flat_per_query_filters(clustered, metric, fraction):
    X, Q = clustered
    rng = np.random.default_rng(4)
    masks = rng.random((len(Q), len(X))) < fraction
    masks[:, :10] = True
    # A few queries with very few rows take the direct path, the others the
    # masked scan, in the same call.
    masks[::5] = False
    masks[::5, rng.choice(len(X), 12, replace=False)] = True
    index = FlatNeighbors(metric=metric).fit(X)
    for allowed in (masks, sparse.csr_matrix(masks), sparse.coo_matrix(masks)):
        _assert_flat_filtered(index, X, Q, masks, 6, metric, allowed)


def test_flat_filter_on_anisotropic_data_with_pca_bound():
    rng = np.random.default_rng(5)
    X = _blobs(rng, 6000, 64, anisotropic=True)
    Q = _blobs(np.random.default_rng(6), 30, 64, anisotropic=True)
    index = FlatNeighbors(algorithm="pca_bound").fit(X)
    assert index.n_bound_components_ > 0
    masks = rng.random((len(Q), len(X))) < 0.3
    _assert_flat_filtered(index, X, Q, masks, 10, "euclidean", masks)
    keep = masks[0]
    shared = np.broadcast_to(keep, masks.shape)
    _assert_flat_filtered(index, X, Q[:3], shared[:3], 10, "euclidean", keep)


def test_user_ids_add_and_remove(clustered):
    X, Q = clustered
    rng = np.random.default_rng(7)
    ids = rng.permutation(10 * len(X))[: len(X)]
    index = FlatNeighbors().fit(X[:2000], ids=ids[:2000])
    index.add(X[2000:], ids=ids[2000:])
    removed = ids[rng.choice(len(X), 300, replace=False)]
    index.remove(removed)
    alive = ~np.isin(ids, removed)
    chosen = rng.choice(ids[alive], 400, replace=False)
    masks = np.broadcast_to(np.isin(ids, chosen), (len(Q), len(X))) & alive
    _assert_flat_filtered(index, X, Q, masks, 5, "euclidean", chosen, ids)
    # A mask over the id space may allow removed ids (their columns are
    # empty): they are ignored.
    space = np.zeros(index._graph_n_columns(), dtype=bool)
    space[chosen] = True
    space[removed[removed < len(space)]] = True
    _assert_flat_filtered(index, X, Q, masks, 5, "euclidean", space, ids)
    # Removed ids as an array are unknown.
    with pytest.raises(ValueError, match="not in the index"):
        index.kneighbors(Q, allowed=np.concatenate([chosen, removed[:2]]))


@pytest.mark.parametrize("make", ["flat", "ivfpq"])
def test_query_is_train_excludes_itself(clustered, make):
    X, _ = clustered
    rng = np.random.default_rng(8)
    keep = rng.random(len(X)) < 0.2
    if make == "flat":
        index = FlatNeighbors(n_neighbors=4).fit(X)
    else:
        index = IVFPQNeighbors(
            n_neighbors=4, nlist=16, nprobe=16, nbits=8, refine_factor=8, random_state=0
        ).fit(X)
    dist, ind = index.kneighbors(allowed=keep)
    D = float64_distances(X, X, "euclidean")
    np.fill_diagonal(D, np.inf)
    D[:, ~keep] = np.inf
    assert keep[ind].all()
    assert not (ind == np.arange(len(X))[:, None]).any()
    if make == "flat":
        ref = np.sort(D, axis=1)[:, :4]
        np.testing.assert_allclose(dist, ref, rtol=1e-4, atol=1e-4)
    else:
        # Approximate: the recall of the X=None search against the exact one.
        ref_ind = np.argsort(D, axis=1, kind="stable")[:, :4]
        assert recall_at_k(ref_ind, ind) > 0.95
    # Per query, with rows in id order, equal to the shared form.
    masks = sparse.csr_matrix(np.broadcast_to(keep, (len(X), len(X))))
    np.testing.assert_array_equal(index.kneighbors(allowed=masks)[1], ind)


@pytest.mark.parametrize(
    "nbits, refine_factor",
    [
        (8, None),
        (4, 4),
        # The other two pairs add no code path of their own: slow only.
        pytest.param(8, 4, marks=pytest.mark.slow),
        pytest.param(4, None, marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("metric", METRICS)
def test_ivfpq_recall_at_full_probe_matches_unfiltered(
    clustered, nbits, refine_factor, metric
):
    """At nprobe=nlist the filtered recall (against the filtered exact answer)
    reaches the unfiltered recall of the same index, up to sampling noise,
    and no disallowed id is ever returned."""
    X, Q = clustered
    rng = np.random.default_rng(9)
    index = IVFPQNeighbors(
        n_neighbors=10,
        nlist=16,
        nprobe=16,
        nbits=nbits,
        n_subquantizers=8,
        metric=metric,
        refine_factor=refine_factor,
        random_state=0,
    ).fit(X)
    flat = FlatNeighbors(n_neighbors=10, metric=metric).fit(X)
    unfiltered = recall_at_k(flat.kneighbors(Q)[1], index.kneighbors(Q)[1])
    for fraction in (0.5, 0.1, 0.01):
        keep = rng.random(len(X)) < fraction
        keep[:20] = True
        ind = index.kneighbors(Q, allowed=keep)[1]
        assert keep[ind].all()
        recall = recall_at_k(flat.kneighbors(Q, allowed=keep)[1], ind)
        assert recall >= unfiltered - 0.05, (fraction, recall, unfiltered)
    masks = rng.random((len(Q), len(X))) < 0.05
    ind = index.kneighbors(Q, allowed=sparse.csr_matrix(masks))[1]
    assert np.take_along_axis(masks, ind, axis=1).all()
    recall = recall_at_k(flat.kneighbors(Q, allowed=masks)[1], ind)
    assert recall >= unfiltered - 0.05


@pytest.mark.parametrize("nbits", [8, 4])
def test_ivfpq_recall_holds_at_default_nprobe(clustered, nbits):
    """The probes widen with 1 / selectivity: at a small nprobe the filtered
    recall does not fall below the unfiltered one at any selectivity."""
    X, Q = clustered
    index = IVFPQNeighbors(
        n_neighbors=10,
        nlist=32,
        nprobe=2,
        nbits=nbits,
        n_subquantizers=8,
        random_state=0,
    ).fit(X)
    flat = FlatNeighbors(n_neighbors=10).fit(X)
    unfiltered = recall_at_k(flat.kneighbors(Q)[1], index.kneighbors(Q)[1])
    rng = np.random.default_rng(10)
    for fraction in (0.3, 0.03, 0.005):
        keep = rng.random(len(X)) < fraction
        keep[:10] = True
        ind = index.kneighbors(Q, allowed=np.flatnonzero(keep))[1]
        assert keep[ind].all()
        recall = recall_at_k(flat.kneighbors(Q, allowed=keep)[1], ind)
        assert recall >= unfiltered - 0.05, (fraction, recall, unfiltered)


def test_ivfpq_after_add_and_remove_with_user_ids(clustered):
    X, Q = clustered
    rng = np.random.default_rng(11)
    ids = 5 * np.arange(len(X)) + 3
    index = IVFPQNeighbors(
        n_neighbors=5,
        nlist=16,
        nprobe=4,
        nbits=4,
        n_subquantizers=8,
        refine_factor=4,
        random_state=0,
    ).fit(X[:2500], ids=ids[:2500])
    index.add(X[2500:], ids=ids[2500:])
    index.remove(ids[:100])
    chosen = rng.choice(ids[100:], 200, replace=False)
    ind = index.kneighbors(Q, allowed=chosen)[1]
    assert np.isin(ind, chosen).all()
    ref = FlatNeighbors(n_neighbors=5).fit(X[np.isin(ids, chosen)], ids=np.sort(chosen))
    assert recall_at_k(ref.kneighbors(Q)[1], ind) >= 0.9


def test_graph_filter_is_a_previous_graph(clustered):
    """kneighbors_graph's own columns are a valid per-query filter."""
    X, Q = clustered
    index = FlatNeighbors(n_neighbors=3).fit(X)
    wide = index.kneighbors_graph(Q, n_neighbors=20)
    narrow = index.kneighbors_graph(Q, n_neighbors=3, allowed=wide)
    np.testing.assert_array_equal(
        narrow.indices, index.kneighbors(Q, 3, return_distance=False).ravel()
    )


@pytest.mark.parametrize("make", ["flat", "ivfpq"])
def test_bad_filters_raise_and_leave_the_index_unchanged(clustered, make):
    X, Q = clustered
    if make == "flat":
        index = FlatNeighbors(n_neighbors=5).fit(X)
    else:
        index = IVFPQNeighbors(n_neighbors=5, nlist=8, random_state=0).fit(X)
    before = dict(index.__dict__)
    n = len(X)
    cases = [
        (np.ones(n - 1, dtype=bool), ValueError, "boolean mask of 2999 entries"),
        (np.ones((len(Q), n + 1), dtype=bool), ValueError, "shape \\(40, 3001\\)"),
        (np.ones((3, n), dtype=bool), ValueError, "boolean array of shape"),
        (sparse.csr_matrix((len(Q) + 1, n)), ValueError, "sparse matrix of shape"),
        (np.arange(5.0), TypeError, "dtype float64"),
        (np.ones((len(Q), n), dtype=np.int64), TypeError, "dtype int64"),
        (np.ones((2, 2, 2), dtype=bool), ValueError, "3 dimensions"),
        (np.array([0, 1, n + 7, -1]), ValueError, "2 ids that are not in the index"),
        (np.arange(4), ValueError, "query 0 \\(and 39 other queries\\) choose from 4"),
        ([], ValueError, "choose from 0 ids"),
    ]
    for allowed, error, message in cases:
        with pytest.raises(error, match=message):
            index.kneighbors(Q, allowed=allowed)
    masks = np.ones((len(Q), n), dtype=bool)
    masks[7, 4:] = False
    with pytest.raises(ValueError, match="query 7 choose from 4 ids"):
        index.kneighbors(Q, allowed=masks)
    # X=None: the query's own id does not count.
    with pytest.raises(ValueError, match="query 0 .* choose from 4 ids other than"):
        index.kneighbors(allowed=np.arange(5))
    assert index.__dict__.keys() == before.keys()
    assert all(index.__dict__[key] is value for key, value in before.items())


def test_pack_layout():
    mask = np.zeros((2, 130), dtype=bool)
    mask[0, [0, 63, 64, 129]] = True
    words = _pack(mask)
    assert words.shape == (2, 3) and words.dtype == np.uint64
    assert words[0, 0] == (1 | 1 << 63) and words[0, 1] == 1 and words[0, 2] == 2
    assert not words[1].any()


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(20, 300),
    k=st.integers(1, 8),
    fraction=st.floats(0.02, 1.0),
    per_query=st.booleans(),
)
def test_flat_filter_property(seed, n, k, fraction, per_query):
    """Any filter, any size: Flat equals brute force over the allowed rows."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 6)).astype(np.float32)
    Q = rng.standard_normal((5, 6)).astype(np.float32)
    shape = (len(Q), n) if per_query else (n,)
    mask = rng.random(shape) < fraction
    mask[..., :k] = True
    masks = np.broadcast_to(mask, (len(Q), n))
    index = FlatNeighbors(algorithm="brute").fit(X)
    _assert_flat_filtered(index, X, Q, masks, k, "euclidean", mask)


def test_ivf_8bit_scan_filter_equals_brute_force():
    """The 8-bit kernel with a bitmap: ADC brute force over the allowed codes
    of the probed lists (word boundaries inside and across lists)."""
    from annlearn import _ivf

    rng = np.random.default_rng(12)
    M, ksub, dsub, nlist = 4, 16, 2, 5
    sizes = np.array([0, 70, 3, 130, 64])
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    codes = rng.integers(0, ksub, (offsets[-1], M), dtype=np.uint8)
    codebooks_t = rng.standard_normal((M, dsub, ksub)).astype(np.float32)
    term2 = rng.standard_normal((nlist, M, ksub)).astype(np.float32)
    Q = rng.standard_normal((9, M * dsub)).astype(np.float32)
    cells = np.array([rng.permutation(nlist)[:3] for _ in Q], dtype=np.int64)
    base = rng.standard_normal(cells.shape).astype(np.float32)
    mask = rng.random((len(Q), len(codes))) < 0.4
    args = (Q, cells, base, codebooks_t, term2, offsets, codes)
    for allowed in (mask, mask[:1]):
        d, p = _ivf.ivfpq_scan(*args, 6, False, 2, allowed=_pack(allowed))
        full_d, full_p = _ivf.ivfpq_scan(*args, len(codes), False, 1)
        for q in range(len(Q)):
            row = allowed[0 if len(allowed) == 1 else q]
            keep = (full_p[q] >= 0) & row[np.maximum(full_p[q], 0)]
            np.testing.assert_array_equal(p[q], full_p[q][keep][:6])
            np.testing.assert_array_equal(d[q], full_d[q][keep][:6])
    with pytest.raises(ValueError, match="Expected allowed of dtype uint64"):
        _ivf.ivfpq_scan(*args, 6, False, 1, allowed=_pack(mask)[:2])


def test_memory_blocks_do_not_change_results(clustered, monkeypatch):
    """Per-query filters are searched one block of queries at a time: a block
    of a single query gives the same results as one block."""
    from annlearn import _filter

    X, Q = clustered
    rng = np.random.default_rng(13)
    masks = rng.random((len(Q), len(X))) < 0.2
    index = FlatNeighbors(n_neighbors=5).fit(X)
    ivf = IVFPQNeighbors(n_neighbors=5, nlist=16, nbits=4, random_state=0).fit(X)
    expected = [index.kneighbors(Q, allowed=masks), ivf.kneighbors(Q, allowed=masks)]
    monkeypatch.setattr(_filter, "_BLOCK_BYTES", 1)
    assert _filter.check_allowed(masks, index._store.ids, len(Q)).block_size() == 1
    for est, (dist, ind) in zip((index, ivf), expected, strict=True):
        d, i = est.kneighbors(Q, allowed=masks)
        np.testing.assert_array_equal(i, ind)
        np.testing.assert_array_equal(d, dist)


@pytest.mark.parametrize("nbits", [8, 4])
def test_ivfpq_exact_and_scan_paths(clustered, monkeypatch, nbits):
    """Both ways of a filtered IVF-PQ query (the widened scan, the exact
    distances to the allowed rows) return allowed ids only, the exact one the
    exact answer."""
    from annlearn import _ivfpq_codec

    X, Q = clustered
    keep = np.random.default_rng(14).random(len(X)) < 0.05
    index = IVFPQNeighbors(
        n_neighbors=5,
        nlist=16,
        nprobe=2,
        nbits=nbits,
        refine_factor=4,
        random_state=0,
    ).fit(X)
    flat = FlatNeighbors(n_neighbors=5).fit(X)
    truth = flat.kneighbors(Q, allowed=keep)
    monkeypatch.setattr(_ivfpq_codec, "_EXACT_COST", 1e-30)
    dist, ind = index.kneighbors(Q, allowed=keep)
    np.testing.assert_array_equal(ind, truth[1])
    np.testing.assert_allclose(dist, truth[0], rtol=1e-5)
    monkeypatch.setattr(_ivfpq_codec, "_EXACT_COST", 1e30)
    ind = index.kneighbors(Q, allowed=keep)[1]
    assert keep[ind].all()
    unfiltered = recall_at_k(flat.kneighbors(Q)[1], index.kneighbors(Q)[1])
    assert recall_at_k(truth[1], ind) >= unfiltered - 0.05


def test_per_query_dense_with_user_ids_and_query_is_train(clustered):
    X, Q = clustered
    rng = np.random.default_rng(15)
    # A permutation: as many columns as rows, but column j is not row j.
    ids = rng.permutation(len(X))
    index = FlatNeighbors(n_neighbors=4).fit(X, ids=ids)
    columns = rng.random((len(Q), len(X))) < 0.3
    _assert_flat_filtered(index, X, Q, columns[:, ids], 4, "euclidean", columns, ids)
    # X=None with the default ids: the filter array is read, never changed.
    default = FlatNeighbors(n_neighbors=4).fit(X)
    per_row = rng.random((len(X), len(X))) < 0.3
    before = per_row.copy()
    ind = default.kneighbors(allowed=per_row)[1]
    np.testing.assert_array_equal(per_row, before)
    assert np.take_along_axis(per_row, ind, axis=1).all()
    assert not (ind == np.arange(len(X))[:, None]).any()


@pytest.mark.parametrize("shared", [True, False])
def test_compact_flat_store_applies_the_filter_in_every_block(monkeypatch, shared):
    """uint8 rows are decoded a block at a time: the filter's bitmap is cut
    at the blocks, and on 8-bit data the answer is float32 storage's."""
    from annlearn import _flat_store

    monkeypatch.setattr(_flat_store, "_COMPACT_BLOCK_BYTES", 64 * 4 * 1000)
    rng = np.random.default_rng(3)
    X = rng.integers(0, 256, (6000, 64)).astype(np.float32)
    Q = X[:40] + 0.5
    compact = FlatNeighbors(n_neighbors=10, vector_dtype="uint8").fit(X)
    plain = FlatNeighbors(n_neighbors=10).fit(X)
    assert len(compact._store._blocks()) > 3
    for share in (0.5, 0.05, 0.005):
        keep = rng.random(len(X) if shared else (len(Q), len(X))) < share
        keep[..., :20] = True
        got, want = (
            compact.kneighbors(Q, allowed=keep),
            plain.kneighbors(Q, allowed=keep),
        )
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
        assert np.broadcast_to(keep, (len(Q), len(X)))[
            np.arange(len(Q))[:, None], got[1]
        ].all()


@pytest.mark.parametrize("vector_dtype", ["uint8", "float16"])
def test_compact_ivfpq_exact_path_decodes_the_allowed_rows(vector_dtype):
    """Few allowed rows take the exact path over the stored vectors: compact
    rows are decoded, and on 8-bit data the answer is exact search's."""
    rng = np.random.default_rng(4)
    X = rng.integers(0, 256, (6000, 32)).astype(np.float32)
    Q = X[:30] + 0.5
    index = IVFPQNeighbors(
        n_neighbors=5, nlist=16, vector_dtype=vector_dtype, random_state=0
    ).fit(X)
    exact = FlatNeighbors(n_neighbors=5).fit(X)
    keep = rng.random(len(X)) < 0.005
    keep[:10] = True
    for allowed in (keep, np.broadcast_to(keep, (len(Q), len(X)))):
        got, want = (
            index.kneighbors(Q, allowed=allowed),
            exact.kneighbors(Q, allowed=keep),
        )
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
