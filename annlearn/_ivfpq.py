"""IVFPQNeighbors: inverted file with product quantization."""

from __future__ import annotations

import time
import warnings
import weakref
import zlib
from numbers import Integral

import numpy as np
from sklearn.base import _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, check_memory

from annlearn import _flat_search, _ivf
from annlearn._base import NeighborsBase, _megabytes, transactional
from annlearn._clustering import train_kmeans
from annlearn._flat import FlatNeighbors, _normalize_rows
from annlearn._persistence import PersistenceMixin, check_array_state
from annlearn._threads import effective_n_threads, flat_search_blas_guard
from annlearn._validation import (
    METRICS,
    check_new_ids,
    check_removed_ids,
    fitted_metric,
    user_stacklevel,
    validate_fit_data,
    validate_query_data,
)

__all__ = ["IVFPQNeighbors"]

# Rows encoded at once: bounds the residual buffer (ENCODE_BLOCK x n_features).
_ENCODE_BLOCK = 65_536

# Lloyd iterations of the coarse quantizer and of each sub-quantizer: FAISS's
# defaults for IndexIVFPQ (cp.niter = 10, pq.cp.niter = 25). The cells only
# need to spread the data evenly; the codebooks decide the distances.
_COARSE_MAX_ITER = 10
_PQ_MAX_ITER = 25
# k-means needs about this many training rows per centre (FAISS warns below).
_MIN_POINTS_PER_CENTRE = 39
# Warn above this imbalance factor of the cells (1.0: equal cells).
_MAX_IMBALANCE = 4.0

# Training-size warnings already shown in this process, by (kind, number of
# centres): a grid search fits clones on every fold, and one warning about a
# parameter value says all there is to say.
_WARNED_TRAINING: set = set()


def _checksum(X: np.ndarray) -> int:
    """CRC-32 of a C-contiguous array's bytes."""
    return zlib.crc32(memoryview(X).cast("B"))


def _train_and_encode(
    X: np.ndarray, params: dict, n_threads: int, verbose: int
) -> dict:
    """Train the quantizers of ``IVFPQNeighbors(**params)`` on prepared X and
    encode X: the part of ``fit`` that ``memory`` caches."""
    index = IVFPQNeighbors(**params, verbose=verbose)
    cells, codes = index._train(X, n_threads)
    return {
        "cluster_centers": index.cluster_centers_,
        "pq_codebooks": index.pq_codebooks_,
        "cells": cells,
        "codes": codes,
    }


def _weak_source(X, ids: np.ndarray, checksum: int):
    """(callable returning X or None, ids, shape, checksum), or None if X
    cannot be referenced.

    ``checksum`` is that of X validated as float32, so that ``score`` can
    tell that the array was overwritten since ``fit``.

    A view (``fit(X[:n])``) dies with the call that made it, so for a view of
    a contiguous array the reference is to that array, and the view is
    rebuilt from it on demand: the index keeps no copy either way.
    """
    owner = X
    while isinstance(owner, np.ndarray) and isinstance(owner.base, np.ndarray):
        owner = owner.base
    if owner is not X and owner.flags.c_contiguous:
        offset = X.__array_interface__["data"][0] - owner.__array_interface__["data"][0]
        shape, dtype, strides = X.shape, X.dtype, X.strides
        ref = weakref.ref(owner)

        def view():
            base = ref()
            if base is None:
                return None
            return np.ndarray(shape, dtype, buffer=base, offset=offset, strides=strides)

        return view, ids, shape, checksum
    try:
        return weakref.ref(X), ids, getattr(X, "shape", None), checksum
    except TypeError:
        return None


def _divisors(n: int) -> list[int]:
    return [m for m in range(1, n + 1) if n % m == 0]


def default_n_subquantizers(n_features: int) -> int:
    """The divisor of ``n_features`` closest to ``n_features / 8`` (sub-vectors
    of about 8 features; the smaller divisor on a tie)."""
    return min(_divisors(n_features), key=lambda m: (abs(m - n_features / 8), m))


class IVFPQNeighbors(PersistenceMixin, NeighborsBase):
    """Approximate k-nearest-neighbour search with an IVF-PQ index.

    The vectors are partitioned into ``nlist`` cells by k-means (the coarse
    quantizer, an inverted file), and each is stored as ``n_subquantizers``
    one-byte codes of its residual to its cell centre (product quantization).
    A query scans the codes of the ``nprobe`` cells nearest to it with
    asymmetric distance computation (lookup tables per query, the query
    itself never quantized) and optionally re-ranks the best candidates with
    exact distances.

    Parameters
    ----------
    n_neighbors : int, default=5
        Number of neighbours returned by ``kneighbors`` and used by
        ``transform``.
    nlist : int, default=256
        Number of cells of the coarse quantizer.
    nprobe : int, default=8
        Cells scanned per query; values above ``nlist`` scan every cell. A
        search-time parameter: changing it needs no refit. More cells, higher
        recall, slower. When the probed cells hold fewer than
        ``n_neighbors`` vectors, further cells are probed: results are never
        padded.
    n_subquantizers : int, default=None
        Number of sub-vectors (bytes per code), a divisor of ``n_features``.
        ``None`` picks the divisor closest to ``n_features / 8``.
    nbits : int, default=8
        Bits per sub-vector code, from 4 to 8: ``2**nbits`` centres per
        sub-quantizer.
    metric : str, default="euclidean"
        One of ``"euclidean"``, ``"sqeuclidean"``, ``"cosine"`` and
        ``"inner_product"``, defined as in :class:`FlatNeighbors` (a zero
        vector is at cosine distance 1 from everything). ``"cosine"``
        indexes normalised vectors and ranks them by inner product;
        ``"inner_product"`` uses inner-product cells and tables.
    refine_factor : int, default=None
        If set, keep a float32 copy of the vectors and re-rank the best
        ``refine_factor * n_neighbors`` candidates of each query by exact
        distance. Search-time for any value once the index was fitted with
        one (fitting with ``None`` stores no vectors).
    by_residual : bool, default=True
        Encode the residuals to the cell centres (more accurate) rather than
        the vectors.
    max_train_samples : int, default=None
        Rows drawn at random to train the quantizers; ``None`` means
        ``256 * max(nlist, 2**nbits)``. Every row is encoded.
    mode : {"distance", "connectivity"}, default="distance"
        What ``transform`` stores in the graph.
    memory : str, joblib.Memory or None, default=None
        Caches the trained quantizers and the codes of the training data
        (the expensive part of ``fit``), keyed by the data and the training
        parameters (``nlist``, ``n_subquantizers``, ``nbits``, ``metric``,
        ``by_residual``, ``max_train_samples``, ``random_state``): a ``fit``
        that differs from a cached one only in search-time parameters
        (``n_neighbors``, ``nprobe``, ``refine_factor``, ``mode``,
        ``n_jobs``) loads them instead of training again. This is what makes
        a :class:`~sklearn.model_selection.GridSearchCV` over ``nprobe``
        cheap. A path or a :class:`joblib.Memory`, as for
        :class:`sklearn.pipeline.Pipeline`; ``None`` caches nothing. With
        ``random_state=None`` a cached training is reused as is.
    random_state : int, RandomState instance or None, default=None
        Seeds the training sample and k-means.
    n_jobs : int, default=None
        Number of OpenMP threads of the kernels (not joblib processes).
        ``None`` honours ``OMP_NUM_THREADS``, threadpoolctl limits and the
        CPUs available; ``-1`` means all CPUs.
    verbose : int, default=0
        Print the stages of ``fit`` with their timing when > 0, and every
        k-means iteration when > 1.

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (nlist, n_features), float32
        Cell centres of the coarse quantizer.
    pq_codebooks_ : ndarray of shape (n_subquantizers, 2**nbits, dsub), float32
        Centres of each sub-quantizer, ``dsub = n_features // n_subquantizers``.
    n_subquantizers_ : int
        Sub-vectors per code.
    effective_metric_ : str
        The metric fitted and searched with. Training parameters (``metric``,
        ``nlist``, ``n_subquantizers``, ``nbits``, ``by_residual``) changed
        with ``set_params`` take effect at the next ``fit``.
    n_samples_fit_ : int
        Number of indexed vectors.
    n_features_in_ : int
        Number of features seen during ``fit``.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during ``fit``, when X has string column names.

    See Also
    --------
    FlatNeighbors : Exact search, the ground truth.

    Notes
    -----
    Memory per vector: ``n_subquantizers`` bytes of codes plus 8 bytes of id
    (codes are stored one byte per sub-vector even when ``nbits < 8``), plus
    ``4 * n_features`` bytes when ``refine_factor`` is set. The index also
    holds the cell centres, the codebooks and a table of
    ``nlist * n_subquantizers * 2**nbits`` floats (term 2 of the distance
    decomposition, see ``annlearn/_ivf.pyx``).

    Examples
    --------
    >>> import numpy as np
    >>> from annlearn import IVFPQNeighbors
    >>> X = np.random.default_rng(0).standard_normal((2000, 16))
    >>> index = IVFPQNeighbors(n_neighbors=3, nlist=8, nprobe=8, nbits=4,
    ...                        refine_factor=4, random_state=0).fit(X)
    >>> index.kneighbors(X[:2], return_distance=False)[:, 0]
    array([0, 1])
    """

    _parameter_constraints: dict = {
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "nlist": [Interval(Integral, 1, None, closed="left")],
        "nprobe": [Interval(Integral, 1, None, closed="left")],
        "n_subquantizers": [Interval(Integral, 1, None, closed="left"), None],
        "nbits": [Interval(Integral, 4, 8, closed="both")],
        "metric": [StrOptions(set(METRICS))],
        "refine_factor": [Interval(Integral, 1, None, closed="left"), None],
        "by_residual": ["boolean"],
        "max_train_samples": [Interval(Integral, 1, None, closed="left"), None],
        "mode": [StrOptions({"distance", "connectivity"})],
        "memory": [None, str, HasMethods(["cache"])],
        "random_state": ["random_state"],
        "n_jobs": [Integral, None],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        n_neighbors=5,
        *,
        nlist=256,
        nprobe=8,
        n_subquantizers=None,
        nbits=8,
        metric="euclidean",
        refine_factor=None,
        by_residual=True,
        max_train_samples=None,
        mode="distance",
        memory=None,
        random_state=None,
        n_jobs=None,
        verbose=0,
    ):
        self.n_neighbors = n_neighbors
        self.nlist = nlist
        self.nprobe = nprobe
        self.n_subquantizers = n_subquantizers
        self.nbits = nbits
        self.metric = metric
        self.refine_factor = refine_factor
        self.by_residual = by_residual
        self.max_train_samples = max_train_samples
        self.mode = mode
        self.memory = memory
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.verbose = verbose

    # -- fit ---------------------------------------------------------------
    @transactional
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, ids=None):
        """Train the coarse and product quantizers on X, then index X.

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
        self : IVFPQNeighbors
            The fitted estimator. On any error it is left exactly as it was.
        """
        source = X
        X = validate_fit_data(self, X)
        ids = check_new_ids(ids, len(X), None)
        n_samples, n_features = X.shape
        n_sub = self._check_n_subquantizers(n_features)
        ksub = 2**self.nbits
        needed = max(self.nlist, ksub)
        if n_samples < needed:
            raise ValueError(
                f"IVFPQNeighbors needs at least max(nlist, 2**nbits) = {needed} "
                f"samples to train its quantizers (nlist = {self.nlist}, "
                f"nbits = {self.nbits}), but n_samples = {n_samples}."
            )
        self._warn_small_training(self._n_train(n_samples))
        n_threads = effective_n_threads(self.n_jobs)
        checksum = _checksum(X)
        self.effective_metric_ = self.metric
        self._by_residual = self.by_residual
        X = self._prepare(X)
        train = check_memory(self.memory).cache(
            _train_and_encode, ignore=["n_threads", "verbose"]
        )
        trained = train(X, self._training_params(n_sub), n_threads, self.verbose)
        self.cluster_centers_ = trained["cluster_centers"]
        self.pq_codebooks_ = trained["pq_codebooks"]
        self.n_subquantizers_ = n_sub
        self._center_sqnorms = _flat_search.row_sqnorms(
            self.cluster_centers_, n_threads
        )
        self._derive_tables()
        cells, codes = trained["cells"], trained["codes"]
        self._set_store(*self._build_lists(cells, codes, ids, self._keep_vectors(X)))
        self._fit_source = _weak_source(source, ids, checksum)
        imbalance = self._imbalance_factor()
        largest = int(np.diff(self._store["list_offsets"]).max())
        if imbalance > _MAX_IMBALANCE:
            warnings.warn(
                f"IVFPQNeighbors cells are badly unbalanced: imbalance factor "
                f"{imbalance:.1f} (1.0 when every cell holds n_samples / nlist "
                f"vectors; the largest holds {largest} of {n_samples}). "
                "Queries that probe the large cells are slow; "
                "duplicated or clustered data, or too many cells for the data, "
                "cause this. Try a smaller nlist.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        return self

    def _imbalance_factor(self) -> float:
        """nlist * sum(cell sizes**2) / n**2: 1.0 for equal cells (FAISS's
        measure); the expected number of codes a probe scans, relative."""
        sizes = np.diff(self._store["list_offsets"]).astype(np.float64)
        n = sizes.sum()
        return float(len(sizes) * (sizes**2).sum() / n**2) if n else 1.0

    def summary(self) -> str:
        """What the fitted index holds: vectors, cells, bytes, memory.

        Returns
        -------
        summary : str
            Several lines: the number of vectors and features, the cell
            sizes and their imbalance factor, the code size, the bytes per
            vector, and the memory of the index by part.

        Examples
        --------
        >>> import numpy as np
        >>> from annlearn import IVFPQNeighbors
        >>> X = np.random.default_rng(0).standard_normal((2000, 16))
        >>> index = IVFPQNeighbors(nlist=8, nbits=4, random_state=0).fit(X)
        >>> print(index.summary())  # doctest: +ELLIPSIS
        IVFPQNeighbors: 2,000 vectors of 16 features, metric='euclidean'
          cells: 8 (vectors per cell: min ..., median ..., max ...; imbalance ...)
          codes: 2 sub-vectors x 4 bits per vector, stored one byte each
          bytes per vector: 10 in the lists (+ ... for the quantizers)
          memory: ... (lists ..., quantizers ..., lookup tables ...)
        """
        check_is_fitted(self)
        store = self._store
        n, d = self.n_samples_fit_, self.n_features_in_
        sizes = np.diff(store["list_offsets"])
        vectors = store["vectors"]
        lists = sum(
            a.nbytes for a in (store["list_offsets"], store["codes"], store["ids"])
        ) + (0 if vectors is None else vectors.nbytes)
        quantizers = self.cluster_centers_.nbytes + self.pq_codebooks_.nbytes
        tables = self._term2.nbytes + self._codebooks_t.nbytes
        per_vector = self.n_subquantizers_ + 8 + (0 if vectors is None else 4 * d)
        stored = "" if vectors is None else " + float32 vectors for re-ranking"
        return "\n".join(
            [
                f"IVFPQNeighbors: {n:,} vectors of {d} features, "
                f"metric={self.effective_metric_!r}",
                f"  cells: {len(sizes)} (vectors per cell: min {sizes.min()}, "
                f"median {int(np.median(sizes))}, max {sizes.max()}; imbalance "
                f"{self._imbalance_factor():.2f}, 1.00 is even)",
                f"  codes: {self.n_subquantizers_} sub-vectors x "
                f"{self.pq_codebooks_.shape[1].bit_length() - 1} bits "
                f"per vector, stored one byte each{stored}",
                f"  bytes per vector: {per_vector} in the lists (+ "
                f"{quantizers / max(n, 1):.1f} for the quantizers)",
                f"  memory: {_megabytes(lists + quantizers + tables)} (lists "
                f"{_megabytes(lists)}, quantizers {_megabytes(quantizers)}, "
                f"lookup tables {_megabytes(tables)})",
            ]
        )

    def _n_train(self, n_samples: int) -> int:
        """Rows the quantizers are trained on."""
        needed = max(self.nlist, 2**self.nbits)
        n_train = self.max_train_samples or 256 * needed
        return max(min(n_train, n_samples), needed)

    def _warn_small_training(self, n_train: int) -> None:
        """Warn when k-means gets fewer than ~39 rows per centre."""
        per_centre = _MIN_POINTS_PER_CENTRE
        cells_key = ("cells", self.nlist)
        if n_train < per_centre * self.nlist and cells_key not in _WARNED_TRAINING:
            _WARNED_TRAINING.add(cells_key)
            warnings.warn(
                f"IVFPQNeighbors trains nlist = {self.nlist} cells on {n_train} "
                f"rows, {n_train / self.nlist:.1f} per cell; k-means needs about "
                f"{per_centre} per cell to place them well. Give more rows "
                f"(max_train_samples) or use nlist <= {max(n_train // per_centre, 1)}. "
                "Shown once per nlist value.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        ksub = 2**self.nbits
        codes_key = ("codes", ksub)
        if n_train < per_centre * ksub and codes_key not in _WARNED_TRAINING:
            _WARNED_TRAINING.add(codes_key)
            fit_bits = int(np.log2(max(n_train // per_centre, 1)))
            warnings.warn(
                f"IVFPQNeighbors trains 2**nbits = {ksub} centres per sub-quantizer "
                f"on {n_train} rows, {n_train / ksub:.1f} per centre; k-means needs "
                f"about {per_centre} per centre. Give more rows (max_train_samples) "
                f"or use nbits <= {max(fit_bits, 4)}. Shown once per nbits value.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )

    def _training_params(self, n_sub: int) -> dict:
        """The parameters that determine the trained quantizers and codes."""
        return {
            "nlist": self.nlist,
            "n_subquantizers": n_sub,
            "nbits": self.nbits,
            "metric": self.metric,
            "by_residual": self.by_residual,
            "max_train_samples": self.max_train_samples,
            "random_state": self.random_state,
        }

    def _train(self, X: np.ndarray, n_threads: int):
        """Train both quantizers on (a sample of) prepared X, then encode X.

        Returns the cell and the codes of every row of X.
        """
        n_samples, n_features = X.shape
        n_sub = self.n_subquantizers
        ksub = 2**self.nbits
        rng = check_random_state(self.random_state)
        self.effective_metric_ = self.metric
        self._by_residual = self.by_residual

        n_train = self._n_train(n_samples)
        train_rows = np.sort(rng.choice(n_samples, n_train, replace=False))
        train = X[train_rows] if n_train < n_samples else X
        start = time.perf_counter()
        centers, _, _ = train_kmeans(
            train,
            self.nlist,
            max_iter=_COARSE_MAX_ITER,
            random_state=rng,
            n_threads=n_threads,
            verbose=self.verbose > 1,
            name="coarse quantizer",
        )
        self._log(
            f"coarse quantizer: {self.nlist} cells trained on {n_train} "
            f"rows in {time.perf_counter() - start:.2f} s"
        )
        self.cluster_centers_ = centers
        self._center_sqnorms = _flat_search.row_sqnorms(centers, n_threads)

        start = time.perf_counter()
        train_cells = self._assign(train, n_threads)
        residuals = self._residuals(train, train_cells)
        dsub = n_features // n_sub
        codebooks = np.empty((n_sub, ksub, dsub), dtype=np.float32)
        for m in range(n_sub):
            codebooks[m], _, _ = train_kmeans(
                np.ascontiguousarray(residuals[:, m * dsub : (m + 1) * dsub]),
                ksub,
                max_iter=_PQ_MAX_ITER,
                random_state=rng,
                n_threads=n_threads,
                verbose=self.verbose > 1,
                name=f"sub-quantizer {m}",
            )
        self.pq_codebooks_ = codebooks
        self.n_subquantizers_ = n_sub
        self._log(
            f"product quantizer: {n_sub} x {ksub} centres trained in "
            f"{time.perf_counter() - start:.2f} s"
        )
        self._derive_tables()

        start = time.perf_counter()
        cells, codes = self._encode(X, n_threads)
        self._log(f"encoded {n_samples} vectors in {time.perf_counter() - start:.2f} s")
        return cells, codes

    def _keep_vectors(self, X: np.ndarray) -> np.ndarray | None:
        return X if self.refine_factor is not None else None

    def _build_lists(self, cells, codes, ids, vectors):
        """Inverted lists from per-vector cells: everything sorted by cell."""
        order = np.argsort(cells, kind="stable")
        return (
            self._offsets_from_cells(cells),
            np.ascontiguousarray(codes[order]),
            np.ascontiguousarray(ids[order]),
            None if vectors is None else np.ascontiguousarray(vectors[order]),
        )

    def _offsets_from_cells(self, cells: np.ndarray) -> np.ndarray:
        """List offsets (nlist + 1,) of vectors sorted by their cells."""
        nlist = len(self.cluster_centers_)
        offsets = np.zeros(nlist + 1, dtype=np.int64)
        np.cumsum(np.bincount(cells, minlength=nlist), out=offsets[1:])
        return offsets

    def _set_store(self, offsets, codes, ids, vectors) -> None:
        # One assignment replaces the whole index, so a search running in
        # another thread sees either the old lists or the new ones.
        self._store = {
            "list_offsets": offsets,
            "codes": codes,
            "ids": ids,
            "vectors": vectors,
        }
        self.n_samples_fit_ = len(ids)
        # The vectors given to fit no longer describe the index.
        self._fit_source = None

    def _exact_reference(self) -> FlatNeighbors:
        """An exact index over the indexed vectors, for ``score``.

        From the stored vectors when ``refine_factor`` keeps them; otherwise
        from the array given to ``fit``, referenced weakly (the index does
        not keep a copy of what it compresses), as long as it is alive and
        the index was not changed since.
        """
        check_is_fitted(self)
        store = self._store
        if store["vectors"] is not None:
            vectors, ids = store["vectors"], store["ids"]
        else:
            # Checked on every call: the reference may share the fit array's
            # memory, which the caller can overwrite at any time.
            vectors, ids = self._fit_vectors()
        cached = getattr(self, "_exact_ref", None)
        if cached is not None and cached[0] is store:
            return cached[1]
        reference = FlatNeighbors(metric=self.effective_metric_, n_jobs=self.n_jobs)
        reference.fit(vectors, ids=ids)
        self._exact_ref = (store, reference)
        return reference

    def _fit_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """The prepared vectors given to ``fit`` and their ids, from the weak
        reference, if that array is alive, unchanged, and still the index's."""
        source = getattr(self, "_fit_source", None)
        X = source[0]() if source is not None else None
        if X is None or getattr(X, "shape", None) != source[2]:
            raise ValueError(
                "IVFPQNeighbors.score needs the indexed vectors to find the "
                "exact neighbours, but this index does not store them "
                "(refine_factor=None) and the array given to fit is gone, "
                "could not be referenced (a list), or the index changed since "
                "(add/remove). Keep the array given to fit alive, or set "
                "refine_factor to store the vectors."
            )
        Xv = validate_query_data(self, X)
        if _checksum(Xv) != source[3]:
            raise ValueError(
                "IVFPQNeighbors.score needs the indexed vectors to find the "
                "exact neighbours, but the array given to fit was modified "
                "since (its checksum changed), so it no longer holds the "
                "indexed vectors. Do not overwrite it while scoring, or set "
                "refine_factor to store the vectors."
            )
        return self._prepare(Xv), source[1]

    def _stored_cells(self, store: dict) -> np.ndarray:
        offsets = store["list_offsets"]
        return np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))

    @transactional
    def add(self, X, ids=None):
        """Encode and index more vectors with the fitted quantizers.

        Parameters
        ----------
        X : array-like of shape (n_new, n_features)
            Vectors to add, validated as in ``fit``. Nothing is retrained.
        ids : array-like of shape (n_new,), default=None
            Their ids: non-negative, distinct, not already in the index.
            ``None``: consecutive ids after the largest id in the index.

        Returns
        -------
        self : IVFPQNeighbors
            The estimator. On any error it is left exactly as it was. The
            lists are rebuilt (O(n_samples_fit_) copy), so add in batches.
        """
        X = validate_query_data(self, X)
        store = self._store
        ids = check_new_ids(ids, len(X), store["ids"])
        X = self._prepare(X)
        cells, codes = self._encode(X, effective_n_threads(self.n_jobs))
        vectors = None
        if store["vectors"] is not None:
            vectors = np.concatenate([store["vectors"], X])
        self._set_store(
            *self._build_lists(
                np.concatenate([self._stored_cells(store), cells]),
                np.concatenate([store["codes"], codes]),
                np.concatenate([store["ids"], ids]),
                vectors,
            )
        )
        return self

    @transactional
    def remove(self, ids):
        """Remove vectors by id; they are never returned again.

        The memory is reclaimed at once (the remaining codes are copied into
        new arrays, O(n_samples_fit_)).

        Parameters
        ----------
        ids : array-like of int
            Ids to remove. Every one must be in the index, otherwise a
            ``ValueError`` lists the unknown ones and nothing is removed.

        Returns
        -------
        self : IVFPQNeighbors
            The estimator.
        """
        check_is_fitted(self)
        store = self._store
        keep = ~check_removed_ids(ids, store["ids"])
        vectors = store["vectors"]
        self._set_store(
            self._offsets_from_cells(self._stored_cells(store)[keep]),
            np.ascontiguousarray(store["codes"][keep]),
            store["ids"][keep],
            None if vectors is None else np.ascontiguousarray(vectors[keep]),
        )
        return self

    def _log(self, message: str) -> None:
        if self.verbose:
            print(f"[IVFPQNeighbors] {message}")

    def _check_n_subquantizers(self, n_features: int) -> int:
        if self.n_subquantizers is None:
            return default_n_subquantizers(n_features)
        if n_features % self.n_subquantizers:
            raise ValueError(
                f"n_subquantizers must divide n_features = {n_features}, but "
                f"n_subquantizers = {self.n_subquantizers}. Valid values: "
                f"{_divisors(n_features)}."
            )
        return self.n_subquantizers

    def _prepare(self, X: np.ndarray) -> np.ndarray:
        return _normalize_rows(X) if fitted_metric(self) == "cosine" else X

    def _ranks_by_inner_product(self) -> bool:
        """Whether the codes are scanned by inner product: for
        ``"inner_product"``, and for ``"cosine"``, whose ``1 - <x, y>`` on
        normalised rows keeps a zero row at distance 1 (as FlatNeighbors and
        scikit-learn say) where ``||x - y||^2 / 2`` would put it at 0.5."""
        return fitted_metric(self) in ("inner_product", "cosine")

    def _coarse_metric(self) -> int:
        if fitted_metric(self) == "inner_product":
            return _flat_search.METRIC_INNER_PRODUCT
        return _flat_search.METRIC_SQEUCLIDEAN

    def _coarse_search(self, X: np.ndarray, nprobe: int, n_threads: int):
        """(term-1 distances, cells) of the ``nprobe`` nearest cells."""
        with flat_search_blas_guard():
            return _flat_search.flat_kneighbors(
                X,
                self.cluster_centers_,
                self._center_sqnorms,
                nprobe,
                self._coarse_metric(),
                n_threads,
            )

    def _assign(self, X: np.ndarray, n_threads: int) -> np.ndarray:
        return self._coarse_search(X, 1, n_threads)[1][:, 0]

    def _residuals(self, X: np.ndarray, cells: np.ndarray) -> np.ndarray:
        if not self._by_residual:
            return X
        return X - self.cluster_centers_[cells]

    _derived_attributes = ("_term2", "_codebooks_t")

    def _upgrade_state(self, state: dict, layout: int) -> dict:
        # Written before the fitted metric and residual flag were recorded:
        # the parameters were them.
        state.setdefault("effective_metric_", state.get("metric"))
        state.setdefault("_by_residual", state.get("by_residual"))
        return state

    def _check_state(self) -> None:
        store = getattr(self, "_store", None)
        keys = {"list_offsets", "codes", "ids", "vectors"}
        if not isinstance(store, dict) or set(store) != keys:
            raise ValueError("Corrupted IVFPQNeighbors state: no inverted lists.")
        name = "IVFPQNeighbors"
        # The fitted sizes come from the arrays, not from the parameters, which
        # set_params may have changed since fit.
        n, d = self.n_samples_fit_, self.n_features_in_
        n_sub = self.n_subquantizers_
        if n_sub < 1 or d % n_sub:
            raise ValueError(
                f"Corrupted IVFPQNeighbors state: n_subquantizers_ = {n_sub} does "
                f"not divide n_features_in_ = {d}."
            )
        metric = getattr(self, "effective_metric_", self.metric)
        if metric not in METRICS:
            raise ValueError(f"Corrupted IVFPQNeighbors state: metric {metric!r}.")
        check_array_state(
            name,
            "cluster_centers_",
            self.cluster_centers_,
            dtype=np.float32,
            ndim=2,
            shape=(None, d),
            finite=True,
        )
        nlist = len(self.cluster_centers_)
        check_array_state(
            name,
            "pq_codebooks_",
            self.pq_codebooks_,
            dtype=np.float32,
            ndim=3,
            shape=(n_sub, None, d // n_sub),
            finite=True,
        )
        ksub = self.pq_codebooks_.shape[1]
        if nlist < 1 or ksub not in (16, 32, 64, 128, 256):
            raise ValueError(
                f"Corrupted IVFPQNeighbors state: {nlist} cells and {ksub} "
                "centres per sub-quantizer (expected >= 1 and 2**4 to 2**8)."
            )
        check_array_state(
            name,
            "_center_sqnorms",
            self._center_sqnorms,
            dtype=np.float32,
            ndim=1,
            shape=(nlist,),
            finite=True,
        )
        offsets = store["list_offsets"]
        check_array_state(
            name,
            "list_offsets",
            offsets,
            dtype=np.int64,
            ndim=1,
            shape=(nlist + 1,),
        )
        if offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) < 0):
            raise ValueError(
                "Corrupted IVFPQNeighbors state: list_offsets must increase "
                f"from 0 to n_samples_fit_ = {n}."
            )
        check_array_state(
            name, "codes", store["codes"], dtype=np.uint8, ndim=2, shape=(n, n_sub)
        )
        check_array_state(
            name,
            "ids",
            store["ids"],
            dtype=np.int64,
            ndim=1,
            shape=(n,),
            low=0,
            distinct=True,
        )
        if store["vectors"] is not None:
            check_array_state(
                name,
                "vectors",
                store["vectors"],
                dtype=np.float32,
                ndim=2,
                shape=(n, d),
            )
        if ksub < 256 and n and int(store["codes"].max()) >= ksub:
            raise ValueError(
                f"Corrupted IVFPQNeighbors state: codes must be < 2**nbits = {ksub}."
            )

    def _derive_tables(self) -> None:
        """Search tables derived from the quantizers (not persisted)."""
        self._term2 = self._term2_tables()
        self._codebooks_t = np.ascontiguousarray(self.pq_codebooks_.transpose(0, 2, 1))

    def _term2_tables(self) -> np.ndarray:
        """Term 2 of the ADC decomposition (see ``_ivf.pyx``)."""
        codebooks = self.pq_codebooks_
        n_sub, ksub, dsub = codebooks.shape
        if self._ranks_by_inner_product():
            return np.zeros((0, n_sub, ksub), dtype=np.float32)
        norms = np.einsum("mkd,mkd->mk", codebooks, codebooks)[None]
        if not self._by_residual:
            return norms.astype(np.float32)
        centers = self.cluster_centers_.reshape(-1, n_sub, dsub)
        cross = np.einsum("cmd,mkd->cmk", centers, codebooks)
        return np.ascontiguousarray(norms + 2 * cross, dtype=np.float32)

    def _encode(self, X: np.ndarray, n_threads: int):
        """Cells and PQ codes of the rows of X, in blocks of rows."""
        n_sub, ksub, dsub = self.pq_codebooks_.shape
        codebook_sqnorms = [
            _flat_search.row_sqnorms(cb, n_threads) for cb in self.pq_codebooks_
        ]
        cells = np.empty(len(X), dtype=np.int64)
        codes = np.empty((len(X), n_sub), dtype=np.uint8)
        for start in range(0, len(X), _ENCODE_BLOCK):
            block = X[start : start + _ENCODE_BLOCK]
            cells[start : start + len(block)] = self._assign(block, n_threads)
            residuals = self._residuals(block, cells[start : start + len(block)])
            with flat_search_blas_guard():
                for m in range(n_sub):
                    sub = np.ascontiguousarray(residuals[:, m * dsub : (m + 1) * dsub])
                    codes[start : start + len(block), m] = _flat_search.flat_kneighbors(
                        sub,
                        self.pq_codebooks_[m],
                        codebook_sqnorms[m],
                        1,
                        _flat_search.METRIC_SQEUCLIDEAN,
                        n_threads,
                    )[1][:, 0]
        return cells, codes

    def _decode(self, store: dict, positions: np.ndarray) -> np.ndarray:
        """Reconstructions of stored vectors (cell centre + decoded residual)."""
        codes = store["codes"][positions]
        parts = [self.pq_codebooks_[m][codes[:, m]] for m in range(codes.shape[1])]
        vectors = np.hstack(parts)
        if self._by_residual:
            offsets = store["list_offsets"]
            cells = np.searchsorted(offsets, positions, side="right") - 1
            vectors = vectors + self.cluster_centers_[cells]
        return np.ascontiguousarray(vectors, dtype=np.float32)

    # -- hooks of NeighborsBase -------------------------------------------
    def _prepare_queries(self, X: np.ndarray) -> np.ndarray:
        return self._prepare(X)

    def _indexed_queries(self, store: dict, positions: np.ndarray) -> np.ndarray:
        # The stored vectors when kept, else the reconstructions from the codes.
        if store["vectors"] is not None:
            return np.ascontiguousarray(store["vectors"][positions])
        return self._decode(store, positions)

    def _search(
        self, store: dict, X: np.ndarray, n_neighbors: int
    ) -> tuple[np.ndarray, np.ndarray]:
        n_threads = effective_n_threads(self.n_jobs)
        if self.refine_factor is not None and store["vectors"] is None:
            raise ValueError(
                "refine_factor is set but this index was fitted with "
                "refine_factor=None and keeps no vectors to re-rank: fit it "
                "again with refine_factor set."
            )
        nlist = len(self.cluster_centers_)
        n_scan = n_neighbors * (self.refine_factor or 1)
        n_scan = min(n_scan, len(store["ids"]))
        nprobe = min(self.nprobe, nlist)
        distances, positions = self._scan(store, X, nprobe, n_scan, n_threads)
        # Too few codes in the probed cells: probe further cells for those
        # queries (never pad with -1), doubling nprobe up to nlist.
        short = np.flatnonzero(positions[:, n_neighbors - 1] < 0)
        while len(short) and nprobe < nlist:
            nprobe = min(2 * nprobe, nlist)
            d_more, p_more = self._scan(store, X[short], nprobe, n_scan, n_threads)
            distances[short], positions[short] = d_more, p_more
            short = short[p_more[:, n_neighbors - 1] < 0]
        ip = self._ranks_by_inner_product()
        if self.refine_factor is not None:
            distances, positions = _ivf.refine(
                X, store["vectors"], positions, n_neighbors, ip, n_threads
            )
        distances = np.ascontiguousarray(distances[:, :n_neighbors])
        positions = positions[:, :n_neighbors]
        metric = fitted_metric(self)
        if metric == "cosine":
            # -<x, y> on normalised rows (zero rows stay zero): 1 - cosine.
            distances += 1.0
            np.clip(distances, 0.0, 2.0, out=distances)
        elif not ip:
            np.maximum(distances, 0, out=distances)
            if metric == "euclidean":
                np.sqrt(distances, out=distances)
        return distances, positions

    def _scan(self, store, X: np.ndarray, nprobe: int, n_scan: int, n_threads: int):
        base, cells = self._coarse_search(X, nprobe, n_threads)
        ip = self._ranks_by_inner_product()
        if not self._by_residual:
            if ip:
                base = np.zeros_like(base)
            else:
                sq = _flat_search.row_sqnorms(X, n_threads)
                base = np.ascontiguousarray(np.repeat(sq[:, None], nprobe, axis=1))
        elif fitted_metric(self) == "cosine":
            # Cells are probed by L2, codes scanned by inner product: term 1
            # becomes -<x, c> = (||x - c||^2 - ||x||^2 - ||c||^2) / 2.
            sq = _flat_search.row_sqnorms(X, n_threads)
            base = 0.5 * (base - sq[:, None] - self._center_sqnorms[cells])
        return _ivf.ivfpq_scan(
            X,
            cells,
            base,
            self._codebooks_t,
            self._term2,
            store["list_offsets"],
            store["codes"],
            n_scan,
            ip,
            n_threads,
        )
