"""Helpers to tune IVF-PQ with scikit-learn's search objects.

A typical search fits each candidate on the training split (the database)
and scores it on the held-out split (the queries), on recall and on speed::

    from sklearn.model_selection import GridSearchCV, ShuffleSplit
    from annlearn import IVFPQNeighbors
    from annlearn.metrics import qps_scorer, recall_scorer
    from annlearn.model_selection import fastest_above, ivfpq_param_grid

    search = GridSearchCV(
        IVFPQNeighbors(n_neighbors=10, memory="cache_dir"),
        ivfpq_param_grid(len(X)),
        scoring={"recall": recall_scorer, "qps": qps_scorer},
        refit=fastest_above(recall=0.9),
        cv=ShuffleSplit(n_splits=1, test_size=1000, random_state=0),
    )

``memory`` makes candidates that differ only in search-time parameters
(``nprobe``, ``refine_factor``, ``n_neighbors``) reuse one training; the
exact answers of a split are computed once (see :mod:`annlearn.metrics`).
"""

from __future__ import annotations

import math
import warnings
from numbers import Integral, Real

import numpy as np

__all__ = ["fastest_above", "ivfpq_param_grid", "suggest_nlist", "suggest_nprobe"]

# FAISS warns below 39 training points per centroid; k-means centres are
# poorly estimated with fewer.
_MIN_POINTS_PER_CELL = 39


def _powers_of_two(low: float, high: float) -> list[int]:
    first = max(int(math.ceil(math.log2(max(low, 1)))), 0)
    last = int(math.floor(math.log2(max(high, 1))))
    return [2**e for e in range(first, last + 1)]


def _spread(values: list[int], n: int) -> list[int]:
    """At most n values of a sorted list, evenly spaced, ends included."""
    if len(values) <= n:
        return values
    picks = np.unique(np.round(np.linspace(0, len(values) - 1, n)).astype(int))
    return [values[i] for i in picks]


def suggest_nlist(n_samples: int, n_values: int = 4) -> list[int]:
    """Candidate ``nlist`` values for an index of ``n_samples`` vectors.

    Powers of two between ``sqrt(n_samples)`` and ``16 * sqrt(n_samples)``
    (the usual range: FAISS's guidelines suggest 4 to 16 times the square
    root), capped so that every cell gets at least 39 training points.

    Parameters
    ----------
    n_samples : int
        Vectors in the index (or its training split).
    n_values : int, default=4
        At most this many values, evenly spaced on a log scale.

    Returns
    -------
    nlist : list of int
        Increasing.

    Examples
    --------
    >>> from annlearn.model_selection import suggest_nlist
    >>> suggest_nlist(60000)
    [256, 512, 1024]
    >>> suggest_nlist(1_000_000)
    [1024, 2048, 4096, 8192]
    """
    if not isinstance(n_samples, Integral) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}.")
    if not isinstance(n_values, Integral) or n_values < 1:
        raise ValueError(f"n_values must be a positive integer, got {n_values!r}.")
    root = math.sqrt(n_samples)
    high = min(16 * root, n_samples / _MIN_POINTS_PER_CELL)
    values = _powers_of_two(root, high) or [
        max(2 ** int(math.floor(math.log2(max(high, 1)))), 1)
    ]
    return _spread(values, n_values)


def suggest_nprobe(nlist: int, n_values: int = 6) -> list[int]:
    """Candidate ``nprobe`` values for an index of ``nlist`` cells.

    Powers of two from 1 up to ``nlist / 4`` (beyond which an IVF index is
    rarely faster than exact search), at most ``n_values`` of them.

    Parameters
    ----------
    nlist : int
        Cells of the coarse quantizer.
    n_values : int, default=6
        At most this many values, evenly spaced on a log scale.

    Returns
    -------
    nprobe : list of int
        Increasing, each at most ``nlist``.

    Examples
    --------
    >>> from annlearn.model_selection import suggest_nprobe
    >>> suggest_nprobe(256)
    [1, 2, 4, 16, 32, 64]
    """
    if not isinstance(nlist, Integral) or nlist < 1:
        raise ValueError(f"nlist must be a positive integer, got {nlist!r}.")
    if not isinstance(n_values, Integral) or n_values < 1:
        raise ValueError(f"n_values must be a positive integer, got {n_values!r}.")
    return _spread(_powers_of_two(1, max(nlist // 4, 1)), n_values)


def ivfpq_param_grid(
    n_samples: int, n_nlist: int = 4, n_nprobe: int = 6
) -> list[dict[str, list[int]]]:
    """A ``param_grid`` over ``nlist`` and ``nprobe`` for ``GridSearchCV``.

    One sub-grid per ``nlist`` from :func:`suggest_nlist`, each with the
    ``nprobe`` values of :func:`suggest_nprobe` for it (so ``nprobe`` never
    exceeds ``nlist``).

    Parameters
    ----------
    n_samples : int
        Vectors each candidate is fitted on (the training split).
    n_nlist, n_nprobe : int, default=4, 6
        At most this many values of each.

    Returns
    -------
    param_grid : list of dict
        ``[{"nlist": [nlist], "nprobe": [...]}, ...]``.

    Examples
    --------
    >>> from annlearn.model_selection import ivfpq_param_grid
    >>> ivfpq_param_grid(60000, n_nlist=2, n_nprobe=3)
    [{'nlist': [256], 'nprobe': [1, 8, 64]}, {'nlist': [1024], 'nprobe': [1, 16, 256]}]
    """
    return [
        {"nlist": [nlist], "nprobe": suggest_nprobe(nlist, n_nprobe)}
        for nlist in suggest_nlist(n_samples, n_nlist)
    ]


class _FastestAbove:
    def __init__(self, recall: float, recall_key: str, speed_key: str):
        self.recall = recall
        self.recall_key = recall_key
        self.speed_key = speed_key

    def __call__(self, cv_results: dict) -> int:
        rec_name = f"mean_test_{self.recall_key}"
        speed_name = f"mean_test_{self.speed_key}"
        missing = [n for n in (rec_name, speed_name) if n not in cv_results]
        if missing:
            raise ValueError(
                f"fastest_above needs the scores {self.recall_key!r} and "
                f"{self.speed_key!r} in scoring (cv_results_ lacks {missing}); "
                "use scoring={'recall': recall_scorer, 'qps': qps_scorer}."
            )
        recall = np.asarray(cv_results[rec_name], dtype=float)
        speed = np.asarray(cv_results[speed_name], dtype=float)
        ok = np.flatnonzero(recall >= self.recall)
        if len(ok) == 0:
            best = int(np.nanargmax(recall))
            warnings.warn(
                f"No candidate reaches recall {self.recall}; refitting the one "
                f"with the highest recall ({recall[best]:.4f}).",
                UserWarning,
                stacklevel=2,
            )
            return best
        return int(ok[np.argmax(speed[ok])])

    def __repr__(self) -> str:
        return f"fastest_above(recall={self.recall!r})"


def fastest_above(
    recall: float = 0.95, *, recall_key: str = "recall", speed_key: str = "qps"
):
    """A ``refit`` callable: the fastest candidate whose recall reaches a target.

    For a multi-metric :class:`~sklearn.model_selection.GridSearchCV` scored
    with ``{"recall": recall_scorer, "qps": qps_scorer}``
    (:mod:`annlearn.metrics`): among the candidates whose mean test recall is
    at least ``recall``, the one with the highest mean queries/second. If
    none reaches it, the candidate with the highest recall, with a warning.

    Parameters
    ----------
    recall : float, default=0.95
        Target recall in [0, 1].
    recall_key, speed_key : str, default="recall", "qps"
        Names of the two scores in ``scoring``.

    Returns
    -------
    refit : callable
        ``refit(cv_results) -> best_index``.

    Examples
    --------
    What it picks from a search's results (``GridSearchCV(...,
    scoring={"recall": recall_scorer, "qps": qps_scorer},
    refit=fastest_above(0.9))`` passes it ``cv_results_``):

    >>> import numpy as np
    >>> from annlearn.model_selection import fastest_above
    >>> cv_results = {
    ...     "mean_test_recall": np.array([0.62, 0.91, 0.98]),
    ...     "mean_test_qps": np.array([24000.0, 12000.0, 5000.0]),
    ... }
    >>> int(fastest_above(recall=0.9)(cv_results))
    1
    """
    if not isinstance(recall, Real) or not 0 <= recall <= 1:
        raise ValueError(f"recall must be in [0, 1], got {recall!r}.")
    return _FastestAbove(float(recall), recall_key, speed_key)
