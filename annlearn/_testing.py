"""Test helpers shared by annlearn's test suite."""

from __future__ import annotations

import numpy as np

__all__ = ["assert_knn_quasi_equal", "float32_knn_tolerance", "float64_distances"]

# Unit roundoff of float32 (half its machine epsilon): one rounded operation
# on normal numbers errs by at most _U times its result.
_U = 2.0**-24
# Smallest float32 subnormal: the absolute error of one operation that
# underflows is at most half of it.
_SUBNORMAL = 2.0**-149


def _gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): a float32 dot product of n terms
    errs by at most gamma_n * sum |x_i y_i|, whatever the summation order
    (GEMM blocking, SIMD lanes, FMA)."""
    return n * _U / (1.0 - n * _U)


def float64_distances(X, Q, metric: str) -> np.ndarray:
    """Reference distances of every (query, vector) pair, in float64.

    A zero row is at cosine distance 1 from everything, as in FlatNeighbors.

    Returns
    -------
    D : ndarray of shape (n_queries, n_samples)
    """
    X = np.asarray(X, dtype=np.float64)
    Q = np.asarray(Q, dtype=np.float64)
    if metric == "cosine":
        X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-300)
        Q = Q / np.maximum(np.linalg.norm(Q, axis=1, keepdims=True), 1e-300)
    dots = Q @ X.T
    if metric == "cosine":
        return 1.0 - dots
    if metric == "inner_product":
        return -dots
    if metric not in ("sqeuclidean", "euclidean"):
        raise ValueError(f"Unknown metric {metric!r}.")
    # The expanded form loses ~1e-16 of the squared norms: far below float32.
    sq = np.einsum("ij,ij->i", Q, Q)[:, None] + np.einsum("ij,ij->i", X, X) - 2 * dots
    sq = np.maximum(sq, 0.0)
    return np.sqrt(sq) if metric == "euclidean" else sq


def float32_knn_tolerance(
    X, Q, metric: str, ref_dist, *, n_float32: int = 1
) -> np.ndarray:
    """How far apart two distances may be and still be ranked either way by
    annlearn's float32 search, for each reference distance.

    It is twice the worst-case error of one float32 score (two candidates
    are swapped only if their errors, each at most that, cancel their gap),
    derived from the computation of each metric for a query x and a vector
    y (with ``||y||`` the largest norm in X: the bound holds for every
    candidate), u = 2**-24 and gamma_n = n u / (1 - n u):

    - ``"sqeuclidean"``: the search ranks by ``||y||^2 - 2 <x, y>`` (the
      query's own norm is left out), whose error is at most
      ``gamma_{d+2} (||x|| + ||y||)^2``: relative to the norms involved, taken
      about the origin or about the data mean, whichever is larger (the index
      stores data far from the origin centred; the rounding of the centring
      costs a few u more, hence ``gamma_{d+10}``).
    - ``"euclidean"``: that bound ``T`` on the squared distance carried
      through the square root: a distance ``r`` may trade places with any
      distance between ``sqrt(r^2 - T)`` and ``sqrt(r^2 + T)``.
    - ``"cosine"``: rows normalised in float32 (2 roundings per coordinate)
      then multiplied: an absolute ``gamma_{d+6}``, as the cosine distance
      lies in ``[0, 2]`` whatever the norms.
    - ``"inner_product"``: ``-<x, y>``, at most ``gamma_{d+2} ||x|| ||y||``.

    Each bound also covers underflow (``d + 10`` operations each within half
    a subnormal). It assumes that the rows' norms are normal float32 numbers:
    a row of subnormal numbers has a norm float32 cannot hold accurately.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        The indexed vectors, as given to ``fit``.
    Q : array-like of shape (n_queries, n_features)
        The queries.
    metric : {"euclidean", "sqeuclidean", "cosine", "inner_product"}
    ref_dist : array-like of shape (n_queries, k)
        The reference distances the tolerance applies to.
    n_float32 : {1, 2}, default=1
        How many of the two results compared were computed in float32: 1
        against a float64 reference, 2 for two float32 results (e.g. two
        algorithms), whose errors add up.

    Returns
    -------
    atol : ndarray of shape (n_queries, k)
        Absolute tolerance for :func:`assert_knn_quasi_equal` (with
        ``rtol=0``).
    """
    X = np.asarray(X, dtype=np.float64)
    Q = np.asarray(Q, dtype=np.float64)
    ref_dist = np.asarray(ref_dist, dtype=np.float64)
    d = X.shape[1]
    underflow = (d + 10) * _SUBNORMAL
    if metric == "cosine":
        per_query = np.full(len(Q), _gamma(d + 6) + underflow)
    elif metric == "inner_product":
        x_norm = np.sqrt(np.einsum("ij,ij->i", X, X).max())
        q_norms = np.sqrt(np.einsum("ij,ij->i", Q, Q))
        per_query = _gamma(d + 2) * q_norms * x_norm + underflow
    elif metric in ("sqeuclidean", "euclidean"):
        scale = np.zeros(len(Q))
        for origin in (np.zeros(d), X.mean(axis=0)):
            x_norm = np.sqrt(((X - origin) ** 2).sum(axis=1).max())
            q_norms = np.sqrt(((Q - origin) ** 2).sum(axis=1))
            scale = np.maximum(scale, (q_norms + x_norm) ** 2)
        per_query = _gamma(d + 10) * scale + underflow
    else:
        raise ValueError(f"Unknown metric {metric!r}.")
    tol = np.broadcast_to(2.0 * n_float32 * per_query[:, None], ref_dist.shape)
    if metric == "euclidean":
        r2 = ref_dist**2
        below = ref_dist - np.sqrt(np.maximum(r2 - tol, 0.0))
        above = np.sqrt(r2 + tol) - ref_dist
        tol = np.maximum(below, above)
    return np.array(tol)


def assert_knn_quasi_equal(
    dist: np.ndarray,
    ind: np.ndarray,
    ref_dist: np.ndarray,
    ref_ind: np.ndarray,
    *,
    rtol: float = 1e-5,
    atol: float | np.ndarray = 1e-6,
    exact_dist: np.ndarray | None = None,
) -> None:
    """Assert that a k-NN result is a correct one, up to float32 near-ties.

    Modelled on scikit-learn's ``assert_compatible_argkmin_results``
    (formerly ``assert_argkmin_results_quasi_equality``, in
    ``sklearn/metrics/tests/test_pairwise_distances_reduction.py``). Two
    candidates whose distances are closer than the tolerance may be ranked
    either way, so for every query row:

    - ids are distinct and distances sorted;
    - distances agree with the reference rank by rank;
    - an id found in both results has the same distance in both (with
      ``exact_dist``: every returned id has its exact distance);
    - the id sets are equal, except for ids tied with the k-th distance:
      a reference id within the tolerance of the k-th distance may be
      missing, replaced by an id that is also within it (the cut at rank k
      may fall on either side of a tie). Every other id must be found.

    Parameters
    ----------
    dist, ind : array-like of shape (n_queries, k)
        Result to check.
    ref_dist, ref_ind : array-like of shape (n_queries, k)
        Reference (e.g. float64 brute force, or scikit-learn).
    rtol : float, default=1e-5
        Relative tolerance on distances, of the reference distance.
    atol : float or array-like broadcastable to (n_queries, k), default=1e-6
        Absolute tolerance on distances, e.g. from
        :func:`float32_knn_tolerance`. Two distances closer than
        ``atol + rtol * |ref_dist|`` (taken at the reference rank; at the
        k-th rank for ties with the k-th) are tied.
    exact_dist : array-like of shape (n_queries, k), default=None
        Exact (float64) distances of the returned pairs
        ``(query i, ind[i, j])``, computed independently of the result. When
        given, each returned distance must match it, and whether an id
        missing from the reference is tied with the k-th distance is judged
        on it instead of on the distance returned for it.
    """
    dist = np.asarray(dist, dtype=np.float64)
    ref_dist = np.asarray(ref_dist, dtype=np.float64)
    ind = np.asarray(ind)
    ref_ind = np.asarray(ref_ind)
    shapes = {dist.shape, ind.shape, ref_dist.shape, ref_ind.shape}
    if exact_dist is not None:
        exact_dist = np.asarray(exact_dist, dtype=np.float64)
        shapes.add(exact_dist.shape)
    if len(shapes) != 1 or dist.ndim != 2:
        raise AssertionError(
            f"Shapes differ: {dist.shape}/{ind.shape} vs "
            f"{ref_dist.shape}/{ref_ind.shape}"
            + ("" if exact_dist is None else f" (exact {exact_dist.shape})")
            + "."
        )
    n, k = dist.shape
    tol = np.broadcast_to(atol + rtol * np.abs(ref_dist), ref_dist.shape)
    judged = dist if exact_dist is None else exact_dist

    def first(bad):
        """(row, rank) of the first True of a mask, or None."""
        where = np.argwhere(bad)
        return None if len(where) == 0 else tuple(where[0])

    if (at := first(np.diff(np.sort(ind, axis=1), axis=1) == 0)) is not None:
        raise AssertionError(f"Query {at[0]}: ids {ind[at[0]]} are not distinct.")
    if (at := first(np.diff(dist, axis=1) < 0)) is not None:
        raise AssertionError(f"Query {at[0]}: distances {dist[at[0]]} are not sorted.")
    if (at := first(~(np.abs(dist - ref_dist) <= tol))) is not None:
        raise AssertionError(
            f"Query {at[0]}: distance of rank {at[1]} is {dist[at]}, expected "
            f"{ref_dist[at]} (tolerance {tol[at]:.3g})."
        )
    if exact_dist is not None and (
        (at := first(~(np.abs(dist - exact_dist) <= tol))) is not None
    ):
        raise AssertionError(
            f"Query {at[0]}: id {ind[at]} is returned at distance {dist[at]}, but "
            f"its exact distance is {exact_dist[at]} (tolerance {tol[at]:.3g})."
        )

    # Where each returned id sits in the reference row (found or not), with
    # ids and rows folded into one key: the row times the number of distinct
    # ids, plus the id's rank among them.
    _, codes = np.unique(
        np.concatenate([ind.ravel(), ref_ind.ravel()]), return_inverse=True
    )
    rows = np.repeat(np.arange(n), k) * (int(codes.max(initial=0)) + 1)
    keys, ref_keys = rows + codes[: n * k], rows + codes[n * k :]
    order = np.argsort(ref_keys, kind="stable")
    slot = order[np.searchsorted(ref_keys[order], keys).clip(max=n * k - 1)]
    found = (ref_keys[slot] == keys).reshape(n, k)
    slot = np.unravel_index(slot.reshape(n, k), (n, k))
    kth, kth_tol = ref_dist[:, -1:], tol[:, -1:]

    moved = found & ~(np.abs(dist - ref_dist[slot]) <= tol[slot])
    if (at := first(moved)) is not None:
        r = slot[1][at]
        raise AssertionError(
            f"Query {at[0]}: id {ind[at]} is at distance {dist[at]} (rank "
            f"{at[1]}), expected {ref_dist[at[0], r]} (rank {r}), and they are "
            "not tied."
        )
    if (at := first(~found & ~(np.abs(judged - kth) <= kth_tol))) is not None:
        raise AssertionError(
            f"Query {at[0]}: id {ind[at]} (distance {judged[at]}) is not in the "
            f"reference, and not tied with its k-th distance {kth[at[0], 0]} "
            f"(tolerance {kth_tol[at[0], 0]:.3g})."
        )
    missing = ~np.isin(ref_keys, keys).reshape(n, k)
    if (at := first(missing & ~(np.abs(ref_dist - kth) <= kth_tol))) is not None:
        raise AssertionError(
            f"Query {at[0]}: id {ref_ind[at]} (distance {ref_dist[at]}) is "
            f"missing, and it is not tied with the k-th distance {kth[at[0], 0]} "
            f"(tolerance {kth_tol[at[0], 0]:.3g})."
        )
