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
import functools
import os
from dataclasses import dataclass

import numpy as np

from annlearn._base import _drop_self
from annlearn._filter import check_allowed
from annlearn._ivfpq_codec import scan_to_metric
from annlearn._merge import best_columns, rank_candidates
from annlearn._persistence import load, save
from annlearn._threads import effective_n_threads
from annlearn._utils._pool import pooled
from annlearn._validation import validate_query_data
from annlearn.dask._cluster import LOST_SHARD, ShardLostError

__all__ = [
    "CellRouter",
    "as_sent",
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
    "search_ivfpq_rest",
    "route",
    "route_pieces",
    "shard_info",
]


def _pooled(task):
    """``task`` with its numpy arrays allocated from the worker's buffer
    pool (``annlearn._utils._pool``): a search task allocates the same large
    temporaries on every call, which a dask worker (glibc's mmap threshold
    frozen by dask's ``MALLOC_TRIM_THRESHOLD_``) would otherwise map and
    page-fault afresh each time."""

    @functools.wraps(task)
    def run(*args, **kwargs):
        with pooled():
            return task(*args, **kwargs)

    return run


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
    """Where each query of a block is scanned, for IVF-PQ shards cut by
    cells.

    The coarse search runs once per query (``IVFPQCodec.probe``, widened on
    the whole index's ``cell_sizes``; a block is routed in pieces on the
    shards' workers, see ``route``); every shard then scans, for the
    queries that probe one of its cells (``cell_owner``), those cells only:
    each (query, cell) pair is scanned once, on the shard holding the cell,
    and a query reaches at most ``nprobe`` shards.
    """

    nprobe: int
    n_neighbors: int
    cell_sizes: np.ndarray
    cell_owner: np.ndarray
    n_jobs: object

    def __call__(self, template, X: np.ndarray) -> tuple:
        """``(cells, base, holder)``: the probed cells of each query of X
        (-1: none), their term 1, and the shard holding each (-1: none, or
        an empty cell)."""
        cells, base = template._codec.probe(
            X,
            self.nprobe,
            effective_n_threads(self.n_jobs),
            n_neighbors=self.n_neighbors,
            cell_sizes=self.cell_sizes,
        )
        # An empty cell has nothing to scan: no shard takes its probe, so
        # that a query's leader always holds some of its rows.
        scanned = (cells >= 0) & (self.cell_sizes[cells] > 0)
        holder = np.where(scanned, self.cell_owner[cells], -1).astype(np.int32)
        return cells, base, holder


@_pooled
def route(router: CellRouter, shard, X: np.ndarray, start: int, stop: int):
    """``router(shard, X[start:stop])`` as a task: a piece of a block's
    probes, computed on a worker (the client only schedules; the pieces of
    a block are routed on several workers at once). Any shard of the index
    routes as the template would (it holds the same quantizers), and one on
    the worker routing costs no transfer."""
    return router(shard, _as_float32(X[start:stop]))


def as_sent(block: np.ndarray, n_threads: int) -> np.ndarray:
    """A block of prepared queries as the client sends it: uint8 when every
    value is an integer in [0, 255] (pixels: a quarter of the bytes to
    send and to pass between workers), restored exactly on the workers
    (``_as_float32``); else as it is."""
    from annlearn._ivf import exact_uint8

    compact = exact_uint8(block, n_threads)
    return block if compact is None else compact


def _as_float32(X: np.ndarray) -> np.ndarray:
    """Queries sent as uint8 (``as_sent``) back to float32; others as they are."""
    return X.astype(np.float32) if X.dtype == np.uint8 else X


def route_pieces(n_rows: int, n_pieces: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the pieces a block of ``n_rows`` queries is
    routed in: ``n_pieces`` at most, none under ``MIN_ROUTE_ROWS`` rows
    unless the block is (below that, the coarse search's GEMM loses more
    than the split gains)."""
    n_pieces = max(1, min(n_pieces, n_rows // MIN_ROUTE_ROWS))
    bounds = np.linspace(0, n_rows, n_pieces + 1).round().astype(int)
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))


MIN_ROUTE_ROWS = 512


def _empty(n_queries: int, width: int = 0):
    return (
        np.full((n_queries, width), np.inf, dtype=np.float32),
        np.full((n_queries, width), -1, dtype=np.int64),
    )


@_pooled
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


@_pooled
def search_ivfpq(
    shard,
    X: np.ndarray,
    probes: tuple,
    shard_no: int,
    n_neighbors: int,
    n_candidates: int,
    refine: bool,
    n_jobs,
):
    """IVF-PQ shard ``shard_no``'s first pass over a block of prepared
    queries X with their ``probes`` (``CellRouter``'s, as one tuple or a
    list of the pieces of X routed apart, in row order): the queries it
    *leads*, those whose nearest probed cell it holds.

    The shard scans its probed cells for them (with 4-bit codes all of a
    query's probed cells go to the scan, which skips the other shards'
    cells, empty here, tables included: a cell's quantized tables depend on
    that cell alone). A query whose probed cells are all this shard's
    (*own*) is answered here, as one index answers it: its
    ``n_candidates`` best rows by code distance, re-ranked by exact distance
    when ``refine``. For the other queries it leads (*shared*) the shard
    keeps its ``n_candidates`` best with their code distances and, when
    ``refine``, their exact distances, and the code distance of the last of
    them, the *bound*: the other shards holding their probes
    (:func:`search_ivfpq_rest`) need only the rows at most that far, as the
    ``n_candidates`` best of one index are at most that far.

    One index ranks equal distances by row of its lists, i.e. by cell, then
    by insertion order within the cell; a shard's lists keep that order, and
    candidates come with their cells (int32) so that the merge ranks ties
    by (cell, id), the same order for ids that increase with insertion (the
    default ids).

    Returns
    -------
    (shard_no, own, wide, for_rest): ``own = (rows, distances, ids)`` of
    shape (r, n_neighbors), ``wide`` the candidates of the shared queries
    probing three shards or more, and ``for_rest = (rows, bound,
    *candidates)`` of every shared query. Candidates are ``(rows, code
    distances, exact distances or None, ids, cells)`` of shape (s,
    n_candidates), distances in scan units, ``rows`` indices into X.
    """
    probes = _joined(probes)
    holder = probes[2]
    mine = holder == shard_no
    leader = _leader(holder)
    led = leader == shard_no
    own = led & (mine | (holder < 0)).all(axis=1)
    # This shard's queries, its own ones first: one copy of X, and views of
    # it and of the scan's answers for each part.
    rows = np.concatenate([np.flatnonzero(own), np.flatnonzero(led & ~own)])
    n_own = int(np.count_nonzero(own))
    X, dist, pos, width = _scan_rows(shard, X, probes, mine, rows, n_candidates, n_jobs)
    lists, codec = shard._store, shard._codec
    n_threads = effective_n_threads(n_jobs)
    # Own queries: answered here, as one index answers them.
    d, p, Xp = dist[:n_own], pos[:n_own], X[:n_own]
    if refine and width and n_own:
        d, p = lists.refine(
            Xp, p, min(n_neighbors, width), codec.inner_product, n_threads
        )
    d, p = _widen(d[:, :n_neighbors], p[:, :n_neighbors], n_neighbors)
    own_answers = (rows[:n_own], d, _ids_or_empty(lists, p))
    # Shared queries: candidates, and the bound for the other shards (none
    # when this shard cannot fill n_candidates).
    d, p, shared_rows = dist[n_own:], pos[n_own:], rows[n_own:]
    bound = (
        d[:, n_candidates - 1]
        if width == n_candidates
        else np.full(len(d), np.inf, dtype=np.float32)
    )
    shared = _candidates(shard, X[n_own:], shared_rows, d, p, refine, n_threads)
    wide = ~_two_shards(holder[shared_rows], leader[shared_rows], None)
    return shard_no, own_answers, _take(shared, wide), (shared_rows, bound, *shared)


@_pooled
def search_ivfpq_rest(
    shard,
    X: np.ndarray,
    probes: tuple,
    shard_no: int,
    leads: list,
    n_neighbors: int,
    n_candidates: int,
    refine: bool,
    n_jobs,
):
    """IVF-PQ shard ``shard_no``'s second pass: the queries probing one of
    its cells that another shard leads (``leads``: every shard's
    :func:`search_ivfpq` answer, this shard's included, which is already
    here), each scanned from its leader's bound, so that only rows at most
    that far become candidates (8-bit codes scan without it: every
    candidate; the merge ranks them the same). A query whose probed cells
    are on its leader and this shard only is answered here, from both
    shards' candidates, as one index answers it; the others' candidates go
    to the merge, with this shard's first-pass answers.

    Returns
    -------
    (n_queries, answers, led, found): ``answers = (rows, distances, ids)``
    of this shard's own queries and of the queries answered here; ``led``
    the candidates of the queries on three shards or more that it leads,
    ``found`` those it found for the ones others lead (as
    :func:`search_ivfpq`'s, ``found`` at most as many per query as the bound
    let through).
    """
    probes = _joined(probes)
    holder = probes[2]
    mine = holder == shard_no
    leader = _leader(holder)
    rows = np.flatnonzero(mine.any(axis=1) & (leader != shard_no))
    first = next(lead for lead in leads if lead[0] == shard_no)
    leads = [lead[3] for lead in leads if lead[0] != shard_no]
    start = np.full(len(holder), np.inf, dtype=np.float32)
    for led_rows, bound, *_ in leads:
        start[led_rows] = bound
    X, dist, pos, _ = _scan_rows(
        shard, X, probes, mine, rows, n_candidates, n_jobs, start[rows]
    )
    # As many columns as the query with the most candidates needs.
    width = int((pos >= 0).sum(axis=1).max(initial=0))
    dist = np.ascontiguousarray(dist[:, :width])
    pos = np.ascontiguousarray(pos[:, :width])
    n_threads = effective_n_threads(n_jobs)
    found = _candidates(shard, X, rows, dist, pos, refine, n_threads)
    # Queries on two shards, their leader and this one: answered here.
    pair = _two_shards(holder[rows], leader[rows], shard_no)
    final_rows = rows[pair]
    d = np.full((len(final_rows), n_neighbors), np.inf, dtype=np.float32)
    ids = np.full((len(final_rows), n_neighbors), -1, dtype=np.int64)
    mine_found = _take(found, pair)
    for led_rows, _, *led_found in leads:
        at = np.isin(final_rows, led_rows)
        if not at.any():
            continue
        group = _take(mine_found, at)
        columns = [_rows_of(group[0], led_found[0], led_found[1:]), group[1:]]
        d[at], ids[at] = rank_candidates(columns, n_candidates, n_neighbors)
    own_rows, own_d, own_ids = first[1]
    answers = (
        np.concatenate([own_rows, final_rows]),
        np.concatenate([own_d, d]),
        np.concatenate([own_ids, ids]),
    )
    return len(holder), answers, first[2], _take(found, ~pair)


def _two_shards(holder: np.ndarray, leader: np.ndarray, other) -> np.ndarray:
    """Whether each query's probed cells are on its leader and at most one
    other shard (``other``, or any one when None)."""
    held = holder >= 0
    if other is None:
        # The other shard: any probed cell's that is not the leader's.
        away = np.where(held & (holder != leader[:, None]), holder, -1)
        other = away.max(axis=1)[:, None]
    return (~held | (holder == leader[:, None]) | (holder == other)).all(axis=1)


def _take(candidates: tuple, keep: np.ndarray) -> tuple:
    """The candidates of the queries ``keep`` (a boolean mask)."""
    if keep.all():
        return candidates
    return tuple(None if a is None else a[keep] for a in candidates)


def _joined(probes) -> tuple:
    """``CellRouter`` probes of a block, from its pieces if routed apart."""
    if isinstance(probes, list):
        return tuple(np.concatenate(column) for column in zip(*probes, strict=True))
    return probes


def _gather_rows(X, rows: np.ndarray) -> np.ndarray:
    """``X[rows]`` of a block of queries, given whole or as the list of its
    pieces (routed apart, in row order)."""
    if not isinstance(X, list):
        return X[rows]
    starts = np.cumsum([0] + [len(piece) for piece in X])
    # float32 whatever the pieces were sent as (``as_sent``).
    out = np.empty((len(rows), X[0].shape[1]), dtype=np.float32)
    piece_of = np.searchsorted(starts, rows, side="right") - 1
    for n, piece in enumerate(X):
        at = np.flatnonzero(piece_of == n)
        out[at] = piece[rows[at] - starts[n]]
    return out


def _leader(holder: np.ndarray) -> np.ndarray:
    """The shard holding each query's nearest probed cell that a shard
    holds (probes come nearest first), -1 for a query with none."""
    held = holder >= 0
    first = np.argmax(held, axis=1)
    return np.where(held.any(axis=1), holder[np.arange(len(holder)), first], -1)


def _scan_rows(shard, X, probes, mine, rows, n_candidates, n_jobs, bound=None):
    """The shard's scan of the queries ``rows`` of X: ``(X[rows], distances,
    positions, width)``, ``width = min(n_candidates, rows of the shard)``
    columns; each query from its ``bound`` (4-bit codes; None: +inf)."""
    cells, base, _ = probes
    cells, base, mine = cells[rows], base[rows], mine[rows]
    lists, codec = shard._store, shard._codec
    if codec.pq.ksub != 16:
        # This shard's cells first (in probe order), then cut.
        width = int(mine.sum(axis=1).max(initial=0))
        order = np.argsort(~mine, axis=1, kind="stable")[:, :width]
        mine = np.take_along_axis(mine, order, 1)
        cells = np.where(mine, np.take_along_axis(cells, order, 1), -1)
        base = np.ascontiguousarray(np.take_along_axis(base, order, 1))
        bound = None
    X = _gather_rows(X, rows)
    width = min(n_candidates, len(lists))
    if not width:
        return X, *_empty(len(X)), 0
    dist, pos = codec.scan_probed(
        lists, X, cells, base, width, effective_n_threads(n_jobs), bound=bound
    )
    return X, dist, pos, width


def _candidates(shard, X, rows, dist, pos, refine: bool, n_threads: int) -> tuple:
    """``(rows, code distances, exact distances or None, ids, cells)`` of
    the candidates at ``pos`` (-1: empty) of the queries X."""
    lists, codec = shard._store, shard._codec
    exact = None
    if refine:
        exact = lists.exact_scores(X, pos, codec.inner_product, n_threads)
    found_cells = np.full(pos.shape, -1, dtype=np.int32)
    if len(lists):
        np.copyto(found_cells, lists.cells_of(np.maximum(pos, 0)), where=pos >= 0)
    return rows, dist, exact, _ids_or_empty(lists, pos), found_cells


def _ids_or_empty(lists, positions: np.ndarray) -> np.ndarray:
    """The ids of the rows at ``positions``, -1 for empty slots (which a
    shard may leave: the other shards fill them; ``annlearn._base._ids_at``
    is the one-index twin that refuses them)."""
    return np.where(positions >= 0, lists.ids[np.maximum(positions, 0)], -1)


def _widen(dist: np.ndarray, pos: np.ndarray, width: int):
    """(dist, pos) with empty slots (+inf, -1) up to ``width`` columns."""
    if dist.shape[1] >= width:
        return dist, pos
    more = width - dist.shape[1]
    return (
        np.pad(dist, ((0, 0), (0, more)), constant_values=np.inf),
        np.pad(pos, ((0, 0), (0, more)), constant_values=-1),
    )


def count_allowed(shard, allowed, n_columns: int, n_queries: int) -> np.ndarray:
    """Rows of the shard each query's filter allows (``allowed`` in
    ``canonical_allowed``'s form, over the index's ``n_columns`` ids)."""
    return check_allowed(allowed, shard._store.ids, n_queries, n_columns).counts


@_pooled
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
    best = best_columns(dist, ids, None, n_neighbors)
    ids = np.take_along_axis(ids, best, 1)
    _check_complete(ids, n_neighbors)
    return np.ascontiguousarray(np.take_along_axis(dist, best, 1)), ids


def merge_ivfpq(parts, n_neighbors: int, n_candidates: int, metric: str):
    """The ``n_neighbors`` best for a block, from every shard's
    ``search_ivfpq_rest`` answer: a query a shard answered takes its
    answer; the candidates of a query on three shards or more are ranked as
    ``IVFPQCodec.search`` ranks one index's: the ``n_candidates`` best by
    code distance, then (when refining) these by exact distance. The
    leader's candidates and the others' within its bound hold these: every
    row of one index's ``n_candidates`` best is at most as far as the
    leader's last."""
    n_queries = parts[0][0]
    dist = np.full((n_queries, n_neighbors), np.inf, dtype=np.float32)
    ids = np.full((n_queries, n_neighbors), -1, dtype=np.int64)
    for part in parts:
        rows, d, i = part[1]
        dist[rows], ids[rows] = d, i
    # A leader's queries on three shards or more, with what every other
    # shard found for them.
    leaders = [part[2] for part in parts if len(part[2][0])]
    others = [part[3] for part in parts if len(part[3][0])]
    for rows, *arrays in leaders:
        columns = [arrays]
        for piece_rows, *found in others:
            columns.append(_rows_of(rows, piece_rows, found))
        d, i = rank_candidates(columns, n_candidates, n_neighbors)
        dist[rows], ids[rows] = d, i
    _check_complete(ids, n_neighbors)
    return scan_to_metric(dist, metric), ids


def _rows_of(rows: np.ndarray, piece_rows: np.ndarray, arrays: list) -> list:
    """A piece's candidate arrays for the queries ``rows`` (both sorted):
    the same arrays when the piece holds exactly these queries (two shards:
    the other shard's second pass), else empty slots where it has none."""
    if len(piece_rows) == len(rows) and np.array_equal(piece_rows, rows):
        return arrays
    at = np.minimum(np.searchsorted(piece_rows, rows), max(len(piece_rows) - 1, 0))
    held = np.flatnonzero(piece_rows[at] == rows) if len(piece_rows) else at[:0]
    out = []
    for array in arrays:
        if array is None:
            out.append(None)
            continue
        whole = np.full(
            (len(rows), array.shape[1]),
            -1 if array.dtype.kind == "i" else np.inf,
            dtype=array.dtype,
        )
        whole[held] = array[at[held]]
        out.append(whole)
    return out


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
