"""Search settings that reach a recall target at the highest speed.

``IVFPQNeighbors(target_recall=...)`` calibrates at ``fit``: a sample of the
rows is held out of training (rows that trained the quantizers are encoded
better than new ones, and would promise a recall that new queries do not
get) but indexed, and queries the index, each row searching one more
neighbour and one more candidate and dropping itself, so that it sees an
index of the real size as new data would. Its exact neighbours among the
other rows are the reference.

:func:`choose_settings` then searches the ``(nprobe, refine_factor)`` plane.
For each ``refine_factor``, largest first, it finds the smallest ``nprobe``
whose recall reaches the target: growing steps, then bisection, since recall
grows with ``nprobe``. A smaller ``refine_factor`` never needs fewer cells,
so each search starts where the previous one ended, and the descent stops
once a ``refine_factor`` cannot reach the target (more cells no longer help)
or would cost more than the cheapest setting found. Of the settings found
with the same ``nprobe`` only the smallest ``refine_factor`` can be the
fastest; of those left, a cost model (``cost_features``) picks the fastest.
Deeper re-ranking (``DEEP_REFINE_FACTORS``) is searched the same way when no
setting reaches the target otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.utils import check_random_state

__all__ = ["Calibration", "choose_settings", "cost_features", "held_out_rows"]

# Queries of the held-out sample: the recall@10 of 1,000 queries is known to
# about +-0.005 (one standard error at 0.95, queries being correlated).
N_QUERIES = 1000
# Candidate re-ranking depths when vectors are stored, largest first: close
# enough that, nprobe being coarse where it is small, some setting lands near
# the target rather than well above it.
REFINE_FACTORS = (32, 28, 24, 20, 16, 14, 12, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1)
# Deeper re-ranking, tried only when none of REFINE_FACTORS reaches the
# target: coarse codes of data that quantizes badly (4-bit codes of text
# embeddings reach recall@10 0.95 only with refine_factor 48).
DEEP_REFINE_FACTORS = (128, 96, 64, 48, 40)


# Seconds per unit of each term of cost_features on 2 threads, fitted by
# non-negative least squares to timed searches (benchmarks/bench_search_costs.py).
# A model, not a timing, chooses between settings, so that a fit with a
# given random_state always chooses the same ones.
COSTS = np.array([4.77e-11, 0.0, 3.17e-10, 2.47e-10])


def cost_features(
    *,
    scanned: float,
    nprobe: int,
    refine_factor: int | None,
    n_neighbors: int,
    n_features: int,
    n_subquantizers: int,
    nbits: int,
) -> np.ndarray:
    """The terms of a search's cost per query that depend on its settings.

    ``scanned`` codes of ``n_subquantizers`` bytes read by the 4-bit fast
    scan or by the 8-bit scan, ``nprobe`` lookup tables of
    ``n_subquantizers * 2**nbits`` entries assembled, and ``refine_factor *
    n_neighbors`` stored vectors re-ranked. The coarse search and the
    query's own tables cost the same whatever the settings.
    """
    code_bytes = scanned * n_subquantizers
    return np.array(
        [
            code_bytes if nbits == 4 else 0.0,
            code_bytes if nbits > 4 else 0.0,
            nprobe * n_subquantizers * 2.0**nbits,
            (refine_factor or 0) * n_neighbors * n_features,
        ]
    )


@dataclass(frozen=True)
class Calibration:
    """The chosen search settings and what they measured.

    ``results`` has one row per setting compared (for each ``nprobe`` that
    is the smallest reaching the target with some ``refine_factor``, the
    smallest such ``refine_factor``; when none reaches it, the best recall
    measured): arrays ``nprobe``, ``refine_factor`` (0 for no re-ranking),
    ``recall``, ``cost`` (the model's microseconds per query, the part the
    settings change) and ``qps`` (queries per second of the one search that
    measured the recall).
    """

    nprobe: int
    refine_factor: int | None
    recall: float
    reached: bool
    results: dict


def held_out_rows(
    n_samples: int, n_needed: int, n_neighbors: int, random_state
) -> np.ndarray:
    """Sorted rows held out to calibrate on: up to ``N_QUERIES``, a tenth of
    the data at most, leaving ``n_needed`` rows to train on and
    ``n_neighbors`` to find."""
    n_queries = min(N_QUERIES, n_samples // 10, n_samples - max(n_needed, n_neighbors))
    if n_queries < 1:
        raise ValueError(
            f"target_recall needs rows to hold out for calibration: at least "
            f"10 samples and max(nlist, 2**nbits, n_neighbors) + 1 = "
            f"{max(n_needed, n_neighbors) + 1}, got n_samples = {n_samples}."
        )
    rng = check_random_state(random_state)
    return np.sort(rng.choice(n_samples, n_queries, replace=False))


def choose_settings(
    measure: Callable[[int, object], tuple[float, float]],
    cost: Callable[[int, object], float],
    *,
    target: float,
    nlist: int,
    refine_factors: Sequence,
    n_queries: int,
    deeper: Sequence = (),
) -> Calibration:
    """The cheapest ``(nprobe, refine_factor)`` whose recall reaches ``target``.

    Parameters
    ----------
    measure : callable
        ``measure(nprobe, refine_factor)`` searches the held-out queries and
        returns ``(recall, seconds)``.
    cost : callable
        ``cost(nprobe, refine_factor)``: the model's seconds per query, the
        part the settings change (``refine_factor=None``: no re-ranking).
    target : float
        Recall to reach.
    nlist : int
        Cells of the index: the largest useful ``nprobe``.
    refine_factors : sequence of int or None
        Candidates, largest first (``[None]`` when no vectors are stored).
    n_queries : int
        Queries ``measure`` searches, for the queries per second.
    deeper : sequence of int
        Larger candidates, largest first, tried only when none of
        ``refine_factors`` reaches the target.

    Returns
    -------
    calibration : Calibration
        ``reached`` is False when no setting tried reaches ``target``; the
        setting with the highest recall measured is returned then.
    """
    seen: dict = {}

    def recall_at(nprobe: int, refine_factor) -> float:
        key = (nprobe, refine_factor)
        if key not in seen:
            seen[key] = measure(nprobe, refine_factor)
        return seen[key][0]

    found: list[tuple[int, object]] = []
    for tier in (refine_factors, deeper):
        found = _descend(recall_at, cost, tier, target, nlist)
        if found:
            break
    reached = bool(found)
    if not reached:
        # The best recall measured, the cheapest among equals.
        found = [max(seen, key=lambda key: (seen[key][0], -cost(*key)))]
    costs = np.array([cost(*key) for key in found])
    best = int(np.argmin(costs))
    nprobe, refine_factor = found[best]
    results = {
        "nprobe": np.array([p for p, _ in found], dtype=np.int64),
        "refine_factor": np.array([rf or 0 for _, rf in found], dtype=np.int64),
        "recall": np.array([seen[key][0] for key in found], dtype=np.float64),
        "cost": costs * 1e6,
        "qps": np.array([n_queries / max(seen[key][1], 1e-9) for key in found]),
    }
    return Calibration(
        nprobe=int(nprobe),
        refine_factor=refine_factor,
        recall=float(seen[(nprobe, refine_factor)][0]),
        reached=reached,
        results=results,
    )


def _descend(recall_at, cost, refine_factors, target: float, nlist: int) -> list:
    """For each of ``refine_factors`` (largest first) until one falls short,
    the smallest ``nprobe`` reaching ``target``; of those with the same
    ``nprobe``, the smallest ``refine_factor`` only."""
    found: list[tuple[int, object]] = []
    cheapest = np.inf
    start = 1
    for refine_factor in refine_factors:
        nprobe = _smallest_nprobe(
            lambda p, rf=refine_factor: recall_at(p, rf),
            target,
            start,
            nlist,
            # A smaller refine_factor needs at least this many cells: once
            # they alone cost more than the cheapest setting, none can win.
            hopeless=lambda p, bound=cheapest: cost(p, None) >= bound,
        )
        if nprobe is None:
            break
        if found and found[-1][0] == nprobe:
            found.pop()
        found.append((nprobe, refine_factor))
        cheapest = min(cheapest, cost(nprobe, refine_factor))
        start = nprobe
    return found


def _smallest_nprobe(
    recall_at: Callable[[int], float],
    target: float,
    start: int,
    nlist: int,
    hopeless: Callable[[int], bool],
) -> int | None:
    """The smallest ``nprobe >= start`` whose recall reaches ``target``
    (``start - 1`` is known to fall short), or None when ``hopeless(nprobe)``
    says so before its recall is measured, when the recall saturates below
    the target, or when ``nlist`` falls short.

    The answer is usually at or just above ``start`` (the previous
    ``refine_factor``'s), so the steps up from it double: ``start``,
    ``start + 1``, ``start + 3``, ... then bisection.
    """
    low, nprobe, step = start - 1, start, 1
    # (nprobe, recall) at successive doublings of nprobe, for _saturated.
    doublings: list[tuple[int, float]] = []
    while True:
        if hopeless(nprobe):
            return None
        recall = recall_at(nprobe)
        if recall >= target:
            break
        if nprobe >= nlist:
            return None
        if not doublings or nprobe >= 2 * doublings[-1][0]:
            doublings.append((nprobe, recall))
            if _saturated([r for _, r in doublings[-3:]], target):
                return None
        low, nprobe, step = nprobe, min(nprobe + step, nlist), 2 * step
    # low falls short, nprobe reaches: bisect between them.
    while nprobe - low > 1:
        middle = (low + nprobe) // 2
        if recall_at(middle) >= target:
            nprobe = middle
        else:
            low = middle
    return nprobe


def _saturated(recalls: list[float], target: float) -> bool:
    """Whether recalls at three successive doublings of nprobe, all short of
    ``target``, will never reach it: the gain of a doubling shrinks by a
    ratio ``rho``, and all the doublings to come would gain about ``gain *
    rho / (1 - rho)``. Saturated when that is under half of what is missing
    (the projection overestimates what is left when the recall approaches
    its limit exponentially), or when a doubling gains nothing."""
    if len(recalls) < 3:
        return False
    before, gain = recalls[1] - recalls[0], recalls[2] - recalls[1]
    if gain <= 0:
        return True
    rho = gain / before if before > 0 else np.inf
    return rho < 1 and gain * rho / (1 - rho) < (target - recalls[2]) / 2
