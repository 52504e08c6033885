"""Recall of approximate neighbours, and scorers that tune it.

``recall_at_k`` compares neighbour lists. The scorers (``recall_scorer``,
``qps_scorer``, or ``make_recall_scorer``/``make_qps_scorer`` for another k)
plug into ``scoring=`` of :class:`~sklearn.model_selection.GridSearchCV`:
with a fitted index and held-out queries X they measure, respectively, the
recall@k of ``estimator.kneighbors(X)`` against exact search over the same
indexed vectors, and the queries per second of that search alone.

The exact answer of a split is computed once: it is kept in a small
in-process cache (``annlearn._exact``) keyed by a hash of the indexed vectors,
their ids, the queries, the metric and k, so that the candidates of a grid
search that share a training split share one exact search.
"""

from __future__ import annotations

import time
from numbers import Integral

import numpy as np

__all__ = [
    "make_qps_scorer",
    "make_recall_scorer",
    "qps_scorer",
    "recall_at_k",
    "recall_scorer",
]


def recall_at_k(
    true_indices,
    pred_indices,
    *,
    true_distances=None,
    pred_distances=None,
    rtol: float = 1e-5,
) -> float:
    """Mean fraction of the true k nearest neighbours that were returned.

    For each query, a returned neighbour is a hit if its id is among the
    ``k`` true ids, where ``k = true_indices.shape[1]``. With distances given,
    the rule is fair to ties: a returned neighbour also counts as a hit when
    its exact distance is at most the true k-th distance (within ``rtol``).
    On data with many equal distances (integer pixels, duplicates) two exact
    methods may pick different members of a tie; both then score 1.0.

    Parameters
    ----------
    true_indices : array-like of shape (n_queries, k)
        Ids of the exact k nearest neighbours of each query.
    pred_indices : array-like of shape (n_queries, k_pred)
        Ids returned by the method under test; only the first ``k`` columns
        are read. Ids < 0 (no neighbour) never count.
    true_distances : array-like of shape (n_queries, k), default=None
        Exact distances of ``true_indices``, ascending per row.
    pred_distances : array-like of shape (n_queries, k_pred), default=None
        *Exact* distances of ``pred_indices`` (not the method's approximate
        ones), computed the same way as ``true_distances``. Give both or
        neither.
    rtol : float, default=1e-5
        Relative tolerance of the tie rule.

    Returns
    -------
    recall : float
        In [0, 1], averaged over the queries.

    Examples
    --------
    >>> from annlearn.metrics import recall_at_k
    >>> recall_at_k([[0, 1], [2, 3]], [[1, 0], [2, 5]])
    0.75
    >>> recall_at_k([[0, 1]], [[0, 7]], true_distances=[[0.0, 1.0]],
    ...             pred_distances=[[0.0, 1.0]])
    1.0
    """
    true_indices = np.asarray(true_indices)
    pred_indices = np.asarray(pred_indices)
    if true_indices.ndim != 2 or pred_indices.ndim != 2:
        raise ValueError("true_indices and pred_indices must be 2-d arrays.")
    n_queries, k = true_indices.shape
    if pred_indices.shape[0] != n_queries:
        raise ValueError(
            f"true_indices has {n_queries} rows but pred_indices has "
            f"{pred_indices.shape[0]}."
        )
    if k == 0 or pred_indices.shape[1] < k:
        raise ValueError(
            f"pred_indices must have at least k = {k} >= 1 columns, got "
            f"{pred_indices.shape[1]}."
        )
    if (true_distances is None) != (pred_distances is None):
        raise ValueError("Give both true_distances and pred_distances, or neither.")
    if n_queries == 0:
        raise ValueError("recall_at_k needs at least one query.")
    pred = pred_indices[:, :k]
    valid = pred >= 0
    # Row-wise membership: sort the true ids once, search each row.
    true_sorted = np.sort(true_indices, axis=1)
    pos = np.empty(pred.shape, dtype=np.intp)
    for i in range(n_queries):
        pos[i] = np.searchsorted(true_sorted[i], pred[i])
    pos = np.minimum(pos, k - 1)
    hit = valid & (np.take_along_axis(true_sorted, pos, axis=1) == pred)
    if true_distances is not None:
        true_distances = np.asarray(true_distances, dtype=np.float64)
        pred_distances = np.asarray(pred_distances, dtype=np.float64)[:, :k]
        if true_distances.shape != true_indices.shape:
            raise ValueError("true_distances must have the shape of true_indices.")
        if pred_distances.shape != pred.shape:
            raise ValueError("pred_distances must have the shape of pred_indices.")
        kth = true_distances[:, -1:]
        tie = pred_distances <= kth + rtol * np.abs(kth)
        hit |= valid & tie
    # Duplicated returned ids would count twice: a row can score at most k.
    return float(np.mean(np.minimum(hit.sum(axis=1), k) / k))


def _estimator_recall(estimator, X, n_neighbors=None) -> float:
    k = estimator.n_neighbors if n_neighbors is None else n_neighbors
    if not isinstance(k, Integral) or k < 1:
        raise ValueError(f"n_neighbors must be a positive integer, got {k!r}.")
    true_ids, pred_ids, true_dist, pred_dist = estimator._recall_inputs(X, k)
    return recall_at_k(
        true_ids, pred_ids, true_distances=true_dist, pred_distances=pred_dist
    )


class _RecallScorer:
    def __init__(self, n_neighbors=None):
        self.n_neighbors = n_neighbors

    def __call__(self, estimator, X, y=None) -> float:
        return _estimator_recall(estimator, X, self.n_neighbors)

    def __repr__(self) -> str:
        return f"make_recall_scorer(n_neighbors={self.n_neighbors!r})"


class _QPSScorer:
    def __init__(self, n_neighbors=None, repeats=1):
        self.n_neighbors = n_neighbors
        self.repeats = repeats

    def __call__(self, estimator, X, y=None) -> float:
        n = len(X) if hasattr(X, "__len__") else np.asarray(X).shape[0]
        best = np.inf
        for _ in range(self.repeats):
            start = time.perf_counter()
            estimator.kneighbors(X, n_neighbors=self.n_neighbors, return_distance=False)
            best = min(best, time.perf_counter() - start)
        return n / max(best, 1e-9)

    def __repr__(self) -> str:
        return (
            f"make_qps_scorer(n_neighbors={self.n_neighbors!r}, "
            f"repeats={self.repeats!r})"
        )


def make_recall_scorer(n_neighbors: int | None = None):
    """A scorer of recall@k for ``GridSearchCV(scoring=...)``.

    The scorer is called as ``scorer(estimator, X, y=None)`` with a fitted
    annlearn estimator and held-out queries ``X``. It returns the tie-fair
    :func:`recall_at_k` of ``estimator.kneighbors(X)`` against the exact
    neighbours among the vectors the estimator indexes (computed once per
    split and cached, see the module docstring).

    Parameters
    ----------
    n_neighbors : int, default=None
        k; the estimator's ``n_neighbors`` if None.

    Returns
    -------
    scorer : callable
        ``scorer(estimator, X, y=None) -> float``.

    Examples
    --------
    >>> import numpy as np
    >>> from annlearn import IVFPQNeighbors
    >>> from annlearn.metrics import make_recall_scorer
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((2000, 16), dtype=np.float32)
    >>> index = IVFPQNeighbors(nlist=16, nprobe=16, n_subquantizers=8, nbits=4,
    ...                        refine_factor=8, random_state=0).fit(X[:1500])
    >>> recall_at_5 = make_recall_scorer(n_neighbors=5)
    >>> print(f"{recall_at_5(index, X[1500:]):.2f}")  # every cell probed
    0.99
    >>> print(f"{recall_at_5(index.set_params(nprobe=2), X[1500:]):.2f}")
    0.57
    """
    return _RecallScorer(n_neighbors)


def make_qps_scorer(n_neighbors: int | None = None, repeats: int = 1):
    """A scorer of search speed, in queries per second.

    It times ``estimator.kneighbors(X)`` alone (best of ``repeats`` runs),
    not the exact search of the recall scorer. Higher is better, as
    ``GridSearchCV`` expects.

    Parameters
    ----------
    n_neighbors : int, default=None
        k; the estimator's ``n_neighbors`` if None.
    repeats : int, default=1
        Timed runs; the fastest counts.

    Returns
    -------
    scorer : callable
        ``scorer(estimator, X, y=None) -> float``.

    Examples
    --------
    >>> import numpy as np
    >>> from annlearn import FlatNeighbors
    >>> from annlearn.metrics import make_qps_scorer
    >>> X = np.random.default_rng(0).standard_normal((2000, 16), dtype=np.float32)
    >>> index = FlatNeighbors(n_neighbors=10).fit(X[:1500])
    >>> qps = make_qps_scorer(repeats=3)(index, X[1500:])
    >>> qps > 0
    True
    """
    if not isinstance(repeats, Integral) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}.")
    return _QPSScorer(n_neighbors, repeats)


#: recall@k with the estimator's ``n_neighbors`` (see ``make_recall_scorer``).
recall_scorer = make_recall_scorer()
#: queries/second of ``kneighbors`` (see ``make_qps_scorer``).
qps_scorer = make_qps_scorer()
