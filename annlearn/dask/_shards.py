"""What runs on the workers: build a shard, search it, merge shard answers.

A shard is an ordinary :class:`~annlearn.FlatNeighbors` or
:class:`~annlearn.IVFPQNeighbors` holding one part of the rows. Every shard
of an index is a copy of one *template*, an estimator fitted on a sample and
then emptied, holding the shard's rows (added to it for Flat; for IVF-PQ,
encoded where they were and regrouped by cell, see ``encode_part``,
``split_part`` and ``assemble_shard``): the template fixes every decision
taken from data (the centring and principal axes of Flat, the quantizers of
IVF-PQ), so all shards store and search their rows exactly as one index
holding all of them would.

These functions take and return plain numpy arrays and estimators; they are
shipped by reference (module and name), never as closures, so that any
worker with annlearn installed can run them.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import numpy as np

from annlearn import _ivf
from annlearn._base import _drop_self
from annlearn._filter import check_allowed
from annlearn._persistence import load, save
from annlearn._threads import effective_n_threads
from annlearn._validation import validate_query_data
from annlearn.dask._cluster import LOST_SHARD, ShardLostError

__all__ = [
    "CellRouter",
    "assemble_shard",
    "build_shard",
    "cell_counts",
    "encode_part",
    "split_part",
    "take_sent",
    "check_shard",
    "merge_flat",
    "merge_ivfpq",
    "owned_ids",
    "drop_self",
    "id_order",
    "indexed_queries",
    "prepare_queries",
    "reference_shard",
    "remove_from_shard",
    "save_shard",
    "load_shard",
    "search_flat",
    "search_ivfpq",
    "route",
    "shard_info",
]

# Sorts after every real id: empty slots (id -1) rank last among equal
# distances (+inf), as the kernels' heaps rank them.
_NO_ID = np.iinfo(np.int64).max


def take_sent(key):
    """The array the client scattered to this worker under ``key`` (rows of
    a shard, see ``_base._send_rows``); :class:`ShardLostError` if it is
    gone, i.e. when the scheduler rebuilds a shard whose worker died."""
    from distributed import get_worker

    try:
        return get_worker().data[key]
    except KeyError:
        raise ShardLostError(LOST_SHARD) from None


def build_shard(template, X: np.ndarray, ids: np.ndarray):
    """A shard: a copy of ``template`` (never modified, workers share it)
    holding rows X with ``ids``, stored as the template stores rows."""
    return copy.copy(template).add(X, ids)


def encode_part(template, X, ids):
    """Rows of an IVF-PQ index, validated, prepared and encoded with the
    template's quantizers: (cells, codes, ids, prepared vectors or None),
    as ``IVFPQNeighbors.add`` would store them."""
    X = template._prepare_queries(validate_query_data(template, X))
    cells, codes = template._codec.encode(X, effective_n_threads(template.n_jobs))
    vectors = X if template._store.vectors is not None else None
    # int32 cells: 4 bytes less per row in the shuffle to the cells' shards.
    return cells.astype(np.int32), codes, np.asarray(ids, dtype=np.int64), vectors


def cell_counts(part, nlist: int) -> np.ndarray:
    """Rows per cell of an encoded part."""
    return np.bincount(part[0], minlength=nlist)


def split_part(part, owner: np.ndarray, n_shards: int) -> list:
    """An encoded part cut by the shard that owns each row's cell (rows keep
    their order, so that a cell's rows stay in insertion order)."""
    cells, codes, ids, vectors = part
    destination = owner[cells]
    pieces = []
    for shard in range(n_shards):
        rows = np.flatnonzero(destination == shard)
        pieces.append(
            (
                cells[rows],
                codes[rows],
                ids[rows],
                None if vectors is None else vectors[rows],
            )
        )
    return pieces


def assemble_shard(template, *pieces):
    """An IVF-PQ shard holding the cells whose rows are in ``pieces`` (one
    piece per part, in row order): the lists one index would hold for these
    cells, in the same order."""
    from annlearn._invlists import InvertedLists

    cells, codes, ids, vectors = (
        None if column[0] is None else np.concatenate(column)
        for column in zip(*pieces, strict=True)
    )
    lists = InvertedLists.from_cells(template._store.nlist, cells, codes, ids, vectors)
    shard = copy.copy(template)
    shard._set_store(lists)
    return shard


def remove_from_shard(shard, ids: np.ndarray):
    """A new shard without ``ids`` (all held by ``shard``)."""
    return copy.copy(shard).remove(ids)


def shard_info(shard) -> dict:
    """What the client keeps of a shard: its size, its largest id, and for
    IVF-PQ its rows per cell (widening is judged on the whole index)."""
    ids = shard._store.ids
    sizes = shard._store.sizes() if hasattr(shard._store, "sizes") else None
    return {
        "n": len(ids),
        "max_id": int(ids.max()) if len(ids) else -1,
        "cell_sizes": sizes,
    }


def owned_ids(shard, ids: np.ndarray) -> np.ndarray:
    """The ids of ``ids`` that ``shard`` holds."""
    return ids[np.isin(ids, shard._store.ids)]


# -- queries --------------------------------------------------------------


def prepare_queries(template, X) -> np.ndarray:
    """One block of queries, validated (float32, finite, the fitted number of
    features) and prepared as the template prepares them (centred, or
    normalised for cosine): done once per block, not on every shard."""
    return template._prepare_queries(validate_query_data(template, X))


def id_order(shard) -> np.ndarray:
    """The rows of a shard in increasing id order (``kneighbors(X=None)``
    answers rows in id order, as one index does)."""
    return np.argsort(shard._store.ids, kind="stable")


def indexed_queries(shard, order: np.ndarray, start: int, stop: int):
    """Rows ``order[start:stop]`` of a shard as prepared queries, as one
    index queries its own vectors (IVF-PQ: the stored vectors, else the
    decoded codes), and their ids."""
    rows = order[start:stop]
    return shard._store.ids[rows], shard._indexed_queries(shard._store, rows)


@dataclass(frozen=True, eq=False)
class CellRouter:
    """What each IVF-PQ shard scans for a block of prepared queries.

    The coarse search runs once per block (``IVFPQCodec.probe``, widened on
    the whole index's ``cell_sizes``), and shard ``s`` receives only the
    queries that probe one of its cells (``cell_owner``), with those cells
    only: each (query, cell) pair is scanned once, on the shard holding the
    cell, and a query reaches at most ``nprobe`` shards. With 4-bit codes a
    query's probed cells all go with it, for the quantization scale of its
    tables spans them all (``annlearn/_fastscan.h``); the scan still skips
    the cells the shard does not hold.
    """

    nprobe: int
    n_neighbors: int
    cell_sizes: np.ndarray
    cell_owner: np.ndarray
    n_shards: int
    n_jobs: object

    def __call__(self, template, X: np.ndarray) -> list:
        """One piece per shard, ``(rows, queries, cells, base)`` with
        ``rows`` a boolean mask over X, or None if no query needs the shard
        (one shard gets a piece, even empty, so that the merge knows
        ``len(X)``)."""
        codec = template._codec
        cells, base = codec.probe(
            X,
            self.nprobe,
            effective_n_threads(self.n_jobs),
            n_neighbors=self.n_neighbors,
            cell_sizes=self.cell_sizes,
        )
        holder = np.where(cells >= 0, self.cell_owner[cells], -1)
        every_cell = codec.pq.ksub == 16
        pieces = []
        for shard in range(self.n_shards):
            mine = holder == shard
            rows = mine.any(axis=1)
            if not rows.any():
                pieces.append(None)
                continue
            probed, terms, mine = cells[rows], base[rows], mine[rows]
            if not every_cell:
                # This shard's cells first (in probe order), then cut.
                width = int(mine.sum(axis=1).max(initial=0))
                order = np.argsort(~mine, axis=1, kind="stable")[:, :width]
                mine = np.take_along_axis(mine, order, 1)
                probed = np.where(mine, np.take_along_axis(probed, order, 1), -1)
                terms = np.take_along_axis(terms, order, 1)
            pieces.append(
                (
                    rows,
                    np.ascontiguousarray(X[rows]),
                    probed.astype(np.int32),
                    np.ascontiguousarray(terms),
                )
            )
        if all(piece is None for piece in pieces):
            # No query (an empty block): the merge still learns len(X).
            pieces[0] = (np.zeros(len(X), bool), X[:0], cells[:0, :0], base[:0, :0])
        return pieces


def route(router: CellRouter, template, X: np.ndarray) -> list:
    """``router(template, X)`` as a task (a lazy block's routing)."""
    return router(template, X)


def _empty(n_queries: int, width: int = 0):
    return (
        np.full((n_queries, width), np.inf, dtype=np.float32),
        np.full((n_queries, width), -1, dtype=np.int64),
    )


def search_flat(shard, X: np.ndarray, n_neighbors: int, n_jobs, prepared=True):
    """A Flat shard's ``n_neighbors`` best (fewer if it holds fewer rows) for
    queries X, prepared by the template unless ``prepared`` is False (then
    prepared by this shard, which has its own preparation: ``score``'s
    exact references): (distances, ids), ties to the smaller row of the
    shard."""
    k = min(n_neighbors, shard.n_samples_fit_)
    if k == 0:
        return _empty(len(X))
    if not prepared:
        X = shard._prepare_queries(X)
    # A shallow copy: the shard in the worker's memory is shared by every
    # task that searches it and is never modified.
    searcher = copy.copy(shard)
    searcher.n_jobs = n_jobs
    dist, positions = searcher._search(shard._store, X, k)
    return dist, shard._store.ids[positions]


def search_ivfpq(shard, piece, n_candidates: int, refine: bool, n_jobs):
    """An IVF-PQ shard's candidates for its piece of a query block.

    ``piece`` is ``CellRouter``'s: (rows of the block, prepared queries,
    probed cells, their term 1). Returns the rows and, for each of these
    queries, the ``n_candidates`` best rows of the probed cells the shard
    holds, with their code distances in scan units and, when ``refine``,
    their exact distances (the stored vectors), so that the merge can rank
    the candidates of every shard exactly as one index ranks its own: by
    code distance to keep ``n_candidates``, then by exact distance:
    (rows, code distances, exact distances or None, ids, cells).

    One index ranks equal distances by row of its lists, i.e. by cell, then
    by insertion order within the cell; the cells (int32) come back too, so
    that the merge ranks ties by (cell, id), the same order for ids that
    increase with insertion (the default ids).
    """
    if piece is None:
        return None
    rows, X, cells, base = piece
    lists, codec = shard._store, shard._codec
    n_threads = effective_n_threads(n_jobs)
    width = min(n_candidates, len(lists))
    if width == 0:
        dist, ids = _empty(len(X))
        return rows, dist, (dist if refine else None), ids, ids.astype(np.int32)
    dist, pos = codec.scan_probed(
        lists, X, cells.astype(np.int64), base, width, n_threads
    )
    exact = None
    if refine:
        ref_dist, ref_pos = _ivf.refine(
            X, lists.vectors, pos, width, codec.inner_product, n_threads
        )
        # refine returns each row's candidates sorted by exact distance; put
        # every exact distance back in its candidate's slot (a row holds each
        # position once, and as many -1 slots in both).
        by_pos = np.argsort(pos, axis=1, kind="stable")
        by_ref = np.argsort(ref_pos, axis=1, kind="stable")
        exact = np.empty_like(ref_dist)
        np.put_along_axis(exact, by_pos, np.take_along_axis(ref_dist, by_ref, 1), 1)
    filled = pos >= 0
    ids = np.where(filled, lists.ids[np.maximum(pos, 0)], -1)
    cells = np.where(filled, lists.cells_of(pos), -1).astype(np.int32)
    return rows, dist, exact, ids, cells


def count_allowed(shard, allowed, n_columns: int, n_queries: int) -> np.ndarray:
    """Rows of the shard each query's filter allows (``allowed`` in
    ``canonical_allowed``'s form, over the index's ``n_columns`` ids)."""
    return check_allowed(allowed, shard._store.ids, n_queries, n_columns).counts


def search_flat_allowed(
    shard, X: np.ndarray, allowed, n_columns: int, n_neighbors: int, n_jobs
):
    """A Flat shard's ``n_neighbors`` best allowed rows for prepared queries
    X: ``(distances, ids)``, as ``search_flat``. ``allowed`` (a boolean mask
    over the ids, or these queries' rows of a per-query filter, over the
    index's ``n_columns`` ids) is applied inside the search, as one index
    applies it. A query allowing fewer rows of this shard gets them all and
    empty slots (+inf, -1) after: the other shards hold the rest, and the
    client checked that every query allows ``n_neighbors`` in all."""
    n_queries = len(X)
    dist, found = _empty(n_queries, n_neighbors)
    store = shard._store
    ids = store.ids
    widths = np.minimum(
        check_allowed(allowed, ids, n_queries, n_columns).counts, n_neighbors
    )
    searcher = copy.copy(shard)
    searcher.n_jobs = n_jobs
    # Queries by the number of neighbours this shard can give them.
    for width in np.unique(widths[widths > 0]):
        queries = np.flatnonzero(widths == width)
        rows = allowed if allowed.ndim == 1 else allowed[queries]
        filt = check_allowed(rows, ids, len(queries), n_columns)
        step = filt.block_size()
        for start in range(0, len(queries), step):
            stop = min(start + step, len(queries))
            block = queries[start:stop]
            d, positions = searcher._search(
                store, X[block], int(width), filt.block(start, stop)
            )
            dist[block, :width] = d
            found[block, :width] = ids[positions]
    return dist, found


def _best(keys, ids, width: int, cells=None) -> np.ndarray:
    """Per row, the columns of the ``width`` best candidates, in order: the
    heap's rule (smaller distance, then smaller cell if given, then smaller
    id), empty slots (id -1) last.

    Rows are sorted by distance alone, and only the rows where two of the
    ``width + 1`` nearest are at equal distances (ties, which the rule's
    other keys decide) sorted again by every key: the full sort costs
    several times more and is rarely needed.
    """
    width = min(width, keys.shape[1])
    empty = ids < 0
    dist = np.where(empty, np.inf, keys)
    order = np.argsort(dist, axis=1)[:, : width + 1]
    head = np.take_along_axis(dist, order, 1)
    tied = np.flatnonzero((head[:, 1:] == head[:, :-1]).any(axis=1))
    order = order[:, :width]
    if len(tied):
        rule = [np.where(empty[tied], _NO_ID, ids[tied])]
        if cells is not None:
            rule.append(cells[tied])
        rule.append(dist[tied])
        order[tied] = np.lexsort(rule, axis=1)[:, :width]
    return order


def _check_complete(ids: np.ndarray, n_neighbors: int) -> None:
    missing = np.count_nonzero((ids[:, :n_neighbors] < 0).any(axis=1))
    if missing:
        raise RuntimeError(
            f"The shards returned fewer than n_neighbors = {n_neighbors} "
            f"candidates for {missing} queries. This is a bug in annlearn.dask: "
            "please report it with the data."
        )


def merge_flat(parts, n_neighbors: int):
    """The ``n_neighbors`` best of every shard's (distances, ids)."""
    dist = np.concatenate([d for d, _ in parts], axis=1)
    ids = np.concatenate([i for _, i in parts], axis=1)
    best = _best(dist, ids, n_neighbors)
    ids = np.take_along_axis(ids, best, 1)
    _check_complete(ids, n_neighbors)
    return np.ascontiguousarray(np.take_along_axis(dist, best, 1)), ids


def merge_ivfpq(template, parts, n_neighbors: int, n_candidates: int):
    """The ``n_neighbors`` best of every shard's IVF-PQ candidates, ranked as
    ``IVFPQCodec.search`` ranks one index's: the ``n_candidates`` best by
    code distance, then (when refining) these by exact distance. A query
    has no candidates from the shards it did not reach (empty slots)."""
    parts = [part for part in parts if part is not None]
    n_queries = len(parts[0][0])
    columns = []
    for rows, *arrays in parts:
        placed = []
        for array, empty in zip(arrays, (np.inf, np.inf, -1, -1), strict=True):
            if array is not None:
                whole = np.full((n_queries, array.shape[1]), empty, array.dtype)
                whole[rows] = array
                array = whole
            placed.append(array)
        columns.append(placed)
    dist, exact, ids, cells = (
        None if column[0] is None else np.concatenate(column, axis=1)
        for column in zip(*columns, strict=True)
    )
    keep = _best(dist, ids, n_candidates, cells)
    dist, ids = np.take_along_axis(dist, keep, 1), np.take_along_axis(ids, keep, 1)
    if exact is not None:
        cells = np.take_along_axis(cells, keep, 1)
        dist = np.take_along_axis(exact, keep, 1)
        best = _best(dist, ids, n_neighbors, cells)
        dist, ids = np.take_along_axis(dist, best, 1), np.take_along_axis(ids, best, 1)
    ids = np.ascontiguousarray(ids[:, :n_neighbors])
    _check_complete(ids, n_neighbors)
    dist = np.ascontiguousarray(dist[:, :n_neighbors])
    return template._codec.to_metric(dist), ids


def drop_self(merged, self_ids: np.ndarray):
    """The neighbours of indexed vectors searched with k + 1, without each
    vector itself (as one index's ``kneighbors(X=None)``), and their ids."""
    dist, ids = _drop_self(*merged, self_ids)
    return dist, ids, self_ids


# -- score ----------------------------------------------------------------


def reference_shard(shard):
    """An exact index over an IVF-PQ shard's stored vectors, for ``score``
    (float32 C-contiguous: the FlatNeighbors shares them, no copy)."""
    from annlearn._flat import FlatNeighbors

    lists = shard._store
    reference = FlatNeighbors(metric=shard.effective_metric_, n_jobs=shard.n_jobs)
    return reference.fit(lists.vectors, ids=lists.ids)


# -- files ----------------------------------------------------------------


def save_shard(shard, path: str) -> int:
    """Write a shard to its own annlearn file; return its size in bytes."""
    save(shard, path)
    return os.path.getsize(path)


def load_shard(path: str, mmap_mode, verify):
    """Read a shard written by ``save_shard``."""
    return load(path, mmap_mode=mmap_mode, verify=verify)


def check_shard(shard, template, n_samples: int):
    """``shard``, if it is a shard of ``template``: the same class, metric
    and features, the same quantizers for IVF-PQ, and ``n_samples`` rows."""
    problems = []
    if type(shard) is not type(template):
        problems.append(f"a {type(shard).__name__}, not a {type(template).__name__}")
    elif shard.n_samples_fit_ != n_samples:
        problems.append(f"{shard.n_samples_fit_} rows, the manifest says {n_samples}")
    elif (shard.n_features_in_, shard.effective_metric_) != (
        template.n_features_in_,
        template.effective_metric_,
    ):
        problems.append("another number of features or metric than the template")
    elif hasattr(template, "cluster_centers_") and not (
        np.array_equal(shard.cluster_centers_, template.cluster_centers_)
        and np.array_equal(shard.pq_codebooks_, template.pq_codebooks_)
    ):
        problems.append("other quantizers than the template")
    if problems:
        raise ValueError(f"a shard file holds {problems[0]}.")
    return shard
