"""DaskFlatNeighbors: exact search over shards held by dask workers."""

from __future__ import annotations

from numbers import Integral

import numpy as np
from sklearn.base import _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions

from annlearn._flat import FlatNeighbors
from annlearn._validation import METRICS
from annlearn.dask import _shards
from annlearn.dask._base import SearchPlan, ShardedIndex, ShardedNeighborsBase

__all__ = ["DaskFlatNeighbors"]

# Rows sampled to take the decisions every shard shares (centring, principal
# axes of the bound): more than the bound's own sample, so that "auto"
# decides as it would on all the rows.
_TEMPLATE_SAMPLE = 65_536


class DaskFlatNeighbors(ShardedNeighborsBase):
    """Exact k-nearest-neighbour search over shards on a dask cluster.

    The rows are split into ``n_shards`` contiguous parts, each held by one
    worker as a :class:`~annlearn.FlatNeighbors` (its vectors and its
    principal-component bound). A query block is searched on every shard,
    on the worker that holds it, and the shards' k best are merged by
    (distance, id): the answer is the one :class:`~annlearn.FlatNeighbors`
    gives on the concatenated rows.

    Parameters
    ----------
    n_neighbors : int, default=5
        Number of neighbours returned by ``kneighbors``.
    metric : {"euclidean", "sqeuclidean", "cosine", "inner_product"}, \
            default="euclidean"
        As :class:`~annlearn.FlatNeighbors`'s.
    algorithm : {"auto", "brute", "pca_bound"}, default="auto"
        As :class:`~annlearn.FlatNeighbors`'s; ``"auto"`` decides on a
        sample of 65,536 rows and every shard follows.
    mode : {"distance", "connectivity"}, default="distance"
        What ``transform`` stores, as :class:`~annlearn.FlatNeighbors`'s
        (``"distance"``: ``n_neighbors + 1`` neighbours per row, for
        estimators with ``metric="precomputed"``).
    n_shards : int, default=None
        Number of shards; ``None``: one per worker at ``fit``. Shards are
        placed on the workers in turn.
    query_block_size : int, default=16384
        Queries per task: each block costs one task per shard and one merge
        task, about a millisecond of scheduling each (and for IVF-PQ a
        routing task per worker and a second pass per shard), so blocks of
        thousands of queries amortise it; every block already keeps every
        worker busy (see the user guide's Dask page).
    n_jobs : int, default=None
        OpenMP threads of each shard's search, resolved on the worker:
        ``None`` honours the worker's ``OMP_NUM_THREADS`` (dask sets it to 1
        per worker thread by default), ``-1`` means all the worker's CPUs.

    Attributes
    ----------
    n_samples_fit_ : int
        Number of indexed vectors, over every shard.
    n_features_in_ : int
        Number of features seen during ``fit``.
    n_shards_ : int
        Number of shards.
    effective_metric_ : str
        The metric fitted and searched with.
    n_bound_components_ : int
        Principal components of the shards' bound, 0 for brute force.

    See Also
    --------
    annlearn.FlatNeighbors : The same search on one machine.
    DaskIVFPQNeighbors : Approximate search over shards.

    Notes
    -----
    Ties: a shard ranks equal distances by its own row order and the merge
    by id, so with ids that increase with the row order (the default ids)
    the answer is exactly that of one index, ties included.

    Memory per worker: ``4 * n_features + 12`` bytes per vector it holds
    (plus the bound's ``4 * (d1 + 2)``). A query block of ``b`` queries
    sends ``4 * b * n_features`` bytes to each worker and returns ``12 * b *
    n_neighbors`` bytes per shard to the merging worker.

    A fitted estimator holds futures of its cluster: it cannot be pickled;
    :func:`annlearn.dask.save` writes it, one file per shard.

    Examples
    --------
    >>> import numpy as np
    >>> from distributed import Client
    >>> from annlearn.dask import DaskFlatNeighbors
    >>> client = Client(processes=False, n_workers=2, threads_per_worker=1)
    >>> X = np.random.default_rng(0).standard_normal((1000, 8), dtype=np.float32)
    >>> index = DaskFlatNeighbors(n_neighbors=3).fit(X)
    >>> index.n_shards_
    2
    >>> index.kneighbors(X[:2], return_distance=False)[:, 0]
    array([0, 1])
    >>> client.close()
    """

    _parameter_constraints: dict = {
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "metric": [StrOptions(set(METRICS))],
        "algorithm": [StrOptions({"auto", "brute", "pca_bound"})],
        "mode": [StrOptions({"distance", "connectivity"})],
        "n_shards": [Interval(Integral, 1, None, closed="left"), None],
        "query_block_size": [Interval(Integral, 1, None, closed="left")],
        "n_jobs": [Integral, None],
    }

    def __init__(
        self,
        n_neighbors=5,
        *,
        metric="euclidean",
        algorithm="auto",
        mode="distance",
        n_shards=None,
        query_block_size=16384,
        n_jobs=None,
    ):
        self.n_neighbors = n_neighbors
        self.metric = metric
        self.algorithm = algorithm
        self.mode = mode
        self.n_shards = n_shards
        self.query_block_size = query_block_size
        self.n_jobs = n_jobs

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, ids=None, *, client=None):
        """Split the rows of X into shards, each kept by a worker.

        Parameters
        ----------
        X : array-like or dask.array.Array of shape (n_samples, n_features)
            Vectors to index. A numpy array is validated here and scattered,
            one part to each worker; a dask array is split into
            ``n_shards`` row ranges, each computed and stored on its worker
            (its values are validated there).
        y : Ignored
            Not used, present for API consistency.
        ids : array-like of shape (n_samples,), default=None
            Non-negative, distinct integer ids returned by ``kneighbors``.
            ``None``: ``0 .. n_samples - 1``.
        client : distributed.Client, default=None
            The cluster; ``None``: the default client.

        Returns
        -------
        self : DaskFlatNeighbors
            The fitted estimator. On any error it is left exactly as it was.
        """
        return self._fit(X, ids, client, _TEMPLATE_SAMPLE, check_random_state(0))

    def _fit_template(self, sample: np.ndarray, rng) -> FlatNeighbors:
        template = FlatNeighbors(
            metric=self.metric, algorithm=self.algorithm, n_jobs=self.n_jobs
        ).fit(sample)
        return template.remove(template._store.ids)

    def _publish(self, index: ShardedIndex) -> None:
        super()._publish(index)
        self.effective_metric_ = index.template.effective_metric_
        self.n_bound_components_ = index.template.n_bound_components_

    def _search_plan(self, index: ShardedIndex, n_neighbors: int) -> SearchPlan:
        return SearchPlan(
            search=_shards.search_flat,
            search_args=(n_neighbors, self.n_jobs),
            merge=_shards.merge_flat,
            merge_args=(n_neighbors,),
        )

    def _allowed_plan(self, index: ShardedIndex, n_neighbors: int) -> SearchPlan:
        return SearchPlan(
            search=_shards.search_flat_allowed,
            search_args=(n_neighbors, self.n_jobs),
            merge=_shards.merge_flat,
            merge_args=(n_neighbors,),
        )

    def _exact_kneighbors(self, index: ShardedIndex, X: np.ndarray, k: int):
        # Exact already: the reference is the index itself.
        return self._kneighbors_now(index, self._prepare(index, X), k)
