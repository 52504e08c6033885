"""Base class of annlearn's neighbour estimators.

It holds what every index shares and no index-specific code: the
scikit-learn semantics of ``kneighbors`` (``X=None`` queries the indexed
vectors, each excluding itself), ``kneighbors_graph``, and ``transform`` /
``fit_transform`` exactly as :class:`sklearn.neighbors.KNeighborsTransformer`
defines them, and ``add``/``remove``. A concrete index keeps its searchable
state in one immutable store object, ``self._store``, with at least ``ids``
(the id of every row) and ``remove(mask)``; every change replaces it whole
(``_store_with`` builds the store with more rows, ``_set_store`` publishes
one). The index implements these hooks, each given the one ``store`` a call
works on:

``_prepare_queries(X)``
    Validated float32 queries -> what the search kernel takes (centred,
    normalised, ...).
``_indexed_queries(store, positions)``
    For ``X=None``: the indexed vectors at these rows of ``store``, already
    prepared (so that each can be searched and excluded from its own
    neighbours).
``_search(store, Xq, n_neighbors, allowed=None)``
    Prepared queries -> ``(distances, positions)``, each of shape
    ``(n_queries, n_neighbors)``, sorted by increasing distance, positions
    being rows of ``store``. ``allowed`` (a :class:`~annlearn._filter.FilterBlock`
    over the rows of ``store``, one row per query or one for all) restricts
    each query to its allowed rows, each query allowing at least
    ``n_neighbors`` (``kneighbors`` has checked it).
``_radius_search(store, Xq, radius)``
    Prepared queries -> ``(indptr, positions, distances)``: the rows within
    ``radius`` of query ``q`` are ``positions[indptr[q]:indptr[q + 1]]``.

A query call reads ``self._store`` once: the size it checks ``n_neighbors``
against is the size it searches, even while another thread adds or removes
vectors. ``fit``, ``add`` and ``remove`` are :func:`transactional`: one that
raises leaves the estimator exactly as it was.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy.sparse import csr_matrix
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
)
from sklearn.utils.validation import check_is_fitted

from annlearn._exact import exact_answers
from annlearn._filter import check_allowed, check_enough
from annlearn._radius import RadiusNeighborsMixin
from annlearn._validation import (
    check_fitted,
    check_graph_mode,
    check_n_neighbors,
    check_new_ids,
    check_removed_ids,
    fitted_metric,
    validate_query_data,
)
from annlearn.metrics import recall_at_k

__all__ = ["NeighborsBase", "transactional"]


def transactional(method):
    """Make a mutating method all-or-nothing.

    The estimator's attributes are restored if the method raises, so that a
    ``fit`` rejected after input validation (which already set
    ``n_features_in_``) or an ``add`` failing half-way leaves the previously
    fitted index usable and unchanged. Arrays are never modified in place
    (the store is replaced whole), so a shallow copy of ``__dict__`` is a
    complete snapshot.
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        saved = dict(self.__dict__)
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise

    return wrapper


class NeighborsBase(
    RadiusNeighborsMixin,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    BaseEstimator,
):
    """Shared query API of annlearn's indexes (see the module docstring)."""

    # Indexed vectors searched at once by queries with X=None: bounds their
    # prepared (decoded, for IVF-PQ) copy to a block, not the whole index.
    _self_query_block = 8192

    def __sklearn_is_fitted__(self) -> bool:
        # What check_is_fitted asks: one attribute, not a scan of them all
        # (which took a fifth of an empty query's time).
        return hasattr(self, "_store")

    # -- hooks -------------------------------------------------------------
    def _prepare_queries(self, X: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def _indexed_queries(
        self, store, positions: np.ndarray
    ) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def _graph_n_columns(self) -> int:
        """Columns of ``kneighbors_graph``: one per id, up to the largest id
        in the index (with the default ids, ``n_samples_fit_``)."""
        ids = self._store.ids
        return int(ids.max()) + 1 if len(ids) else 0

    def _search(
        self, store, X: np.ndarray, n_neighbors: int, allowed=None
    ) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def _describe(self, store) -> list[str]:  # pragma: no cover
        """The lines of ``summary()`` after its header."""
        raise NotImplementedError

    def _radius_search(
        self, store, X: np.ndarray, radius: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def _store_with(self, store, X: np.ndarray, ids: np.ndarray):  # pragma: no cover
        """A new store holding ``store``'s rows and validated rows X."""
        raise NotImplementedError

    def _set_store(self, store) -> None:  # pragma: no cover
        """Publish a new store (one assignment) and the attributes it sets."""
        raise NotImplementedError

    # -- mutations ---------------------------------------------------------
    @transactional
    def add(self, X, ids=None):
        """Index more vectors after ``fit``, with the fitted quantizers if any.

        Parameters
        ----------
        X : array-like of shape (n_new, n_features)
            Vectors to add, validated as in ``fit``. Nothing is retrained.
        ids : array-like of shape (n_new,), default=None
            Their ids: non-negative, distinct, not already in the index.
            ``None``: consecutive ids after the largest id in the index.

        Returns
        -------
        self : object
            The estimator. On any error it is left exactly as it was. The
            index is rebuilt (an O(n_samples_fit_) copy), so add in batches.
        """
        X = validate_query_data(self, X)
        store = self._store
        ids = check_new_ids(ids, len(X), store.ids)
        self._set_store(self._store_with(store, X, ids))
        return self

    @transactional
    def remove(self, ids):
        """Remove vectors by id; they are never returned again.

        The memory is reclaimed at once (the remaining rows are copied into
        new arrays, O(n_samples_fit_)).

        Parameters
        ----------
        ids : array-like of int
            Ids to remove. Every one must be in the index, otherwise a
            ``ValueError`` lists the unknown ones and nothing is removed.

        Returns
        -------
        self : object
            The estimator. On any error it is left exactly as it was.
        """
        check_is_fitted(self)
        store = self._store
        self._set_store(store.remove(check_removed_ids(ids, store.ids)))
        return self

    # -- scikit-learn API --------------------------------------------------
    @property
    def _n_features_out(self) -> int:
        # Columns of ``transform``'s graph (ClassNamePrefixFeaturesOutMixin).
        return self.n_samples_fit_

    def kneighbors(
        self, X=None, n_neighbors=None, return_distance=True, *, allowed=None
    ):
        """Find the k nearest neighbours of each query.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), default=None
            Queries. If None, the neighbours of each indexed vector are
            returned, the vector itself excluded.
        n_neighbors : int, default=None
            Number of neighbours; the estimator's ``n_neighbors`` if None.
        return_distance : bool, default=True
            Whether to return the distances too.
        allowed : array-like or sparse matrix, default=None
            Restrict each search to a subset of ids (filtered search, see the
            user guide). One of:

            - an array of ids (integers, each in the index): one filter for
              every query;
            - a boolean mask of shape ``(n_ids,)``, ``n_ids`` being the
              number of columns of ``kneighbors_graph`` (the largest id + 1):
              one filter for every query, entry ``j`` allowing id ``j``;
            - a boolean array or a scipy sparse matrix of shape
              ``(n_queries, n_ids)``, one row per query (a stored non-zero
              allows its column). With ``X=None`` row ``i`` is the i-th
              smallest id's, as the rows of the result.

            Disallowed vectors are skipped inside the scan (never scored), so
            every query gets ``n_neighbors`` allowed neighbours; a query that
            allows fewer (its own id left out when ``X=None``) raises a
            ``ValueError`` naming it. Mask entries of ids not in the index
            are ignored. None: no filter.

        Returns
        -------
        neigh_dist : ndarray of shape (n_queries, n_neighbors), dtype float32
            Distances, increasing along each row (only if
            ``return_distance=True``).
        neigh_ind : ndarray of shape (n_queries, n_neighbors), dtype int64
            Indices of the neighbours in the fitted data.
        """
        check_fitted(self)
        if n_neighbors is None:
            n_neighbors = self.n_neighbors
        store = self._store  # one snapshot for the whole call
        query_is_train = X is None
        n_neighbors = check_n_neighbors(
            n_neighbors, len(store.ids), query_is_train=query_is_train
        )
        if allowed is not None:
            distances, indices = self._kneighbors_filtered(
                store, X, n_neighbors, allowed
            )
        elif query_is_train:
            distances, indices = self._kneighbors_indexed(store, n_neighbors)
        else:
            Xq = self._prepare_queries(validate_query_data(self, X))
            distances, positions = self._search(store, Xq, n_neighbors)
            indices = _ids_at(store.ids, positions)
        return (distances, indices) if return_distance else indices

    def _kneighbors_indexed(
        self, store, n_neighbors: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Neighbours of every indexed vector but itself, rows in id order,
        searched a block of vectors at a time."""
        ids = store.ids
        order = np.argsort(ids, kind="stable")
        distances = np.empty((len(ids), n_neighbors), dtype=np.float32)
        indices = np.empty((len(ids), n_neighbors), dtype=np.int64)
        for start in range(0, len(ids), self._self_query_block):
            rows = order[start : start + self._self_query_block]
            queries = self._indexed_queries(store, rows)
            dist, positions = self._search(store, queries, n_neighbors + 1)
            block = slice(start, start + len(rows))
            distances[block], indices[block] = _drop_self(
                dist, _ids_at(ids, positions), ids[rows]
            )
        return distances, indices

    def _kneighbors_filtered(
        self, store, X, n_neighbors: int, allowed
    ) -> tuple[np.ndarray, np.ndarray]:
        """``kneighbors`` with a filter, checked whole before any search,
        then searched one block of queries at a time (the block's filter
        bitmaps bound the memory). With ``X=None`` each indexed vector's own
        row is taken out of its filter, so that it needs no removal after."""
        ids = store.ids
        if X is None:
            order = np.argsort(ids, kind="stable")
            filt = check_allowed(allowed, ids, len(ids))
            counts = filt.counts - filt.allows(np.arange(len(ids)), order)
            check_enough(counts, n_neighbors, query_is_train=True)
            step = min(self._self_query_block, filt.block_size(per_query=True))
            Xq = None
        else:
            Xq = self._prepare_queries(validate_query_data(self, X))
            filt = check_allowed(allowed, ids, len(Xq))
            check_enough(filt.counts, n_neighbors, query_is_train=False)
            step = filt.block_size()
        n_queries = filt.n_queries
        distances = np.empty((n_queries, n_neighbors), dtype=np.float32)
        indices = np.empty((n_queries, n_neighbors), dtype=np.int64)
        for start in range(0, n_queries, step):
            stop = min(start + step, n_queries)
            if Xq is None:
                rows = order[start:stop]
                block = filt.block(start, stop, exclude=rows)
                queries = self._indexed_queries(store, rows)
            else:
                block = filt.block(start, stop)
                queries = Xq[start:stop]
            dist, positions = self._search(store, queries, n_neighbors, block)
            distances[start:stop] = dist
            indices[start:stop] = _ids_at(ids, positions)
        return distances, indices

    def kneighbors_graph(
        self, X=None, n_neighbors=None, mode="connectivity", *, allowed=None
    ):
        """Compute the graph of k nearest neighbours as a sparse matrix.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), default=None
            Queries. If None, the neighbours of each indexed vector, the
            vector itself excluded.
        n_neighbors : int, default=None
            Number of neighbours per row; the estimator's ``n_neighbors`` if
            None.
        mode : {"connectivity", "distance"}, default="connectivity"
            ``"connectivity"`` stores ones, ``"distance"`` the distances.
        allowed : array-like or sparse matrix, default=None
            A filter, as for ``kneighbors``: a graph of the same shape (for
            instance a previous result) restricts each row to its columns.

        Returns
        -------
        A : sparse matrix of shape (n_queries, n_samples_fit)
            CSR matrix; ``A[i, j]`` is set when ``j`` is one of the neighbours
            of query ``i``. Zero distances are stored explicitly.
        """
        check_graph_mode(mode)
        if mode == "distance":
            distances, indices = self.kneighbors(
                X, n_neighbors, return_distance=True, allowed=allowed
            )
            data = np.ravel(distances)
        else:
            indices = self.kneighbors(
                X, n_neighbors, return_distance=False, allowed=allowed
            )
            data = np.ones(indices.size, dtype=np.float32)
        n_queries, k = indices.shape
        indptr = np.arange(0, n_queries * k + 1, k)
        return csr_matrix(
            (data, np.ravel(indices), indptr),
            shape=(n_queries, self._graph_n_columns()),
        )

    def transform(self, X):
        """Graph of the neighbours of each row of X, as KNeighborsTransformer.

        In ``mode="distance"`` each row has ``n_neighbors + 1`` entries, so
        that a row of the training data, which is its own nearest neighbour,
        keeps ``n_neighbors`` others; this is what a downstream estimator with
        ``metric="precomputed"`` expects.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)
            Queries.

        Returns
        -------
        Xt : sparse matrix of shape (n_queries, n_samples_fit)
            CSR graph of float32 values.
        """
        check_is_fitted(self)
        add_one = self.mode == "distance"
        return self.kneighbors_graph(
            X, mode=self.mode, n_neighbors=self.n_neighbors + add_one
        )

    def fit_transform(self, X, y=None):
        """Fit to X, then return the neighbour graph of X (see ``transform``).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data.
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        Xt : sparse matrix of shape (n_samples, n_samples)
            CSR graph of float32 values.
        """
        return self.fit(X).transform(X)

    def summary(self) -> str:
        """What the fitted index holds: vectors, bytes per vector, memory.

        Returns
        -------
        summary : str
            Several lines: the number of vectors and features, the metric,
            the bytes per vector and the memory of the index by part (with
            the cells and codes of an IVF-PQ index).

        Examples
        --------
        >>> import numpy as np
        >>> from annlearn import FlatNeighbors
        >>> print(FlatNeighbors().fit(np.ones((1000, 8))).summary())
        FlatNeighbors: 1,000 vectors of 8 features, metric='euclidean'
          bytes per vector: 44 (float32 vector 32, squared norm 4, id 8)
          search: brute
          memory: 43.0 KiB
        """
        check_is_fitted(self)
        store = self._store
        header = (
            f"{type(self).__name__}: {len(store.ids):,} vectors of "
            f"{self.n_features_in_} features, metric={fitted_metric(self)!r}"
        )
        return "\n".join([header, *self._describe(store)])

    def score(self, X, y=None) -> float:
        """Recall@k of ``kneighbors(X)`` against exact search.

        The exact neighbours are searched among the same indexed vectors
        (for an exact index the score is 1.0). It is what
        :class:`~sklearn.model_selection.GridSearchCV` maximises when given
        no ``scoring``: fit on the training split (the database), score on
        the held-out split (the queries). See
        :func:`annlearn.metrics.recall_at_k` for the rule on ties and
        :mod:`annlearn.metrics` for the cache of exact answers.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)
            Queries.
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        recall : float
            Mean fraction of the ``n_neighbors`` exact neighbours returned.
        """
        check_is_fitted(self)
        true_ids, ids, true_dist, dist = self._recall_inputs(X, self.n_neighbors)
        return recall_at_k(true_ids, ids, true_distances=true_dist, pred_distances=dist)

    def _recall_inputs(self, X, n_neighbors: int):
        """What :func:`~annlearn.metrics.recall_at_k` compares for queries X:
        ``(true_ids, pred_ids, true_distances, pred_distances)``, the
        distances exact (float64) for both. X is validated once."""
        check_is_fitted(self)
        reference = self._exact_reference()
        Xv = validate_query_data(self, X)
        store = self._store
        n_neighbors = check_n_neighbors(n_neighbors, len(store.ids))
        Xq = reference._prepare_queries(Xv)
        true_dist, true_ids = exact_answers(reference, Xq, n_neighbors)
        _, positions = self._search(store, self._prepare_queries(Xv), n_neighbors)
        pred_ids = _ids_at(store.ids, positions)
        pred_dist = reference._exact_distances(Xq, pred_ids)
        return true_ids, pred_ids, true_dist, pred_dist

    def _exact_reference(self):  # pragma: no cover
        """A fitted exact index over the same vectors and ids (see score)."""
        raise NotImplementedError

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False
        tags.input_tags.allow_nan = False
        # Distances are computed and returned in float32 whatever the input.
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


def _ids_at(ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The ids stored at ``positions``, which must all be filled.

    Kernels mark a slot they could not fill with -1; indexing ``ids[-1]``
    would return the last id as a neighbour, so an empty slot is an error.
    """
    if positions.size and positions.min() < 0:
        raise RuntimeError(
            "The search found fewer finite candidates than n_neighbors for "
            f"{int(np.count_nonzero((positions < 0).any(axis=1)))} queries. "
            "This is a bug in annlearn: please report it with the data."
        )
    return ids[positions]


def _drop_self(
    distances: np.ndarray, indices: np.ndarray, self_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each indexed vector from its own k+1 neighbours.

    Row ``i`` of the result keeps the k entries other than ``self_ids[i]``.
    Where it is not among them (more exact duplicates than k at distance 0,
    or an approximate index that missed it) the last, farthest entry is
    dropped.
    """
    n_queries, k_plus_one = indices.shape
    keep = indices != np.asarray(self_ids)[:, None]
    self_absent = keep.all(axis=1)
    keep[self_absent, -1] = False
    shape = (n_queries, k_plus_one - 1)
    return distances[keep].reshape(shape), indices[keep].reshape(shape)
