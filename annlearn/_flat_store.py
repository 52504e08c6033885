"""FlatStore: the vectors of an exact index, and the exact search over them.

Layout: the rows as searched (centred or normalised by the estimator), their
squared norms, their ids, and optionally the principal-component bound (a
dict of arrays, :mod:`annlearn._pca_bound`). The rows are float32, or, with
``vector_dtype``, float16 or uint8 as a
:class:`~annlearn._quantizers.ScalarQuantizer` stores them: the search then
decodes one block of rows at a time (``_COMPACT_BLOCK_BYTES`` of float32),
searches it exactly and merges the blocks' answers, so it is exact over the
stored vectors with memory bounded by the block. A ``FlatStore`` is never
modified: ``add`` and ``remove`` return new stores, which the estimator
publishes with one assignment, so a search running in another thread keeps a
consistent snapshot.
"""

from __future__ import annotations

import numpy as np

from annlearn import _flat_search, _pca_bound
from annlearn._persistence import check_array_state, check_ids_state
from annlearn._quantizers import ScalarQuantizer
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
# float32 bytes of compact rows decoded at once by a search.
_COMPACT_BLOCK_BYTES = 32 << 20

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
    vectors : ndarray of shape (n, n_features), C-contiguous
        float32, or as ``sq`` stores them.
    sqnorms : ndarray of shape (n,), float32
        Of the (decoded) vectors.
    ids : ndarray of shape (n,), int64
    bound : dict or None
        The principal-component bound (``_pca_bound.fit_bound``) of the
        (decoded) vectors, or None for brute force.
    sq : ScalarQuantizer or None, default=None
        How ``vectors`` are stored; None for float32.
    """

    _FIELDS = ("vectors", "sqnorms", "ids", "bound")
    # __weakref__: the cache of exact answers keys digests by store.
    __slots__ = (*_FIELDS, "sq", "__weakref__")

    def __init__(self, vectors, sqnorms, ids, bound, sq=None) -> None:
        self.vectors, self.sqnorms, self.ids, self.bound = vectors, sqnorms, ids, bound
        # float32 rows are searched as they are: no quantizer.
        self.sq = None if sq is None or sq.dtype == "float32" else sq

    @classmethod
    def build(
        cls,
        X,
        ids,
        *,
        algorithm: str,
        n_threads: int,
        sqnorms=None,
        l2: bool = True,
        sq=None,
    ) -> FlatStore:
        """A store of prepared rows X (and their squared norms, if known);
        ``algorithm`` as FlatNeighbors'; ``l2``: ranked by L2 distance, else
        by inner product; stored as ``sq`` says (float32 if None), the norms
        and the bound being those of the stored vectors."""
        stored = X
        if sq is not None and sq.dtype != "float32":
            stored, _ = sq.encode(X, n_threads)
            X, sqnorms = sq.decode(stored), None
        if sqnorms is None:
            sqnorms = _flat_search.row_sqnorms(X, n_threads)
        bound = None
        if algorithm != "brute":
            bound = _pca_bound.fit_bound(
                X, sqnorms, l2=l2, force=algorithm == "pca_bound"
            )
        return cls(stored, sqnorms, ids, bound, sq)

    def decoded(self, rows=slice(None)) -> np.ndarray:
        """The float32 vectors stored at ``rows``, C-contiguous."""
        if self.sq is None:
            return np.ascontiguousarray(self.vectors[rows])
        return np.ascontiguousarray(self.sq.decode(self.vectors[rows]))

    def _blocks(self):
        """Slices of rows decoded at once by a search of compact rows."""
        n, d = self.vectors.shape
        # A multiple of 64 rows: a filter's bitmap words split at blocks.
        step = max(1024, _COMPACT_BLOCK_BYTES // (4 * max(d, 1))) // 64 * 64
        return [slice(s, min(s + step, n)) for s in range(0, n, step)]

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
        size = self.vectors.dtype.itemsize * d
        kind = "float32 vector" if self.sq is None else self.sq.describe()[: -len("s")]
        return [
            f"  bytes per vector: {size + 12} ({kind} {size}, squared norm 4, id 8)",
            f"  search: {search}",
            f"  memory: {format_bytes(self.nbytes)}",
        ]

    # -- changes -----------------------------------------------------------
    def add(self, vectors, ids, n_threads: int, *, stored=None) -> FlatStore:
        """A store with these prepared vectors too (O(n) copy); ``stored``
        is their encoding by ``self.sq`` if the caller has it. The bound is
        extended on the same axes, so it stays exact for any vector."""
        if self.sq is None:
            stored = vectors
        else:
            if stored is None:
                stored, _ = self.sq.encode(vectors, n_threads)
            vectors = self.sq.decode(stored)
        sqnorms = _flat_search.row_sqnorms(vectors, n_threads)
        bound = self.bound
        return FlatStore(
            np.concatenate([self.vectors, stored]),
            np.concatenate([self.sqnorms, sqnorms]),
            np.concatenate([self.ids, ids]),
            None if bound is None else _pca_bound.extend(bound, vectors, sqnorms),
            self.sq,
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
            self.sq,
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
        # Compact rows are decoded a block at a time: no direct scoring.
        direct = allowed.counts * _DIRECT_RATIO < n
        direct &= self.sq is None
        if allowed.shared and n_queries:
            way = shared_filter_way(n, int(allowed.counts[0]), n_queries)
            if way == "direct" and self.sq is not None:
                way = "gathered"
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
            self.decoded(rows),
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
        if self.sq is not None:
            return self._search_blocks(X, k, metric, n_threads, bound, bitmap)
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

    def _search_blocks(self, X, k: int, metric: str, n_threads: int, bound, bitmap):
        """``search`` over compact rows: each block decoded and searched
        exactly (``bitmap``, the filter's words, cut to the block's), the
        blocks' k best merged by (distance, position), which is the order
        of a search over all rows at once."""
        distances = np.full((len(X), 0), np.inf, dtype=np.float32)
        positions = np.full((len(X), 0), -1, dtype=np.int64)
        for rows in self._blocks():
            part = None if bound is None else _block_bound(bound, rows)
            with flat_search_blas_guard():
                d, p = _flat_search.flat_kneighbors(
                    X,
                    self.decoded(rows),
                    self.sqnorms[rows],
                    min(k, rows.stop - rows.start),
                    METRIC_CODES[metric],
                    n_threads,
                    bound=part,
                    allowed=None
                    if bitmap is None
                    else np.ascontiguousarray(
                        bitmap[:, rows.start // 64 : -(-rows.stop // 64)]
                    ),
                )
            distances = np.concatenate([distances, d], axis=1)
            positions = np.concatenate([positions, p + rows.start], axis=1)
            # Positions increase with the blocks: a stable sort on the
            # distance breaks ties on the smaller position.
            order = np.argsort(distances, axis=1, kind="stable")[:, :k]
            distances = np.take_along_axis(distances, order, axis=1)
            positions = np.take_along_axis(positions, order, axis=1)
        return distances, positions

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
        limits = limits.astype(np.float32)
        blocks = [slice(None)] if self.sq is None else self._blocks()
        hits = []
        for rows in blocks:
            part = None if bound is None else _block_bound(bound, rows)
            with flat_search_blas_guard():
                indptr, found, dist = _flat_search.flat_radius(
                    X,
                    self.vectors if self.sq is None else self.decoded(rows),
                    self.sqnorms[rows],
                    limits,
                    kernel_radius,
                    METRIC_CODES[metric],
                    n_threads,
                    bound=part,
                )
            if self.sq is None:
                return indptr, found, dist
            query = np.repeat(np.arange(len(X)), np.diff(indptr))
            hits.append((query, found + rows.start, dist))
        return _merge_hits(hits, len(X))

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
            y = self.decoded(rows[i]).astype(np.float64)
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
    def from_state(cls, state: dict, sq: ScalarQuantizer | None = None) -> FlatStore:
        return cls(state["vectors"], state["sqnorms"], state["ids"], state["bound"], sq)

    @staticmethod
    def check_state(owner: str, state, *, n: int, d: int, d1: int) -> None:
        """Raise ValueError unless ``state`` (``to_state``'s dict, loaded)
        holds ``n`` rows of ``d`` features and a bound on ``d1`` components
        (none when 0)."""
        if not isinstance(state, dict) or set(state) != set(FlatStore._FIELDS):
            raise ValueError(f"Corrupted {owner} state: no index arrays.")
        vectors = state["vectors"]
        check_array_state(
            owner,
            "vectors",
            vectors,
            # Its dtype is one ScalarQuantizer.check_state accepted.
            dtype=getattr(vectors, "dtype", np.float32),
            ndim=2,
            shape=(n, d),
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


def _block_bound(bound: tuple, rows: slice) -> tuple:
    """``query_bounds``' tuple for the database rows ``rows`` only."""
    X_proj, Y_proj, Y_sqnorms, shift = bound
    return X_proj, np.ascontiguousarray(Y_proj[rows]), Y_sqnorms[rows], shift


def _merge_hits(hits: list, n_queries: int):
    """One ``(indptr, rows, distances)`` from the ``(query, rows,
    distances)`` hits of consecutive blocks; rows increase within a query."""
    query = np.concatenate([h[0] for h in hits])
    # Stable: within a query, the blocks' hits keep their (increasing) order.
    order = np.argsort(query, kind="stable")
    indptr = np.zeros(n_queries + 1, dtype=np.int64)
    np.cumsum(np.bincount(query, minlength=n_queries), out=indptr[1:])
    rows = np.concatenate([h[1] for h in hits])[order]
    distances = np.concatenate([h[2] for h in hits])[order]
    return indptr, rows.astype(np.int64), distances.astype(np.float32)
