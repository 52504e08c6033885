"""Base class of the sharded estimators: fit, kneighbors, add, remove, score.

A fitted sharded estimator holds one immutable :class:`ShardedIndex`
(``self._index``): the futures of its shards, which stay in the memory of
the workers that built them, what the client needs to route and check
requests (rows and largest id of each shard), the template every shard was
made from, and its future. Every change builds a new ``ShardedIndex`` and
publishes it with one assignment, once every new shard exists: a failed
``add`` or ``remove`` leaves the index as it was, and a search in flight
keeps the shards it started with.

A concrete estimator implements these hooks:

``_fit_template(sample, rng)``
    A local estimator fitted on a sample of the rows and emptied: it fixes
    every decision taken from data, and each shard is a copy of it.
``_search_plan(index, n_neighbors)``
    A :class:`SearchPlan`: the task run on each shard, the task merging a
    block's shard answers, and, optionally, the router that says which
    queries each shard needs (IVF-PQ); without one, every shard searches
    the whole block (Flat).
``_build_shards(client, template, template_future, parts)``
    The shard futures from the parts of the rows, each on its worker (by
    default one shard per part; IVF-PQ regroups the rows by cell).
``_route(index, X)``
    Which rows of X each shard takes in ``add``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from annlearn._base import NeighborsBase, transactional
from annlearn._filter import canonical_allowed, check_enough, unknown_ids_error
from annlearn._threads import effective_n_threads
from annlearn._validation import (
    _as_int64_ids,
    _show,
    check_n_neighbors,
    check_new_ids,
    check_removed_ids,
    validate_fit_data,
    validate_query_data,
)
from annlearn.dask import _shards
from annlearn.dask._cluster import (
    ShardLostError,
    even_sizes,
    gather,
    holders,
    resolve_client,
    route_new_rows,
    share,
    worker_addresses,
)
from annlearn.metrics import recall_at_k

__all__ = ["SearchPlan", "ShardedIndex", "ShardedNeighborsBase", "is_dask_array"]


def is_dask_array(X) -> bool:
    """Whether X is a ``dask.array.Array`` (without importing dask.array
    for anything else)."""
    from dask.array import Array

    return isinstance(X, Array)


@dataclass(frozen=True, eq=False)
class ShardedIndex:
    """The published state of a fitted sharded estimator (never modified)."""

    client: object
    shards: tuple  # distributed.Future of each shard, in shard order
    sizes: np.ndarray  # rows of each shard
    max_ids: np.ndarray  # largest id of each shard, -1 if empty
    cell_sizes: np.ndarray | None  # IVF-PQ: rows per cell of the whole index
    cell_owner: np.ndarray | None  # IVF-PQ: the shard holding each cell, or -1
    template: object  # the emptied local estimator, on the client
    template_future: object  # ... and on every worker
    # Futures derived from the shards on demand (score's exact reference).
    derived: dict = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return int(self.sizes.sum())


@dataclass(frozen=True)
class SearchPlan:
    """How a block of prepared queries is searched on the shards.

    ``search(shard, block, *search_args)`` runs on each shard's worker and
    ``merge(parts, *merge_args)`` -> (distances, ids) merges a
    block's answers (``parts`` in shard order). With a ``router``, the block
    is first routed, in pieces by tasks on the shards' workers,
    ``_shards.route(router, shard, block, start, stop)`` -> probes of rows
    ``start:stop``, and each shard's search is ``search(shard, block,
    probes, shard_number, *search_args)`` with the list of the pieces'.
    With a ``rest``, each shard then searches again, ``rest(shard, block,
    probes, shard_number, firsts, *search_args)``, ``firsts`` listing every
    shard's first answer, and the merge takes these second answers only.
    With ``merge_here``, numpy queries
    are merged on the client (their parts being about the size of the
    answer: one hop fewer); a lazy search always merges in a task.
    """

    search: Callable
    search_args: tuple
    merge: Callable
    merge_args: tuple = ()
    router: Callable | None = None
    rest: Callable | None = None
    merge_here: bool = False


class ShardedNeighborsBase(BaseEstimator):
    """Shared API of the sharded estimators (see the module docstring)."""

    # -- hooks -------------------------------------------------------------
    def _fit_template(self, sample: np.ndarray, rng):  # pragma: no cover
        raise NotImplementedError

    def _search_plan(self, index: ShardedIndex, n_neighbors: int):  # pragma: no cover
        raise NotImplementedError

    def _prepare(self, index: ShardedIndex, X: np.ndarray) -> np.ndarray:
        # Prepared once on the client (centred, normalised), not per shard.
        return index.template._prepare_queries(X)

    def _publish(self, index: ShardedIndex) -> None:
        # One assignment replaces the whole index (see the module docstring).
        self._index = index
        self.n_samples_fit_ = index.n_samples
        self.n_shards_ = len(index.shards)

    # -- fit ---------------------------------------------------------------
    @transactional
    def _fit(self, X, ids, client, sample_size: int, rng, template=None):
        """Fit on X: a template from ``sample_size`` random rows (unless
        ``template`` is given), then one shard per row range."""
        client = resolve_client(client)
        lazy = is_dask_array(X)
        if lazy:
            X = self._check_dask_array(X, fit=True)
        else:
            X = validate_fit_data(self, X)
        n_samples = X.shape[0]
        ids = check_new_ids(ids, n_samples, None)
        if template is None:
            size = min(sample_size, n_samples)
            rows = np.sort(rng.choice(n_samples, size, replace=False))
            sample = client.compute(X[rows], sync=True) if lazy else X[rows]
            template = self._fit_template(np.asarray(sample), rng)
        elif template.n_features_in_ != X.shape[1]:
            raise ValueError(
                f"X has {X.shape[1]} features, but the quantizers were fitted "
                f"on {template.n_features_in_}."
            )
        workers = worker_addresses(client)
        n_shards = min(self.n_shards or len(workers), n_samples)
        sizes = even_sizes(n_samples, n_shards)
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        template_future = share(client, template)
        if lazy:
            import dask

            blocks = X.rechunk({0: tuple(sizes), 1: -1}).to_delayed().ravel()
        parts, sent = [], []
        for i in range(n_shards):
            worker = workers[i % len(workers)]
            part_ids = ids[bounds[i] : bounds[i + 1]]
            if lazy:
                # Computed on its worker: the rows never pass through here.
                part = (blocks[i], dask.delayed(part_ids))
            else:
                part = _send_rows(
                    client, [worker], X[bounds[i] : bounds[i + 1]], part_ids, sent
                )
            parts.append((worker, part))
        shards = self._build_shards(client, template, template_future, parts)
        self._publish(self._make_index(client, shards, template, template_future))
        del sent  # the rows sent are released once the shards hold them
        return self

    def _build_shards(self, client, template, template_future, parts) -> list:
        """One shard per part of the rows: a copy of the template holding
        them, built on the part's worker. ``parts`` are ``(worker, (rows,
        ids))``, rows and ids both futures or both delayed."""
        shards = []
        for worker, part in parts:
            shards.append(
                _run_on(client, worker, _shards.build_shard, template_future, *part)
            )
        return shards

    def _check_dask_array(self, X, *, fit: bool):
        """Check what a dask array's metadata can tell (the values are
        validated on the workers, block by block, when computed)."""
        if X.ndim != 2:
            raise ValueError(
                f"Expected a 2-d dask array of shape (n_samples, n_features), got "
                f"{X.ndim} dimensions."
            )
        if np.isnan(X.shape[0]):
            raise ValueError(
                "The dask array has unknown chunk sizes: call "
                "X.compute_chunk_sizes() first."
            )
        if X.dtype.kind not in "biuf":
            raise ValueError(
                f"Expected a real numeric dask array, got dtype {X.dtype}."
            )
        if X.shape[1] < 1 or (fit and X.shape[0] < 1):
            raise ValueError(
                f"Found array with shape {X.shape}, while a minimum of 1 is required."
            )
        if fit:
            self.n_features_in_ = int(X.shape[1])
            self.__dict__.pop("feature_names_in_", None)
        elif X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features, but {type(self).__name__} is "
                f"expecting {self.n_features_in_} features as input."
            )
        return X

    def _make_index(self, client, shards, template, template_future):
        """A ShardedIndex over built (or building) shard futures: waits for
        them and reads their sizes (any error of a build is raised here)."""
        infos = gather(
            client,
            [client.submit(_shards.shard_info, s, pure=False) for s in shards],
            f"Building the shards of {type(self).__name__}",
        )
        cell_sizes = owner = None
        if infos[0]["cell_sizes"] is not None:
            per_shard = np.stack([info["cell_sizes"] for info in infos])
            cell_sizes = per_shard.sum(axis=0)
            # The shard holding each cell (-1: empty): where add sends rows
            # and where a query's probe of the cell is scanned.
            owner = np.where(cell_sizes > 0, per_shard.argmax(axis=0), -1)
        return ShardedIndex(
            client=client,
            shards=tuple(shards),
            sizes=np.array([info["n"] for info in infos], dtype=np.int64),
            max_ids=np.array([info["max_id"] for info in infos], dtype=np.int64),
            cell_sizes=cell_sizes,
            cell_owner=owner,
            template=template,
            template_future=template_future,
        )

    # -- queries -----------------------------------------------------------
    def kneighbors(
        self, X=None, n_neighbors=None, return_distance=True, *, allowed=None
    ):
        """Find the k nearest neighbours of each query, over every shard.

        Each block of ``query_block_size`` queries is searched on the shards
        (on the workers that hold them) and their answers are merged by
        (distance, id) on a worker; only the merged answer comes back.

        Parameters
        ----------
        X : array-like or dask.array.Array of shape (n_queries, n_features), \
default=None
            Queries. A dask array is searched lazily, one graph per chunk of
            rows; its values are validated on the workers. If None, the
            neighbours of each indexed vector, the vector itself excluded,
            rows in increasing id order (as the local estimators; the
            queries are made on the workers that hold the vectors).
        n_neighbors : int, default=None
            Number of neighbours; the estimator's ``n_neighbors`` if None.
        return_distance : bool, default=True
            Whether to return the distances too.
        allowed : array-like or sparse matrix, default=None
            Restrict each search to a subset of ids, in any form
            :meth:`annlearn.FlatNeighbors.kneighbors` takes (an array of
            ids, a boolean mask over the ids, or one row per query), with
            numpy queries X. Every shard applies the filter inside its
            search and the answers are those of one index over all the
            vectors; a query allowing fewer than ``n_neighbors`` ids in the
            whole index raises a ``ValueError`` naming it. Sharded indexes
            without filtered search (``DaskIVFPQNeighbors``), ``X=None`` and
            dask arrays of queries raise a ``ValueError``: a filter is never
            dropped.

        Returns
        -------
        neigh_dist : ndarray or dask.array.Array of shape (n_queries, n_neighbors)
            float32 distances, increasing along each row (only if
            ``return_distance=True``). A dask array, chunked as X's rows,
            when X is one.
        neigh_ind : ndarray or dask.array.Array of shape (n_queries, n_neighbors)
            int64 ids of the neighbours.

        Raises
        ------
        ShardLostError
            If a shard was lost with its worker and cannot be rebuilt: no
            partial answer is ever returned (for a dask array, when it is
            computed).
        """
        check_is_fitted(self)
        index = self._index  # one snapshot for the whole call
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        k = check_n_neighbors(k, index.n_samples, query_is_train=X is None)
        if allowed is not None:
            dist, ids = self._kneighbors_allowed(index, X, k, allowed)
        elif X is None:
            dist, ids = self._kneighbors_indexed(index, k)
        elif is_dask_array(X):
            dist, ids = self._kneighbors_lazy(
                index, self._check_dask_array(X, fit=False), k
            )
        else:
            Xv = validate_query_data(self, X)
            dist, ids = self._kneighbors_now(index, self._prepare(index, Xv), k)
        return (dist, ids) if return_distance else ids

    # The local estimators' graph and transformer API, over this kneighbors.
    _graph = NeighborsBase.kneighbors_graph
    transform = NeighborsBase.transform
    fit_transform = NeighborsBase.fit_transform

    def kneighbors_graph(
        self, X=None, n_neighbors=None, mode="connectivity", *, allowed=None
    ):
        """Compute the graph of k nearest neighbours as a sparse matrix.

        As :meth:`annlearn.FlatNeighbors.kneighbors_graph`; a dask array of
        queries is searched and the graph built on the client (a sparse
        matrix is not lazy).

        Parameters
        ----------
        X : array-like or dask.array.Array of shape (n_queries, n_features), \
default=None
            Queries. If None, the neighbours of each indexed vector, the
            vector itself excluded.
        n_neighbors : int, default=None
            Number of neighbours per row; the estimator's ``n_neighbors`` if
            None.
        mode : {"connectivity", "distance"}, default="connectivity"
            ``"connectivity"`` stores ones, ``"distance"`` the distances.
        allowed : array-like or sparse matrix, default=None
            A filter, as in :meth:`kneighbors`.

        Returns
        -------
        A : sparse matrix of shape (n_queries, largest id + 1)
            CSR matrix; ``A[i, j]`` is set when id ``j`` is one of the
            neighbours of query ``i``. Zero distances are stored explicitly.
        """
        if X is not None and is_dask_array(X):
            check_is_fitted(self)
            X = self._check_dask_array(X, fit=False)
            X = self._index.client.compute(X, sync=True)
        return self._graph(X, n_neighbors, mode, allowed=allowed)

    def _graph_n_columns(self) -> int:
        """Columns of the graphs: one per id, up to the largest."""
        return int(self._index.max_ids.max()) + 1

    def _allowed_plan(self, index: ShardedIndex, k: int) -> SearchPlan | None:
        """How a block is searched with a filter, or None if this kind of
        sharded index cannot: ``search(shard, queries, allowed,
        n_columns, *search_args)``."""
        return None

    def _kneighbors_allowed(self, index: ShardedIndex, X, k: int, allowed):
        """Filtered search of numpy queries: the filter is checked on the
        client against the whole index (its form, its ids, the ids it
        allows per query, summed over the shards), then sent with each
        block of queries to every shard."""
        name = type(self).__name__
        plan = self._allowed_plan(index, k)
        if plan is None:
            raise ValueError(
                f"{name} does not support filtered search (allowed=) yet: a "
                "filter is never dropped, so search a DaskFlatNeighbors or "
                "an IVFPQNeighbors for filtered queries."
            )
        if X is None or is_dask_array(X):
            raise ValueError(
                f"{name} filters (allowed=) the search of a numpy array of "
                "queries only, not X=None nor a dask array: give the queries "
                "as a numpy array."
            )
        Xq = self._prepare(index, validate_query_data(self, X))
        n_columns = self._graph_n_columns()
        kind, data = canonical_allowed(allowed, n_columns, len(Xq))
        if kind == "ids":
            data = self._ids_mask(index, data, n_columns)
        client = index.client
        shards = [s for s, n in zip(index.shards, index.sizes, strict=True) if n]
        size = self.query_block_size
        starts = range(0, len(Xq), size)

        def pieces():
            """The filter of each block on the workers, with the block's
            first query (sent again by a retry: scattered data has no
            lineage, see ``share``)."""
            if data.ndim == 1:
                shared = client.scatter(data, broadcast=True, hash=False)
                return [(shared, s) for s in starts]
            return [
                (client.scatter(data[s : s + size], broadcast=True, hash=False), s)
                for s in starts
            ]

        def count():
            sent = pieces()
            return [
                client.submit(
                    _shards.count_allowed,
                    shard,
                    piece,
                    n_columns,
                    min(size, len(Xq) - start),
                    pure=False,
                )
                for piece, start in sent
                for shard in shards
            ]

        counts = self._retried(index, shards, count)
        per_block = [
            np.sum(counts[i * len(shards) : (i + 1) * len(shards)], axis=0)
            for i in range(len(starts))
        ]
        check_enough(
            np.concatenate(per_block) if per_block else np.zeros(0, np.int64),
            k,
            query_is_train=False,
        )

        def search():
            blocks = client.scatter([Xq[s : s + size] for s in starts], hash=False)
            merged = []
            for block, (piece, _) in zip(blocks, pieces(), strict=True):
                parts = [
                    client.submit(
                        plan.search,
                        shard,
                        block,
                        piece,
                        n_columns,
                        *plan.search_args,
                        pure=False,
                    )
                    for shard in shards
                ]
                merged.append(
                    client.submit(plan.merge, parts, *plan.merge_args, pure=False)
                )
            return merged

        results = self._retried(index, shards, search)
        if not results:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return (
            np.concatenate([d for d, _ in results]),
            np.concatenate([i for _, i in results]),
        )

    def _ids_mask(self, index: ShardedIndex, ids: np.ndarray, n_columns: int):
        """An ``allowed`` array of ids as a boolean mask over the ids, after
        checking with the shards that every id is in the index."""
        inside = np.unique(ids[(ids >= 0) & (ids < n_columns)])
        held = self._ask_shards(index, _shards.owned_ids, inside)
        missing = np.setdiff1d(inside, np.concatenate(held))
        unknown = np.concatenate([ids[(ids < 0) | (ids >= n_columns)], missing])
        if len(unknown):
            raise unknown_ids_error(unknown)
        mask = np.zeros(n_columns, dtype=bool)
        mask[inside] = True
        return mask

    def _kneighbors_now(
        self, index: ShardedIndex, Xq: np.ndarray, k: int, shards=None, plan=None
    ):
        """Search prepared numpy queries on ``shards`` (the index's) with
        ``plan`` (``_search_plan``'s), retried once if a worker is lost.

        The query blocks are scattered, not part of a graph: a worker lost
        mid-search takes the blocks it held with it. The search is then run
        again, once, unless a shard itself is gone: shards fitted from a
        dask array are rebuilt by the scheduler (the second run waits for
        them), scattered or loaded ones are not (``ShardLostError``).
        """
        shards = index.shards if shards is None else shards
        plan = self._search_plan(index, k) if plan is None else plan
        results = self._retried(
            index, shards, lambda: self._submit_blocks(index, Xq, shards, plan)
        )
        if plan.merge_here:
            results = [plan.merge(parts, *plan.merge_args) for parts in results]
        return (
            np.concatenate([d for d, _ in results]),
            np.concatenate([i for _, i in results]),
        )

    def _retried(self, index: ShardedIndex, shards, submit) -> list:
        """The results of the futures ``submit()`` returns, submitted again
        once if a worker was lost and every shard still exists."""
        what = f"{type(self).__name__}.kneighbors"
        for attempt in (1, 2):
            try:
                return gather(index.client, submit(), what)
            except ShardLostError:
                # A shard being rebuilt reads "lost" until the scheduler
                # starts again; only a failed or cancelled one is gone.
                gone = [s for s in shards if s.status in ("error", "cancelled")]
                if attempt == 2 or gone:
                    raise

    def _submit_blocks(self, index: ShardedIndex, Xq, shards, plan) -> list:
        """The merge futures of every query block (see ``SearchPlan``), or
        with ``plan.merge_here`` the lists of its parts' futures.

        The blocks are scattered over the workers. With a router, every
        worker holding a shard routes a piece of every block, sent to it
        alone, so that the client only schedules and the workers route,
        search and merge side by side, and a worker receives only the rows
        of the other pieces its searches need. Each search asks for the
        worker holding its shard.
        """
        client = index.client
        size = self.query_block_size
        router = self._router(index, plan)
        pieces = [Xq[s : s + size] for s in range(0, len(Xq), size)]
        placed = holders(client, shards)
        # A shard on each worker holding one: the pieces of a block are
        # routed there, by the shard's own quantizers.
        on = dict(zip(placed, shards, strict=True))
        on.pop(None, None)
        workers = list(on)
        if router is None:
            blocks = client.scatter(pieces, hash=False)
        else:
            blocks = _send_pieces(client, pieces, workers)
        merged = []
        for block in blocks:
            if router is None:
                heads = [(shard, block) for shard in shards]
            else:
                probes = [
                    client.submit(
                        _shards.route,
                        router,
                        on[workers[n]] if workers else index.template_future,
                        piece,
                        0,
                        n_rows,
                        pure=False,
                        **_near(workers[n] if workers else None),
                    )
                    for n, (piece, n_rows) in enumerate(block)
                ]
                block_pieces = [piece for piece, _ in block]
                heads = [
                    (shard, block_pieces, probes, number)
                    for number, shard in enumerate(shards)
                ]
            searched = [
                (head, worker)
                for head, n, worker in zip(heads, index.sizes, placed, strict=True)
                if n
            ]
            parts = [
                client.submit(
                    plan.search,
                    *head,
                    *plan.search_args,
                    pure=False,
                    **_near(worker),
                )
                for head, worker in searched
            ]
            if plan.rest is not None:
                parts = [
                    client.submit(
                        plan.rest,
                        *head,
                        parts,
                        *plan.search_args,
                        pure=False,
                        **_near(worker),
                    )
                    for head, worker in searched
                ]
            if plan.merge_here:
                merged.append(parts)
            else:
                merged.append(
                    client.submit(plan.merge, parts, *plan.merge_args, pure=False)
                )
        return merged

    def _block_graph(self, index: ShardedIndex, plan, queries, n_rows: int, router):
        """The lazy search of one block of ``n_rows`` prepared queries (a
        delayed object): route (if the plan routes: in a piece per shard
        holding rows, which the scheduler spreads), search each shard,
        merge."""
        import dask

        if router is None:
            heads = [(shard, queries) for shard in index.shards]
        else:
            # Routed by the template, not by a shard: routed by a shard, a
            # lazy graph whose shard is lost for good was at times cancelled
            # instead of failing with ShardLostError (test_dask's kill test).
            route = dask.delayed(_shards.route)
            pieces = _shards.route_pieces(n_rows, int(np.count_nonzero(index.sizes)))
            probes = [
                route(router, index.template_future, queries, start, stop)
                for start, stop in pieces
            ]
            heads = [
                (shard, queries, probes, number)
                for number, shard in enumerate(index.shards)
            ]
        heads = [head for head, n in zip(heads, index.sizes, strict=True) if n]
        parts = [dask.delayed(plan.search)(*head, *plan.search_args) for head in heads]
        if plan.rest is not None:
            parts = [
                dask.delayed(plan.rest)(*head, parts, *plan.search_args)
                for head in heads
            ]
        return dask.delayed(plan.merge, nout=2)(parts, *plan.merge_args)

    def _router(self, index: ShardedIndex, plan):
        """The plan's router on every worker (a future, made once per index
        and routing parameters), or None."""
        if plan.router is None:
            return None
        router = plan.router
        key = ("router", router.nprobe, router.n_neighbors, router.n_jobs)
        if key not in index.derived:
            index.derived[key] = share(index.client, plan.router)
        return index.derived[key]

    def _kneighbors_lazy(self, index: ShardedIndex, X, k: int):
        """Search a dask array of queries: a lazy graph per chunk of rows.

        A worker lost while it is computed is handled by the scheduler: the
        tasks it held run again elsewhere, shards fitted from a dask array
        or loaded from files are rebuilt; a shard fitted from numpy cannot
        be, and the computation raises :class:`ShardLostError` (from
        ``_shards.take_sent``, the root of its lineage), never a partial
        answer.
        """
        import dask
        import dask.array as da

        plan = self._search_plan(index, k)
        router = self._router(index, plan)
        X = X.rechunk({1: -1})
        dist, ids = [], []
        for block, n_rows in zip(X.to_delayed().ravel(), X.chunks[0], strict=True):
            prepare = dask.delayed(_shards.prepare_queries)
            queries = prepare(index.template_future, block)
            merged = self._block_graph(index, plan, queries, n_rows, router)
            dist.append(da.from_delayed(merged[0], (n_rows, k), dtype=np.float32))
            ids.append(da.from_delayed(merged[1], (n_rows, k), dtype=np.int64))
        return da.concatenate(dist), da.concatenate(ids)

    def _kneighbors_indexed(self, index: ShardedIndex, k: int):
        """Neighbours of every indexed vector but itself, rows in id order.

        Each shard makes query blocks of its own vectors where they live
        (``query_block_size`` at a time, prepared as one index prepares
        them), each block is searched with k + 1 as any query block, and
        each vector is dropped from its own answer; only the answers come
        to the client.
        """
        import dask

        client = index.client
        plan = self._search_plan(index, k + 1)
        router = self._router(index, plan)
        size = self.query_block_size

        def submit():
            tasks = []
            for shard, n in zip(index.shards, index.sizes, strict=True):
                order = dask.delayed(_shards.id_order)(shard)
                for start in range(0, int(n), size):
                    block = dask.delayed(_shards.indexed_queries, nout=2)(
                        shard, order, start, start + size
                    )
                    n_rows = min(size, int(n) - start)
                    merged = self._block_graph(index, plan, block[1], n_rows, router)
                    tasks.append(dask.delayed(_shards.drop_self)(merged, block[0]))
            return client.compute(tasks)

        results = self._retried(index, index.shards, submit)
        self_ids = np.concatenate([r[2] for r in results])
        order = np.argsort(self_ids, kind="stable")
        return (
            np.concatenate([r[0] for r in results])[order],
            np.concatenate([r[1] for r in results])[order],
        )

    # -- mutations ---------------------------------------------------------
    def add(self, X, ids=None):
        """Index more vectors, on the shards that hold the fewest.

        The rows go to the smallest shards first (water filling), each shard
        encoding or storing them as the template does; nothing is retrained.

        Parameters
        ----------
        X : array-like of shape (n_new, n_features)
            Vectors to add, validated as in ``fit``.
        ids : array-like of shape (n_new,), default=None
            Their ids: non-negative, distinct, not already in the index.
            ``None``: consecutive ids after the largest id in the index.

        Returns
        -------
        self : object
            The estimator. On any error it is left exactly as it was.
        """
        check_is_fitted(self)
        index = self._index
        client = index.client
        X = validate_query_data(self, X)
        largest = int(index.max_ids.max())
        if ids is None:
            ids = check_new_ids(
                None, len(X), np.array([largest]) if largest >= 0 else None
            )
        else:
            ids = check_new_ids(ids, len(X), None)
            taken = np.concatenate(self._ask_shards(index, _shards.owned_ids, ids))
            if len(taken):
                raise ValueError(f"Ids already in the index: {_show(np.sort(taken))}.")
        where = client.who_has(list(index.shards))
        shards, sent = list(index.shards), []
        for i, rows in enumerate(self._route(index, X)):
            if not len(rows):
                continue
            workers = list(where.get(shards[i].key, ())) or None
            part = _send_rows(client, workers, X[rows], ids[rows], sent)
            shards[i] = client.submit(_shards.build_shard, shards[i], *part, pure=False)
        self._publish(self._rebuilt(index, shards))
        del sent
        return self

    def remove(self, ids):
        """Remove vectors by id, on the shards that hold them.

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
        index = self._index
        ids = np.unique(_as_int64_ids(np.atleast_1d(np.asarray(ids))))
        owned = self._ask_shards(index, _shards.owned_ids, ids)
        check_removed_ids(ids, np.concatenate(owned))
        shards = [
            index.client.submit(_shards.remove_from_shard, shard, mine, pure=False)
            if len(mine)
            else shard
            for shard, mine in zip(index.shards, owned, strict=True)
        ]
        self._publish(self._rebuilt(index, shards))
        return self

    def _route(self, index: ShardedIndex, X: np.ndarray) -> list:
        """The rows of X each shard takes (a list of index arrays, one per
        shard): the smallest shards first, so that ``add`` never makes the
        shards less even (see ``route_new_rows``)."""
        counts = route_new_rows(index.sizes, len(X))
        bounds = np.concatenate([[0], np.cumsum(counts)])
        return [np.arange(bounds[i], bounds[i + 1]) for i in range(len(counts))]

    def _ask_shards(self, index: ShardedIndex, task, *args) -> list:
        client = index.client
        futures = [
            client.submit(task, shard, *args, pure=False) for shard in index.shards
        ]
        return gather(client, futures, type(self).__name__)

    def _rebuilt(self, index: ShardedIndex, shards: list) -> ShardedIndex:
        """The index with these shards (some new): waits for the new ones."""
        return self._make_index(
            index.client, shards, index.template, index.template_future
        )

    # -- score -------------------------------------------------------------
    def score(self, X, y=None) -> float:
        """Recall@k of ``kneighbors(X)`` against the sharded exact search.

        Parameters
        ----------
        X : array-like or dask.array.Array of shape (n_queries, n_features)
            Queries (a dask array is computed: scoring returns one number).
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        recall : float
            Mean fraction of the ``n_neighbors`` exact neighbours returned
            (ties counted fairly, see :func:`annlearn.metrics.recall_at_k`).
        """
        check_is_fitted(self)
        index = self._index
        if is_dask_array(X):
            X = index.client.compute(self._check_dask_array(X, fit=False), sync=True)
        Xv = validate_query_data(self, X)
        k = check_n_neighbors(self.n_neighbors, index.n_samples)
        true_dist, true_ids = self._exact_kneighbors(index, Xv, k)
        dist, ids = self._kneighbors_now(index, self._prepare(index, Xv), k)
        return recall_at_k(true_ids, ids, true_distances=true_dist, pred_distances=dist)

    def _exact_kneighbors(self, index: ShardedIndex, X: np.ndarray, k: int):
        """Exact neighbours of validated queries, over the same rows."""
        raise NotImplementedError  # pragma: no cover

    # -- scikit-learn API --------------------------------------------------
    def __getstate__(self):
        if hasattr(self, "_index"):
            raise TypeError(
                f"A fitted {type(self).__name__} cannot be pickled: its shards "
                "live in the memory of the cluster's workers. Write it with "
                "annlearn.dask.save and read it back with annlearn.dask.load, or "
                "pickle sklearn.base.clone(estimator), which is not fitted."
            )
        return super().__getstate__()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False
        tags.input_tags.allow_nan = False
        tags.non_deterministic = False
        return tags


def _send_rows(client, workers, X, ids, sent: list) -> tuple:
    """Rows and ids from the client as inputs of a shard's build on
    ``workers``: futures of ``_shards.take_sent`` tasks, which read the
    scattered arrays (appended to ``sent``, to be held until the build is
    done). Scattered data has no lineage: if the worker of a shard built
    from them dies, the scheduler would cancel every search of the shard
    with dask's "lost dependencies". With these tasks as the root of the
    shard's lineage, rebuilding it runs ``take_sent`` again, which finds no
    rows and raises :class:`ShardLostError`, the error every search then
    raises, lazy ones included."""
    target = workers[:1] if workers else None
    scattered = client.scatter([X, ids], workers=target, hash=False)
    sent.extend(scattered)
    # Read where the data went (the task must run there the first time).
    where = client.who_has(scattered)
    return tuple(
        client.submit(
            _shards.take_sent,
            future.key,
            workers=list(where[future.key]),
            allow_other_workers=True,
            pure=False,
        )
        for future in scattered
    )


def _send_pieces(client, blocks: list, workers: list) -> list:
    """Each block of queries cut in ``route_pieces``, piece ``n`` scattered
    to ``workers[n]`` (anywhere without workers) as ``_shards.as_sent``
    makes it: per block, a list of ``(future, rows)``."""
    cuts = [_shards.route_pieces(len(block), len(workers) or 1) for block in blocks]
    sent = [[None] * len(cut) for cut in cuts]
    places = [
        [(b, cut[n]) for b, cut in enumerate(cuts) if n < len(cut)]
        for n in range(max(map(len, cuts), default=0))
    ]
    # One scatter per worker, all under way at once: every worker starts
    # routing as soon as its own pieces arrive, not after the others'.
    n_threads = effective_n_threads(None)
    sending = [
        client.scatter(
            [
                _shards.as_sent(blocks[b][start:stop], n_threads)
                for b, (start, stop) in at
            ],
            hash=False,
            asynchronous=True,
            **({"workers": [workers[n]]} if workers else {}),
        )
        for n, at in enumerate(places)
    ]

    async def scattered():
        return await asyncio.gather(*sending)

    for n, futures in enumerate(client.sync(scattered)):
        for (b, (start, stop)), future in zip(places[n], futures, strict=True):
            sent[b][n] = (future, stop - start)
    return sent


def _near(worker) -> dict:
    """``client.submit`` arguments asking for ``worker`` (any other if it
    is gone), or none for None."""
    if worker is None:
        return {}
    return {"workers": [worker], "allow_other_workers": True}


def _run_on(client, worker, function, *args):
    """``function(*args)`` as a future, run on ``worker`` if it is alive
    (elsewhere if not); ``args`` may hold futures or dask.delayed objects,
    whose graphs then run there too."""
    from dask.base import is_dask_collection

    if any(is_dask_collection(a) for a in args):
        import dask

        task = dask.delayed(function, pure=False)(*args)
        return client.compute(task, workers=[worker], allow_other_workers=True)
    return client.submit(
        function, *args, workers=[worker], allow_other_workers=True, pure=False
    )
