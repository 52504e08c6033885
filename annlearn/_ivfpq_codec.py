"""IVFPQCodec: a vector as (cell, PQ code), and the search over coded lists.

The codec joins the two quantizers (:mod:`annlearn._quantizers`) and says how
they form a distance: the residual to the cell centre is coded
(``by_residual``) or the vector itself, and codes are ranked by squared L2
distance or by inner product. It knows nothing of the estimator: the
estimator validates and prepares the vectors (normalised for cosine), keeps
the :class:`~annlearn._invlists.InvertedLists`, and asks the codec to encode
and to search them. The scan itself is the ``annlearn._ivf`` kernel.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from sklearn.utils import check_random_state

from annlearn import _fastscan, _flat_search, _ivf
from annlearn._flat_store import search_rows
from annlearn._invlists import InvertedLists
from annlearn._persistence import check_array_state
from annlearn._quantizers import CoarseQuantizer, ProductQuantizer
from annlearn._utils import format_bytes

__all__ = ["IVFPQCodec", "scan_to_metric", "train_and_encode"]

# Rows encoded at once: bounds the residual buffer (ENCODE_BLOCK x n_features).
_ENCODE_BLOCK = 65_536


# Filtered search (``allowed``). A query allowing a fraction s of the rows
# probes ceil(nprobe * max(s ** -1/4, s ** -1/2 / 10 ** 1/4)) cells (at most
# nlist; the two terms meet at s = 0.1): its k allowed neighbours lie
# further than its k nearest, but fewer candidates compete for them, so down
# to 10% allowed a quarter power keeps the recall at its unfiltered level on
# Fashion-MNIST and text embeddings, with and without re-ranking; below, the
# square root is needed (text embeddings without re-ranking fell from 0.63
# unfiltered to 0.54 at 0.1% allowed with the quarter power). When the
# vectors are stored and the exact distances to its allowed rows cost less
# than that scan, the query gets them instead (recall 1). The costs compared:
# a probed cell M * ksub (its lookup table) plus M per code of the cell
# against _EXACT_COST * n_features per allowed row. _EXACT_COST was measured
# on Fashion-MNIST with 98 x 4-bit codes in 256 cells (benchmarks/README.md,
# bench_filter.py --crossover): a probed cell cost as much as 16 exact rows,
# and the exact search won by 2.3x at 3% allowed, lost by 2.7x at 10%, as
# this rule predicts.
_EXACT_COST = 2


def _widening(share: np.ndarray) -> np.ndarray:
    """Factor on nprobe for a query allowing ``share`` of the rows."""
    return np.maximum(share**-0.25, share**-0.5 / 10**0.25)


# Lloyd iterations of the coarse quantizer and of each sub-quantizer: FAISS's
# defaults for IndexIVFPQ. The cells only need to spread the data evenly; the
# codebooks decide the distances.
_COARSE_MAX_ITER = 10
_PQ_MAX_ITER = 25
# Each sub-quantizer trains on at most this many rows per centre (FAISS's
# k-means max_points_per_centroid): 4,096 rows place 16 centres in a few
# dimensions as well as 65,536 do, at a sixteenth of the cost.
_PQ_MAX_POINTS_PER_CENTRE = 256


class IVFPQCodec:
    """Coarse quantizer + product quantizer + the distance they estimate.

    Parameters
    ----------
    quantizer : CoarseQuantizer
        The cells.
    pq : ProductQuantizer
        The codes of the residuals (or of the vectors).
    metric : {"euclidean", "sqeuclidean", "cosine", "inner_product"}
        The distance returned by ``search``. ``"cosine"`` expects normalised
        vectors and ranks them by inner product, so that a zero vector is at
        distance 1 from everything.
    by_residual : bool
        Whether the codes are of ``x - centre`` rather than of ``x``.
    """

    def __init__(
        self,
        quantizer: CoarseQuantizer,
        pq: ProductQuantizer,
        metric: str,
        by_residual: bool,
    ) -> None:
        self.quantizer = quantizer
        self.pq = pq
        self.metric = metric
        self.by_residual = by_residual
        # Codes are scored by -<x, y> for these metrics, by ||x - y||^2 else.
        self.inner_product = metric in ("inner_product", "cosine")
        if self.inner_product:
            self.term2 = np.zeros((0, pq.M, pq.ksub), dtype=np.float32)
        else:
            self.term2 = pq.term2_tables(quantizer.centers if by_residual else None)

    @property
    def nbytes(self) -> int:
        """Memory of the quantizers and of the tables derived from them."""
        arrays = (self.quantizer.centers, self.pq.codebooks)
        derived = (self.term2, self.pq.codebooks_t)
        return sum(a.nbytes for a in arrays + derived)

    @staticmethod
    def check_state(
        owner: str, centers, codebooks, center_sqnorms, *, d: int, M: int, lift, metric
    ) -> tuple[int, int]:
        """Raise ValueError unless the loaded quantizer arrays are a valid
        pair for ``d`` features and ``M`` sub-quantizers (finite, float32,
        consistent shapes) and the lift of the cells (a dict, or None) fits
        them; return (nlist, ksub)."""
        check_array_state(
            owner,
            "cluster_centers_",
            centers,
            dtype=np.float32,
            ndim=2,
            shape=(None, d),
            finite=True,
        )
        nlist = len(centers)
        check_array_state(
            owner, "pq_codebooks_", codebooks, dtype=np.float32, ndim=3, finite=True
        )
        n_books, ksub, dsub = codebooks.shape
        if n_books != M or M * dsub != d:
            raise ValueError(
                f"Corrupted {owner} state: pq_codebooks_ has shape "
                f"{codebooks.shape}, not {M} sub-quantizers covering {d} features "
                "(n_subquantizers_, n_features_in_)."
            )
        if nlist < 1 or ksub not in (16, 32, 64, 128, 256):
            raise ValueError(
                f"Corrupted {owner} state: {nlist} cells and {ksub} centres per "
                "sub-quantizer (expected >= 1 and 2**4 to 2**8)."
            )
        check_array_state(
            owner,
            "_center_sqnorms",
            center_sqnorms,
            dtype=np.float32,
            ndim=1,
            shape=(nlist,),
            finite=True,
        )
        if lift is not None:
            if metric != "inner_product":
                raise ValueError(
                    f"Corrupted {owner} state: _ip_lift is set for metric {metric!r}."
                )
            check_array_state(
                owner,
                "_ip_lift/extra",
                lift["extra"],
                dtype=np.float32,
                ndim=1,
                shape=(nlist,),
                finite=True,
                low=0,
            )
            max_sqnorm = lift["max_sqnorm"]
            if not (np.isfinite(max_sqnorm) and max_sqnorm >= 0):
                raise ValueError(
                    f"Corrupted {owner} state: _ip_lift/max_sqnorm = "
                    f"{max_sqnorm!r}, expected a finite number >= 0."
                )
        return nlist, ksub

    def describe(self, lists: InvertedLists) -> list[str]:
        """Lines of ``IVFPQNeighbors.summary`` on the cells, the codes and
        the memory of an index of ``lists`` coded by this codec."""
        n, d = len(lists), self.quantizer.centers.shape[1]
        sizes = lists.sizes()
        # The uint8 scalar quantizer (lists.sq) counts with the quantizers.
        sq_bytes = 0 if lists.sq is None else lists.sq.nbytes
        quantizers = self.quantizer.centers.nbytes + self.pq.codebooks.nbytes
        quantizers += sq_bytes
        kept = lists.vectors is not None
        per_vector = self.pq.M + 8 + (lists.sq.itemsize * d if kept else 0)
        stored = f" + {lists.sq.describe()} for re-ranking" if kept else ""
        return [
            f"  cells: {len(sizes)} (vectors per cell: min {sizes.min()}, "
            f"median {int(np.median(sizes))}, max {sizes.max()}; imbalance "
            f"{lists.imbalance_factor():.2f}, 1.00 is even)",
            f"  codes: {self.pq.M} sub-vectors x {self.pq.nbits} bits "
            f"per vector, of the {'residuals' if self.by_residual else 'vectors'}, "
            f"stored one byte each{stored}",
            f"  bytes per vector: {per_vector} in the lists (+ "
            f"{quantizers / max(n, 1):.1f} for the quantizers)",
            f"  memory: {format_bytes(lists.nbytes + self.nbytes)} (lists "
            f"{format_bytes(lists.nbytes - sq_bytes)}, quantizers "
            f"{format_bytes(quantizers)}, lookup tables "
            f"{format_bytes(self.nbytes + sq_bytes - quantizers)})",
        ]

    # -- coding -----------------------------------------------------------
    def encode(self, X: np.ndarray, n_threads: int) -> tuple[np.ndarray, np.ndarray]:
        """The cell and the code of every row of X, a block of rows at a time."""
        cells = np.empty(len(X), dtype=np.int64)
        for start in range(0, len(X), _ENCODE_BLOCK):
            block = slice(start, start + _ENCODE_BLOCK)
            cells[block] = self.quantizer.assign(X[block], n_threads)
        return cells, self.encode_in(X, cells, n_threads)

    def encode_in(self, X: np.ndarray, cells: np.ndarray, n_threads: int) -> np.ndarray:
        """The codes of the rows of X, already assigned to ``cells``."""
        centers = self.quantizer.centers if self.by_residual else None
        codes = np.empty((len(X), self.pq.M), dtype=np.uint8)
        for start in range(0, len(X), _ENCODE_BLOCK):
            block = slice(start, start + _ENCODE_BLOCK)
            codes[block] = self.pq.encode(
                np.ascontiguousarray(X[block], dtype=np.float32),
                n_threads,
                centers,
                None if centers is None else cells[block],
            )
        return codes

    def decode(self, cells: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Reconstructions of rows coded as (cells, codes), float32."""
        vectors = self.pq.decode(codes)
        if self.by_residual:
            vectors = vectors + self.quantizer.centers[cells]
        return np.ascontiguousarray(vectors, dtype=np.float32)

    # -- search -----------------------------------------------------------
    def search(
        self,
        lists: InvertedLists,
        X: np.ndarray,
        n_neighbors: int,
        *,
        nprobe: int,
        refine_factor: int | None,
        n_threads: int,
        allowed=None,
        n_candidates: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``n_neighbors`` best rows of ``lists`` for each query.

        Scans the ``nprobe`` nearest cells (further cells for the queries
        whose probed cells hold fewer than ``n_neighbors`` rows, so no result
        is padded), keeps ``refine_factor * n_neighbors`` candidates and
        re-ranks them by exact distance to the vectors ``lists`` stores
        (float32, float16 or uint8, ``lists.sq``) when ``refine_factor`` is
        set. ``allowed`` (a :class:`~annlearn._filter.FilterBlock`, each
        query allowing at least ``n_neighbors`` rows) restricts the scan
        (see ``_EXACT_COST``). ``n_candidates`` overrides the number of
        candidates scanned for (``refine_factor * n_neighbors``; at least
        ``n_neighbors``): a query that is itself indexed searches one more
        neighbour and one more candidate to search as a new query would.

        Returns
        -------
        distances : ndarray of shape (n_queries, n_neighbors), float32
            In ``metric``'s units, ascending.
        positions : ndarray of shape (n_queries, n_neighbors), int64
            Rows of ``lists``.
        """
        lists.check_refinable(refine_factor)
        nlist = self.quantizer.nlist
        if n_candidates is None:
            n_candidates = n_neighbors * (refine_factor or 1)
        n_scan = min(max(n_candidates, n_neighbors), len(lists))
        nprobe = min(nprobe, nlist)
        if allowed is not None:
            return self._filtered_search(
                lists, X, n_neighbors, n_scan, nprobe, refine_factor, n_threads, allowed
            )
        distances, positions = self._scan(lists, X, nprobe, n_scan, n_threads)
        short = np.flatnonzero(positions[:, n_neighbors - 1] < 0)
        while len(short) and nprobe < nlist:
            nprobe = min(2 * nprobe, nlist)
            d_more, p_more = self._scan(lists, X[short], nprobe, n_scan, n_threads)
            distances[short], positions[short] = d_more, p_more
            short = short[p_more[:, n_neighbors - 1] < 0]
        return self._finish(
            lists, X, distances, positions, n_neighbors, refine_factor, n_threads
        )

    def _filtered_search(
        self, lists, X, n_neighbors, n_scan, nprobe, refine_factor, n_threads, allowed
    ):
        """``search`` with a filter: per query, the widened scan or the exact
        distances to its allowed rows, whichever costs less (``_EXACT_COST``)."""
        n, nlist, M = len(lists), self.quantizer.nlist, self.pq.M
        counts = np.maximum(allowed.counts, 1)
        probes = np.minimum(np.ceil(nprobe * _widening(counts / n)), nlist)
        probes = probes.astype(np.int64)
        scan_cost = probes * M * self.pq.ksub + (n * probes / nlist) * M
        exact = np.zeros(len(X), dtype=bool)
        if lists.vectors is not None:
            exact = counts * X.shape[1] * _EXACT_COST < scan_cost
        distances = np.empty((len(X), n_neighbors), dtype=np.float32)
        positions = np.empty((len(X), n_neighbors), dtype=np.int64)
        queries = np.flatnonzero(exact)
        if len(queries):
            indptr, rows = allowed.rows(queries)
            Xe = np.ascontiguousarray(X[queries])
            vectors, kept = lists.vectors, None
            if lists.sq.dtype != "float32":
                # Compact rows: the allowed ones decoded (few: this path is
                # taken when they are few), rows renumbered into them.
                kept = np.unique(rows)
                vectors = lists.decoded_vectors(kept)
                rows = np.searchsorted(kept, rows)
            if allowed.shared:
                # Many queries over one list: gathered and searched by GEMM.
                metric = "inner_product" if self.inner_product else "sqeuclidean"
                dist, pos = search_rows(
                    vectors, rows, Xe, n_neighbors, metric, n_threads
                )
            else:
                metric = (
                    _flat_search.METRIC_INNER_PRODUCT
                    if self.inner_product
                    else _flat_search.METRIC_SQEUCLIDEAN
                )
                dist, pos = _flat_search.rows_kneighbors(
                    Xe, vectors, indptr, rows, n_neighbors, metric, n_threads
                )
            positions[queries] = pos if kept is None else kept[pos]
            distances[queries] = self.to_metric(dist)
        # The others by groups of equal probes (one group for a shared filter).
        for value in np.unique(probes[~exact]):
            queries = np.flatnonzero(~exact & (probes == value))
            Xg = np.ascontiguousarray(X[queries])
            sub = allowed.take(queries)
            dist, pos = self._scan(lists, Xg, int(value), n_scan, n_threads, sub)
            short = np.flatnonzero(pos[:, n_neighbors - 1] < 0)
            probe = int(value)
            while len(short) and probe < nlist:
                probe = min(2 * probe, nlist)
                d_more, p_more = self._scan(
                    lists, Xg[short], probe, n_scan, n_threads, sub.take(short)
                )
                dist[short], pos[short] = d_more, p_more
                short = short[p_more[:, n_neighbors - 1] < 0]
            distances[queries], positions[queries] = self._finish(
                lists, Xg, dist, pos, n_neighbors, refine_factor, n_threads
            )
        return distances, positions

    def _finish(
        self, lists, X, distances, positions, n_neighbors, refine_factor, n_threads
    ):
        """Re-rank the scanned candidates if asked; keep ``n_neighbors``,
        in the metric's units."""
        if refine_factor is not None:
            distances, positions = lists.refine(
                X, positions, n_neighbors, self.inner_product, n_threads
            )
        distances = np.ascontiguousarray(distances[:, :n_neighbors])
        return self.to_metric(distances), positions[:, :n_neighbors]

    def radius_search(
        self,
        lists: InvertedLists,
        X: np.ndarray,
        radius: float,
        *,
        nprobe: int,
        n_threads: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows of the ``nprobe`` nearest cells within ``radius`` of each
        query: by exact distance when ``lists`` stores the vectors, by ADC
        distance otherwise. ``(indptr, positions, distances)``, positions
        increasing within a query, distances in ``metric``'s units."""
        if self.metric == "euclidean":
            limit = radius * radius
        elif self.metric == "cosine":
            limit = radius - 1.0  # -<x, y> of normalised rows
        else:
            limit = radius
        nprobe = min(nprobe, self.quantizer.nlist)
        stored = {} if lists.vectors is None else lists.sq.kernel_args()
        indptr, positions, distances = _ivf.ivfpq_radius(
            *self._scan_inputs(lists, X, nprobe, n_threads),
            lists.vectors,
            np.float32(limit),
            self.inner_product,
            n_threads,
            **stored,
        )
        return indptr, positions, self.to_metric(distances)

    def probe(
        self,
        X: np.ndarray,
        nprobe: int,
        n_threads: int,
        *,
        n_neighbors: int = 0,
        cell_sizes: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The cells the scan of each query visits, and their term 1.

        ``nprobe`` nearest cells; with ``cell_sizes`` (rows per cell of the
        whole index), ``nprobe`` doubles for the queries whose probed cells
        hold fewer than ``n_neighbors`` rows, as ``search`` widens, and their
        rows are wider: the other queries' extra slots are -1 (skipped by the
        scans, and a zero table for the 4-bit scale). This is ``search``'s
        coarse step for an index cut into shards by cells (``annlearn.dask``):
        run once, then each shard scans its cells (``scan_probed``).

        Returns
        -------
        cells : ndarray of shape (n_queries, width), int64
            Probed cells, nearest first; -1 for none.
        base : ndarray of shape (n_queries, width), float32
            Term 1 of each probed cell in scan units (0 where no cell).
        """
        nlist = self.quantizer.nlist
        nprobe = min(nprobe, nlist)
        cells, base = self._probe(X, nprobe, n_threads)
        if cell_sizes is None:
            return cells, base
        pending = np.flatnonzero(cell_sizes[cells].sum(axis=1) < n_neighbors)
        while len(pending) and nprobe < nlist:
            nprobe = min(2 * nprobe, nlist)
            more_cells, more_base = self._probe(X[pending], nprobe, n_threads)
            width = cells.shape[1]
            cells = np.pad(cells, ((0, 0), (0, nprobe - width)), constant_values=-1)
            base = np.pad(base, ((0, 0), (0, nprobe - width)))
            cells[pending], base[pending] = more_cells, more_base
            pending = pending[cell_sizes[more_cells].sum(axis=1) < n_neighbors]
        return cells, base

    def scan_probed(
        self,
        lists: InvertedLists,
        X: np.ndarray,
        cells: np.ndarray,
        base: np.ndarray,
        n_scan: int,
        n_threads: int,
        allowed=None,
        bound=None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``n_scan`` best rows of ``lists`` in the given cells of each
        query (``probe``'s), by code distance in scan units (``||x - y||^2``
        or ``-<x, y>``, see ``to_metric``); empty slots are (+inf, -1).
        ``allowed`` (an ``annlearn._filter`` filter over the rows of
        ``lists``): disallowed rows are never scored. ``bound`` (one float32
        per query, 4-bit codes only): only rows at most that far are
        candidates (``_fastscan.ivf_fastscan_queries``).

        Returns
        -------
        distances : ndarray of shape (n_queries, n_scan), float32
        positions : ndarray of shape (n_queries, n_scan), int64
            Rows of ``lists``, -1 for empty slots.
        """
        tables = (self.pq.codebooks_t, self.term2)
        if self.pq.ksub == 16:
            slots = None
            if allowed is not None:
                n_slots = 32 * len(lists.packed_codes()[0])
                slots = allowed.slot_bitmap(lists.fastscan_slots(), n_slots)
            return self._fast_scan(
                lists, X, cells, base, *tables, n_scan, n_threads, slots, bound
            )
        if bound is not None:
            raise ValueError("Only the 4-bit scan starts from a bound.")
        bitmap = None if allowed is None else allowed.bitmap()
        return _ivf.ivfpq_scan(
            X,
            cells,
            base,
            *tables,
            lists.offsets,
            lists.codes,
            n_scan,
            self.inner_product,
            n_threads,
            allowed=bitmap,
        )

    def to_metric(self, distances: np.ndarray) -> np.ndarray:
        """Scan units -> the metric's distance, in place."""
        return scan_to_metric(distances, self.metric)

    def _scan(
        self,
        lists: InvertedLists,
        X: np.ndarray,
        nprobe: int,
        n_scan: int,
        n_threads,
        allowed=None,
    ):
        cells, base = self._probe(X, nprobe, n_threads)
        return self.scan_probed(lists, X, cells, base, n_scan, n_threads, allowed)

    def _fast_scan(
        self,
        lists,
        X,
        cells,
        base,
        codebooks_t,
        term2,
        n_scan: int,
        n_threads,
        allowed=None,
        bound=None,
    ):
        """The 4-bit scan (``annlearn/_fastscan.h``): each query's tables
        quantized to uint8 and scanned at once, codes read 32 rows at a
        time."""
        packed, block_offsets = lists.packed_codes()
        return _fastscan.ivf_fastscan_queries(
            X,
            codebooks_t,
            term2,
            cells,
            base,
            self.inner_product,
            packed,
            block_offsets,
            lists.offsets,
            n_scan,
            n_threads,
            allowed=allowed,
            bound=bound,
        )

    def _scan_inputs(self, lists: InvertedLists, X: np.ndarray, nprobe: int, n_threads):
        """The arrays the ``_ivf`` scans take first: the queries, the
        ``nprobe`` cells of each and their term 1 (scan units), the tables
        and the lists."""
        cells, base = self._probe(X, nprobe, n_threads)
        tables = (self.pq.codebooks_t, self.term2)
        return X, cells, base, *tables, lists.offsets, lists.codes

    def _probe(self, X: np.ndarray, nprobe: int, n_threads: int):
        """The ``nprobe`` nearest cells of each query and their term 1 in
        scan units: (cells, base)."""
        base, cells = self.quantizer.search(X, nprobe, n_threads)
        if not self.by_residual:
            if self.inner_product:
                base = np.zeros_like(base)
            else:
                sq = _flat_search.row_sqnorms(X, n_threads)
                base = np.ascontiguousarray(np.repeat(sq[:, None], nprobe, axis=1))
        elif self.metric == "cosine":
            # Cells are probed by L2, codes scanned by inner product: term 1
            # becomes -<x, c> = (||x - c||^2 - ||x||^2 - ||c||^2) / 2.
            sq = _flat_search.row_sqnorms(X, n_threads)
            base = 0.5 * (base - sq[:, None] - self.quantizer.sqnorms[cells])
        return cells, np.ascontiguousarray(base, dtype=np.float32)

    # -- training ----------------------------------------------------------
    @classmethod
    def train(
        cls,
        X: np.ndarray,
        *,
        nlist: int,
        M: int,
        nbits: int,
        metric: str,
        by_residual: bool | str,
        n_train: int,
        random_state,
        n_threads: int,
        held_out: np.ndarray | None = None,
        verbose: int = 0,
        log: Callable[[str], None] = lambda message: None,
    ) -> list[IVFPQCodec]:
        """Train both quantizers on ``n_train`` rows of X drawn at random (the
        sub-quantizers on at most ``256 * 2**nbits`` of them), never from the
        rows ``held_out`` (at most all the others).

        Returns one codec, or for ``by_residual="auto"`` two: codes of the
        residuals, then codes of the vectors, their sub-quantizers trained on
        the same rows. Codes of the vectors leave the cells only to route
        queries: for the inner product their cells are spherical (see
        ``annlearn/_quantizers/_coarse.py``), else the two share the cells.
        """
        rng = check_random_state(random_state)
        n_samples = len(X)
        if held_out is None:
            rows = np.sort(rng.choice(n_samples, n_train, replace=False))
            train = X[rows] if n_train < n_samples else X
        else:
            pool = np.setdiff1d(np.arange(n_samples), held_out)
            n_train = min(n_train, len(pool))
            train = X[np.sort(pool[rng.choice(len(pool), n_train, replace=False)])]
        quantizers: dict[bool, CoarseQuantizer] = {}
        pq_train = None
        codecs = []
        for residual in (True, False) if by_residual == "auto" else (by_residual,):
            spherical = not residual and metric == "inner_product"
            if spherical not in quantizers:
                start = time.perf_counter()
                quantizers[spherical] = CoarseQuantizer.train(
                    train,
                    nlist,
                    metric="inner_product" if metric == "inner_product" else "l2",
                    max_iter=_COARSE_MAX_ITER,
                    random_state=rng,
                    n_threads=n_threads,
                    verbose=verbose > 1,
                    spherical=spherical,
                )
                log(
                    f"{'spherical ' if spherical else ''}coarse quantizer: "
                    f"{nlist} cells trained on {n_train} rows in "
                    f"{time.perf_counter() - start:.2f} s"
                )
            quantizer = quantizers[spherical]
            if pq_train is None:
                pq_train = train
                pq_rows = _PQ_MAX_POINTS_PER_CENTRE * 2**nbits
                if len(train) > pq_rows:
                    pick = np.sort(rng.choice(len(train), pq_rows, replace=False))
                    pq_train = train[pick]
            start = time.perf_counter()
            target = pq_train
            if residual:
                cells = quantizer.assign(pq_train, n_threads)
                target = pq_train - quantizer.centers[cells]
            pq = ProductQuantizer.train(
                target,
                M,
                nbits,
                max_iter=_PQ_MAX_ITER,
                random_state=rng,
                n_threads=n_threads,
                verbose=verbose > 1,
            )
            log(
                f"product quantizer of the {'residuals' if residual else 'vectors'}: "
                f"{M} x {2**nbits} centres trained on {len(pq_train)} rows in "
                f"{time.perf_counter() - start:.2f} s"
            )
            codecs.append(cls(quantizer, pq, metric, residual))
        return codecs


def train_and_encode(X: np.ndarray, params: dict, n_threads: int, verbose: int) -> dict:
    """Train an :class:`IVFPQCodec` on prepared X with ``params`` (see
    ``IVFPQCodec.train``) and encode X: the part of ``IVFPQNeighbors.fit``
    that its ``memory`` caches, so it returns plain arrays. ``"encodings"``
    holds, for each codec trained (two for ``by_residual="auto"``), its
    quantizers, and the cell and the code of every row."""

    def log(message: str) -> None:
        if verbose:
            print(f"[IVFPQNeighbors] {message}")

    codecs = IVFPQCodec.train(
        X, **params, n_threads=n_threads, verbose=verbose, log=log
    )
    start = time.perf_counter()
    encodings = []
    for codec in codecs:
        # Codecs that share the first one's cells reuse its assignment.
        if encodings and codec.quantizer is codecs[0].quantizer:
            cells = encodings[0]["cells"]
            codes = codec.encode_in(X, cells, n_threads)
        else:
            cells, codes = codec.encode(X, n_threads)
        encodings.append(
            {
                "by_residual": codec.by_residual,
                "cluster_centers": codec.quantizer.centers,
                "cells_lift": codec.quantizer.lift,
                "cells": cells,
                "pq_codebooks": codec.pq.codebooks,
                "codes": codes,
            }
        )
    log(f"encoded {len(X)} vectors in {time.perf_counter() - start:.2f} s")
    return {"encodings": encodings}


def scan_to_metric(distances: np.ndarray, metric: str) -> np.ndarray:
    """Scan units (||x - y||^2, or -<x, y> for ``"inner_product"`` and
    ``"cosine"``) -> the distance of ``metric``, in place."""
    if metric == "cosine":
        # -<x, y> on normalised rows (zero rows stay zero): 1 - cosine.
        distances += 1.0
        np.clip(distances, 0.0, 2.0, out=distances)
    elif metric != "inner_product":
        np.maximum(distances, 0, out=distances)
        if metric == "euclidean":
            np.sqrt(distances, out=distances)
    return distances
