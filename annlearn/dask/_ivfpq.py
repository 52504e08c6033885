"""DaskIVFPQNeighbors: IVF-PQ over shards held by dask workers."""

from __future__ import annotations

import copy
import operator
from numbers import Integral

import numpy as np
from sklearn.base import _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from annlearn._ivfpq import IVFPQNeighbors
from annlearn._threads import effective_n_threads
from annlearn._validation import METRICS
from annlearn.dask import _shards
from annlearn.dask._base import SearchPlan, ShardedIndex, ShardedNeighborsBase, _run_on
from annlearn.dask._cluster import assign_cells, gather

__all__ = ["DaskIVFPQNeighbors"]


class DaskIVFPQNeighbors(ShardedNeighborsBase):
    """Approximate k-nearest-neighbour search with IVF-PQ shards on dask.

    The quantizers (coarse cells and product-quantizer codebooks) are
    trained once, on the client, on a sample of the rows (the FAISS and
    autofaiss pattern), then sent to every worker; each worker encodes the
    rows of its shard into its own inverted lists and keeps them; each shard
    holds a group of neighbouring cells. A query block is probed once, in
    a piece per shard worker, and each shard scans its own cells for the
    queries that probe them; a query whose probed cells one shard holds is answered
    there, the candidates of the others are merged on a worker, ranked as
    :class:`~annlearn.IVFPQNeighbors` ranks them: with the same
    quantizers, ``nprobe`` and ``refine_factor``, the answer is the one of
    one index holding every row.

    Parameters
    ----------
    n_neighbors : int, default=5
        Number of neighbours returned by ``kneighbors``.
    nlist, nprobe, n_subquantizers, nbits, metric, refine_factor, by_residual
        As :class:`~annlearn.IVFPQNeighbors`'s. ``nprobe`` counts cells of
        the whole index, and is widened (doubled) for the queries whose
        probed cells hold fewer than ``n_neighbors`` rows over all shards,
        as one index does. ``by_residual="auto"`` is decided on the
        training sample, as one index decides it on its rows.
    mode : {"distance", "connectivity"}, default="distance"
        What ``transform`` stores, as :class:`~annlearn.FlatNeighbors`'s
        (``"distance"``: ``n_neighbors + 1`` neighbours per row, for
        estimators with ``metric="precomputed"``).
    max_train_samples : int, default=None
        Rows drawn from X (at random, over every chunk) to train the
        quantizers; ``None``: ``256 * max(nlist, 2**nbits)``. They are the
        only rows that come to the client.
    n_shards : int, default=None
        Number of shards; ``None``: one per worker at ``fit``.
    query_block_size : int, default=16384
        Queries per task (see :class:`DaskFlatNeighbors`).
    random_state : int, RandomState instance or None, default=None
        Seeds the training sample and k-means.
    n_jobs : int, default=None
        OpenMP threads of each shard's encoding and search, resolved on the
        worker (see :class:`DaskFlatNeighbors`); also of the training on
        the client.

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (nlist, n_features), float32
        Cell centres of the coarse quantizer.
    pq_codebooks_ : ndarray of shape (n_subquantizers, 2**nbits, dsub), float32
        Centres of each sub-quantizer.
    n_subquantizers_ : int
        Sub-vectors per code.
    effective_metric_ : str
        The metric fitted and searched with.
    n_samples_fit_ : int
        Number of indexed vectors, over every shard.
    n_features_in_ : int
        Number of features seen during ``fit``.
    n_shards_ : int
        Number of shards.

    See Also
    --------
    annlearn.IVFPQNeighbors : The same index on one machine.
    DaskFlatNeighbors : Exact search over shards, the ground truth.

    Notes
    -----
    Memory per worker: ``n_subquantizers + 8`` bytes per vector it holds
    (code and id), plus ``4 * n_features`` with ``refine_factor``, plus the
    quantizers and their tables (as :class:`~annlearn.IVFPQNeighbors`).

    Per query, the shard holding all its probed cells returns its
    ``n_neighbors`` best (12 bytes each); when its probed cells are on
    several shards, each of them returns its ``n_neighbors *
    (refine_factor or 1)`` best candidates with their ids, cells and code
    distances (and, with ``refine_factor``, exact distances): 16 or 20
    bytes each. The merge keeps the best candidates of the whole index by
    code distance before re-ranking them exactly, which is what makes the
    answer that of one index.

    ``score`` needs the vectors: it is available with ``refine_factor``
    set (the shards keep them).

    Examples
    --------
    >>> import numpy as np
    >>> from distributed import Client
    >>> from annlearn.dask import DaskIVFPQNeighbors
    >>> client = Client(processes=False, n_workers=2, threads_per_worker=1)
    >>> X = np.random.default_rng(0).standard_normal((2000, 16), dtype=np.float32)
    >>> index = DaskIVFPQNeighbors(n_neighbors=3, nlist=8, nprobe=8, nbits=4,
    ...                            refine_factor=4, random_state=0).fit(X)
    >>> index.kneighbors(X[:2], return_distance=False)[:, 0]
    array([0, 1])
    >>> client.close()
    """

    _parameter_constraints: dict = {
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "nlist": [Interval(Integral, 1, None, closed="left")],
        "nprobe": [Interval(Integral, 1, None, closed="left")],
        "n_subquantizers": [Interval(Integral, 1, None, closed="left"), None],
        "nbits": [Interval(Integral, 4, 8, closed="both")],
        "metric": [StrOptions(set(METRICS))],
        "refine_factor": [Interval(Integral, 1, None, closed="left"), None],
        "by_residual": ["boolean", StrOptions({"auto"})],
        "max_train_samples": [Interval(Integral, 1, None, closed="left"), None],
        "mode": [StrOptions({"distance", "connectivity"})],
        "n_shards": [Interval(Integral, 1, None, closed="left"), None],
        "query_block_size": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "n_jobs": [Integral, None],
    }

    def __init__(
        self,
        n_neighbors=5,
        *,
        nlist=256,
        nprobe=8,
        n_subquantizers=None,
        nbits=4,
        metric="euclidean",
        refine_factor=4,
        by_residual="auto",
        mode="distance",
        max_train_samples=None,
        n_shards=None,
        query_block_size=16384,
        random_state=None,
        n_jobs=None,
    ):
        self.n_neighbors = n_neighbors
        self.nlist = nlist
        self.nprobe = nprobe
        self.n_subquantizers = n_subquantizers
        self.nbits = nbits
        self.metric = metric
        self.refine_factor = refine_factor
        self.by_residual = by_residual
        self.mode = mode
        self.max_train_samples = max_train_samples
        self.n_shards = n_shards
        self.query_block_size = query_block_size
        self.random_state = random_state
        self.n_jobs = n_jobs

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, ids=None, *, client=None, quantizers=None):
        """Train the quantizers on a sample, then encode every shard on its
        worker.

        Parameters
        ----------
        X : array-like or dask.array.Array of shape (n_samples, n_features)
            Vectors to index (see :meth:`DaskFlatNeighbors.fit`).
        y : Ignored
            Not used, present for API consistency.
        ids : array-like of shape (n_samples,), default=None
            Non-negative, distinct integer ids returned by ``kneighbors``.
            ``None``: ``0 .. n_samples - 1``.
        client : distributed.Client, default=None
            The cluster; ``None``: the default client.
        quantizers : IVFPQNeighbors, default=None
            A fitted index whose quantizers to use instead of training new
            ones (train once, on one machine, then index anywhere). Its
            metric, ``nlist``, ``nbits``, ``n_subquantizers`` and
            ``by_residual`` must be this estimator's (any with
            ``"auto"``), and it must keep its vectors if ``refine_factor``
            is set.

        Returns
        -------
        self : DaskIVFPQNeighbors
            The fitted estimator. On any error it is left exactly as it was.
        """
        rng = check_random_state(self.random_state)
        if quantizers is not None:
            return self._fit(X, ids, client, 0, rng, self._template_of(quantizers))
        n_train = self.max_train_samples or 256 * max(self.nlist, 2**self.nbits)
        return self._fit(X, ids, client, n_train, rng)

    def _local_params(self) -> dict:
        names = IVFPQNeighbors().get_params()
        return {key: value for key, value in self.get_params().items() if key in names}

    def _fit_template(self, sample: np.ndarray, rng) -> IVFPQNeighbors:
        # Trained on the whole sample, with the generator that drew it.
        params = {**self._local_params(), "max_train_samples": None}
        template = IVFPQNeighbors(**{**params, "random_state": rng}).fit(sample)
        template.set_params(random_state=None)
        return template.remove(template._store.ids)

    def _template_of(self, quantizers) -> IVFPQNeighbors:
        """An emptied copy of a fitted IVFPQNeighbors whose quantizers match
        this estimator's parameters."""
        if not isinstance(quantizers, IVFPQNeighbors):
            raise TypeError(
                "quantizers must be a fitted IVFPQNeighbors, got "
                f"{type(quantizers).__name__}."
            )
        check_is_fitted(quantizers)
        fitted = {
            "metric": quantizers.effective_metric_,
            "nlist": len(quantizers.cluster_centers_),
            "nbits": int(np.log2(quantizers.pq_codebooks_.shape[1])),
            "n_subquantizers": quantizers.n_subquantizers_,
            "by_residual": quantizers._by_residual,
        }
        wanted = self.get_params()
        if wanted["n_subquantizers"] is None:
            wanted["n_subquantizers"] = fitted["n_subquantizers"]
        if wanted["by_residual"] == "auto":
            wanted["by_residual"] = fitted["by_residual"]
        problems = [
            f"{key}={fitted[key]!r} (this estimator: {wanted[key]!r})"
            for key in fitted
            if fitted[key] != wanted[key]
        ]
        if self.refine_factor is not None and quantizers._store.vectors is None:
            problems.append("no stored vectors, and refine_factor is set")
        if problems:
            raise ValueError(
                "The quantizers do not match this DaskIVFPQNeighbors: the given "
                f"IVFPQNeighbors has {', '.join(problems)}."
            )
        # A deep copy goes through the estimator's state, which leaves out
        # what only the original needs (its fit array, its exact reference).
        template = copy.deepcopy(quantizers)
        template.set_params(**{**self._local_params(), "random_state": None})
        return template.remove(template._store.ids)

    def _build_shards(self, client, template, template_future, parts) -> list:
        """Shards by cells: each part is encoded on its worker, the cells are
        shared out in groups of neighbouring cells holding about as many rows
        (``assign_cells``), and each shard gathers its cells' rows from every
        part, in row order (the lists of one index, cut by cells)."""
        encoded = [
            _run_on(client, worker, _shards.encode_part, template_future, *part)
            for worker, part in parts
        ]
        nlist = self.nlist
        counts = gather(
            client,
            [client.submit(_shards.cell_counts, e, nlist, pure=False) for e in encoded],
            "Encoding the rows of DaskIVFPQNeighbors",
        )
        n_shards = len(parts)
        centers = template.cluster_centers_
        owner = assign_cells(np.sum(counts, axis=0), n_shards, centers)
        pieces = []
        for part in encoded:
            split = client.submit(_shards.split_part, part, owner, n_shards, pure=False)
            pieces.append(
                [
                    client.submit(operator.getitem, split, shard, pure=False)
                    for shard in range(n_shards)
                ]
            )
        return [
            _run_on(
                client,
                worker,
                _shards.assemble_shard,
                template_future,
                *[row[shard] for row in pieces],
            )
            for shard, (worker, _) in enumerate(parts)
        ]

    def _route(self, index: ShardedIndex, X: np.ndarray) -> list:
        """The rows of X each shard takes: the shard holding their cell (a
        cell no shard holds yet goes to the smallest shard)."""
        template = index.template
        cells, _ = template._codec.encode(
            template._prepare_queries(X), effective_n_threads(self.n_jobs)
        )
        owner = index.cell_owner.copy()
        sizes = index.sizes.copy()
        for cell in np.unique(cells[owner[cells] < 0]):
            owner[cell] = int(np.argmin(sizes))
            sizes[owner[cell]] += np.count_nonzero(cells == cell)
        destination = owner[cells]
        return [np.flatnonzero(destination == shard) for shard in range(len(sizes))]

    def _publish(self, index: ShardedIndex) -> None:
        super()._publish(index)
        template = index.template
        self.effective_metric_ = template.effective_metric_
        self.cluster_centers_ = template.cluster_centers_
        self.pq_codebooks_ = template.pq_codebooks_
        self.n_subquantizers_ = template.n_subquantizers_

    def _search_plan(self, index: ShardedIndex, n_neighbors: int) -> SearchPlan:
        index.template._store.check_refinable(self.refine_factor)
        refine = self.refine_factor is not None
        n_candidates = min(n_neighbors * (self.refine_factor or 1), index.n_samples)
        router = _shards.CellRouter(
            nprobe=self.nprobe,
            n_neighbors=n_neighbors,
            cell_sizes=index.cell_sizes,
            cell_owner=index.cell_owner,
            n_jobs=self.n_jobs,
        )
        return SearchPlan(
            search=_shards.search_ivfpq,
            search_args=(n_neighbors, n_candidates, refine, self.n_jobs),
            merge=_shards.merge_ivfpq,
            merge_args=(n_neighbors, n_candidates, index.template._codec.metric),
            router=router,
            rest=_shards.search_ivfpq_rest,
            # Answers come back, and candidates only of the queries on three
            # shards or more: merged on the client.
            merge_here=True,
        )

    def _exact_kneighbors(self, index: ShardedIndex, X: np.ndarray, k: int):
        if index.template._store.vectors is None:
            raise ValueError(
                "score needs the indexed vectors, which this index does not "
                "keep: fit it with refine_factor set (the shards then keep "
                "them), or compare with DaskFlatNeighbors yourself through "
                "annlearn.metrics.recall_at_k."
            )
        client = index.client
        references = index.derived.get("reference")
        if references is None:
            references = [
                client.submit(_shards.reference_shard, shard, pure=False)
                for shard in index.shards
            ]
            index.derived["reference"] = references
        # Each reference prepares the queries itself (its own centring).
        plan = SearchPlan(
            _shards.search_flat,
            (k, self.n_jobs, False),
            _shards.merge_flat,
            merge_args=(k,),
        )
        return self._kneighbors_now(index, X, k, references, plan)
