"""Lloyd k-means training, orchestrated in Python over the Cython kernels.

Used to train the coarse quantizer (``nlist`` cells) and the product
quantizer's codebooks (``2**nbits`` centres per sub-space). The loops live in
the kernels: each iteration is one top-1 exact search
(:func:`annlearn._flat_search.flat_kneighbors`) and one centre update
(:func:`annlearn._kmeans.centre_sums`).
"""

from __future__ import annotations

import time

import numpy as np
from sklearn.utils import check_random_state

from annlearn import _flat_search
from annlearn._kmeans import centre_sums
from annlearn._threads import flat_search_blas_guard

__all__ = ["train_kmeans"]


def train_kmeans(
    X: np.ndarray,
    n_clusters: int,
    *,
    max_iter: int = 25,
    tol: float = 1e-4,
    random_state=None,
    n_threads: int = 1,
    verbose: int = 0,
    name: str = "k-means",
) -> tuple[np.ndarray, float, int]:
    """Cluster the rows of X with Lloyd's algorithm.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features), float32, C-contiguous
        Training points (validated by the caller).
    n_clusters : int
        Number of centres, at most ``n_samples``.
    max_iter : int, default=25
        Maximum number of Lloyd iterations.
    tol : float, default=1e-4
        Stop when the squared shift of the centres, summed, is below ``tol``
        times the total variance of X (scikit-learn's rule).
    random_state : int, RandomState instance or None, default=None
        Seeds the initial centres (distinct rows of X drawn at random, as
        FAISS does) and the splitting of empty clusters.
    n_threads : int, default=1
        OpenMP threads of the kernels.
    verbose : int, default=0
        Print the inertia and time of every iteration when > 0.
    name : str, default="k-means"
        What to call this training in verbose output.

    Returns
    -------
    centers : ndarray of shape (n_clusters, n_features), float32
    inertia : float
        Sum of squared distances of the points to their centre, at the last
        assignment.
    n_iter : int
        Iterations run.

    Notes
    -----
    A cluster left empty by an update is re-seeded by splitting a populated
    one (chosen with probability proportional to its size): the two centres
    are moved apart by a small step along a random direction scaled by the
    data's spread, and each keeps half of the points (FAISS's rule, with an
    additive step so that zero coordinates split too).
    """
    n_samples, n_features = X.shape
    if not 1 <= n_clusters <= n_samples:
        raise ValueError(
            f"{name}: expected 1 <= n_clusters <= n_samples, but n_clusters = "
            f"{n_clusters}, n_samples = {n_samples}."
        )
    rng = check_random_state(random_state)
    centers = X[np.sort(rng.choice(n_samples, n_clusters, replace=False))].copy()
    spread = np.sqrt(np.var(X, axis=0, dtype=np.float64))
    threshold = tol * float(np.sum(spread**2))
    inertia = np.inf
    n_iter = 0
    with flat_search_blas_guard():
        for n_iter in range(1, max_iter + 1):
            start = time.perf_counter()
            sqnorms = _flat_search.row_sqnorms(centers, n_threads)
            distances, labels = _flat_search.flat_kneighbors(
                X, centers, sqnorms, 1, _flat_search.METRIC_SQEUCLIDEAN, n_threads
            )
            inertia = float(distances.sum(dtype=np.float64))
            sums, counts = centre_sums(X, labels[:, 0], n_clusters, n_threads)
            new_centers = sums / np.maximum(counts, 1)[:, None]
            _split_empty_clusters(new_centers, counts, spread, rng)
            new_centers = new_centers.astype(np.float32)
            shift = float(np.sum((new_centers - centers) ** 2, dtype=np.float64))
            centers = new_centers
            if verbose:
                print(
                    f"[{name}] iteration {n_iter}: inertia {inertia:.6g}, centre "
                    f"shift {shift:.3g}, {time.perf_counter() - start:.2f} s"
                )
            if shift <= threshold:
                break
    return np.ascontiguousarray(centers), inertia, n_iter


def _split_empty_clusters(
    centers: np.ndarray, counts: np.ndarray, spread: np.ndarray, rng
) -> None:
    """Re-seed every empty cluster by splitting a populated one, in place."""
    for empty in np.flatnonzero(counts == 0):
        weights = np.maximum(counts - 1, 0).astype(np.float64)
        if weights.sum() == 0:
            return  # every cluster has at most one point: nothing to split
        donor = rng.choice(len(counts), p=weights / weights.sum())
        step = 1e-3 * spread * rng.choice((-1.0, 1.0), size=spread.shape)
        centers[empty] = centers[donor] + step
        centers[donor] = centers[donor] - step
        counts[empty] = counts[donor] // 2
        counts[donor] -= counts[empty]
