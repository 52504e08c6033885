"""CoarseQuantizer: the k-means cells of an inverted file."""

from __future__ import annotations

import numpy as np

from annlearn import _flat_search
from annlearn._clustering import train_kmeans
from annlearn._threads import flat_search_blas_guard

__all__ = ["CoarseQuantizer"]

_SEARCH_METRICS = {
    "l2": _flat_search.METRIC_SQEUCLIDEAN,
    "inner_product": _flat_search.METRIC_INNER_PRODUCT,
}


class CoarseQuantizer:
    """``nlist`` centres that split the space into cells.

    Parameters
    ----------
    centers : ndarray of shape (nlist, n_features), float32
        The cell centres.
    metric : {"l2", "inner_product"}
        How a vector picks its cells: smallest squared distance to the
        centre, or largest inner product with it.

    Attributes
    ----------
    sqnorms : ndarray of shape (nlist,), float32
        Squared norms of the centres (the flat search kernel takes them).
    """

    def __init__(self, centers: np.ndarray, metric: str = "l2") -> None:
        if metric not in _SEARCH_METRICS:
            raise ValueError(f"metric must be 'l2' or 'inner_product', got {metric!r}.")
        self.centers = centers
        self.metric = metric
        self.sqnorms = _flat_search.row_sqnorms(centers, 1)

    @classmethod
    def train(
        cls,
        X: np.ndarray,
        nlist: int,
        *,
        metric: str = "l2",
        max_iter: int,
        random_state,
        n_threads: int,
        verbose: bool = False,
    ) -> CoarseQuantizer:
        """k-means on the rows of X (float32, C-contiguous)."""
        centers, _, _ = train_kmeans(
            X,
            nlist,
            max_iter=max_iter,
            random_state=random_state,
            n_threads=n_threads,
            verbose=verbose,
            name="coarse quantizer",
        )
        return cls(centers, metric)

    @property
    def nlist(self) -> int:
        """Number of cells."""
        return len(self.centers)

    def search(
        self, X: np.ndarray, nprobe: int, n_threads: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``nprobe`` best cells of each row of X, best first.

        Returns
        -------
        distances : ndarray of shape (n, nprobe), float32
            Squared distances to the centres (``"l2"``) or ``-<x, c>``
            (``"inner_product"``): term 1 of the ADC distance.
        cells : ndarray of shape (n, nprobe), int64
        """
        with flat_search_blas_guard():
            return _flat_search.flat_kneighbors(
                X,
                self.centers,
                self.sqnorms,
                nprobe,
                _SEARCH_METRICS[self.metric],
                n_threads,
            )

    def assign(self, X: np.ndarray, n_threads: int) -> np.ndarray:
        """The cell of each row of X, shape (n,), int64."""
        return self.search(X, 1, n_threads)[1][:, 0]
