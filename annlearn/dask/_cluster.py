"""The client side of a sharded index: which cluster, which workers, how the
rows are split, and how a lost shard is reported.

Nothing here knows about neighbours; :mod:`annlearn.dask._base` uses it.
"""

from __future__ import annotations

from concurrent.futures import CancelledError

import numpy as np
from dask.sizeof import sizeof

from annlearn._base import NeighborsBase

__all__ = [
    "LOST_SHARD",
    "ShardLostError",
    "assign_cells",
    "even_sizes",
    "gather",
    "held_bytes",
    "holders",
    "resolve_client",
    "share",
    "route_new_rows",
    "worker_addresses",
]


class ShardLostError(RuntimeError):
    """A shard of a sharded index is gone with its worker.

    Raised instead of any answer: a search never merges fewer shards than
    the index has, so a result is complete or there is none.
    """


# What to do about a lost shard (the end of every ShardLostError message).
LOST_SHARD = (
    "A shard of the index was lost with its worker. Shards fitted from a dask "
    "array, or loaded from files, are rebuilt from them when their worker "
    "dies; shards fitted from a numpy array are not: fit the index again, or "
    "load it again from the files of annlearn.dask.save."
)


def held_bytes(obj, seen: set | None = None) -> int:
    """The bytes of the numpy arrays an annlearn object holds, through its
    attributes (``__dict__`` and ``__slots__``), lists, tuples and dicts."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (list, tuple)):
        return sum(held_bytes(item, seen) for item in obj)
    if isinstance(obj, dict):
        return sum(held_bytes(item, seen) for item in obj.values())
    if not type(obj).__module__.startswith("annlearn"):
        return 0
    names = list(getattr(obj, "__dict__", ()))
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        names += [slots] if isinstance(slots, str) else list(slots)
    return sum(held_bytes(getattr(obj, name, None), seen) for name in names)


# The scheduler places a task by the bytes its inputs would cost to move, as
# sizeof reports them; for an estimator its default is a few dozen bytes, and
# a search task would then copy a whole shard to where its queries are.
sizeof.register(NeighborsBase)(held_bytes)


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


def _itself(obj):
    return obj


def share(client, obj):
    """``obj`` on the cluster's workers, as a future that can be recomputed.

    Not ``client.scatter(obj, broadcast=True)``: scattered data has no
    lineage, and dask's active memory manager drops the copies it deems
    redundant, so a worker's death could lose the only one and cancel every
    task that needs it ("lost dependencies"). A task that returns ``obj``
    (kept in the scheduler's graph; small objects only: templates, routers)
    is run again instead.
    """
    future = client.submit(_itself, obj, pure=False)
    client.replicate([future])
    return future


def worker_addresses(client) -> list[str]:
    """The addresses of the cluster's workers, sorted (a stable placement)."""
    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    if not workers:
        raise ValueError(
            "The dask cluster has no workers: start some before fitting or "
            "loading a sharded index."
        )
    return workers


def holders(client, futures) -> list:
    """The worker holding each of ``futures`` (the first if several), None
    for one not computed yet."""
    held = client.who_has(list(futures))
    return [next(iter(held.get(future.key, ())), None) for future in futures]


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


def assign_cells(
    cell_sizes: np.ndarray, n_shards: int, centers: np.ndarray
) -> np.ndarray:
    """The shard of each cell of an IVF index: groups of neighbouring cells
    holding about as many rows each.

    Sharding by cells, not by rows, is what makes IVF-PQ scale out: a
    query's probe of a cell is scanned on the one shard holding it. Cells
    near each other go to the same shard, so that the ``nprobe`` cells of a
    query (its nearest) tend to lie on few shards: a query then costs its
    per-query work (the term-3 table, the transfer) on fewer shards. The
    groups come from recursive bisection: the centres (``centers``, one row
    per cell) are split across their principal axis, weighted by rows, at
    the point that gives each side its share of the rows for its share of
    the shards (within half a cell), and each side is split again.
    """
    sizes = np.asarray(cell_sizes, dtype=np.float64)
    centers = np.asarray(centers, dtype=np.float64)
    owner = np.empty(len(sizes), dtype=np.int64)
    # (cells, first shard, number of shards) still to split.
    pending = [(np.arange(len(sizes)), 0, n_shards)]
    while pending:
        cells, first, n = pending.pop()
        if n == 1 or len(cells) <= 1:
            owner[cells] = first
            continue
        # Empty cells weigh a little, so that every group has a direction.
        weights = sizes[cells] + 1e-6
        centred = centers[cells] - np.average(centers[cells], axis=0, weights=weights)
        axis = np.linalg.eigh((centred * weights[:, None]).T @ centred)[1][:, -1]
        order = cells[np.argsort(centred @ axis, kind="stable")]
        left = n // 2
        cumulative = np.cumsum(sizes[order] + 1e-6)
        # The cut nearest the share of the rows (within half a cell).
        cut = int(np.argmin(np.abs(cumulative - cumulative[-1] * left / n))) + 1
        cut = min(cut, len(order) - 1)
        pending.append((order[:cut], first, left))
        pending.append((order[cut:], first + left, n - left))
    return owner


def gather(client, futures, what: str):
    """``client.gather(futures)``, with a lost worker reported as
    :class:`ShardLostError` (never a partial list of results)."""
    from distributed import KilledWorker

    try:
        return client.gather(list(futures))
    except (CancelledError, KilledWorker) as exc:
        raise ShardLostError(
            f"{what} failed ({type(exc).__name__}: {exc}). {LOST_SHARD}"
        ) from exc
