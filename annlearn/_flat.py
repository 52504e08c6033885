"""FlatNeighbors: exact k-nearest-neighbour search."""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from sklearn.base import _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from annlearn import _flat_search
from annlearn._base import NeighborsBase, transactional
from annlearn._flat_store import FlatStore
from annlearn._persistence import PersistenceMixin, check_array_state
from annlearn._quantizers import VECTOR_DTYPES, ScalarQuantizer
from annlearn._threads import effective_n_threads
from annlearn._validation import (
    METRICS,
    check_new_ids,
    fitted_metric,
    validate_fit_data,
)

__all__ = ["FlatNeighbors"]


def _normalize_rows(X: np.ndarray) -> np.ndarray:
    """Unit-norm copy of X (float32); zero rows stay zero, as sklearn's.

    A norm that float32 cannot hold (subnormal, or above its maximum) would
    round to another value or to infinity: those rows are divided in float64.
    """
    norms = np.sqrt(np.einsum("ij,ij->i", X, X, dtype=np.float64))
    norms[norms == 0.0] = 1.0
    info = np.finfo(np.float32)
    odd = (norms < info.tiny) | (norms > info.max)
    norms32 = np.clip(norms, info.tiny, info.max).astype(np.float32)
    out = np.ascontiguousarray(X / norms32[:, None])
    if odd.any():
        out[odd] = X[odd] / norms[odd, None]
    return out


def _far_from_origin(X: np.ndarray, sqnorms: np.ndarray) -> bool:
    """True if the rows sit so far from the origin, relative to their spread,
    that float32 ``||x||^2 + ||y||^2 - 2 <x, y>`` would lose the distances.

    The rounding error of that form is about eps * ||x||**2, to be compared
    with squared distances of the order of the spread (the mean squared
    distance to the mean, ``mean(||x||^2) - ||mean||^2``). Past a ratio of 32
    between the norm of the mean and the spread (error ~ 1e-4 relative) the
    stored copy is centred, which changes no Euclidean distance.
    """
    mean = X.mean(axis=0, dtype=np.float64)
    mean_sq = float(mean @ mean)
    spread = max(float(np.mean(sqnorms, dtype=np.float64)) - mean_sq, 0.0)
    return mean_sq > 32.0**2 * max(spread, float(np.finfo(np.float32).tiny))


class FlatNeighbors(PersistenceMixin, NeighborsBase):
    """Exact k-nearest-neighbour search, brute force on GEMM + top-k heaps.

    The ground truth for annlearn's approximate indexes, and a drop-in
    unsupervised neighbours estimator and transformer: ``kneighbors``,
    ``kneighbors_graph`` and ``transform`` follow
    :class:`sklearn.neighbors.NearestNeighbors` and
    :class:`sklearn.neighbors.KNeighborsTransformer`.

    Parameters
    ----------
    n_neighbors : int, default=5
        Number of neighbours returned by ``kneighbors`` and used by
        ``transform``.
    radius : float, default=1.0
        Distance within which ``radius_neighbors`` and
        ``radius_neighbors_graph`` look by default, in the metric's units.
    metric : str, default="euclidean"
        Dissimilarity, one of:

        - ``"euclidean"``: ``||x - y||``;
        - ``"sqeuclidean"``: ``||x - y||**2``;
        - ``"cosine"``: ``1 - <x, y> / (||x|| ||y||)``, in ``[0, 2]`` (a zero
          vector is at distance 1 from everything, as in scikit-learn);
        - ``"inner_product"``: neighbours by *decreasing* inner product
          (maximum inner product search); the distance returned is
          ``-<x, y>``, so it increases along each row like every other
          metric, and can be negative.
    mode : {"distance", "connectivity"}, default="distance"
        What ``transform`` stores in the graph: distances, or ones.
    algorithm : {"auto", "brute", "pca_bound"}, default="auto"
        How the exact search avoids work (the neighbours and distances are
        the same either way):

        - ``"brute"``: every query against every vector with one GEMM;
        - ``"pca_bound"``: a GEMM on the first principal components (plus
          one column) gives a lower bound of every score, and only the
          candidates whose bound beats a query's current k-th best are
          scored in full. Costs ``4 * (d1 + 1)`` bytes per vector (``d1``
          components, at most ``n_features / 4``) and a principal-axes
          estimate at ``fit``;
        - ``"auto"``: chosen by cost at ``fit`` (at least 4,096 vectors of
          at least 32 features for the bound): a sample search counts the
          candidates the bound would let through, and ``"pca_bound"`` is
          kept, on the cheapest number of components, only when it is
          estimated at 70% of brute force's cost or less (images, many
          learnt embeddings); else ``"brute"`` (flat spectra, small
          indexes). User guide, "Bounds from principal components".
    vector_dtype : {"float32", "float16", "uint8"}, default="float32"
        How the indexed vectors are stored (an explicit opt-in: memory for
        speed and, except on 8-bit data, exactness):

        - ``"float32"``: the vectors as given;
        - ``"float16"``: 2 bytes per feature; ``fit`` and ``add`` refuse
          values of magnitude above 65504;
        - ``"uint8"``: 1 byte per feature, ``offset + scale * code`` per
          feature over its range at ``fit``. Features whose values are
          integers spanning at most 256 values (8-bit data such as pixels)
          are stored exactly: the index is then the float32 one at a quarter
          of the memory. Values ``add`` brings outside what the codes cover
          are clipped, with a warning.

        The search is exact over the *stored* vectors (which are the data
        themselves with ``"float32"``, and with ``"uint8"`` on 8-bit data):
        it decodes a block of them at a time to float32, so it costs one
        conversion of the whole index per call on top of the float32 search
        (batches amortise it; single queries pay it).
    n_jobs : int, default=None
        Number of OpenMP threads of the search kernel (not joblib processes).
        ``None`` honours ``OMP_NUM_THREADS``, threadpoolctl limits and the
        CPUs available to the process; ``-1`` means all CPUs. BLAS is held at
        one thread inside the kernel, whose threads each run their own GEMM.

    Attributes
    ----------
    n_samples_fit_ : int
        Number of indexed vectors.
    n_features_in_ : int
        Number of features seen during ``fit``.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during ``fit``, when X has string column names.
    n_bound_components_ : int
        Principal components of the ``"pca_bound"`` search, 0 for brute force.
    effective_metric_ : str
        The metric fitted and searched with. Changing ``metric`` with
        ``set_params`` takes effect at the next ``fit``.

    See Also
    --------
    sklearn.neighbors.NearestNeighbors : Unsupervised learner for neighbour
        searches, in float64.
    sklearn.neighbors.KNeighborsTransformer : The transformer API followed by
        ``transform``.

    Notes
    -----
    Vectors are stored in float32: 4 bytes per feature per vector (2 or 1
    with ``vector_dtype="float16"`` or ``"uint8"``). Input of another dtype
    is converted once at ``fit``; float32 C-contiguous input is
    stored without a copy, except for ``"cosine"`` (rows are normalised) and
    for Euclidean data sitting far from the origin relative to their spread,
    which are stored centred on their mean (this changes no distance and
    keeps float32 precise).

    The search computes ``-2 <x, y> + ||y||**2`` for blocks of queries and
    vectors with single-precision GEMM, offers each score to a bounded heap
    per query (ties go to the smaller index), and finally recomputes the
    exact distance of the k winners, so the distances returned are accurate
    to float32 rounding. Memory is O(threads x block), never
    n_queries x n_samples_fit.

    Examples
    --------
    >>> import numpy as np
    >>> from annlearn import FlatNeighbors
    >>> X = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    >>> index = FlatNeighbors(n_neighbors=2).fit(X)
    >>> distances, indices = index.kneighbors([[0.1, 0.0]])
    >>> indices
    array([[0, 1]])
    >>> distances.round(3)
    array([[0.1, 0.9]], dtype=float32)
    """

    _parameter_constraints: dict = {
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "radius": [Interval(Real, None, None, closed="neither")],
        "metric": [StrOptions(set(METRICS))],
        "mode": [StrOptions({"distance", "connectivity"})],
        "algorithm": [StrOptions({"auto", "brute", "pca_bound"})],
        "vector_dtype": [StrOptions(set(VECTOR_DTYPES))],
        "n_jobs": [Integral, None],
    }

    def __init__(
        self,
        n_neighbors=5,
        *,
        radius=1.0,
        metric="euclidean",
        mode="distance",
        algorithm="auto",
        vector_dtype="float32",
        n_jobs=None,
    ):
        self.n_neighbors = n_neighbors
        self.radius = radius
        self.metric = metric
        self.mode = mode
        self.algorithm = algorithm
        self.vector_dtype = vector_dtype
        self.n_jobs = n_jobs

    @transactional
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, ids=None):
        """Index the rows of X.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Vectors to index. Converted to float32; NaN, infinity and sparse
            input are rejected.
        y : Ignored
            Not used, present for API consistency.
        ids : array-like of shape (n_samples,), default=None
            Non-negative, distinct integer ids returned by ``kneighbors``
            instead of row positions. ``None``: ``0 .. n_samples - 1``.

        Returns
        -------
        self : FlatNeighbors
            The fitted estimator. On any error it is left exactly as it was.
        """
        X = validate_fit_data(self, X)
        ids = check_new_ids(ids, len(X), None)
        n_threads = effective_n_threads(self.n_jobs)
        self._center = None
        if self.metric == "cosine":
            X = _normalize_rows(X)
        sqnorms = _flat_search.row_sqnorms(X, n_threads)
        if self.metric in ("euclidean", "sqeuclidean") and _far_from_origin(X, sqnorms):
            self._center = X.mean(axis=0, dtype=np.float64).astype(np.float32)
            if self.vector_dtype == "uint8":
                # An integer centre keeps integer features integer (exact).
                self._center = np.rint(self._center)
            X = np.ascontiguousarray(X - self._center)
            sqnorms = None
        store = FlatStore.build(
            X,
            ids,
            algorithm=self.algorithm,
            n_threads=n_threads,
            sqnorms=sqnorms,
            l2=self.metric in ("euclidean", "sqeuclidean"),
            sq=ScalarQuantizer.train(X, self.vector_dtype, n_threads),
        )
        self.effective_metric_ = self.metric
        self._set_store(store)
        return self

    def _set_store(self, store: FlatStore) -> None:
        # One assignment replaces the whole index, so a search running in
        # another thread sees either the old index or the new one, never a
        # mix of the two.
        self._store = store
        self.n_samples_fit_ = len(store)
        self.n_bound_components_ = store.n_bound_components
        # Saved with the state: the uint8 quantizer of the stored vectors.
        sq = store.sq
        self._vector_offset = None if sq is None else sq.offset
        self._vector_scale = None if sq is None else sq.scale

    def _store_with(self, store: FlatStore, X: np.ndarray, ids) -> FlatStore:
        X = self._prepare_queries(X)
        n_threads = effective_n_threads(self.n_jobs)
        stored = None
        if store.sq is not None:
            stored = store.sq.encode_added(
                X, "FlatNeighbors", "the uint8 store", n_threads
            )
        return store.add(X, ids, n_threads, stored=stored)

    def _upgrade_state(self, state: dict, layout: int) -> dict:
        # Written before the fitted metric was recorded: the parameter was it.
        state.setdefault("effective_metric_", state.get("metric"))
        # Before layout 4 the vectors were float32.
        state.setdefault("_vector_offset", None)
        state.setdefault("_vector_scale", None)
        store = state.get("_store")
        if layout < 2 and isinstance(store, dict):
            # Written before the bound existed: brute force, as then.
            state = {**state, "_store": {**store, "bound": None}}
            state["n_bound_components_"] = 0
        return state

    def _check_state(self) -> None:
        name, d = "FlatNeighbors", self.n_features_in_
        store = getattr(self, "_store", None)
        ScalarQuantizer.check_state(
            name,
            store.get("vectors") if isinstance(store, dict) else None,
            self._vector_offset,
            self._vector_scale,
            d=d,
        )
        FlatStore.check_state(
            name,
            getattr(self, "_store", None),
            n=self.n_samples_fit_,
            d=d,
            d1=getattr(self, "n_bound_components_", -1),
        )
        metric = getattr(self, "effective_metric_", self.metric)
        if metric not in METRICS:
            raise ValueError(f"Corrupted {name} state: metric {metric!r}.")
        center = getattr(self, "_center", None)
        if center is not None:
            check_array_state(
                name,
                "_center",
                center,
                dtype=np.float32,
                ndim=1,
                shape=(d,),
                finite=True,
            )

    def _derive_tables(self) -> None:
        # A loaded state holds the store as plain arrays (to_state's dict).
        if isinstance(self._store, dict):
            vectors = self._store["vectors"]
            sq = ScalarQuantizer.of_stored(
                vectors, self._vector_offset, self._vector_scale
            )
            self._store = FlatStore.from_state(self._store, sq)

    def _prepare_vectors(self, X: np.ndarray) -> np.ndarray:
        """Validated float32 rows -> the form stored and searched."""
        if self._center is not None:
            return np.ascontiguousarray(X - self._center)
        if fitted_metric(self) == "cosine":
            return _normalize_rows(X)
        return X

    # -- hooks of NeighborsBase -------------------------------------------
    def _describe(self, store: FlatStore) -> list[str]:
        return store.describe(self.n_features_in_)

    def _exact_reference(self) -> FlatNeighbors:
        check_is_fitted(self)
        return self

    def _exact_distances(self, Xq: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """float64 distances between prepared queries and indexed ids, in
        the metric's units; +inf for ids not in the index (or < 0)."""
        return self._store.exact_distances(Xq, ids, fitted_metric(self))

    def _prepare_queries(self, X: np.ndarray) -> np.ndarray:
        return self._prepare_vectors(X)

    def _indexed_queries(self, store: FlatStore, positions: np.ndarray) -> np.ndarray:
        return store.decoded(positions)

    def _radius_search(self, store: FlatStore, X: np.ndarray, radius: float):
        return store.radius_search(
            X, radius, fitted_metric(self), effective_n_threads(self.n_jobs)
        )

    def _search(
        self, store: FlatStore, X: np.ndarray, n_neighbors: int, allowed=None
    ) -> tuple[np.ndarray, np.ndarray]:
        return store.search(
            X,
            n_neighbors,
            fitted_metric(self),
            effective_n_threads(self.n_jobs),
            allowed=allowed,
        )
