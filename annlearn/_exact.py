"""Exact answers that recall is measured against, computed once per split.

An index's ``score`` (and the recall scorers of :mod:`annlearn.metrics`)
compare its neighbours with the exact ones among the same indexed vectors,
found by a FlatNeighbors over them (the index's ``_exact_reference``). In a
grid search every candidate fitted on one training split asks for the same
exact answers, so they are cached in-process, keyed by the digest of the
indexed vectors and ids (computed once per store: stores are immutable), of
the queries, the metric and k.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict

import numpy as np

__all__ = ["exact_answers"]

_CACHE_SIZE = 16
_cache: OrderedDict = OrderedDict()
_lock = threading.Lock()
# Digest of each live store, so that a database is hashed once, not per call.
_store_digests: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _digest(*arrays) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _store_digest(store) -> str:
    with _lock:
        digest = _store_digests.get(store)
    if digest is None:
        # A uint8 store's codes mean nothing without its offsets and scales.
        sq = getattr(store, "sq", None)
        extra = () if sq is None else (sq.offset, sq.scale)
        extra = [a for a in extra if a is not None]
        digest = _digest(store.vectors, store.ids, *extra)
        with _lock:
            _store_digests[store] = digest
    return digest


def exact_answers(reference, Xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(float64 distances, ids) of the exact k nearest neighbours.

    Parameters
    ----------
    reference : FlatNeighbors
        Fitted over the indexed vectors.
    Xq : ndarray of shape (n_queries, n_features), float32
        Queries validated and prepared by ``reference._prepare_queries``.
    k : int
        Neighbours per query, at most the number of indexed vectors.

    Returns
    -------
    distances : ndarray of shape (n_queries, k), float64
        Ascending (re-sorted on float64 distances, the kernel's are float32).
    ids : ndarray of shape (n_queries, k), int64
    """
    store = reference._store
    key = (reference.effective_metric_, int(k), _store_digest(store), _digest(Xq))
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    _, positions = reference._search(store, Xq, k)
    ids = store.ids[positions]
    distances = reference._exact_distances(Xq, ids)
    order = np.argsort(distances, axis=1, kind="stable")
    answer = (
        np.take_along_axis(distances, order, axis=1),
        np.take_along_axis(ids, order, axis=1),
    )
    with _lock:
        _cache[key] = answer
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return answer
