"""Lloyd k-means training, orchestrated in Python over the Cython kernels.

Used to train the coarse quantizer (``nlist`` cells) and the product
quantizer's codebooks (``2**nbits`` centres per sub-space). The loops live in
the kernels: each iteration is one top-1 exact search
(:func:`annlearn._flat_search.flat_kneighbors`; from the second on, through
the principal-component bound of :mod:`annlearn._pca_bound` where its cost
model says it pays, as on images) and one centre update
(:func:`annlearn._kmeans.centre_sums`). The stopping rule and the handling of
empty clusters are scikit-learn's, so that from the same initial centres
``sklearn.cluster.KMeans(algorithm="lloyd", n_init=1)`` stops at the same
iteration with the same inertia (up to float32 rounding).

Why not call scikit-learn's ``KMeans``: this loop is used for every training
because it is faster for the same inertia on each training ``IVFPQNeighbors``
runs. ``benchmarks/bench_kmeans.py`` (Fashion-MNIST, 2 threads, both from the
same initial rows; scikit-learn on OpenBLAS's SkylakeX sgemm) measured
scikit-learn's time per iteration over this loop's at 1.12 for the coarse
quantizer with 256 cells, 1.37 with 1024 cells, 1.42 for a 256-centre PQ
sub-quantizer on 8-feature sub-vectors and 1.19 on 28-feature ones (medians
of 9 paired runs each, this loop faster in 35 of 36; inertias within 0.02%);
with ``OPENBLAS_CORETYPE=Haswell`` (OpenBLAS's AVX2 sgemm) the coarse ratios
were 1.62 and 2.02. On a machine whose cores were also busy with other jobs
the PQ trainings measured 0.85 instead, and the coarse one with 256 cells
about 1.0.
"""

from __future__ import annotations

import time

import numpy as np
from sklearn.utils import check_random_state

from annlearn import _flat_search, _pca_bound
from annlearn._flat_search import METRIC_SQEUCLIDEAN
from annlearn._kmeans import centre_sums
from annlearn._threads import flat_search_blas_guard

__all__ = ["train_kmeans"]

# Rows per block of the variance computation (a few MiB of temporaries).
_VARIANCE_BLOCK = 4096
# The assignments are searched through the principal-component bound only
# from this many rows and features: below, it cannot pay.
_MIN_BOUND_ROWS = 16384
_MIN_BOUND_FEATURES = 32
# Rows its principal axes are estimated on (any orthonormal basis keeps the
# bound exact; these place the leading axes well enough to make it tight).
_BOUND_SAMPLE = 4096


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
    sphere_radius: float | None = None,
    pca_bound: bool | None = None,
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
        Stop when the squared shift of the centres, summed over centres and
        features, is at most ``tol`` times the mean over features of the
        variance of X: scikit-learn's rule (``sklearn.cluster.KMeans``).
        Training also stops when no point changes centre (the shift is then
        zero).
    random_state : int, RandomState instance or None, default=None
        Seeds the initial centres (distinct rows of X drawn at random, as
        FAISS does).
    n_threads : int, default=1
        OpenMP threads of the kernels.
    verbose : int, default=0
        Print the inertia and time of every iteration when > 0.
    name : str, default="k-means"
        What to call this training in verbose output.
    sphere_radius : float or None, default=None
        Spherical k-means: after each update every centre is scaled to this
        norm (a centre at the origin stays there). For rows that all have
        this norm, whose nearest centre is then the one of largest inner
        product.
    pca_bound : bool or None, default=None
        Search each assignment through the principal-component bound
        (:mod:`annlearn._pca_bound`: the same nearest centres as brute force,
        from a thinner GEMM plus the exact distances of the centres the
        bound cannot rule out). None decides by the bound's cost model on
        the initial centres.

    Returns
    -------
    centers : ndarray of shape (n_clusters, n_features), float32
    inertia : float
        The sum of the squared distances of the points to their centre, at
        the last assignment.
    n_iter : int
        Iterations run.

    Notes
    -----
    A cluster left empty by an assignment is given one of the points
    farthest from their own centre, which leaves its cluster; the centre is
    then that point. This is scikit-learn's rule. FAISS instead splits a
    large cluster in two, which gave more inertia on the PQ sub-vectors of
    Fashion-MNIST, whose many repeated rows make initial centres coincide.
    """
    n_samples, n_features = X.shape
    if not 1 <= n_clusters <= n_samples:
        raise ValueError(
            f"{name}: expected 1 <= n_clusters <= n_samples, but n_clusters = "
            f"{n_clusters}, n_samples = {n_samples}."
        )
    rng = check_random_state(random_state)
    init = _initial_centers(X, n_clusters, rng)
    return _lloyd(
        X,
        init,
        max_iter=max_iter,
        tol=tol,
        n_threads=n_threads,
        verbose=verbose,
        name=name,
        sphere_radius=sphere_radius,
        pca_bound=pca_bound,
    )


def _initial_centers(X: np.ndarray, n_clusters: int, rng) -> np.ndarray:
    """Distinct rows of X drawn at random, in row order (a copy)."""
    return X[np.sort(rng.choice(X.shape[0], n_clusters, replace=False))].copy()


def _tolerance(X: np.ndarray, tol: float) -> float:
    """The bound on the summed squared centre shift under which Lloyd stops:
    ``tol`` times the mean over features of the variance of X, which is
    scikit-learn's rule (``sklearn.cluster._kmeans._tolerance``), so that
    ``tol`` means the same in both.

    Computed over row blocks, centred in float32 and summed in float64, so
    that the temporaries stay at one block whatever the number of rows.
    """
    if tol == 0:
        return 0.0
    n_samples = X.shape[0]
    mean = (X.sum(axis=0, dtype=np.float64) / n_samples).astype(X.dtype)
    total = 0.0
    for start in range(0, n_samples, _VARIANCE_BLOCK):
        centred = X[start : start + _VARIANCE_BLOCK] - mean
        total += float(np.einsum("ij,ij->j", centred, centred).sum(dtype=np.float64))
    return total / (n_samples * X.shape[1]) * tol


def _lloyd(
    X: np.ndarray,
    centers: np.ndarray,
    *,
    max_iter: int,
    tol: float,
    n_threads: int,
    verbose: int = 0,
    name: str = "k-means",
    sphere_radius: float | None = None,
    pca_bound: bool | None = None,
) -> tuple[np.ndarray, float, int]:
    """annlearn's Lloyd iterations from the given initial centres."""
    n_clusters = centers.shape[0]
    threshold = _tolerance(X, tol)
    inertia = np.inf
    n_iter = 0
    nearest = _NearestCentre(X, max_iter, n_threads, pca_bound)
    with flat_search_blas_guard():
        for n_iter in range(1, max_iter + 1):
            start = time.perf_counter()
            distances, labels = nearest(centers)
            inertia = float(distances.sum(dtype=np.float64))
            sums, counts = centre_sums(X, labels, n_clusters, n_threads)
            _relocate_empty_clusters(X, distances, labels, sums, counts)
            new_centers = sums / np.maximum(counts, 1)[:, None]
            # A centre no point could be moved to stays where it was.
            new_centers[counts == 0] = centers[counts == 0]
            if sphere_radius is not None:
                norms = np.linalg.norm(new_centers, axis=1)
                away = norms > 0
                new_centers[away] *= (sphere_radius / norms[away])[:, None]
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


class _NearestCentre:
    """The assignment step: the nearest centre of every row of X, by the
    flat search kernel, through the principal-component bound when it pays.

    The first assignment, against rows drawn as centres, is brute force;
    from the second on, the centres are means of rows and the bound is
    decided by cost on them. Its axes are X's (estimated on a sample) and X
    is projected once for all the remaining iterations; only the centres'
    side is projected again each time.
    """

    def __init__(self, X, max_iter: int, n_threads: int, pca_bound) -> None:
        self.X = X
        self.max_iter = max_iter
        self.n_threads = n_threads
        self.bound = None
        n, d = X.shape
        self.force = bool(pca_bound)
        self.pending = self.force or (
            pca_bound is None and n >= _MIN_BOUND_ROWS and d >= _MIN_BOUND_FEATURES
        )
        self.calls = 0

    def __call__(self, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(distances, labels)``, shape (n_samples,) each: the squared
        distance of each row to its nearest centre and that centre."""
        sqnorms = _flat_search.row_sqnorms(centers, self.n_threads)
        if self.pending and (self.force or self.calls > 0):
            self.pending = False
            self._fit_bound(centers)
        self.calls += 1
        query_bound = None
        if self.bound is not None:
            side = _pca_bound.database_bounds(self.bound, centers, sqnorms)
            shift = _pca_bound.query_shift(side, self.scale, self.offset)
            query_bound = (self.projected, side["vectors"], side["sqnorms"], shift)
        distances, labels = _flat_search.flat_kneighbors(
            self.X,
            centers,
            sqnorms,
            1,
            METRIC_SQEUCLIDEAN,
            self.n_threads,
            bound=query_bound,
        )
        return distances[:, 0], labels[:, 0]

    def _fit_bound(self, centers: np.ndarray) -> None:
        """Keep the bound on the cheapest number of X's principal axes for a
        top-1 search among ``centers`` (cost model of
        :func:`annlearn._pca_bound.bound_costs`, X's projection shared by the
        iterations left), unless it is estimated to cost more than
        ``_pca_bound``'s ratio of brute force's and is not forced."""
        sample, queries = _pca_bound.sample_rows(self.X, _BOUND_SAMPLE)
        searches = max(self.max_iter - self.calls, 1)
        self.bound = _pca_bound.cheapest_axes(
            sample,
            queries,
            centers,
            len(centers) * searches,
            True,
            self.force,
            k=1,
            cached=True,
        )
        if self.bound is None:
            return
        self.projected, self.scale, self.offset = _pca_bound.project_queries(
            self.bound, self.X, True
        )


def _relocate_empty_clusters(
    X: np.ndarray,
    distances: np.ndarray,
    labels: np.ndarray,
    sums: np.ndarray,
    counts: np.ndarray,
) -> None:
    """Give every empty cluster, in place, one of the points worst served by
    their centre (largest ``distances``), taken out of its cluster's sum.

    A point is moved only if its cluster keeps another point, so that no
    cluster is emptied in turn, and only if it is not on its centre (it
    would gain nothing). Empty clusters left over
    (fewer such points than empty clusters) keep no point.
    """
    empty = np.flatnonzero(counts == 0)
    if not len(empty):
        return
    candidates = np.argsort(-distances, kind="stable")
    moved = 0
    for point in candidates:
        if moved == len(empty) or distances[point] <= 0:
            break
        old = labels[point]
        if counts[old] <= 1:
            continue
        sums[old] -= X[point]
        counts[old] -= 1
        sums[empty[moved]] = X[point]
        counts[empty[moved]] = 1
        moved += 1
