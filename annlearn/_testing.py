"""Test helpers shared by annlearn's test suite."""

from __future__ import annotations

import numpy as np

__all__ = ["assert_knn_quasi_equal"]


def assert_knn_quasi_equal(
    dist: np.ndarray,
    ind: np.ndarray,
    ref_dist: np.ndarray,
    ref_ind: np.ndarray,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """Assert two k-NN results are equal up to float32 near-ties.

    Distances must agree within ``rtol``/``atol``. Indices must agree except
    inside groups of near-tied distances, where the *set* of indices of the
    group must agree; at the last rank a near-tied group may be cut
    differently, so there only the ids whose distance is clearly below the
    k-th distance must be found.

    Parameters
    ----------
    dist, ind : ndarray of shape (n_queries, k)
        Result to check.
    ref_dist, ref_ind : ndarray of shape (n_queries, k)
        Reference (e.g. scikit-learn, float64).
    rtol, atol : float
        Tolerance on distances; two distances closer than it are tied.
    """
    dist = np.asarray(dist, dtype=np.float64)
    ref_dist = np.asarray(ref_dist, dtype=np.float64)
    ind = np.asarray(ind)
    ref_ind = np.asarray(ref_ind)
    if dist.shape != ref_dist.shape or np.shape(ind) != np.shape(ref_ind):
        raise AssertionError(
            f"Shapes differ: {dist.shape}/{np.shape(ind)} vs "
            f"{ref_dist.shape}/{np.shape(ref_ind)}."
        )
    np.testing.assert_allclose(dist, ref_dist, rtol=rtol, atol=atol)
    for row, (d, i, rd, ri) in enumerate(
        zip(dist, ind, ref_dist, ref_ind, strict=True)
    ):
        tol = atol + rtol * np.abs(rd)
        kth = rd[-1]
        for j in range(len(ri)):
            if i[j] == ri[j]:
                continue
            group = np.abs(rd - rd[j]) <= tol[j]
            near_kth = abs(rd[j] - kth) <= tol[-1]
            if near_kth:
                # The cut at rank k may keep either of the tied ids.
                continue
            if set(i[group]) != set(ri[group]):
                raise AssertionError(
                    f"Query {row}: neighbour {j} is {i[j]} (distance {d[j]}), "
                    f"expected {ri[j]} (distance {rd[j]}), and they are not tied."
                )
