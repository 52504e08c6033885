"""Compact re-ranking vectors (``vector_dtype``): the scalar quantizer, the
kernels over float16 / uint8 rows, and IVFPQNeighbors with each storage."""

import warnings

import joblib
import numpy as np
import pytest
from sklearn.utils._param_validation import InvalidParameterError

from annlearn import FlatNeighbors, IVFPQNeighbors, _flat_store, _ivf, load, save
from annlearn._quantizers import ScalarQuantizer
from annlearn._testing import assert_knn_quasi_equal, float64_distances
from annlearn.datasets import make_embeddings

METRICS = ["euclidean", "sqeuclidean", "cosine", "inner_product"]
# Dimensions around the SIMD widths (8, 16, 32): every tail of the kernels.
DIMS = [1, 5, 8, 15, 16, 17, 31, 32, 33, 47, 100]


def _pixels(n, d, seed):
    """8-bit data: clustered integer rows in [0, 255] (as images are)."""
    rng = np.random.default_rng(seed)
    centres = rng.integers(0, 256, (12, d))
    rows = centres[rng.integers(0, 12, n)] + rng.integers(-40, 41, (n, d))
    return np.clip(rows, 0, 255).astype(np.float32)


def _anisotropic(n, d, seed):
    """Clustered rows stretched by very different scales per feature, off
    the origin."""
    X = make_embeddings(n, d, n_clusters=20, random_state=seed)
    scales = np.geomspace(0.01, 100.0, d).astype(np.float32)
    return X * scales + np.float32(50.0)


def _recall(found, truth):
    k = truth.shape[1]
    return np.mean(
        [len(set(a) & set(b)) / k for a, b in zip(found, truth, strict=True)]
    )


def _index(**params):
    defaults = dict(
        n_neighbors=10, nlist=16, nprobe=4, nbits=4, refine_factor=8, random_state=0
    )
    return IVFPQNeighbors(**{**defaults, **params})


# -- the scalar quantizer ------------------------------------------------------


def test_uint8_is_lossless_on_8bit_data():
    X = _pixels(500, 20, 0) + np.float32(1000.0)  # integers off the origin
    X[:, 3] = 7.0  # a constant feature
    sq = ScalarQuantizer.train(X, "uint8")
    assert np.all(sq.scale == 1.0)
    codes, clipped = sq.encode(X)
    assert codes.dtype == np.uint8 and clipped == 0
    np.testing.assert_array_equal(sq.decode(codes), X)


def test_uint8_error_is_half_a_step_and_mixed_features():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2000, 6)).astype(np.float32) * [1, 10, 0.1, 1, 1, 1]
    X[:, 4] = rng.integers(0, 200, 2000)  # integers: unit steps
    X[:, 5] = rng.integers(0, 400, 2000)  # integers spanning > 256 values
    sq = ScalarQuantizer.train(X.astype(np.float32), "uint8")
    assert sq.scale[4] == 1.0 and sq.scale[5] > 1.0
    decoded = sq.decode(sq.encode(X.astype(np.float32))[0])
    error = np.abs(decoded - X).max(axis=0)
    assert np.all(error <= sq.scale * 0.5 * (1 + 1e-5))
    assert error[4] == 0.0


def test_uint8_encoding_is_numpys_rounding_and_counts_clipped_rows():
    rng = np.random.default_rng(2)
    X = (rng.standard_normal((3000, 37)) * 50).astype(np.float32)
    sq = ScalarQuantizer.train(X[:2000], "uint8")  # the other rows may clip
    codes, clipped = sq.encode(X)
    steps = np.rint((X - sq.offset) / sq.scale)
    np.testing.assert_array_equal(codes, np.clip(steps, 0, 255).astype(np.uint8))
    outside = ((steps < 0) | (steps > 255)).any(axis=1).sum()
    assert clipped == outside > 0
    # Halves round to even, as np.rint.
    half = ScalarQuantizer("uint8", np.zeros(4, np.float32), np.ones(4, np.float32))
    row = np.array([[0.5, 1.5, 2.5, 254.5]], dtype=np.float32)
    np.testing.assert_array_equal(half.encode(row)[0], [[0, 2, 2, 254]])


@pytest.mark.parametrize("n_threads", [1, 2])
def test_uint8_range_is_numpys_over_all_rows(n_threads):
    # Enough rows for two threads; integer features, fractional ones, one
    # feature fractional in a single row of the last block only.
    rng = np.random.default_rng(3)
    X = (rng.standard_normal((70_001, 9)) * 30).astype(np.float32)
    X[:, :5] = np.rint(X[:, :5])
    X[-1, 4] += 0.5
    sq = ScalarQuantizer.train(X, "uint8", n_threads)
    span = X.max(axis=0).astype(np.float64) - X.min(axis=0)
    integral = (X == np.rint(X)).all(axis=0)
    np.testing.assert_array_equal(sq.offset, X.min(axis=0))
    exact = integral & (span <= 255)
    np.testing.assert_array_equal(
        sq.scale, np.where(exact, 1.0, span / 255).astype(np.float32)
    )
    assert integral.tolist() == [True] * 4 + [False] * 5
    codes, clipped = sq.encode(X, n_threads)
    np.testing.assert_array_equal(codes, sq.encode(X)[0])
    assert clipped == 0
    empty = ScalarQuantizer.train(np.empty((0, 3), np.float32), "uint8", n_threads)
    np.testing.assert_array_equal(empty.offset, 0.0)


def test_float16_overflow_is_refused():
    sq = ScalarQuantizer.train(np.ones((3, 2), np.float32), "float16")
    with pytest.raises(ValueError, match="vector_dtype='float16' holds magnitudes"):
        sq.encode(np.array([[1.0, 7e4]], dtype=np.float32))


# -- the kernels ---------------------------------------------------------------


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("inner_product", [False, True])
def test_refine_reads_compact_rows_as_their_decoded_vectors(d, inner_product):
    rng = np.random.default_rng(d)
    Q = rng.standard_normal((9, d)).astype(np.float32)
    candidates = rng.integers(-1, 60, (9, 25))
    # float16: the decoded rows are exact float32 values.
    V = rng.standard_normal((60, d)).astype(np.float16)
    got = _ivf.refine(Q, V, candidates, 6, inner_product, 2)
    want = _ivf.refine(Q, V.astype(np.float32), candidates, 6, inner_product, 2)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    # uint8 with a general quantizer: the decoded rows up to one rounding.
    sq = ScalarQuantizer(
        "uint8",
        rng.standard_normal(d).astype(np.float32),
        (rng.random(d) + 0.01).astype(np.float32),
    )
    codes = rng.integers(0, 256, (60, d)).astype(np.uint8)
    got = sq.refine(Q, codes, candidates, 6, inner_product, 2)
    want = _ivf.refine(Q, sq.decode(codes), candidates, 6, inner_product, 2)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("inner_product", [False, True])
def test_refine_on_8bit_rows_is_float32_bit_for_bit(d, inner_product):
    rng = np.random.default_rng(d)
    X = _pixels(80, d, d)
    Q = np.concatenate([_pixels(5, d, d + 1), rng.random((5, d), np.float32) * 255])
    candidates = rng.integers(0, 80, (10, 30))
    sq = ScalarQuantizer.train(X, "uint8")
    codes, _ = sq.encode(X)
    got = sq.refine(Q, codes, candidates, 7, inner_product, 1)
    want = _ivf.refine(Q, X, candidates, 7, inner_product, 1)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
@pytest.mark.parametrize("inner_product", [False, True])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_exact_scores_are_refines_distances_in_place(dtype, inner_product, n_threads):
    """exact_scores gives every candidate's exact distance where it stands
    (+inf for -1): sorted by (distance, row), they are refine's answer."""
    rng = np.random.default_rng(3)
    d = 37
    X = _pixels(300, d, 1) if dtype == "uint8" else rng.standard_normal((300, d))
    sq = ScalarQuantizer.train(X.astype(np.float32), dtype)
    stored = sq.encode(X.astype(np.float32))[0]
    Q = rng.standard_normal((2000, d)).astype(np.float32)
    candidates = np.stack([rng.permutation(300)[:12] for _ in range(len(Q))])
    candidates[rng.random(candidates.shape) < 0.2] = -1
    scores = sq.exact_scores(Q, stored, candidates, inner_product, n_threads)
    assert scores.shape == candidates.shape and scores.dtype == np.float32
    assert np.isinf(scores[candidates < 0]).all()
    assert np.isfinite(scores[candidates >= 0]).all()
    dist, pos = sq.refine(Q, stored, candidates, 12, inner_product, n_threads)
    order = np.lexsort((np.where(candidates < 0, 2**62, candidates), scores), axis=1)
    np.testing.assert_array_equal(np.take_along_axis(candidates, order, 1), pos)
    np.testing.assert_array_equal(np.take_along_axis(scores, order, 1), dist)
    with pytest.raises(ValueError, match="one row per query"):
        sq.exact_scores(Q[:3], stored, candidates, inner_product, 1)
    with pytest.raises(ValueError, match="candidates must lie"):
        sq.exact_scores(Q, stored, candidates + 300, inner_product, 1)


def test_refine_rejects_inconsistent_rows():
    Q = np.zeros((2, 4), np.float32)
    cand = np.zeros((2, 3), np.int64)
    with pytest.raises(ValueError, match="offset and scale"):
        _ivf.refine(Q, np.zeros((5, 4), np.uint8), cand, 2, False, 1)
    with pytest.raises(ValueError, match="float32, float16 or uint8"):
        _ivf.refine(Q, np.zeros((5, 4), np.int16), cand, 2, False, 1)
    with pytest.raises(ValueError, match="n_features"):
        _ivf.refine(Q, np.zeros((5, 3), np.float16), cand, 2, False, 1)


# -- IVFPQNeighbors --------------------------------------------------------------


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "inner_product"])
def test_uint8_on_8bit_data_equals_float32(metric):
    X, Q = _pixels(3000, 48, 0), _pixels(60, 48, 1)
    ref = _index(metric=metric).fit(X)
    est = _index(metric=metric, vector_dtype="uint8").fit(X)
    assert est._store.vectors.dtype == np.uint8
    for got, want in zip(est.kneighbors(Q), ref.kneighbors(Q), strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(
        est.radius_neighbors(Q[:10], radius=ref.kneighbors(Q[:10])[0][:, 4].max()),
        ref.radius_neighbors(Q[:10], radius=ref.kneighbors(Q[:10])[0][:, 4].max()),
        strict=True,
    ):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    assert est.score(Q) == ref.score(Q)


@pytest.mark.parametrize("make", [_pixels, _anisotropic, make_embeddings])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_compact_storage_recall_and_exact_distances(make, metric, dtype):
    if make is make_embeddings:
        X, Q = make(3000, 32, random_state=0), make(60, 32, random_state=1)
    else:
        X, Q = make(3000, 32, 0), make(60, 32, 1)
    ref = _index(metric=metric).fit(X)
    est = _index(metric=metric, vector_dtype=dtype).fit(X)
    dist, ind = est.kneighbors(Q)
    # Nearly the neighbours of float32 storage ...
    assert _recall(ind, ref.kneighbors(Q)[1]) >= (0.97 if dtype == "float16" else 0.9)
    # ... at their exact distances to the stored vectors (float64 reference).
    stored = est._store.decoded_vectors()
    rows = np.searchsorted(est._store.ids, ind, sorter=np.argsort(est._store.ids))
    rows = np.argsort(est._store.ids)[rows]
    Qp = est._prepare(Q.astype(np.float32))
    if metric == "cosine":
        # 1 - <x, y> with the stored rows, normalised before quantization
        # (not after: the distance is to what is stored).
        want = np.stack(
            [
                np.clip(1 - stored[r].astype(float) @ q, 0, 2)
                for r, q in zip(rows, Qp, strict=True)
            ]
        )
    else:
        want = np.stack(
            [
                float64_distances(stored[r], q[None], metric)[0]
                for r, q in zip(rows, Qp, strict=True)
            ]
        )
    np.testing.assert_allclose(dist, want, rtol=1e-4, atol=1e-3 * np.abs(want).max())


def test_bytes_per_vector_in_summary():
    X = _pixels(2000, 32, 0)
    lines = {
        dtype: _index(vector_dtype=dtype, n_subquantizers=8).fit(X).summary()
        for dtype in ("float32", "float16", "uint8")
    }
    # 8 code bytes + 8 id bytes + the vector.
    assert "bytes per vector: 144 " in lines["float32"]
    assert "bytes per vector: 80 " in lines["float16"]
    assert "bytes per vector: 48 " in lines["uint8"]
    assert "uint8 (scalar-quantized) vectors" in lines["uint8"]


def test_unknown_vector_dtype():
    with pytest.raises(InvalidParameterError, match="'vector_dtype' parameter"):
        _index(vector_dtype="int8").fit(_pixels(500, 8, 0))


def test_float16_refuses_large_values_and_leaves_the_index_as_it_was():
    X = _pixels(2000, 16, 0)
    with pytest.raises(ValueError, match="float16"):
        _index(vector_dtype="float16").fit(X * 1000)
    est = _index(vector_dtype="float16").fit(X)
    before = est.kneighbors(X[:5])
    with pytest.raises(ValueError, match="float16"):
        est.add(X[:3] * 1000)
    assert est.n_samples_fit_ == 2000
    np.testing.assert_array_equal(est.kneighbors(X[:5])[1], before[1])


def test_add_out_of_range_clips_with_a_warning():
    X = _pixels(2000, 16, 0)
    X[:, 0] = np.clip(X[:, 0], 10, 200)
    est = _index(vector_dtype="uint8").fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est.add(X[:4])  # in range: no warning
    new = X[:3].copy()
    # Unit steps from the minimum, 10: codes cover 10 to 265.
    new[0, 0], new[1, 0], new[2, 0] = 0.0, 300.0, 250.0
    with pytest.warns(UserWarning, match="2 of 3 vectors .* clipped"):
        est.add(new, ids=[5000, 5001, 5002])
    stored = est._store.decoded_vectors(np.flatnonzero(est._store.ids >= 5000))
    order = np.argsort(est._store.ids[est._store.ids >= 5000])
    np.testing.assert_array_equal(stored[order][:, 0], [10.0, 265.0, 250.0])
    # The rows are searchable; their distances are to the clipped vectors.
    dist, ind = est.kneighbors(new[:1], n_neighbors=1)
    assert ind[0, 0] == 5000 and dist[0, 0] == 10.0


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_round_trips_and_memory_maps(dtype, tmp_path):
    X, Q = _anisotropic(2500, 24, 0), _anisotropic(20, 24, 1)
    est = _index(vector_dtype=dtype, metric="euclidean").fit(X)
    expected = est.kneighbors(Q)
    path = tmp_path / "index.annlearn"
    save(est, path)
    for mode in (None, "r"):
        loaded = load(path, mmap_mode=mode)
        assert loaded._store.vectors.dtype == dtype
        assert loaded.vector_dtype == dtype
        for got, want in zip(loaded.kneighbors(Q), expected, strict=True):
            np.testing.assert_array_equal(got, want)
        loaded.add(X[:3], ids=[9000, 9001, 9002]).remove([0])
        assert loaded._store.vectors.dtype == dtype
    joblib.dump(est, tmp_path / "index.joblib")
    mapped = joblib.load(tmp_path / "index.joblib", mmap_mode="r")
    assert isinstance(mapped._store.vectors, np.memmap)
    np.testing.assert_array_equal(mapped.kneighbors(Q)[1], expected[1])


def test_corrupted_quantizer_state_is_refused():
    est = _index(vector_dtype="uint8").fit(_pixels(2000, 8, 0))
    state = est.__getstate__()
    with pytest.raises(ValueError, match="_vector_scale must be > 0"):
        IVFPQNeighbors().__setstate__(
            {**state, "_vector_scale": -state["_vector_scale"]}
        )
    with pytest.raises(ValueError, match="if and only if the vectors are uint8"):
        IVFPQNeighbors().__setstate__({**state, "_vector_offset": None})
    store = {**state["_store"], "vectors": state["_store"]["vectors"].astype(np.int16)}
    with pytest.raises(ValueError, match="float32, float16 or uint8"):
        IVFPQNeighbors().__setstate__({**state, "_store": store})


def test_layout_3_state_loads_as_float32():
    """States written before vector_dtype existed hold float32 vectors and
    no quantizer."""
    est = _index().fit(_pixels(2000, 8, 0))
    state = est.__getstate__()
    for key in ("vector_dtype", "_vector_offset", "_vector_scale"):
        del state[key]
    state["_annlearn_format"] = 3
    old = IVFPQNeighbors.__new__(IVFPQNeighbors)
    old.__setstate__(state)
    assert old._store.sq.dtype == "float32" and old._vector_offset is None
    np.testing.assert_array_equal(
        old.kneighbors(_pixels(5, 8, 1))[1], est.kneighbors(_pixels(5, 8, 1))[1]
    )


# -- FlatNeighbors ---------------------------------------------------------------


@pytest.fixture
def small_blocks(monkeypatch):
    """Compact stores decoded 1,024 rows at a time: several blocks to merge."""
    monkeypatch.setattr(_flat_store, "_COMPACT_BLOCK_BYTES", 1 << 12)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "inner_product"])
@pytest.mark.parametrize("algorithm", ["brute", "pca_bound"])
@pytest.mark.parametrize("shift", [0.0, 1e5])
def test_flat_uint8_on_8bit_data_equals_float32(metric, algorithm, shift, small_blocks):
    # shift 1e5: stored centred on an integer mean, still 8-bit.
    X, Q = _pixels(4000, 40, 0) + shift, _pixels(30, 40, 1) + shift
    params = dict(n_neighbors=7, metric=metric, algorithm=algorithm)
    ref = FlatNeighbors(**params).fit(X)
    est = FlatNeighbors(**params, vector_dtype="uint8").fit(X)
    assert est._store.vectors.dtype == np.uint8
    assert (est._center is None) == (ref._center is None)
    for got, want in zip(est.kneighbors(Q), ref.kneighbors(Q), strict=True):
        np.testing.assert_array_equal(got, want)
    radius = ref.kneighbors(Q[:8])[0][:, -1].max()
    got = est.radius_neighbors(Q[:8], radius=radius, sort_results=True)
    want = ref.radius_neighbors(Q[:8], radius=radius, sort_results=True)
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_flat_compact_is_exact_over_the_stored_vectors(metric, dtype, small_blocks):
    X, Q = _anisotropic(3000, 24, 0), _anisotropic(40, 24, 1)
    est = FlatNeighbors(n_neighbors=8, metric=metric, vector_dtype=dtype).fit(X)
    # float32 exact search over the decoded stored vectors is the answer.
    stored = est._store.decoded()
    ref = FlatNeighbors(
        n_neighbors=8, metric="inner_product" if metric == "cosine" else metric
    ).fit(stored)
    Qp = est._prepare_queries(Q.astype(np.float32))
    want_d, want_i = ref.kneighbors(Qp)
    if metric == "cosine":
        want_d = np.clip(1 + want_d, 0, 2)
    assert_knn_quasi_equal(*est.kneighbors(Q), want_d, want_i, rtol=1e-4, atol=1e-4)


def test_flat_add_clips_and_round_trips(tmp_path):
    X = _pixels(3000, 16, 0)
    est = FlatNeighbors(n_neighbors=3, vector_dtype="uint8").fit(X)
    new = X[:2].copy()
    new[0, 0] = 1000.0
    with pytest.warns(UserWarning, match="1 of 2 vectors .* clipped"):
        est.add(new, ids=[7000, 7001])
    path = tmp_path / "flat.annlearn"
    save(est, path)
    for mode in (None, "r"):
        loaded = load(path, mmap_mode=mode)
        assert loaded._store.vectors.dtype == np.uint8
        for got, want in zip(
            loaded.kneighbors(X[:20]), est.kneighbors(X[:20]), strict=True
        ):
            np.testing.assert_array_equal(got, want)
    assert "bytes per vector: 28 (uint8" in est.summary()
    with pytest.raises(InvalidParameterError, match="'vector_dtype' parameter"):
        FlatNeighbors(vector_dtype="float64").fit(X)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_exact_uint8_only_for_integers_from_0_to_255(n_threads):
    from annlearn._ivf import exact_uint8

    rng = np.random.default_rng(3)
    X = rng.integers(0, 256, size=(70_001, 9)).astype(np.float32)
    got = exact_uint8(X, n_threads)
    assert got.dtype == np.uint8 and np.array_equal(got.astype(np.float32), X)
    assert exact_uint8(np.zeros((0, 4), np.float32), n_threads).shape == (0, 4)
    # One other value anywhere (the last row too) and the answer is None.
    for bad in (-1.0, 256.0, 0.5, 255.5, -0.5, np.nan, np.inf, -np.inf):
        for row in (0, 35_000, 70_000):
            Y = X.copy()
            Y[row, 4] = bad
            assert exact_uint8(Y, n_threads) is None, (bad, row)
