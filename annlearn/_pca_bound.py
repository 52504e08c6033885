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
    mean, rotation = bound["mean"], bound["rotation"]
    u1 = (vectors @ rotation.astype(np.float32)).astype(np.float64)
    u1 -= mean @ rotation
    # ||v - mean||^2 from the float32 norms: inflate ||u2|| by the rounding
    # of that difference, so that it bounds the true one from above (which
    # only lowers the bound). The GEMM's bias is ||u||^2 itself.
    total = (
        sqnorms.astype(np.float64)
        - 2.0 * (vectors @ mean.astype(np.float32))
        + mean @ mean
    )
    head = np.einsum("ij,ij->i", u1, u1)
    slack = 1e-6 * (sqnorms.astype(np.float64) + mean @ mean)
    rest = np.sqrt(np.clip(total - head, 0.0, None) + slack)
    projected = np.empty((len(vectors), u1.shape[1] + 1), dtype=np.float32)
    projected[:, :-1] = u1
    projected[:, -1] = rest
    proj_sqnorms = np.maximum(total, head).astype(np.float32)
    return {
        "vectors": projected,
        "sqnorms": proj_sqnorms,
        "max_sqnorm": float(
            max(proj_sqnorms.max(initial=0.0), sqnorms.max(initial=0.0))
        ),
    }


def extend(bound: dict, vectors: np.ndarray, sqnorms: np.ndarray) -> dict:
    """The bound with ``vectors`` appended (same axes, still exact)."""
    new = database_bounds(bound, vectors, sqnorms)
    out = dict(bound)
    out["vectors"] = np.concatenate([bound["vectors"], new["vectors"]])
    out["sqnorms"] = np.concatenate([bound["sqnorms"], new["sqnorms"]])
    out["max_sqnorm"] = max(bound["max_sqnorm"], new["max_sqnorm"])
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
    # float32 products (no float64 copy of the queries): their rounding is
    # far inside the margin below.
    q_sq = np.einsum("ij,ij->i", queries, queries, dtype=np.float64)
    q_mean = (queries @ mean.astype(np.float32)).astype(np.float64)
    p1 = (queries @ rotation.astype(np.float32)).astype(np.float64)
    if l2:
        total = q_sq - 2.0 * q_mean + mean @ mean
        p1 -= mean @ rotation
        offset = total - q_sq
    else:
        total = q_sq
        offset = -q_mean
    head = np.einsum("ij,ij->i", p1, p1)
    rest = np.sqrt(np.clip(total - head, 0.0, None) + 1e-6 * (total + 1.0))
    projected = np.empty((len(queries), p1.shape[1] + 1), dtype=np.float32)
    projected[:, :-1] = p1
    projected[:, -1] = rest
    margin = _RTOL * (q_sq + total + bound["max_sqnorm"]) + 1e-30
    shift = (margin - offset).astype(np.float32)
    return projected, bound["vectors"], bound["sqnorms"], shift
