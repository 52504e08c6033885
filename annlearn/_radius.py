"""Radius queries, shared by annlearn's indexes as scikit-learn's
``RadiusNeighborsMixin`` is by its neighbours estimators.

``radius_neighbors`` and ``radius_neighbors_graph`` follow
:class:`sklearn.neighbors.NearestNeighbors`; the index's
``_radius_search(store, Xq, radius)`` hook gives the hits of prepared
queries as ``(indptr, positions, distances)``, and the mixin turns positions
into ids, drops each indexed vector from its own neighbours (``X=None``),
sorts and splits them. Memory follows the number of hits.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix
from sklearn.utils.validation import check_is_fitted

from annlearn._validation import (
    check_graph_mode,
    check_radius,
    fitted_metric,
    validate_query_data,
)

__all__ = ["RadiusNeighborsMixin"]


class RadiusNeighborsMixin:
    """``radius_neighbors`` and ``radius_neighbors_graph`` over the hooks of
    :class:`annlearn._base.NeighborsBase`."""

    def radius_neighbors(
        self, X=None, radius=None, return_distance=True, sort_results=False
    ):
        """Find the neighbours within a given radius of each query.

        As :meth:`sklearn.neighbors.NearestNeighbors.radius_neighbors`:
        the result holds one array per query, as long as its number of
        neighbours, and takes memory in proportion to it.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), default=None
            Queries. If None, the neighbours of each indexed vector (in id
            order), the vector itself excluded.
        radius : float, default=None
            Largest distance returned, in the metric's units (for
            ``"inner_product"`` the distance is ``-<x, y>``, so a negative
            radius asks for inner products above ``-radius``); the
            estimator's ``radius`` if None.
        return_distance : bool, default=True
            Whether to return the distances too.
        sort_results : bool, default=False
            Sort each query's neighbours by increasing distance (ties by
            id); otherwise they come in no particular order. Needs
            ``return_distance=True``.

        Returns
        -------
        neigh_dist : ndarray of shape (n_queries,), dtype object
            Per query, a float32 array of distances (only if
            ``return_distance=True``).
        neigh_ind : ndarray of shape (n_queries,), dtype object
            Per query, an int64 array of the neighbours' ids.
        """
        if sort_results and not return_distance:
            raise ValueError("return_distance must be True if sort_results is True.")
        indptr, ids, distances = self._radius_csr(X, radius, sort_results)
        neigh_ind = _split(ids, indptr)
        if return_distance:
            return _split(distances, indptr), neigh_ind
        return neigh_ind

    def radius_neighbors_graph(
        self, X=None, radius=None, mode="connectivity", sort_results=False
    ):
        """Compute the graph of the neighbours within a radius, as CSR.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), default=None
            Queries. If None, the neighbours of each indexed vector, the
            vector itself excluded.
        radius : float, default=None
            As for :meth:`radius_neighbors`.
        mode : {"connectivity", "distance"}, default="connectivity"
            ``"connectivity"`` stores ones, ``"distance"`` the distances.
        sort_results : bool, default=False
            Store each row's entries by increasing distance, otherwise by
            column. Only used with ``mode="distance"``.

        Returns
        -------
        A : sparse matrix of shape (n_queries, n_samples_fit)
            CSR matrix; ``A[i, j]`` is set when id ``j`` is within the
            radius of query ``i``. Zero distances are stored explicitly.
        """
        check_graph_mode(mode)
        sort_results = sort_results and mode == "distance"
        indptr, ids, distances = self._radius_csr(X, radius, sort_results)
        if mode == "connectivity":
            distances = np.ones(len(ids), dtype=np.float32)
        return csr_matrix(
            (distances, ids, indptr), shape=(len(indptr) - 1, self._graph_n_columns())
        )

    def _radius_csr(self, X, radius, sort_results: bool):
        """``(indptr, ids, distances)`` of a radius query, rows by query, each
        row by id (by distance, then id, with ``sort_results``)."""
        check_is_fitted(self)
        radius = check_radius(
            self.radius if radius is None else radius, fitted_metric(self)
        )
        store = self._store  # one snapshot for the whole call
        if X is None:
            indptr, positions, distances = self._radius_indexed(store, radius)
        else:
            Xq = self._prepare_queries(validate_query_data(self, X))
            indptr, positions, distances = self._radius_search(store, Xq, radius)
        ids = store.ids[positions]
        # Each row by id, then stably by distance if asked.
        rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        keys = (ids, distances, rows) if sort_results else (ids, rows)
        order = np.lexsort(keys)
        return indptr, ids[order], distances[order]

    def _radius_indexed(self, store, radius: float):
        """Radius neighbours of every indexed vector but itself, rows in id
        order, searched a block of vectors at a time."""
        order = np.argsort(store.ids, kind="stable")
        parts, counts = [], []
        for start in range(0, len(order), self._self_query_block):
            rows = order[start : start + self._self_query_block]
            queries = self._indexed_queries(store, rows)
            indptr, positions, distances = self._radius_search(store, queries, radius)
            query = np.repeat(np.arange(len(rows)), np.diff(indptr))
            keep = positions != rows[query]
            parts.append((positions[keep], distances[keep]))
            counts.append(np.bincount(query[keep], minlength=len(rows)))
        indptr = np.zeros(len(order) + 1, dtype=np.int64)
        if counts:
            np.cumsum(np.concatenate(counts), out=indptr[1:])
        positions = np.concatenate([p for p, _ in parts] or [np.zeros(0, np.int64)])
        distances = np.concatenate([d for _, d in parts] or [np.zeros(0, np.float32)])
        return indptr, positions, distances


def _split(values: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """An object array of the slices ``values[indptr[i]:indptr[i + 1]]``."""
    out = np.empty(len(indptr) - 1, dtype=object)
    # Filled one by one: slices of equal length must not become a 2-d array.
    for i, part in enumerate(np.split(values, indptr[1:-1]) if len(out) else []):
        out[i] = part
    return out
