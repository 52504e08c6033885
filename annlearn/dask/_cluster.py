"""The client side of a sharded index: which cluster, which workers, how the
rows are split, and how a lost shard is reported.

Nothing here knows about neighbours; :mod:`annlearn.dask._base` uses it.
"""

from __future__ import annotations

from concurrent.futures import CancelledError

import numpy as np

__all__ = [
    "ShardLostError",
    "assign_cells",
    "even_sizes",
    "gather",
    "resolve_client",
    "route_new_rows",
    "worker_addresses",
]


class ShardLostError(RuntimeError):
    """A shard of a sharded index is gone with its worker.

    Raised instead of any answer: a search never merges fewer shards than
    the index has, so a result is complete or there is none.
    """


def resolve_client(client):
    """The ``distributed.Client`` given, else the default one."""
    from distributed import Client, default_client

    if client is not None:
        if not isinstance(client, Client):
            raise TypeError(
                f"client must be a distributed.Client, got {type(client).__name__}."
            )
        return client
    try:
        return default_client()
    except ValueError:
        raise ValueError(
            "No dask.distributed client: pass client=Client(...) or create one "
            "first (distributed.Client(...) becomes the default client)."
        ) from None


def worker_addresses(client) -> list[str]:
    """The addresses of the cluster's workers, sorted (a stable placement)."""
    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    if not workers:
        raise ValueError(
            "The dask cluster has no workers: start some before fitting or "
            "loading a sharded index."
        )
    return workers


def even_sizes(n: int, n_parts: int) -> np.ndarray:
    """Sizes of ``n_parts`` contiguous ranges covering ``n`` rows, differing
    by at most one (the larger first)."""
    sizes = np.full(n_parts, n // n_parts, dtype=np.int64)
    sizes[: n % n_parts] += 1
    return sizes


def route_new_rows(sizes: np.ndarray, n_new: int) -> np.ndarray:
    """How many of ``n_new`` rows each shard takes so that the shards end as
    even as possible: water filling, the smallest shards first (ties to the
    lower shard number), so that ``add`` never makes the imbalance worse."""
    sizes = np.asarray(sizes, dtype=np.int64)
    levels = sizes.copy()
    remaining = int(n_new)
    while remaining:
        low = levels.min()
        at_low = np.flatnonzero(levels == low)
        above = levels[levels > low]
        room = int(above.min() - low) if len(above) else remaining
        each = min(room, remaining // len(at_low))
        if each == 0:
            levels[at_low[:remaining]] += 1
            break
        levels[at_low] += each
        remaining -= each * len(at_low)
    return levels - sizes


def assign_cells(cell_sizes: np.ndarray, n_shards: int) -> np.ndarray:
    """The shard of each cell of an IVF index, so that the shards hold about
    as many rows each: the largest cells first, each to the shard holding
    the fewest rows so far (ties to the lower shard).

    Sharding by cells, not by rows, is what makes IVF-PQ scale out: a query
    builds the lookup table of a probed cell on the one shard holding it,
    where rows sharding would build it on every shard.
    """
    owner = np.empty(len(cell_sizes), dtype=np.int64)
    loads = np.zeros(n_shards, dtype=np.int64)
    for cell in np.argsort(-np.asarray(cell_sizes), kind="stable"):
        shard = int(np.argmin(loads))
        owner[cell] = shard
        loads[shard] += cell_sizes[cell]
    return owner


def gather(client, futures, what: str):
    """``client.gather(futures)``, with a lost worker reported as
    :class:`ShardLostError` (never a partial list of results)."""
    from distributed import KilledWorker

    try:
        return client.gather(list(futures))
    except (CancelledError, KilledWorker) as exc:
        raise ShardLostError(
            f"{what} failed: a shard of the index was lost with its worker "
            f"({type(exc).__name__}: {exc}). Shards fitted from a dask array are "
            "rebuilt from it when their worker dies; shards fitted from a numpy "
            "array or loaded from files are not: fit the index again, or load "
            "it again from the files of annlearn.dask.save."
        ) from exc
