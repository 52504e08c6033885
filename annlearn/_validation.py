"""Input checks and conversions: the one place where annlearn validates.

Estimators call these once per public call; kernels then trust their inputs
(float32, C-contiguous, finite, the fitted number of features).
"""

from __future__ import annotations

import numbers
import os
import sys
import warnings
import weakref

import joblib
import numpy as np
import sklearn
from sklearn.exceptions import DataConversionWarning
from sklearn.utils.validation import check_is_fitted, validate_data

__all__ = [
    "MAX_ID",
    "METRICS",
    "check_n_neighbors",
    "fitted_metric",
    "user_stacklevel",
    "validate_fit_data",
    "validate_query_data",
]

_FAST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# The metrics every annlearn estimator understands.
METRICS = ("euclidean", "sqeuclidean", "cosine", "inner_product")

# Largest id: a neighbour graph has max(id) + 1 columns, which must fit in int64.
MAX_ID = np.iinfo(np.int64).max - 1

# Largest squared norm of a row: float32 distances are sums of a few squared
# norms and inner products (||x||^2 + ||y||^2 - 2 <x, y> <= 2 (||x||^2 +
# ||y||^2)), which then stay below float32's maximum with room for rounding.
_MAX_SQNORM = float(np.finfo(np.float32).max) / 16

# Frames in these folders are not the user's code (warnings skip them):
# annlearn, and scikit-learn and joblib, through which pipelines and
# searches call it.
_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep
    for path in (__file__, sklearn.__file__, joblib.__file__)
)

# Estimators that have already warned about a float64 conversion. Weak, so
# that it holds no estimator alive; not an attribute, so that kneighbors and
# transform leave the estimator's __dict__ unchanged.
_WARNED_FLOAT64: weakref.WeakSet = weakref.WeakSet()


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the user's line.

    For a ``warnings.warn`` call made in the function that calls this one:
    skips every frame of annlearn, scikit-learn and joblib (``fit`` wrappers,
    pipelines, cached steps), so that the warning names the line that called into them,
    however deep the call that warns.
    """
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame = frame.f_back
        level += 1
    return level


def _is_float64(X) -> bool:
    dtype = getattr(X, "dtype", None)
    if dtype is not None:
        return dtype == np.float64
    dtypes = getattr(X, "dtypes", None)  # pandas DataFrame
    try:
        return dtypes is not None and any(dt == np.float64 for dt in dtypes)
    except TypeError:
        return False


def _warn_float64_once(estimator, X) -> None:
    """DataConversionWarning the first time ``estimator`` converts float64."""
    if not _is_float64(X) or estimator in _WARNED_FLOAT64:
        return
    _WARNED_FLOAT64.add(estimator)
    warnings.warn(
        f"{type(estimator).__name__} works in float32: float64 input is "
        "converted, which copies it and rounds it to float32 precision. Pass "
        "float32 arrays (X.astype(np.float32)) to avoid the copy. This warning "
        "is shown once per estimator.",
        DataConversionWarning,
        stacklevel=user_stacklevel(),
    )


def fitted_metric(estimator) -> str:
    """The metric an estimator searches with: the one it was fitted with
    (``effective_metric_``), whatever ``set_params`` changed since."""
    return getattr(estimator, "effective_metric_", estimator.metric)


def _check_magnitude(X: np.ndarray, metric: str) -> np.ndarray:
    """Refuse rows whose float32 squared norm overflows the distance sums.

    Cosine normalises every row (in float64) before any float32 product, so
    any finite row is fine there.
    """
    if metric == "cosine" or X.size == 0:
        return X
    largest = max(float(X.max()), -float(X.min()))
    if largest * largest * X.shape[1] <= _MAX_SQNORM:
        return X
    sqnorms = np.einsum("ij,ij->i", X, X, dtype=np.float64)
    bad = np.flatnonzero(sqnorms > _MAX_SQNORM)
    if len(bad):
        raise ValueError(
            f"Input contains rows too large for float32 distances: rows "
            f"{_show(bad)} have norms up to {np.sqrt(sqnorms[bad].max()):.3g}, "
            f"and metric={metric!r} needs norms below "
            f"{np.sqrt(_MAX_SQNORM):.3g} (squared norms are summed in float32). "
            "Scale the data down (distances scale with it) or use "
            "metric='cosine'."
        )
    return X


def validate_fit_data(estimator, X, *, min_samples: int = 1) -> np.ndarray:
    """Validate training data and convert it to float32, C order.

    float32 C-contiguous input is not copied; float64 and integer input are
    converted once. The first float64 input an estimator converts raises a
    ``DataConversionWarning`` (once per estimator, in ``fit`` or in a query).
    Sparse input, NaN or infinity, values whose float32 squares overflow,
    fewer than ``min_samples`` rows, or no feature raise a ``ValueError`` or
    ``TypeError`` naming the problem. Sets ``n_features_in_`` (and
    ``feature_names_in_``).

    Parameters
    ----------
    estimator : BaseEstimator
        The estimator being fitted.
    X : array-like of shape (n_samples, n_features)
        Training data.
    min_samples : int, default=1
        Minimum number of rows.

    Returns
    -------
    X : ndarray of shape (n_samples, n_features), dtype float32
    """
    _warn_float64_once(estimator, X)
    X = validate_data(
        estimator,
        X,
        reset=True,
        accept_sparse=False,
        dtype=np.float32,
        order="C",
        ensure_min_samples=min_samples,
        ensure_all_finite=True,
    )
    return _check_magnitude(X, estimator.metric)


def check_fitted(estimator) -> None:
    """``check_is_fitted``, without scikit-learn's tag lookup (tens of
    microseconds, twice per query) when ``__sklearn_is_fitted__`` says the
    estimator is fitted; otherwise scikit-learn's own check and error."""
    is_fitted = getattr(estimator, "__sklearn_is_fitted__", None)
    if is_fitted is None or not is_fitted():
        check_is_fitted(estimator)


def validate_query_data(estimator, X) -> np.ndarray:
    """Validate query data against a fitted estimator; convert to float32.

    Raises ``NotFittedError`` if the estimator is not fitted, and a
    ``ValueError`` on NaN/inf, values whose float32 squares overflow, or a
    number of features other than the fitted one.

    Parameters
    ----------
    estimator : BaseEstimator
        A fitted estimator.
    X : array-like of shape (n_queries, n_features)
        Queries.

    Returns
    -------
    X : ndarray of shape (n_queries, n_features), dtype float32
    """
    check_fitted(estimator)
    _warn_float64_once(estimator, X)
    if (
        type(X) is np.ndarray
        and X.ndim == 2
        and X.dtype in _FAST_DTYPES
        and X.shape[0] > 0
        and X.shape[1] == estimator.n_features_in_
        and not hasattr(estimator, "feature_names_in_")
    ):
        # Fast path for the common case (a float ndarray of the right width),
        # which matters for single-query latency: scikit-learn's validation
        # costs ~100 us. Anything unusual, including non-finite values, goes
        # through validate_data below, which raises its precise errors.
        Xc = np.ascontiguousarray(X, dtype=np.float32)
        if np.isfinite(Xc).all():
            return _check_magnitude(Xc, fitted_metric(estimator))
    X = validate_data(
        estimator,
        X,
        reset=False,
        accept_sparse=False,
        dtype=np.float32,
        order="C",
        ensure_all_finite=True,
    )
    return _check_magnitude(X, fitted_metric(estimator))


def check_graph_mode(mode) -> None:
    """Raise ValueError unless ``mode`` is a graph mode of scikit-learn."""
    if mode not in ("connectivity", "distance"):
        raise ValueError(
            'Unsupported mode, must be one of "connectivity" or "distance" '
            f"but got {mode!r} instead."
        )


def check_radius(radius, metric: str) -> float:
    """Check a radius passed to a radius query against the fitted metric.

    A finite number; at least 0 for the distance metrics (0 finds exact
    duplicates only), any finite value for ``"inner_product"``, whose
    distance ``-<x, y>`` may be negative.
    """
    if isinstance(radius, bool) or not isinstance(radius, numbers.Real):
        raise ValueError(f"Expected radius to be a real number, got {radius!r}.")
    radius = float(radius)
    if not np.isfinite(radius):
        raise ValueError(f"Expected a finite radius, got {radius!r}.")
    if radius < 0 and metric != "inner_product":
        raise ValueError(
            f"Expected radius >= 0 for metric {metric!r}, got {radius!r} (only "
            "metric='inner_product' has negative distances)."
        )
    return radius


def check_n_neighbors(
    n_neighbors, n_samples_fit: int, *, query_is_train: bool = False
) -> int:
    """Check a ``n_neighbors`` passed to a query method against the index size.

    Parameters
    ----------
    n_neighbors : int
        Requested number of neighbours.
    n_samples_fit : int
        Number of vectors in the index.
    query_is_train : bool, default=False
        True when the queries are the indexed vectors themselves (``X=None``):
        each point is not its own neighbour, so one vector fewer is available.

    Returns
    -------
    n_neighbors : int
    """
    if (
        not isinstance(n_neighbors, numbers.Integral)
        or isinstance(n_neighbors, bool)
        or n_neighbors <= 0
    ):
        raise ValueError(f"Expected n_neighbors > 0, an integer. Got {n_neighbors!r}.")
    n_neighbors = int(n_neighbors)
    available = n_samples_fit - 1 if query_is_train else n_samples_fit
    if n_neighbors > available:
        if query_is_train:
            raise ValueError(
                "Expected n_neighbors < n_samples_fit when querying the fitted "
                f"data (X=None), but n_neighbors = {n_neighbors}, "
                f"n_samples_fit = {n_samples_fit}."
            )
        raise ValueError(
            f"Expected n_neighbors <= n_samples_fit, but n_neighbors = "
            f"{n_neighbors}, n_samples_fit = {n_samples_fit}."
        )
    return n_neighbors


def _show(values: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def _as_int64_ids(ids) -> np.ndarray:
    """A 1-d int64 array of ids, or a ValueError saying what is wrong."""
    ids_arr = np.asarray(ids)
    if ids_arr.ndim != 1:
        raise ValueError(f"Expected a 1-d array of ids, got shape {ids_arr.shape}.")
    if ids_arr.size and not np.issubdtype(ids_arr.dtype, np.integer):
        raise ValueError(f"Expected integer ids, got dtype {ids_arr.dtype}.")
    if ids_arr.size and ids_arr.dtype.kind == "u" and ids_arr.max() > MAX_ID:
        raise ValueError(
            f"Expected ids <= {MAX_ID}, got {_show(ids_arr[ids_arr > MAX_ID])}."
        )
    return ids_arr.astype(np.int64)


def check_new_ids(ids, n_new: int, existing: np.ndarray | None) -> np.ndarray:
    """Validate the ids of vectors being indexed, or make default ones.

    Parameters
    ----------
    ids : array-like of shape (n_new,) or None
        User ids (integers). ``None``: consecutive ids after the largest
        existing one (``0 .. n_new - 1`` for an empty index).
    n_new : int
        Number of vectors being indexed.
    existing : ndarray of int64 or None
        Ids already in the index.

    Returns
    -------
    ids : ndarray of shape (n_new,), int64
    """
    if ids is None:
        first = 0 if existing is None or len(existing) == 0 else int(existing.max()) + 1
        if first + n_new - 1 > MAX_ID:
            raise ValueError(
                f"Cannot number {n_new} new vectors after the largest id in the "
                f"index, {first - 1}: ids must be at most {MAX_ID}. Pass ids."
            )
        return np.arange(first, first + n_new, dtype=np.int64)
    ids_arr = _as_int64_ids(ids)
    if len(ids_arr) != n_new:
        raise ValueError(
            f"Expected ids of shape ({n_new},), one per vector, but got shape "
            f"{ids_arr.shape}."
        )
    if ids_arr.size and ids_arr.min() < 0:
        raise ValueError(
            f"Expected ids >= 0, got negative ids {_show(ids_arr[ids_arr < 0])}."
        )
    if ids_arr.size and ids_arr.max() > MAX_ID:
        raise ValueError(
            f"Expected ids <= {MAX_ID} (a neighbour graph has max(id) + 1 "
            f"columns), got {_show(ids_arr[ids_arr > MAX_ID])}."
        )
    unique, counts = np.unique(ids_arr, return_counts=True)
    if np.any(counts > 1):
        raise ValueError(f"Duplicate ids in the input: {_show(unique[counts > 1])}.")
    if existing is not None:
        taken = ids_arr[np.isin(ids_arr, existing)]
        if len(taken):
            raise ValueError(f"Ids already in the index: {_show(np.sort(taken))}.")
    return ids_arr


def check_removed_ids(ids, existing: np.ndarray) -> np.ndarray:
    """Validate ids to remove: integers, all present in the index.

    Returns
    -------
    mask : ndarray of shape (len(existing),), bool
        True for the stored vectors to remove.
    """
    ids_arr = _as_int64_ids(np.atleast_1d(np.asarray(ids)))
    unknown = np.setdiff1d(ids_arr, existing)
    if len(unknown):
        raise ValueError(
            f"Cannot remove ids that are not in the index: {_show(unknown)}; "
            "nothing was removed."
        )
    return np.isin(existing, ids_arr)
