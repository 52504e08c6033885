"""IVFPQNeighbors: the scikit-learn estimator over an IVF-PQ index.

It validates once and composes: an :class:`~annlearn._ivfpq_codec.IVFPQCodec`
(coarse quantizer + product quantizer, trained at ``fit``) and the
:class:`~annlearn._invlists.InvertedLists` holding the codes, replaced whole
by ``add`` and ``remove``.
"""

from __future__ import annotations

import time
import warnings
from numbers import Integral, Real

import numpy as np
from sklearn.base import _fit_context
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, check_memory

from annlearn import _calibration
from annlearn._base import NeighborsBase, _drop_self, transactional
from annlearn._fit_source import FitSource, checksum
from annlearn._flat import FlatNeighbors, _normalize_rows
from annlearn._invlists import InvertedLists
from annlearn._ivfpq_codec import IVFPQCodec, train_and_encode
from annlearn._persistence import PersistenceMixin
from annlearn._quantizers import (
    VECTOR_DTYPES,
    CoarseQuantizer,
    ProductQuantizer,
    ScalarQuantizer,
)
from annlearn._threads import effective_n_threads
from annlearn._validation import (
    METRICS,
    check_new_ids,
    fitted_metric,
    user_stacklevel,
    validate_fit_data,
    validate_query_data,
)
from annlearn.metrics import recall_at_k

__all__ = ["IVFPQNeighbors"]

# k-means needs about this many training rows per centre (FAISS warns below).
_MIN_POINTS_PER_CENTRE = 39
# Warn above this imbalance factor of the cells (1.0: equal cells).
_MAX_IMBALANCE = 4.0
# by_residual="auto" compares the two codes on held-out rows only from this
# many rows up (100 held-out queries); below it, codes of the residuals.
_AUTO_MIN_SAMPLES = 1_000


def _codec(metric, centers, lift, codebooks, by_residual) -> IVFPQCodec:
    """The codec of fitted quantizer arrays, searching by ``metric``."""
    cells_metric = "inner_product" if metric == "inner_product" else "l2"
    return IVFPQCodec(
        CoarseQuantizer(centers, cells_metric, lift),
        ProductQuantizer(codebooks),
        metric,
        by_residual,
    )


# Training-size warnings already shown in this process, by (kind, number of
# centres): a grid search fits clones on every fold, and one warning about a
# parameter value says all there is to say.
_WARNED_TRAINING: set = set()


def _divisors(n: int) -> list[int]:
    return [m for m in range(1, n + 1) if n % m == 0]


def default_n_subquantizers(n_features: int) -> int:
    """The divisor of ``n_features`` closest to ``n_features / 8`` (sub-vectors
    of about 8 features; the smaller divisor on a tie)."""
    return min(_divisors(n_features), key=lambda m: (abs(m - n_features / 8), m))


def _n_subquantizers(n_subquantizers: int | None, n_features: int) -> int:
    """The parameter checked against the data, or its default."""
    if n_subquantizers is None:
        return default_n_subquantizers(n_features)
    if n_features % n_subquantizers:
        raise ValueError(
            f"n_subquantizers must divide n_features = {n_features}, but "
            f"n_subquantizers = {n_subquantizers}. Valid values: "
            f"{_divisors(n_features)}."
        )
    return n_subquantizers


def _training_rows(n_samples, nlist, nbits, max_train_samples) -> int:
    """Rows to train the quantizers on; a ValueError if there are too few
    for the requested centres, a warning if too few to place them well."""
    needed = max(nlist, 2**nbits)
    if n_samples < needed:
        raise ValueError(
            f"IVFPQNeighbors needs at least max(nlist, 2**nbits) = {needed} "
            f"samples to train its quantizers (nlist = {nlist}, nbits = {nbits}), "
            f"but n_samples = {n_samples}."
        )
    n_train = max(min(max_train_samples or 256 * needed, n_samples), needed)
    _warn_small_training(n_train, nlist, 2**nbits)
    return n_train


def _warn_small_training(n_train: int, nlist: int, ksub: int) -> None:
    """Warn when k-means gets fewer than ~39 rows per centre."""
    per_centre = _MIN_POINTS_PER_CENTRE
    if n_train < per_centre * nlist and ("cells", nlist) not in _WARNED_TRAINING:
        _WARNED_TRAINING.add(("cells", nlist))
        warnings.warn(
            f"IVFPQNeighbors trains nlist = {nlist} cells on {n_train} rows, "
            f"{n_train / nlist:.1f} per cell; k-means needs about {per_centre} "
            "per cell to place them well. Give more rows (max_train_samples) or "
            f"use nlist <= {max(n_train // per_centre, 1)}. Shown once per "
            "nlist value.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    if n_train < per_centre * ksub and ("codes", ksub) not in _WARNED_TRAINING:
        _WARNED_TRAINING.add(("codes", ksub))
        fit_bits = int(np.log2(max(n_train // per_centre, 1)))
        warnings.warn(
            f"IVFPQNeighbors trains 2**nbits = {ksub} centres per sub-quantizer "
            f"on {n_train} rows, {n_train / ksub:.1f} per centre; k-means needs "
            f"about {per_centre} per centre. Give more rows (max_train_samples) "
            f"or use nbits <= {max(fit_bits, 4)}. Shown once per nbits value.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


def _warn_imbalance(lists: InvertedLists) -> None:
    imbalance = lists.imbalance_factor()
    if imbalance > _MAX_IMBALANCE:
        warnings.warn(
            f"IVFPQNeighbors cells are badly unbalanced: imbalance factor "
            f"{imbalance:.1f} (1.0 when every cell holds n_samples / nlist "
            f"vectors; the largest holds {lists.sizes().max()} of {len(lists)}). "
            "Queries that probe the large cells are slow; duplicated or "
            "clustered data, or too many cells for the data, cause this. Try a "
            "smaller nlist.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


class IVFPQNeighbors(PersistenceMixin, NeighborsBase):
    """Approximate k-nearest-neighbour search with an IVF-PQ index.

    k-means cells (an inverted file) and product-quantization codes of the
    residuals to the cell centres: a query scans the codes of its ``nprobe``
    nearest cells with per-query lookup tables and optionally re-ranks the
    best candidates by exact distance.

    Parameters
    ----------
    n_neighbors : int, default=5
        Number of neighbours returned by ``kneighbors`` and used by
        ``transform``.
    radius : float, default=1.0
        Distance within which ``radius_neighbors`` and
        ``radius_neighbors_graph`` look by default, in the metric's units.
    nlist : int, default=256
        Number of cells of the coarse quantizer.
    nprobe : int, default=8
        Cells scanned per query (search time: no refit); more is slower and
        finds more. Further cells are probed when these hold fewer than
        ``n_neighbors`` vectors: results are never padded.
    n_subquantizers : int, default=None
        Number of sub-vectors (bytes per code), a divisor of ``n_features``.
        ``None`` picks the divisor closest to ``n_features / 8``.
    nbits : int, default=4
        Bits per sub-vector code, from 4 to 8: ``2**nbits`` centres per
        sub-quantizer. 4-bit codes are scanned 32 at a time with lookup
        tables quantized to 8 bits (user guide, "Fast scan"); 8-bit codes
        rank better without re-ranking.
    metric : str, default="euclidean"
        ``"euclidean"``, ``"sqeuclidean"``, ``"cosine"`` or
        ``"inner_product"``, as in :class:`FlatNeighbors`. Inner-product
        cells are built on lifted vectors (user guide, "Inner-product
        cells").
    refine_factor : int, default=4
        If set, keep a copy of the vectors (stored as ``vector_dtype``) and
        re-rank the best ``refine_factor * n_neighbors`` candidates by exact
        distance to it (search time, once fitted with a value: ``None``
        stores no vectors, for the smallest index). The defaults (4-bit
        codes of about 8 features each, re-ranking 4 * k candidates, nprobe
        8) are chosen in the user guide, "Defaults".
    vector_dtype : {"float32", "float16", "uint8"}, default="float32"
        How the copy kept for re-ranking stores each feature (used when
        ``refine_factor`` is set at ``fit``; the user guide, "Compact vectors
        for re-ranking", compares them):

        - ``"float32"``: the vectors as given, 4 bytes per feature;
        - ``"float16"``: 2 bytes, about 3 significant digits; ``fit`` and
          ``add`` refuse values of magnitude above 65504;
        - ``"uint8"``: 1 byte, per-feature scalar quantization
          ``offset + scale * code`` over the range of each feature at
          ``fit``. Features whose values are integers spanning at most 256
          values (8-bit data such as pixels) are stored exactly, so
          re-ranking and its distances are those of ``"float32"``. Values
          that ``add`` brings outside what the codes cover (the range at
          ``fit``; 256 integers from the minimum for 8-bit features) are
          clipped to it, with a warning. With ``"cosine"`` the normalised
          rows are quantized, which is never exact.

        Distances after re-ranking are exact to the stored vectors, and
        ``score`` compares with exact search over them.
    target_recall : float in (0, 1], default=None
        Recall@``n_neighbors`` to reach, as fast as possible: ``fit`` then
        chooses the search-time ``nprobe`` and ``refine_factor`` itself
        (``nprobe_``, ``refine_factor_``), and searches use them instead of
        the parameters (``refine_factor=None`` still stores no vectors, and
        only ``nprobe`` is chosen). Up to 1,000 rows (a tenth of X at most)
        are held out of training to measure the recall as new queries would
        see it (user guide, "A recall target"); expect the recall of new
        queries from the same distribution within about 0.01 of the target.
        A target out of reach warns and keeps the setting with the highest
        recall measured. Calibrated at ``fit`` only: ``add``, ``remove``
        and ``set_params`` keep the settings, a new ``fit`` recalibrates.
    by_residual : bool or "auto", default="auto"
        Whether the codes are of the residuals to the cell centres (True) or
        of the vectors themselves (False). Residuals are smaller and usually
        rank better (images, generated embeddings); sentence embeddings
        ranked by inner product rank better by codes of the vectors (recall
        0.90 against 0.87 at ``nprobe=32, refine_factor=16`` on 384-d
        MiniLM embeddings). With codes of the vectors, inner-product cells
        are spherical (user guide, "Inner-product cells"). ``"auto"`` trains
        both and keeps the one whose index finds more of the true neighbours
        of up to 1,000 rows held out of training (a tenth of X at most),
        searched at ``nprobe`` and ``refine_factor``; the residuals' on a tie
        and below 1,000 rows. ``by_residual_`` tells which.
    max_train_samples : int, default=None
        Rows drawn at random to train the quantizers; ``None`` means
        ``256 * max(nlist, 2**nbits)``. The sub-quantizers train on at most
        ``256 * 2**nbits`` of them (as FAISS does). Every row is encoded.
    mode : {"distance", "connectivity"}, default="distance"
        What ``transform`` stores in the graph.
    memory : str, joblib.Memory or None, default=None
        Caches the training (quantizers and codes) as
        :class:`sklearn.pipeline.Pipeline` caches its steps, so that a grid
        search over search-time parameters trains once. With
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
    by_residual_ : bool
        Whether the codes are of the residuals (see ``by_residual``).
    effective_metric_ : str
        The metric fitted and searched with (training parameters changed by
        ``set_params`` take effect at the next ``fit``).
    n_samples_fit_ : int
        Number of indexed vectors.
    n_features_in_ : int
        Number of features seen during ``fit``.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during ``fit``, when X has string column names.
    nprobe_ : int
        Cells the searches probe, chosen by ``fit`` for ``target_recall``
        (only when fitted with one).
    refine_factor_ : int or None
        Re-ranking depth the searches use, chosen with ``nprobe_``.
    calibration_recall_ : float
        Recall@``n_neighbors`` of ``nprobe_`` and ``refine_factor_`` on the
        held-out rows (below ``target_recall`` only if out of reach).
    calibration_results_ : dict of ndarray
        The settings compared: for each ``nprobe`` that is the smallest
        reaching the target with some ``refine_factor``, the smallest such
        ``refine_factor``. Keys ``"nprobe"``, ``"refine_factor"`` (0 for
        none), ``"recall"``, ``"cost"`` (microseconds per query that a cost
        model, fitted on this machine kind, gives the part of the search the
        settings change; the lowest is chosen, so that a fit with a given
        ``random_state`` always chooses alike) and ``"qps"`` (queries per
        second of the search that measured the recall).

    See Also
    --------
    FlatNeighbors : Exact search, the ground truth.

    Notes
    -----
    Memory per vector: ``n_subquantizers`` bytes of codes (one byte each,
    whatever ``nbits``; 4-bit codes are also kept packed, two per byte, for
    the fast scan) and 8 bytes of id, plus ``4 * n_features`` bytes when
    ``refine_factor`` is set (2 with ``vector_dtype="float16"``, 1 with
    ``"uint8"``); ``summary()`` reports the whole index.

    Examples
    --------
    >>> import numpy as np
    >>> from annlearn import IVFPQNeighbors
    >>> X = np.random.default_rng(0).standard_normal((2000, 16))
    >>> index = IVFPQNeighbors(n_neighbors=3, nlist=8, nprobe=8, nbits=4,
    ...                        n_subquantizers=4, refine_factor=4,
    ...                        random_state=0).fit(X)
    >>> index.kneighbors(X[:2], return_distance=False)[:, 0]
    array([0, 1])
    """

    _parameter_constraints: dict = {
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "radius": [Interval(Real, None, None, closed="neither")],
        "nlist": [Interval(Integral, 1, None, closed="left")],
        "nprobe": [Interval(Integral, 1, None, closed="left")],
        "n_subquantizers": [Interval(Integral, 1, None, closed="left"), None],
        "nbits": [Interval(Integral, 4, 8, closed="both")],
        "metric": [StrOptions(set(METRICS))],
        "refine_factor": [Interval(Integral, 1, None, closed="left"), None],
        "vector_dtype": [StrOptions(set(VECTOR_DTYPES))],
        "target_recall": [Interval(Real, 0, 1, closed="right"), None],
        "by_residual": ["boolean", StrOptions({"auto"})],
        "max_train_samples": [Interval(Integral, 1, None, closed="left"), None],
        "mode": [StrOptions({"distance", "connectivity"})],
        "memory": [None, str, HasMethods(["cache"])],
        "random_state": ["random_state"],
        "n_jobs": [Integral, None],
        "verbose": ["verbose"],
    }
    _derived_attributes = ("_codec",)

    def __init__(
        self,
        n_neighbors=5,
        *,
        radius=1.0,
        nlist=256,
        nprobe=8,
        n_subquantizers=None,
        nbits=4,
        metric="euclidean",
        refine_factor=4,
        vector_dtype="float32",
        target_recall=None,
        by_residual="auto",
        max_train_samples=None,
        mode="distance",
        memory=None,
        random_state=None,
        n_jobs=None,
        verbose=0,
    ):
        self.n_neighbors = n_neighbors
        self.radius = radius
        self.nlist = nlist
        self.nprobe = nprobe
        self.n_subquantizers = n_subquantizers
        self.nbits = nbits
        self.metric = metric
        self.refine_factor = refine_factor
        self.vector_dtype = vector_dtype
        self.target_recall = target_recall
        self.by_residual = by_residual
        self.max_train_samples = max_train_samples
        self.mode = mode
        self.memory = memory
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.verbose = verbose

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
        n_sub = _n_subquantizers(self.n_subquantizers, X.shape[1])
        n_train = _training_rows(len(X), self.nlist, self.nbits, self.max_train_samples)
        n_threads = effective_n_threads(self.n_jobs)
        held_out = None
        # "auto" compares on held-out rows when X has rows to spare for them.
        compare = (
            self.by_residual == "auto"
            and len(X) >= _AUTO_MIN_SAMPLES
            and len(X) - max(self.nlist, 2**self.nbits, self.n_neighbors)
            >= len(X) // 10
        )
        if self.target_recall is not None or compare:
            held_out = _calibration.held_out_rows(
                len(X),
                max(self.nlist, 2**self.nbits),
                self.n_neighbors,
                self.random_state,
            )
        # score finds the exact neighbours in the stored vectors when kept,
        # else in the fit array, whose checksum tells if it was overwritten.
        keep_vectors = self.refine_factor is not None
        crc = None if keep_vectors else checksum(X)
        self.effective_metric_ = self.metric
        X = self._prepare(X)
        sq = vectors = None
        if keep_vectors:
            # Before training: float16 may refuse X.
            sq = ScalarQuantizer.train(X, self.vector_dtype, n_threads)
            vectors, _ = sq.encode(X, n_threads)
        params = {
            "nlist": self.nlist,
            "M": n_sub,
            "nbits": self.nbits,
            "metric": self.metric,
            # Below _AUTO_MIN_SAMPLES rows, "auto" codes the residuals.
            "by_residual": "auto" if compare else self.by_residual in (True, "auto"),
            "n_train": n_train,
            "random_state": self.random_state,
        }
        if held_out is not None:
            params["held_out"] = held_out
        train = check_memory(self.memory).cache(
            train_and_encode, ignore=["n_threads", "verbose"]
        )
        trained = train(X, params, n_threads, self.verbose)
        encodings = trained["encodings"]
        measure = None
        if held_out is not None:
            measure = self._held_out_recall(X, ids, held_out, n_threads)
        chosen, lists = encodings[0], None
        if len(encodings) > 1:
            chosen, lists = self._choose_encoding(measure, trained, ids, vectors, sq)
        self._by_residual = chosen["by_residual"]
        self.cluster_centers_ = chosen["cluster_centers"]
        self._ip_lift = chosen["cells_lift"]
        self.pq_codebooks_ = chosen["pq_codebooks"]
        self.n_subquantizers_ = n_sub
        self._codec = self._make_codec()
        # Saved with the state (older files have it); the quantizer's own.
        self._center_sqnorms = self._codec.quantizer.sqnorms
        if lists is None:
            lists = InvertedLists.from_cells(
                self.nlist, chosen["cells"], chosen["codes"], ids, vectors, sq
            )
        self._set_store(lists)
        if not keep_vectors:
            self._fit_source = FitSource.of(source, ids, crc)
        _warn_imbalance(lists)
        calibration = None
        if self.target_recall is not None:
            calibration = self._calibrate(measure, X[held_out], n_threads)
        self._set_calibration(calibration)
        return self

    @property
    def by_residual_(self) -> bool:
        """Whether the codes are of the residuals to the cell centres."""
        check_is_fitted(self, "pq_codebooks_")
        return bool(self._by_residual)

    # -- internals ---------------------------------------------------------
    def _held_out_recall(
        self, X: np.ndarray, ids: np.ndarray, held_out: np.ndarray, n_threads: int
    ):
        """``measure(codec, lists, nprobe, refine_factor) -> (recall,
        seconds)``: the recall@``n_neighbors`` of an index of prepared X
        searched with the ``held_out`` rows (which trained no quantizer) as
        queries, and the search's time. Each query finds itself in the
        index: it searches one more neighbour and one more candidate, and its
        own row is dropped, so that it sees the index of the same size as a
        new query would."""
        queries = X[held_out]
        own_ids = ids[held_out]
        k = self.n_neighbors
        reference = FlatNeighbors(
            algorithm="brute", metric=self.metric, n_jobs=self.n_jobs
        ).fit(X, ids=ids)
        ref_queries = reference._prepare_queries(queries)
        true_dist, true_ids = reference.kneighbors(ref_queries, k + 1)
        true_dist, true_ids = _drop_self(true_dist, true_ids, own_ids)
        true_dist = reference._exact_distances(ref_queries, true_ids)

        def measure(codec, lists, nprobe, refine_factor):
            start = time.perf_counter()
            distances, positions = codec.search(
                lists,
                queries,
                k + 1,
                nprobe=nprobe,
                refine_factor=refine_factor,
                n_threads=n_threads,
                n_candidates=k * (refine_factor or 1) + 1,
            )
            seconds = time.perf_counter() - start
            _, found = _drop_self(distances, lists.ids[positions], own_ids)
            # Exact distances for the ids not among the true ones only: the
            # tie rule (recall_at_k) decides nothing else.
            missed = ~(found[:, :, None] == true_ids[:, None, :]).any(axis=2)
            found_dist = np.zeros(found.shape)
            rows, cols = np.nonzero(missed)
            found_dist[rows, cols] = reference._exact_distances(
                ref_queries[rows], found[rows, cols][:, None]
            )[:, 0]
            recall = recall_at_k(
                true_ids, found, true_distances=true_dist, pred_distances=found_dist
            )
            return recall, seconds

        return measure

    def _choose_encoding(self, measure, trained, ids, vectors, sq):
        """For ``by_residual="auto"``: the encoding of ``trained`` whose index
        has the highest recall of the held-out rows (``measure``, see
        ``_held_out_recall``) at this estimator's ``nprobe`` and
        ``refine_factor`` (the residuals' on a tie), and its inverted lists."""
        recalls, indexes = {}, []
        for encoding in trained["encodings"]:
            codec = _codec(
                self.metric,
                encoding["cluster_centers"],
                encoding["cells_lift"],
                encoding["pq_codebooks"],
                encoding["by_residual"],
            )
            lists = InvertedLists.from_cells(
                self.nlist, encoding["cells"], encoding["codes"], ids, vectors, sq
            )
            name = "residuals" if encoding["by_residual"] else "vectors"
            recalls[name] = measure(codec, lists, self.nprobe, self.refine_factor)[0]
            indexes.append(lists)
        best = int(recalls["vectors"] > recalls["residuals"])
        if self.verbose:
            print(
                f"[IVFPQNeighbors] recall@{self.n_neighbors} of the held-out "
                f"rows: codes of the residuals {recalls['residuals']:.4f}, of "
                f"the vectors {recalls['vectors']:.4f}"
            )
        return trained["encodings"][best], indexes[best]

    def _calibrate(
        self, held_out_recall, queries: np.ndarray, n_threads: int
    ) -> _calibration.Calibration:
        """Settings for ``target_recall``, measured with the held-out rows
        ``queries`` (``held_out_recall``, see ``_held_out_recall``)."""
        lists = self._store
        k = self.n_neighbors

        def measure(nprobe, refine_factor):
            return held_out_recall(self._codec, lists, nprobe, refine_factor)

        # Rows per probed cell of each query, nearest first (-1: none).
        sizes = np.append(lists.sizes(), 0)
        probed = np.empty((len(queries), 0), dtype=np.int64)

        def cost(nprobe, refine_factor):
            nonlocal probed
            if probed.shape[1] < nprobe:
                width = min(self.nlist, max(nprobe, 2 * probed.shape[1], 64))
                probed = self._codec.probe(queries, width, n_threads)[0]
            features = _calibration.cost_features(
                scanned=sizes[probed[:, :nprobe]].sum(axis=1).mean(),
                nprobe=nprobe,
                refine_factor=refine_factor,
                n_neighbors=k,
                n_features=queries.shape[1],
                n_subquantizers=self.n_subquantizers_,
                nbits=self.nbits,
            )
            return float(features @ _calibration.COSTS)

        keep_vectors = lists.vectors is not None
        calibration = _calibration.choose_settings(
            measure,
            cost,
            target=self.target_recall,
            nlist=self.nlist,
            refine_factors=_calibration.REFINE_FACTORS if keep_vectors else (None,),
            n_queries=len(queries),
            deeper=_calibration.DEEP_REFINE_FACTORS if keep_vectors else (),
        )
        if self.verbose:
            print(
                f"[IVFPQNeighbors] calibrated on {len(queries)} held-out rows: "
                f"nprobe={calibration.nprobe}, "
                f"refine_factor={calibration.refine_factor}, "
                f"recall@{k} {calibration.recall:.4f}"
            )
        if not calibration.reached:
            warnings.warn(
                f"IVFPQNeighbors cannot reach target_recall={self.target_recall}: "
                f"the highest recall@{k} measured on {len(queries)} held-out rows "
                f"is {calibration.recall:.4f}, at nprobe={calibration.nprobe} and "
                f"refine_factor={calibration.refine_factor}, which searches use. "
                + (
                    "Store vectors to re-rank (refine_factor=4), or use "
                    if not keep_vectors
                    else "Use "
                )
                + "more sub-quantizers or nbits=8 for a higher recall.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        return calibration

    def _set_calibration(self, calibration) -> None:
        names = ("nprobe_", "refine_factor_", "calibration_recall_")
        if calibration is None:
            for name in (*names, "calibration_results_"):
                self.__dict__.pop(name, None)
            return
        self.nprobe_ = calibration.nprobe
        self.refine_factor_ = calibration.refine_factor
        self.calibration_recall_ = calibration.recall
        self.calibration_results_ = calibration.results

    def _search_settings(self) -> tuple[int, int | None]:
        """``(nprobe, refine_factor)`` of a search: calibrated at fit for a
        target recall, else the parameters."""
        if hasattr(self, "nprobe_"):
            return self.nprobe_, self.refine_factor_
        return self.nprobe, self.refine_factor

    def _prepare(self, X: np.ndarray) -> np.ndarray:
        return _normalize_rows(X) if fitted_metric(self) == "cosine" else X

    def _make_codec(self) -> IVFPQCodec:
        return _codec(
            fitted_metric(self),
            self.cluster_centers_,
            self._ip_lift,
            self.pq_codebooks_,
            self._by_residual,
        )

    def _store_with(self, lists: InvertedLists, X: np.ndarray, ids) -> InvertedLists:
        X = self._prepare(X)
        n_threads = effective_n_threads(self.n_jobs)
        vectors = None
        if lists.vectors is not None:
            vectors = lists.sq.encode_added(
                X, "IVFPQNeighbors", "the uint8 copy kept for re-ranking", n_threads
            )
        cells, codes = self._codec.encode(X, n_threads)
        return lists.add(cells, codes, ids, vectors)

    def _set_store(self, lists: InvertedLists) -> None:
        # One assignment replaces the whole index, so a search running in
        # another thread sees either the old lists or the new ones.
        self._store = lists
        self.n_samples_fit_ = len(lists)
        # Saved with the state: the uint8 quantizer of the stored vectors.
        sq = lists.sq
        self._vector_offset = None if sq is None else sq.offset
        self._vector_scale = None if sq is None else sq.scale
        # The vectors given to fit no longer describe the index.
        self._fit_source = None

    def _exact_reference(self) -> FlatNeighbors:
        # From the stored vectors, else from the array given to fit while it
        # is alive and unchanged (annlearn/_fit_source.py).
        check_is_fitted(self)
        lists = self._store
        if lists.vectors is not None:
            vectors, ids = lists.decoded_vectors(), lists.ids
        else:
            # Checked on every call: the reference may share the fit array's
            # memory, which the caller can overwrite at any time.
            source = getattr(self, "_fit_source", None)
            X = FitSource.validated(source, lambda X: validate_query_data(self, X))
            vectors, ids = self._prepare(X), source.ids
        cached = getattr(self, "_exact_ref", None)
        if cached is not None and cached[0] is lists:
            return cached[1]
        reference = FlatNeighbors(metric=self.effective_metric_, n_jobs=self.n_jobs)
        reference.fit(vectors, ids=ids)
        self._exact_ref = (lists, reference)
        return reference

    # -- persistence hooks -------------------------------------------------
    def _upgrade_state(self, state: dict, layout: int) -> dict:
        # Written before the fitted metric and residual flag were recorded:
        # the parameters were them.
        state.setdefault("effective_metric_", state.get("metric"))
        state.setdefault("_by_residual", state.get("by_residual"))
        # Before layout 3, inner-product cells were not lifted: they keep
        # being probed by the largest inner product, which they were built for.
        state.setdefault("_ip_lift", None)
        # Before layout 4 the stored vectors were float32.
        state.setdefault("_vector_offset", None)
        state.setdefault("_vector_scale", None)
        return state

    def _check_state(self) -> None:
        # The fitted sizes come from the arrays, not from the parameters,
        # which set_params may have changed since fit.
        name = "IVFPQNeighbors"
        metric = getattr(self, "effective_metric_", self.metric)
        if metric not in METRICS:
            raise ValueError(f"Corrupted {name} state: metric {metric!r}.")
        nlist, ksub = IVFPQCodec.check_state(
            name,
            self.cluster_centers_,
            self.pq_codebooks_,
            self._center_sqnorms,
            d=self.n_features_in_,
            M=self.n_subquantizers_,
            lift=self._ip_lift,
            metric=metric,
        )
        store = self._store
        ScalarQuantizer.check_state(
            name,
            store.get("vectors") if isinstance(store, dict) else None,
            self._vector_offset,
            self._vector_scale,
            d=self.n_features_in_,
        )
        InvertedLists.check_state(
            name,
            store,
            n=self.n_samples_fit_,
            nlist=nlist,
            code_size=self.n_subquantizers_,
            ksub=ksub,
            d=self.n_features_in_,
        )
        self._check_calibration(name, store)

    def _check_calibration(self, name: str, store) -> None:
        attributes = ("nprobe_", "refine_factor_", "calibration_recall_")
        present = [hasattr(self, a) for a in (*attributes, "calibration_results_")]
        if not any(present):
            return
        if not all(present):
            raise ValueError(
                f"Corrupted {name} state: a calibration needs nprobe_, "
                "refine_factor_, calibration_recall_ and calibration_results_."
            )
        vectors = store.get("vectors") if isinstance(store, dict) else store.vectors
        refine_factor = self.refine_factor_
        if self.nprobe_ < 1 or (refine_factor is not None and refine_factor < 1):
            raise ValueError(
                f"Corrupted {name} state: nprobe_ = {self.nprobe_} and "
                f"refine_factor_ = {refine_factor} must be >= 1."
            )
        if refine_factor is not None and vectors is None:
            raise ValueError(
                f"Corrupted {name} state: refine_factor_ = {refine_factor} but "
                "no vectors are stored to re-rank."
            )
        if not 0.0 <= self.calibration_recall_ <= 1.0:
            raise ValueError(
                f"Corrupted {name} state: calibration_recall_ = "
                f"{self.calibration_recall_} is not in [0, 1]."
            )
        lengths = {len(np.ravel(v)) for v in self.calibration_results_.values()}
        if len(lengths) != 1 or any(
            np.ndim(v) != 1 for v in self.calibration_results_.values()
        ):
            raise ValueError(
                f"Corrupted {name} state: calibration_results_ must hold 1-d "
                "arrays of one length."
            )

    def _derive_tables(self) -> None:
        # A loaded state holds the lists as plain arrays (to_state's dict).
        if isinstance(self._store, dict):
            vectors, sq = self._store["vectors"], None
            if vectors is not None:
                sq = ScalarQuantizer.of_stored(
                    vectors, self._vector_offset, self._vector_scale
                )
            self._store = InvertedLists.from_state(self._store, sq)
        self._codec = self._make_codec()

    # -- hooks of NeighborsBase -------------------------------------------
    def _describe(self, store: InvertedLists) -> list[str]:
        lines = self._codec.describe(store)
        if hasattr(self, "nprobe_"):
            lines.append(
                f"  search: nprobe={self.nprobe_}, refine_factor="
                f"{self.refine_factor_}, chosen at fit for a target recall "
                f"(recall@{self.n_neighbors} {self.calibration_recall_:.4f} "
                "on held-out rows)"
            )
        return lines

    def _prepare_queries(self, X: np.ndarray) -> np.ndarray:
        return self._prepare(X)

    def _indexed_queries(self, store: InvertedLists, positions: np.ndarray):
        # The stored vectors when kept, else the reconstructions from the codes.
        if store.vectors is not None:
            return store.decoded_vectors(positions)
        return self._codec.decode(store.cells_of(positions), store.codes[positions])

    def _radius_search(self, store: InvertedLists, X: np.ndarray, radius: float):
        return self._codec.radius_search(
            store,
            X,
            radius,
            nprobe=self._search_settings()[0],
            n_threads=effective_n_threads(self.n_jobs),
        )

    def _search(
        self, store: InvertedLists, X: np.ndarray, n_neighbors: int, allowed=None
    ):
        nprobe, refine_factor = self._search_settings()
        return self._codec.search(
            store,
            X,
            n_neighbors,
            nprobe=nprobe,
            refine_factor=refine_factor,
            n_threads=effective_n_threads(self.n_jobs),
            allowed=allowed,
        )
