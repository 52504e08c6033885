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

Data whose spectrum is flat (the first ``n_features / 4`` axes hold less
than 85% of the variance) gain nothing and keep the plain GEMM.
"""

from __future__ import annotations

import numpy as np

__all__ = ["fit_bound", "database_bounds", "extend", "subset", "query_bounds"]

# Use the bound when the first d1 <= n_features / 4 principal axes explain at
# least this share of the variance; d1 is the smallest candidate that does,
# but at least min(64, n_features / 4) (see fit_bound).
_MIN_EXPLAINED = 0.85
_CANDIDATE_DIMS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# Below these sizes the bound costs more than it saves.
_MIN_SAMPLES = 4096
_MIN_FEATURES = 32
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
    vectors: np.ndarray, sqnorms: np.ndarray, *, force: bool = False
) -> dict | None:
    """The projection for ``vectors``, or None where it would not pay.

    Parameters
    ----------
    vectors : ndarray of shape (n_samples, n_features), float32
        The stored (prepared) vectors.
    sqnorms : ndarray of shape (n_samples,), float32
        Their squared norms.
    force : bool, default=False
        Build it whatever the size and spectrum (tests).

    Returns
    -------
    bound : dict or None
        ``mean`` (n_features,) float64, ``rotation`` (n_features, d1)
        float64, plus the database side from :func:`database_bounds`.
    """
    n, d = vectors.shape
    if not force and (n < _MIN_SAMPLES or d < _MIN_FEATURES):
        return None
    rng = np.random.default_rng(0)
    sample = (
        vectors
        if n <= _MAX_SAMPLE
        else vectors[rng.choice(n, _MAX_SAMPLE, replace=False)]
    )
    mean = sample.mean(axis=0, dtype=np.float64)
    centred = sample - mean.astype(np.float32)
    cov = (centred.T @ centred).astype(np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    eigenvalues = np.clip(eigenvalues[::-1], 0.0, None)
    explained = np.cumsum(eigenvalues) / max(eigenvalues.sum(), np.finfo(float).tiny)
    dims = [c for c in _CANDIDATE_DIMS if c <= d // 4] or [max(d // 4, 1)]
    good = [c for c in dims if explained[c - 1] >= _MIN_EXPLAINED]
    if not good and not force:
        return None
    # The bound's GEMM costs little next to the exact scores of survivors
    # until about 64 columns: never fewer (the cap is n_features / 4).
    d1 = max(good[0] if good else dims[0], min(64, d // 4))
    bound = {
        "mean": mean,
        "rotation": np.ascontiguousarray(eigenvectors[:, ::-1][:, :d1]),
    }
    bound.update(database_bounds(bound, vectors, sqnorms))
    return bound


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
    mean, rotation = bound["mean"], bound["rotation"]
    rotation32, mean32 = rotation.astype(np.float32), mean.astype(np.float32)
    mean_u1, mean_sq = mean @ rotation, mean @ mean
    projected = np.empty((len(queries), rotation.shape[1] + 1), dtype=np.float32)
    shift = np.empty(len(queries), dtype=np.float32)
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
            offset = total - q_sq
        else:
            total = q_sq
            offset = -q_mean
        head = np.einsum("ij,ij->i", p1, p1)
        projected[rows, :-1] = p1
        projected[rows, -1] = np.sqrt(
            np.clip(total - head, 0.0, None) + 1e-6 * (total + 1.0)
        )
        margin = _RTOL * (q_sq + total + bound["max_sqnorm"]) + 1e-30
        shift[rows] = margin - offset
    return projected, bound["vectors"], bound["sqnorms"], shift
