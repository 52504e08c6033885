"""Lower bounds on exact scores from a few principal components.

Exact search need not compute every inner product in full. Rotate the data
onto its principal axes (an orthonormal ``R``: distances and inner products
do not change) and split each centred vector ``u = (v - mean) R`` into its
first ``d1`` coordinates ``u1`` and the rest ``u2``. For a query ``p``
rotated the same way, Cauchy-Schwarz on the rest gives

    <p, u> = <p1, u1> + <p2, u2> <= <p1, u1> + ||p2|| ||u2||
           = <[p1, ||p2||], [u1, ||u2||]>,

an inner product of two vectors of ``d1 + 1`` coordinates. So one GEMM of
``d1 + 1`` columns instead of ``n_features`` yields, for every pair, a lower
bound of the score the search ranks by (``||v||^2 - 2 <q, v>`` for the L2
metrics, ``-<q, v>`` for the inner-product ones, up to a per-query
constant). The kernel computes the exact score only of the candidates whose
bound may beat the query's current k-th best: on data whose variance sits in
a few directions (images, many learnt embeddings), a small fraction of
them. The answer is the same as the brute-force one; the margin in
``query_bounds`` covers float32 rounding of the projected GEMM.

Whether the bound pays, and on how many axes, is decided by cost at ``fit``
(:func:`fit_bound`): on a sample of the rows searched against another, the
share of candidates that would survive the bound is counted for each number
of axes, and the bound is kept only where its GEMM plus the survivors' exact
scores cost clearly less than the plain GEMM. Data whose spectrum is flat
(random vectors, many text embeddings) prune too little and keep brute force.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "bound_costs",
    "database_bounds",
    "extend",
    "cheapest_axes",
    "fit_bound",
    "project_queries",
    "query_bounds",
    "query_shift",
    "sample_rows",
    "subset",
]

# Numbers of principal axes tried (at most n_features / 4).
_CANDIDATE_DIMS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# Below these sizes the bound costs more than it saves.
_MIN_SAMPLES = 4096
_MIN_FEATURES = 32
# The cost model, in multiply-adds of brute force's GEMM. Every (query, row)
# pair costs _PAIR_COST (its score written and screened) plus its GEMM
# share: n_features for brute force, _PROJECTED_COST * (d1 + 1) for the
# bound's thinner GEMM, which adds for each survivor an exact score over a
# row fetched from memory, _EXACT_COST per feature. Fitted by non-negative
# least squares to side-by-side runs of both searches
# (benchmarks/bench_pca_bound_costs.py).
_PAIR_COST = 200.0
_PROJECTED_COST = 1.4
_EXACT_COST = 13.5
# A survivor's exact score over a row already in cache (a database of a few
# hundred rows: k-means centres), estimated from the two searches timed side
# by side on the assignments of Fashion-MNIST to 256 centres (32 and 64 axes
# both gave about 7).
_CACHED_EXACT_COST = 7.0
# The bound is kept when its estimated cost is at most this share of brute
# force's: the model errs by up to 0.2 either way, and a slower exact search
# is the failure to avoid.
_MAX_COST_RATIO = 0.7
# Rows searched, the neighbours counted and the rows of a screening step in
# the survivor count: the kernel's k-th best tightens as it scans, row
# block after row block.
_SIM_QUERIES = 128
_SIM_K = 10
_SIM_BLOCK = 256
# Rows sampled to estimate the principal axes (any orthonormal basis keeps
# the bound valid; a sample is accurate enough to make it tight).
_MAX_SAMPLE = 16384
# Relative margin that covers float32 rounding of the projections, the
# projected GEMM and the exact scores.
_RTOL = 1e-4
# Rows projected at a time, so that the temporaries of a projection (float32
# then float64 coordinates) take _BLOCK_ROWS x d1 x 12 bytes (48 MiB at the
# largest d1, 256), never n_samples x d1; a row's arithmetic is the same in
# any block.
_BLOCK_ROWS = 16384


def _row_blocks(n: int):
    """Slices of at most ``_BLOCK_ROWS`` rows covering ``range(n)``."""
    return (slice(s, min(s + _BLOCK_ROWS, n)) for s in range(0, n, _BLOCK_ROWS))


def fit_bound(
    vectors: np.ndarray, sqnorms: np.ndarray, *, l2: bool = True, force: bool = False
) -> dict | None:
    """The projection for ``vectors``, or None where it would not pay.

    Parameters
    ----------
    vectors : ndarray of shape (n_samples, n_features), float32
        The stored (prepared) vectors.
    sqnorms : ndarray of shape (n_samples,), float32
        Their squared norms.
    l2 : bool, default=True
        Whether the search ranks by L2 distance (else by inner product):
        the survivor count ranks as the search will.
    force : bool, default=False
        Build it whatever the size and spectrum, on the cheapest number of
        axes (``algorithm="pca_bound"``).

    Returns
    -------
    bound : dict or None
        ``mean`` (n_features,) float64, ``rotation`` (n_features, d1)
        float64, plus the database side from :func:`database_bounds`.
    """
    n, d = vectors.shape
    if not force and (n < _MIN_SAMPLES or d < _MIN_FEATURES):
        return None
    sample, queries = sample_rows(vectors)
    bound = cheapest_axes(sample, queries, sample, n, l2, force)
    if bound is not None:
        bound.update(database_bounds(bound, vectors, sqnorms))
    return bound


def cheapest_axes(
    sample: np.ndarray,
    queries: np.ndarray,
    database: np.ndarray,
    n_total: int,
    l2: bool,
    force: bool,
    k: int | None = None,
    cached: bool = False,
) -> dict | None:
    """``{"mean", "rotation"}`` on the cheapest number of ``sample``'s
    principal axes for searching ``queries`` in ``database`` (see
    :func:`bound_costs` for ``n_total``, ``l2``, ``k`` and ``cached``), or,
    unless ``force``, None where that costs more than ``_MAX_COST_RATIO`` of
    brute force."""
    mean, axes = _principal_axes(sample)
    dims = _candidate_dims(sample.shape[1])
    costs = bound_costs(
        axes[:, : dims[-1]], mean, database, queries, dims, n_total, l2, k, cached
    )
    best = min(range(len(dims)), key=costs.__getitem__)
    if not force and costs[best] > _MAX_COST_RATIO:
        return None
    return {"mean": mean, "rotation": np.ascontiguousarray(axes[:, : dims[best]])}


def sample_rows(
    vectors: np.ndarray, max_sample: int = _MAX_SAMPLE
) -> tuple[np.ndarray, np.ndarray]:
    """Rows drawn at random (seeded): up to ``max_sample`` to estimate the
    principal axes on, then up to ``_SIM_QUERIES`` others for the survivor
    count's queries (none when there is a single row)."""
    n = len(vectors)
    n_sample = min(n, max_sample + _SIM_QUERIES)
    rows = np.random.default_rng(0).choice(n, n_sample, replace=False)
    n_axes = max(n_sample - _SIM_QUERIES, 1)
    return vectors[rows[:n_axes]], vectors[rows[n_axes:]]


def _principal_axes(sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean (n_features,) and the principal axes (n_features, n_features),
    both float64, of the rows of ``sample``, axes by decreasing variance."""
    mean = sample.mean(axis=0, dtype=np.float64)
    centred = sample - mean.astype(np.float32)
    cov = (centred.T @ centred).astype(np.float64)
    _, eigenvectors = np.linalg.eigh(cov)
    return mean, eigenvectors[:, ::-1]


def _candidate_dims(n_features: int) -> list[int]:
    """The numbers of axes worth trying: at most a quarter of the features."""
    return [c for c in _CANDIDATE_DIMS if c <= n_features // 4] or [
        max(n_features // 4, 1)
    ]


def bound_costs(
    axes,
    mean,
    database,
    queries,
    dims,
    n_total: int,
    l2: bool,
    k: int | None = None,
    cached: bool = False,
) -> list[float]:
    """Estimated cost of the bound on ``dims[i]`` axes, as a share of brute
    force's, from a search of ``queries`` in ``database`` (both samples).

    A (query, row) pair survives when its bound is below the query's k-th
    best exact score among the rows scanned before its block; k, unless
    given, is scaled to the sample (the same share of the rows as
    ``_SIM_K`` of ``n_total``). Scores as the kernel ranks them:
    ``||q - y||^2`` for the L2 metrics, ``-<q, y>`` for the inner-product
    ones. The queries' projection is counted as spread over ``n_total``
    rows. ``cached``: the database is small enough to stay in cache, which
    makes the survivors' exact scores cheaper.
    """
    d = database.shape[1]
    if len(queries) == 0 or len(database) == 0:
        return [np.inf] * len(dims)
    if k is None:
        k = round(_SIM_K * len(database) / n_total)
    k = int(np.clip(k, 1, len(database)))
    mean32, axes32 = mean.astype(np.float32), axes.astype(np.float32)
    centred = database - mean32
    u = (centred @ axes32).astype(np.float64)
    u_head = np.cumsum(u * u, axis=1)
    u_total = np.einsum("ij,ij->i", centred, centred, dtype=np.float64)
    dots = (queries @ database.T).astype(np.float64)
    if l2:
        q_c = queries - mean32
        p = (q_c @ axes32).astype(np.float64)
        p_total = np.einsum("ij,ij->i", q_c, q_c, dtype=np.float64)
        q_sq = np.einsum("ij,ij->i", queries, queries, dtype=np.float64)
        y_sq = np.einsum("ij,ij->i", database, database, dtype=np.float64)
        exact = q_sq[:, None] - 2.0 * dots + y_sq[None, :]
    else:
        p = (queries @ axes32).astype(np.float64)
        p_total = np.einsum("ij,ij->i", queries, queries, dtype=np.float64)
        q_mean = (queries @ mean32).astype(np.float64)
        exact = -dots
    p_head = np.cumsum(p * p, axis=1)
    exact = exact.astype(np.float32)
    costs = []
    for d1 in dims:
        u_rest = np.sqrt(np.clip(u_total - u_head[:, d1 - 1], 0.0, None))
        p_rest = np.sqrt(np.clip(p_total - p_head[:, d1 - 1], 0.0, None))
        lower = (p[:, :d1] @ u[:, :d1].T).astype(np.float32)
        if l2:
            # ||p1 - u1||^2 + (||p2|| - ||u2||)^2 <= ||q - y||^2
            lower *= -2.0
            lower += (p_head[:, d1 - 1] + p_rest**2)[:, None].astype(np.float32)
            lower += (u_head[:, d1 - 1] + u_rest**2)[None, :].astype(np.float32)
            lower -= 2.0 * np.outer(p_rest, u_rest).astype(np.float32)
        else:
            # <q, y> = <q, mean> + <p, u> <= <q, mean> + <p1, u1> + ||p2|| ||u2||
            lower += np.outer(p_rest, u_rest).astype(np.float32)
            lower += q_mean[:, None].astype(np.float32)
            np.negative(lower, out=lower)
        share = _survivor_share(lower, exact, k)
        # The queries' projection (d * d1 per query) is spread over the rows.
        rescore = share * (_CACHED_EXACT_COST if cached else _EXACT_COST) * d
        bound = _PROJECTED_COST * (d1 + 1) + rescore + d * d1 / n_total
        costs.append((_PAIR_COST + bound) / (_PAIR_COST + d))
        if len(costs) >= 3 and costs[-1] > costs[-2] > costs[-3]:
            break  # past the minimum: more axes only add GEMM columns
    return costs + [np.inf] * (len(dims) - len(costs))


def _survivor_share(lower: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Share of pairs whose lower bound is at most the k-th best exact score
    of the rows before them; the blocks grow from k rows to ``_SIM_BLOCK``,
    as the k-th best settles, so that the first rows are not over-counted."""
    m, n = exact.shape
    best = np.full((m, k), np.inf)
    survivors, start, size = 0, 0, k
    while start < n:
        block = slice(start, start + size)
        root = best.max(axis=1)
        survivors += np.count_nonzero(lower[:, block] <= root[:, None])
        merged = np.concatenate([best, exact[:, block]], axis=1)
        best = np.partition(merged, k - 1, axis=1)[:, :k]
        start += size
        size = min(2 * size, _SIM_BLOCK)
    return survivors / (m * n)


def database_bounds(bound: dict, vectors: np.ndarray, sqnorms: np.ndarray) -> dict:
    """Projected database rows ``[u1, ||u2||]`` and their squared norms."""
    projected = np.empty((len(vectors), bound["rotation"].shape[1] + 1), np.float32)
    proj_sqnorms = np.empty(len(vectors), dtype=np.float32)
    _project_database(bound, vectors, sqnorms, projected, proj_sqnorms)
    return {
        "vectors": projected,
        "sqnorms": proj_sqnorms,
        "max_sqnorm": float(
            max(proj_sqnorms.max(initial=0.0), sqnorms.max(initial=0.0))
        ),
    }


def _project_database(bound, vectors, sqnorms, projected, proj_sqnorms) -> None:
    """Write ``database_bounds`` of ``vectors`` into ``projected`` and
    ``proj_sqnorms``, ``_BLOCK_ROWS`` rows at a time."""
    mean, rotation = bound["mean"], bound["rotation"]
    rotation32, mean32 = rotation.astype(np.float32), mean.astype(np.float32)
    mean_u1, mean_sq = mean @ rotation, mean @ mean
    for rows in _row_blocks(len(vectors)):
        v, sq = vectors[rows], sqnorms[rows].astype(np.float64)
        u1 = (v @ rotation32).astype(np.float64)
        u1 -= mean_u1
        # ||v - mean||^2 from the float32 norms: inflate ||u2|| by the rounding
        # of that difference, so that it bounds the true one from above (which
        # only lowers the bound). The GEMM's bias is ||u||^2 itself.
        total = sq - 2.0 * (v @ mean32) + mean_sq
        head = np.einsum("ij,ij->i", u1, u1)
        slack = 1e-6 * (sq + mean_sq)
        projected[rows, :-1] = u1
        projected[rows, -1] = np.sqrt(np.clip(total - head, 0.0, None) + slack)
        proj_sqnorms[rows] = np.maximum(total, head)


def extend(bound: dict, vectors: np.ndarray, sqnorms: np.ndarray) -> dict:
    """The bound with ``vectors`` appended (same axes, still exact)."""
    n_old = len(bound["vectors"])
    projected = np.empty((n_old + len(vectors), bound["vectors"].shape[1]), np.float32)
    proj_sqnorms = np.empty(n_old + len(vectors), dtype=np.float32)
    projected[:n_old] = bound["vectors"]
    proj_sqnorms[:n_old] = bound["sqnorms"]
    # The new rows are projected straight into the grown arrays.
    _project_database(bound, vectors, sqnorms, projected[n_old:], proj_sqnorms[n_old:])
    out = dict(bound)
    out["vectors"] = projected
    out["sqnorms"] = proj_sqnorms
    out["max_sqnorm"] = max(
        bound["max_sqnorm"],
        float(proj_sqnorms[n_old:].max(initial=0.0)),
        float(sqnorms.max(initial=0.0)),
    )
    return out


def subset(bound: dict, keep: np.ndarray) -> dict:
    """The bound of the rows ``keep`` (a boolean mask)."""
    out = dict(bound)
    out["vectors"] = np.ascontiguousarray(bound["vectors"][keep])
    out["sqnorms"] = bound["sqnorms"][keep]
    return out


def query_bounds(bound: dict, queries: np.ndarray, l2: bool) -> tuple:
    """``(X_proj, Y_proj, Y_proj_sqnorms, shift)`` for the search kernel.

    The kernel's projected score ``g`` of a pair satisfies ``g + c_q <=``
    exact score, with ``c_q = ||q - mean||^2 - ||q||^2`` (L2) or
    ``-<q, mean>`` (inner product); a candidate is scored exactly when
    ``g <= root + shift_q``, ``shift_q = margin_q - c_q``.
    """
    projected = _projected_rows(bound, len(queries))
    shift = np.empty(len(queries), dtype=np.float32)
    for rows, scale, offset in _project_blocks(bound, queries, l2, projected):
        shift[rows] = query_shift(bound, scale, offset)
    return projected, bound["vectors"], bound["sqnorms"], shift


def query_shift(bound: dict, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``shift_q`` of ``query_bounds`` from ``project_queries``' ``scale`` and
    ``offset``, against the database side of ``bound``."""
    margin = _RTOL * (scale + bound["max_sqnorm"]) + 1e-30
    return (margin - offset).astype(np.float32)


def project_queries(bound: dict, queries: np.ndarray, l2: bool) -> tuple:
    """The queries' side of ``query_bounds``, which does not depend on the
    database: ``(projected, scale, offset)``, the projected queries
    ``[p1, ||p2||]`` (float32) and, per query (float64), the size of its
    scores that the rounding margin is relative to and ``c_q``.
    """
    projected = _projected_rows(bound, len(queries))
    scale = np.empty(len(queries), dtype=np.float64)
    offset = np.empty(len(queries), dtype=np.float64)
    for rows, block_scale, block_offset in _project_blocks(
        bound, queries, l2, projected
    ):
        scale[rows] = block_scale
        offset[rows] = block_offset
    return projected, scale, offset


def _projected_rows(bound: dict, n: int) -> np.ndarray:
    return np.empty((n, bound["rotation"].shape[1] + 1), dtype=np.float32)


def _project_blocks(bound: dict, queries: np.ndarray, l2: bool, projected):
    """Write the projected queries into ``projected``, ``_BLOCK_ROWS`` at a
    time, yielding each block's rows with its ``scale`` and ``offset``."""
    mean, rotation = bound["mean"], bound["rotation"]
    rotation32, mean32 = rotation.astype(np.float32), mean.astype(np.float32)
    mean_u1, mean_sq = mean @ rotation, mean @ mean
    for rows in _row_blocks(len(queries)):
        q = queries[rows]
        # float32 products (no float64 copy of the queries): their rounding
        # is far inside the margin below.
        q_sq = np.einsum("ij,ij->i", q, q, dtype=np.float64)
        q_mean = (q @ mean32).astype(np.float64)
        p1 = (q @ rotation32).astype(np.float64)
        if l2:
            total = q_sq - 2.0 * q_mean + mean_sq
            p1 -= mean_u1
            c_q = total - q_sq
        else:
            total = q_sq
            c_q = -q_mean
        head = np.einsum("ij,ij->i", p1, p1)
        projected[rows, :-1] = p1
        projected[rows, -1] = np.sqrt(
            np.clip(total - head, 0.0, None) + 1e-6 * (total + 1.0)
        )
        yield rows, q_sq + total, c_q
