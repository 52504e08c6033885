"""CoarseQuantizer: the k-means cells of an inverted file.

Cells for the inner product reduce maximum inner product search to nearest
neighbour search as Bachrach et al. (2014) do. Every row ``x`` is lifted to
``[x, sqrt(M2 - ||x||^2)]``, ``M2`` the largest squared norm of the training
rows, so that all lifted rows have the same norm, and a query ``q`` to
``[q, 0]``. The lifted distance ``||q||^2 + M2 - 2 <q, x>`` then ranks rows as
``-<q, x>`` does, and L2 k-means on the lifted rows gives cells that a query
probes by its lifted distance to their centres: training, assignment and
probing use one metric. k-means run directly by inner product has no such
consistency (the mean of a cell does not maximise its inner products) and
leaves many cells empty.

Spherical cells (``spherical=True``, for indexes whose codes are of the
vectors, so that the cells only route queries) keep the lifted centres on the
sphere of the lifted rows, radius ``sqrt(M2)``, at every k-means step. All
lifted centres then have one norm, so the nearest lifted centres of a query
are those of largest inner product ``<q, c>``: FAISS's inner-product cells
(normalised centres) for unit rows, and more of a query's true neighbours in
its probed cells on sentence embeddings. With codes of the residuals the
cell means are kept instead, as they make the residuals smallest.
"""

from __future__ import annotations

import numpy as np

from annlearn import _flat_search
from annlearn._clustering import train_kmeans
from annlearn._threads import flat_search_blas_guard

__all__ = ["CoarseQuantizer"]

_METRICS = ("l2", "inner_product")


class CoarseQuantizer:
    """``nlist`` centres that split the space into cells.

    Parameters
    ----------
    centers : ndarray of shape (nlist, n_features), float32
        The cell centres.
    metric : {"l2", "inner_product"}
        The term 1 that ``search`` returns: ``||x - c||^2`` or ``-<x, c>``.
    lift : dict or None, default=None
        ``"inner_product"`` only: ``"extra"``, the lifted coordinate of each
        centre (shape (nlist,), float32), and ``"max_sqnorm"``, the ``M2`` of
        the rows (a float; see the module docstring). Cells are then those
        of the lifted L2 distance. ``None`` with ``"inner_product"``: a
        vector picks the cells of largest inner product, as indexes saved by
        annlearn before the lift did.

    Attributes
    ----------
    sqnorms : ndarray of shape (nlist,), float32
        Squared norms of the centres (the flat search kernel takes them).
    """

    def __init__(
        self, centers: np.ndarray, metric: str = "l2", lift: dict | None = None
    ) -> None:
        if metric not in _METRICS:
            raise ValueError(f"metric must be 'l2' or 'inner_product', got {metric!r}.")
        if lift is not None and metric != "inner_product":
            raise ValueError("Only inner-product cells are lifted.")
        self.centers = centers
        self.metric = metric
        self.lift = lift
        self.sqnorms = _flat_search.row_sqnorms(centers, 1)
        if lift is not None:
            # Centres as [c, extra, -||c_lifted||^2 / 2]: against a row
            # lifted to [x, e, 1], the inner product is <x, c> + e * extra -
            # ||c_lifted||^2 / 2, largest for the nearest lifted centre.
            extra = lift["extra"]
            lifted_sqnorms = self.sqnorms + extra * extra
            self._probe_centers = np.ascontiguousarray(
                np.column_stack([centers, extra, -0.5 * lifted_sqnorms]),
                dtype=np.float32,
            )
            self._half_lifted_sqnorms = 0.5 * lifted_sqnorms

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
        spherical: bool = False,
    ) -> CoarseQuantizer:
        """k-means on the rows of X (float32, C-contiguous), lifted for
        ``"inner_product"``, spherical if asked (``"inner_product"`` only; see
        the module docstring)."""
        if spherical and metric != "inner_product":
            raise ValueError("Only inner-product cells are spherical.")
        lift = radius = None
        if metric == "inner_product":
            sqnorms = _flat_search.row_sqnorms(X, n_threads)
            max_sqnorm = float(sqnorms.max())
            X = np.column_stack([X, _extra_coordinate(sqnorms, max_sqnorm)])
            if spherical:
                radius = np.sqrt(max_sqnorm)
        centers, _, _ = train_kmeans(
            X,
            nlist,
            max_iter=max_iter,
            random_state=random_state,
            n_threads=n_threads,
            verbose=verbose,
            name="coarse quantizer",
            sphere_radius=radius,
        )
        if metric == "inner_product":
            lift = {
                "extra": np.ascontiguousarray(centers[:, -1]),
                "max_sqnorm": max_sqnorm,
            }
            centers = np.ascontiguousarray(centers[:, :-1])
        return cls(centers, metric, lift)

    @property
    def nlist(self) -> int:
        """Number of cells."""
        return len(self.centers)

    def search(
        self, X: np.ndarray, nprobe: int, n_threads: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``nprobe`` best cells of each query (row of X), best first.

        Returns
        -------
        terms : ndarray of shape (n, nprobe), float32
            Term 1 of the ADC distance of each probed cell: ``||x - c||^2``
            (``"l2"``) or ``-<x, c>`` (``"inner_product"``).
        cells : ndarray of shape (n, nprobe), int64
        """
        if self.lift is None:
            metric = (
                _flat_search.METRIC_SQEUCLIDEAN
                if self.metric == "l2"
                else _flat_search.METRIC_INNER_PRODUCT
            )
            return self._nearest(X, self.centers, nprobe, metric, n_threads)
        # A query's lifted coordinate is 0.
        lifted = np.zeros((len(X), X.shape[1] + 2), dtype=np.float32)
        lifted[:, :-2] = X
        lifted[:, -1] = 1.0
        scores, cells = self._nearest(
            lifted,
            self._probe_centers,
            nprobe,
            _flat_search.METRIC_INNER_PRODUCT,
            n_threads,
        )
        # score = -<x, c> + ||c_lifted||^2 / 2 (cells with no centre at all,
        # -1, only appear when nprobe > nlist, which callers clamp).
        return scores - self._half_lifted_sqnorms[cells], cells

    def assign(self, X: np.ndarray, n_threads: int) -> np.ndarray:
        """The cell of each row of X (a vector to index), shape (n,), int64."""
        if self.lift is None:
            return self.search(X, 1, n_threads)[1][:, 0]
        max_sqnorm = self.lift["max_sqnorm"]
        lifted = np.empty((len(X), X.shape[1] + 2), dtype=np.float32)
        lifted[:, :-2] = X
        # Rows of larger norm than the training rows get 0 (the clipped lift).
        lifted[:, -2] = _extra_coordinate(
            _flat_search.row_sqnorms(X, n_threads), max_sqnorm
        )
        lifted[:, -1] = 1.0
        return self._nearest(
            lifted, self._probe_centers, 1, _flat_search.METRIC_INNER_PRODUCT, n_threads
        )[1][:, 0]

    def _nearest(self, X, centers, k, metric, n_threads):
        # Both centre arrays have nlist rows; the kernel reads sqnorms for L2.
        with flat_search_blas_guard():
            return _flat_search.flat_kneighbors(
                X, centers, self.sqnorms, k, metric, n_threads
            )


def _extra_coordinate(sqnorms: np.ndarray, max_sqnorm: float) -> np.ndarray:
    """``sqrt(max_sqnorm - ||x||^2)`` of each row, 0 where negative."""
    return np.sqrt(np.maximum(max_sqnorm - sqnorms.astype(np.float64), 0.0)).astype(
        np.float32
    )
