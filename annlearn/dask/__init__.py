"""Sharded nearest-neighbour indexes on a dask cluster.

Needs the ``dask`` extra (``pip install "annlearn[dask]"``, which installs
``dask[distributed]``); ``import annlearn`` never imports dask.

Design
------
An index is cut into shards, each an ordinary annlearn estimator holding
some of the rows, kept in the memory of one worker for the index's life
(a ``distributed.Future`` on the client). Every shard is a copy of one
*template*: an estimator fitted on a sample of the rows on the client and
emptied, so that all shards store, encode and search rows the same way
(Flat: the centring and principal axes; IVF-PQ: the quantizers, trained
once). A query block goes to the shards (Flat: every shard; IVF-PQ: the
block is first routed, its coarse search done once, in pieces on the
shards' workers, and each shard scans the queries that probe its cells);
each returns its best candidates and a merge task ranks them by the
kernels' rule, (distance, id), which is why the answer is the one of a
single index::

                          ┌─ search(shard 0) ─┐
    query block ── route ─┼─ search(shard 1) ─┼── merge ──> (dist, ids)
                (IVF-PQ)  └─ search(shard 2) ─┘

Only queries travel to the shards and only candidates travel back; the
shards never move (the scheduler is told their size, see
``_cluster.held_bytes``, and their searches ask for the workers holding
them). Changes (``add``, ``remove``) build new shard futures
and publish them all at once; a search uses the shards it started with.
A lost worker gives a rebuilt shard (fitted from a dask array or loaded
from files) or a :class:`ShardLostError`, never a merge of fewer shards.

Modules: ``_cluster`` (client, workers, row routing, loss errors), ``_shards``
(what the workers run), ``_base`` (the shared estimator API), ``_flat`` and
``_ivfpq`` (the estimators), ``_persistence`` (one file per shard and a
manifest).
"""

try:
    import distributed  # noqa: F401
except ImportError as error:  # pragma: no cover - the extra is installed in CI
    raise ImportError(
        f'annlearn.dask needs the dask extra: pip install "annlearn[dask]" ({error}).'
    ) from error

from annlearn.dask._cluster import ShardLostError
from annlearn.dask._flat import DaskFlatNeighbors
from annlearn.dask._ivfpq import DaskIVFPQNeighbors
from annlearn.dask._persistence import load, save

__all__ = ["DaskFlatNeighbors", "DaskIVFPQNeighbors", "ShardLostError", "load", "save"]
