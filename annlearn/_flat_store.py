"""FlatStore: the vectors of an exact index, and the exact search over them.

Layout: float32 rows as searched (centred or normalised by the estimator),
their squared norms, their ids, and optionally the principal-component bound
(a dict of arrays, :mod:`annlearn._pca_bound`). A ``FlatStore`` is never
modified: ``add`` and ``remove`` return new stores, which the estimator
publishes with one assignment, so a search running in another thread keeps a
consistent snapshot.
"""

from __future__ import annotations

import numpy as np

from annlearn import _flat_search, _pca_bound
from annlearn._persistence import check_array_state, check_ids_state
from annlearn._threads import flat_search_blas_guard
from annlearn._utils import format_bytes

__all__ = ["FlatStore"]

METRIC_CODES = {
    "sqeuclidean": _flat_search.METRIC_SQEUCLIDEAN,
    "euclidean": _flat_search.METRIC_EUCLIDEAN,
    "inner_product": _flat_search.METRIC_INNER_PRODUCT,
    "cosine": _flat_search.METRIC_COSINE,
}

# Relative float32 rounding allowed for in the radius screen (the GEMM scores
# of d-feature float32 rows are within ~1e-6 * sqrt(d) of exact).
_SCREEN_RTOL = 1e-4

# Filtered search (``allowed``): three ways, chosen per call by cost, counted
# in rows scanned by the masked scan (one query against one row):
#
# - direct: the ranking score of each allowed row computed on its own (SIMD
#   distance, no GEMM): _DIRECT_RATIO rows of the masked scan each, which
#   runs on blocked GEMM (on the principal-component projections with a
#   bound). Per-query filters: taken by a query allowing fewer than
#   n / _DIRECT_RATIO rows.
# - gathered (one filter for every query): the allowed rows copied into a
#   smaller store, then searched as is: the copy of a row costs
#   _GATHER_QUERIES rows of the masked scan: n_allowed * (n_queries +
#   _GATHER_QUERIES) in all.
# - masked: the scan of every row, the disallowed ones failing the screen:
#   n * n_queries.
#
# One filter for every query takes the cheapest of the three.
#
# Both ratios were measured on Fashion-MNIST (benchmarks/README.md,
# bench_filter.py --crossover): direct and masked break even near n / 64
# allowed rows per query, and the gather of 54,000 rows costs as much as the
# masked scan of about 200 queries.
_DIRECT_RATIO = 64
_GATHER_QUERIES = 256

# The bound's arrays: dtype and shape for n vectors, d features, d1 components.
_BOUND_ARRAYS = {
    "mean": (np.float64, lambda n, d, d1: (d,)),
    "rotation": (np.float64, lambda n, d, d1: (d, d1)),
    "vectors": (np.float32, lambda n, d, d1: (n, d1 + 1)),
    "sqnorms": (np.float32, lambda n, d, d1: (n,)),
}


def shared_filter_way(n: int, n_allowed: int, n_queries: int) -> str:
    """The cheapest way to search ``n_queries`` queries among ``n_allowed``
    of ``n`` rows (one filter for every query): "direct", "gathered" or
    "masked" (see _DIRECT_RATIO)."""
    costs = {
        "direct": n_queries * n_allowed * _DIRECT_RATIO,
        "gathered": n_allowed * (n_queries + _GATHER_QUERIES),
        "masked": n * n_queries,
    }
    return min(costs, key=costs.get)


def search_rows(vectors, rows, X, k, metric: str, n_threads: int):
    """Exact ``k`` nearest of ``vectors[rows]`` for every query (one list of
    rows for all): gathered and searched by GEMM when that is cheaper than
    scoring each row directly. (distances, positions in ``vectors``)."""
    if len(X) * _DIRECT_RATIO <= len(X) + _GATHER_QUERIES:
        indptr = np.array([0, len(rows)], dtype=np.int64)
        return _flat_search.rows_kneighbors(
            X, vectors, indptr, rows, k, METRIC_CODES[metric], n_threads
        )
    gathered = np.ascontiguousarray(vectors[rows])
    store = FlatStore(
        gathered, _flat_search.row_sqnorms(gathered, n_threads), rows, None
    )
    distances, positions = store._search(X, k, metric, n_threads, None)
    return distances, rows[positions]


class FlatStore:
    """Vectors, squared norms, ids and the optional bound of an exact index.

    Parameters
    ----------
    vectors : ndarray of shape (n, n_features), float32, C-contiguous
    sqnorms : ndarray of shape (n,), float32
    ids : ndarray of shape (n,), int64
    bound : dict or None
        The principal-component bound (``_pca_bound.fit_bound``), or None
        for brute force.
    """

    _FIELDS = ("vectors", "sqnorms", "ids", "bound")
    # __weakref__: the cache of exact answers keys digests by store.
    __slots__ = (*_FIELDS, "__weakref__")

    def __init__(self, vectors, sqnorms, ids, bound) -> None:
        self.vectors, self.sqnorms, self.ids, self.bound = vectors, sqnorms, ids, bound

    @classmethod
    def build(
        cls, X, ids, *, algorithm: str, n_threads: int, sqnorms=None, l2: bool = True
    ) -> FlatStore:
        """A store of prepared rows X (and their squared norms, if known);
        ``algorithm`` as FlatNeighbors'; ``l2``: ranked by L2 distance, else
        by inner product."""
        if sqnorms is None:
            sqnorms = _flat_search.row_sqnorms(X, n_threads)
        bound = None
        if algorithm != "brute":
            bound = _pca_bound.fit_bound(
                X, sqnorms, l2=l2, force=algorithm == "pca_bound"
            )
        return cls(X, sqnorms, ids, bound)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_bound_components(self) -> int:
        """Principal components of the bound, 0 without one."""
        return 0 if self.bound is None else self.bound["rotation"].shape[1]

    @property
    def nbytes(self) -> int:
        arrays = [self.vectors, self.sqnorms, self.ids]
        if self.bound is not None:
            arrays += [self.bound[key] for key in _BOUND_ARRAYS]
        return sum(a.nbytes for a in arrays)

    def describe(self, d: int) -> list[str]:
        """Lines of ``summary()`` on the bytes and the search of a store of
        ``d``-feature vectors."""
        d1 = self.n_bound_components
        search = "brute"
        if d1:
            search = f"pca_bound on {d1} principal components, +{4 * (d1 + 2)} "
            search += "bytes per vector"
        return [
            f"  bytes per vector: {4 * d + 12} (float32 vector {4 * d}, squared "
            "norm 4, id 8)",
            f"  search: {search}",
            f"  memory: {format_bytes(self.nbytes)}",
        ]

    # -- changes -----------------------------------------------------------
    def add(self, vectors, ids, n_threads: int) -> FlatStore:
        """A store with these prepared vectors too (O(n) copy); the bound is
        extended on the same axes, so it stays exact for any vector."""
        sqnorms = _flat_search.row_sqnorms(vectors, n_threads)
        bound = self.bound
        return FlatStore(
            np.concatenate([self.vectors, vectors]),
            np.concatenate([self.sqnorms, sqnorms]),
            np.concatenate([self.ids, ids]),
            None if bound is None else _pca_bound.extend(bound, vectors, sqnorms),
        )

    def remove(self, mask) -> FlatStore:
        """A store without the rows where ``mask`` is True (O(n) copy)."""
        keep = ~mask
        bound = self.bound
        return FlatStore(
            np.ascontiguousarray(self.vectors[keep]),
            self.sqnorms[keep],
            self.ids[keep],
            None if bound is None else _pca_bound.subset(bound, keep),
        )

    # -- search ------------------------------------------------------------
    def search(
        self, X: np.ndarray, k: int, metric: str, n_threads: int, allowed=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The exact ``k`` nearest rows of each prepared query: (distances in
        the metric's units, row positions), ties by the smaller position.
        ``allowed``: a :class:`~annlearn._filter.FilterBlock` over the rows,
        each query allowing at least ``k`` of them."""
        if allowed is not None:
            return self._filtered_search(X, k, metric, n_threads, allowed)
        return self._search(X, k, metric, n_threads, None)

    def _filtered_search(self, X, k, metric, n_threads, allowed):
        n, n_queries = len(self), len(X)
        direct = allowed.counts * _DIRECT_RATIO < n
        if allowed.shared and n_queries:
            way = shared_filter_way(n, int(allowed.counts[0]), n_queries)
            if way == "gathered":
                return self.gathered_search(X, k, metric, n_threads, allowed.mask[0])
            if way == "masked":
                return self._search(X, k, metric, n_threads, allowed.bitmap())
            direct[:] = True
        distances = np.empty((n_queries, k), dtype=np.float32)
        positions = np.empty((n_queries, k), dtype=np.int64)
        queries = np.flatnonzero(direct)
        if len(queries):
            indptr, rows = allowed.rows(queries)
            distances[queries], positions[queries] = _flat_search.rows_kneighbors(
                X[queries],
                self.vectors,
                indptr,
                rows,
                k,
                METRIC_CODES[metric],
                n_threads,
            )
        queries = np.flatnonzero(~direct)
        if len(queries):
            Xs = X if len(queries) == n_queries else np.ascontiguousarray(X[queries])
            bitmap = allowed.take(queries).bitmap()
            distances[queries], positions[queries] = self._search(
                Xs, k, metric, n_threads, bitmap
            )
        return distances, positions

    def gathered_search(self, X, k, metric, n_threads, keep):
        """``search`` over the rows where ``keep`` is True, copied into a
        smaller store (the bound restricted to them stays exact)."""
        rows = np.flatnonzero(keep)
        bound = self.bound
        gathered = FlatStore(
            np.ascontiguousarray(self.vectors[rows]),
            self.sqnorms[rows],
            self.ids[rows],
            None if bound is None else _pca_bound.subset(bound, keep),
        )
        distances, positions = gathered._search(X, k, metric, n_threads, None)
        return distances, rows[positions]

    def _search(self, X, k, metric, n_threads, bitmap):
        bound = self.bound
        if bound is not None:
            l2 = metric in ("euclidean", "sqeuclidean")
            bound = _pca_bound.query_bounds(bound, X, l2)
        with flat_search_blas_guard():
            return _flat_search.flat_kneighbors(
                X,
                self.vectors,
                self.sqnorms,
                k,
                METRIC_CODES[metric],
                n_threads,
                bound=bound,
                allowed=bitmap,
            )

    def radius_search(
        self, X: np.ndarray, radius: float, metric: str, n_threads: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows within ``radius`` of each prepared query, exactly:
        ``(indptr, rows, distances)``, rows increasing within a query."""
        q_sq = _flat_search.row_sqnorms(X, n_threads).astype(np.float64)
        max_sq = float(self.sqnorms.max()) if len(self) else 0.0
        # The GEMM screen keeps every score within float32 rounding of the
        # limit; the kernel then decides on the exact float64 distance.
        margin = _SCREEN_RTOL * (q_sq + max_sq) + 1e-30
        l2 = metric in ("euclidean", "sqeuclidean")
        kernel_radius = radius * radius if metric == "euclidean" else radius
        if l2:
            limits = kernel_radius - q_sq + margin
        elif metric == "cosine":
            limits = np.full(len(X), radius - 1.0) + margin
        else:
            limits = radius + margin
        bound = self.bound
        if bound is not None:
            bound = _pca_bound.query_bounds(bound, X, l2)
        with flat_search_blas_guard():
            return _flat_search.flat_radius(
                X,
                self.vectors,
                self.sqnorms,
                limits.astype(np.float32),
                kernel_radius,
                METRIC_CODES[metric],
                n_threads,
                bound=bound,
            )

    def exact_distances(self, Xq: np.ndarray, ids: np.ndarray, metric: str):
        """float64 distances between prepared queries and the stored rows of
        ``ids`` (one row of ids per query), in the metric's units; +inf for
        ids not in the store (or < 0)."""
        order = np.argsort(self.ids, kind="stable")
        sorted_ids = self.ids[order]
        pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
        found = (ids >= 0) & (sorted_ids[pos] == ids)
        rows = order[pos]
        out = np.full(ids.shape, np.inf)
        # One query row at a time keeps memory at O(k * n_features).
        for i in range(len(Xq)):
            q = Xq[i].astype(np.float64)
            y = self.vectors[rows[i]].astype(np.float64)
            if metric in ("euclidean", "sqeuclidean"):
                d = ((y - q) ** 2).sum(axis=1)
                if metric == "euclidean":
                    d = np.sqrt(d)
            elif metric == "cosine":
                d = np.clip(1.0 - y @ q, 0.0, 2.0)
            else:
                d = -(y @ q)
            out[i] = np.where(found[i], d, np.inf)
        return out

    # -- persistence ---------------------------------------------------------
    def to_state(self) -> dict:
        return {name: getattr(self, name) for name in self._FIELDS}

    @classmethod
    def from_state(cls, state: dict) -> FlatStore:
        return cls(state["vectors"], state["sqnorms"], state["ids"], state["bound"])

    @staticmethod
    def check_state(owner: str, state, *, n: int, d: int, d1: int) -> None:
        """Raise ValueError unless ``state`` (``to_state``'s dict, loaded)
        holds ``n`` rows of ``d`` features and a bound on ``d1`` components
        (none when 0)."""
        if not isinstance(state, dict) or set(state) != set(FlatStore._FIELDS):
            raise ValueError(f"Corrupted {owner} state: no index arrays.")
        check_array_state(
            owner, "vectors", state["vectors"], dtype=np.float32, ndim=2, shape=(n, d)
        )
        check_array_state(
            owner, "sqnorms", state["sqnorms"], dtype=np.float32, ndim=1, shape=(n,)
        )
        check_ids_state(owner, state["ids"], n)
        bound = state["bound"]
        if bound is None:
            if d1 != 0:
                raise ValueError(
                    f"Corrupted {owner} state: n_bound_components_ = {d1} "
                    "without a bound."
                )
            return
        max_sqnorm = bound.get("max_sqnorm") if isinstance(bound, dict) else None
        if not isinstance(max_sqnorm, float) or np.isnan(max_sqnorm) or not 0 < d1 <= d:
            raise ValueError(f"Corrupted {owner} state: bound.")
        for key, (dtype, shape) in _BOUND_ARRAYS.items():
            check_array_state(
                owner,
                f"bound {key}",
                bound.get(key),
                dtype=dtype,
                ndim=len(shape(n, d, d1)),
                shape=shape(n, d, d1),
                finite=key in ("mean", "rotation"),
            )
