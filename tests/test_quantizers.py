"""The coarse quantizer (cells, lifted inner-product cells) and the product
quantizer (codes, tables), each on its own."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from annlearn._quantizers import CoarseQuantizer, ProductQuantizer


@pytest.fixture
def X(eight_blobs):
    return eight_blobs


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


@pytest.mark.parametrize("repeated", [False, True])
def test_product_quantizer_trains_as_one_kmeans_per_sub_vector(X, repeated):
    """The M k-means run side by side give what train_kmeans gives on each
    sub-vector from the same random stream: same iterations, stopping rule
    and empty-cluster rule (exercised by rows repeated many times, as the
    pixels of Fashion-MNIST are)."""
    from sklearn.utils import check_random_state

    from annlearn._clustering import train_kmeans

    data = X[:1500].copy()
    if repeated:
        data = np.round(data[np.arange(1500) % 40] * 0.5)  # 40 distinct rows
    M, nbits = 4, 4
    pq = ProductQuantizer.train(
        data, M, nbits, max_iter=20, random_state=0, n_threads=2
    )
    rng = check_random_state(0)
    dsub = data.shape[1] // M
    for m in range(M):
        centers, _, _ = train_kmeans(
            np.ascontiguousarray(data[:, m * dsub : (m + 1) * dsub]),
            2**nbits,
            max_iter=20,
            random_state=rng,
            n_threads=1,
        )
        assert_allclose(pq.codebooks[m], centers, rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize(
    "M,ksub,dsub", [(4, 16, 3), (7, 256, 2), (3, 16, 1), (2, 16, 17)]
)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_pq_encode_is_the_nearest_centre_per_sub_vector(
    M, ksub, dsub, residual, n_threads
):
    """Codes of the rows, or of their residuals to their cells' centres,
    without the residuals materialised: numpy's brute force, ties to the
    smaller centre."""
    rng = np.random.default_rng(M * ksub + dsub)
    codebooks = rng.standard_normal((M, ksub, dsub)).astype(np.float32)
    codebooks[:, 1] = codebooks[:, 0]  # tied centres: the first one wins
    pq = ProductQuantizer(codebooks)
    X = rng.standard_normal((700, M * dsub)).astype(np.float32)
    centers = rng.standard_normal((5, M * dsub)).astype(np.float32)
    cells = rng.integers(0, 5, len(X))
    R = X - centers[cells] if residual else X
    sub = R.reshape(len(X), M, 1, dsub)
    want = ((sub - codebooks[None]) ** 2).sum(-1).argmin(-1)
    got = pq.encode(X, n_threads, *((centers, cells) if residual else ()))
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
    assert not (got == 1).any()


def test_pq_encode_validation():
    pq = ProductQuantizer(np.zeros((2, 16, 3), dtype=np.float32))
    X = np.zeros((4, 6), dtype=np.float32)
    with pytest.raises(ValueError, match="codebooks_t of shape"):
        pq.encode(np.zeros((4, 5), dtype=np.float32), 1)
    with pytest.raises(ValueError, match="given together"):
        pq.encode(X, 1, np.zeros((2, 6), np.float32))
    with pytest.raises(ValueError, match="cells in"):
        pq.encode(X, 1, np.zeros((2, 6), np.float32), np.array([0, 1, 2, 0]))
